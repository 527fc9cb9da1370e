"""What each scan moved and where its time went: bytes fetched, requests, network and compute seconds.

A scan reads a Hub repo's weights by range requests (or a local checkpoint by reads), so the bytes
it fetched (each byte once when its layers fit the cache), the requests it made (the Hub limits them
per token per 5 minutes), and the seconds it waited on the network against the seconds it computed
are what an operator plans a crawl with. Rows from before have none of them (NULL).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

COLUMNS = (("bytes_fetched", sa.BigInteger), ("requests", sa.Integer), ("network_seconds", sa.Float),
           ("compute_seconds", sa.Float))


def upgrade() -> None:
    with op.batch_alter_table("scans") as batch:
        for name, kind in COLUMNS:
            batch.add_column(sa.Column(name, kind))


def downgrade() -> None:
    with op.batch_alter_table("scans") as batch:
        for name, _ in reversed(COLUMNS):
            batch.drop_column(name)
