"""The scans table: one row per (repo_id, revision, scanner_version) and its latest attempt.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "scans",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("repo_id", sa.String(512), nullable=False),
        sa.Column("revision", sa.String(128), nullable=False),
        sa.Column("scanner_version", sa.String(32), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("worker", sa.String(256)),
        sa.Column("started_at", sa.DateTime),
        sa.Column("finished_at", sa.DateTime),
        sa.Column("bytes_read", sa.Integer),
        sa.UniqueConstraint("repo_id", "revision", "scanner_version", name="uq_scans_key"),
        sa.CheckConstraint("state IN ('queued', 'running', 'succeeded', 'failed', 'refused')", name="ck_scans_state"),
    )
    op.create_index("ix_scans_state", "scans", ["state"])


def downgrade() -> None:
    op.drop_index("ix_scans_state", "scans")
    op.drop_table("scans")
