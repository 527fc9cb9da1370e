"""Leases for concurrent crawls, and 64-bit bytes_read.

A crawl claims a model by setting lease_owner and lease_expires_at in the same conditional UPDATE
that moves it to running; another crawl may take it over only once the lease has expired (its
owner was killed). bytes_read outgrows a 32-bit integer at 2 GiB, i.e. any 1B+ model.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("scans") as batch:  # batch: SQLite rebuilds the table to alter a column
        batch.add_column(sa.Column("lease_owner", sa.String(256)))
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime))
        batch.alter_column("bytes_read", type_=sa.BigInteger, existing_type=sa.Integer)


def downgrade() -> None:
    with op.batch_alter_table("scans") as batch:
        batch.alter_column("bytes_read", type_=sa.Integer, existing_type=sa.BigInteger)
        batch.drop_column("lease_expires_at")
        batch.drop_column("lease_owner")
