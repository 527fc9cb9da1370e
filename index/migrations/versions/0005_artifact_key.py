"""The artifact joins a scan's key: two GGUF files of one Hub repo and commit are two rows.

A Hub repo of GGUF files holds one file per quantization, all at one commit; `superweight scan
--file` scans each as its own model, and the catalog keys them by (repo_id, revision,
scanner_version, artifact) since its schema 4. The ledger follows: a row's `artifact` is the GGUF
file (or, until the scan resolves it, the --file asked for), '' for a repo's own safetensors.
Rows from before take ''.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("scans") as batch:
        batch.add_column(sa.Column("artifact", sa.String(512), nullable=False, server_default=""))
        batch.drop_constraint("uq_scans_key", type_="unique")
        batch.create_unique_constraint("uq_scans_key", ["repo_id", "revision", "scanner_version", "artifact"])


def downgrade() -> None:
    """Back to one row per (repo_id, revision, scanner_version): of several, the newest row stays."""
    scans = sa.table("scans", sa.column("id", sa.Integer), sa.column("repo_id", sa.String),
                     sa.column("revision", sa.String), sa.column("scanner_version", sa.String))
    newer = scans.alias("newer")
    op.execute(scans.delete().where(sa.exists().where(
        newer.c.repo_id == scans.c.repo_id, newer.c.revision == scans.c.revision,
        newer.c.scanner_version == scans.c.scanner_version, newer.c.id > scans.c.id)))
    with op.batch_alter_table("scans") as batch:
        batch.drop_constraint("uq_scans_key", type_="unique")
        batch.create_unique_constraint("uq_scans_key", ["repo_id", "revision", "scanner_version"])
        batch.drop_column("artifact")
