"""The kind of a refusal, beside its reason: a crawl decides what to vet again from the kind.

A refused row names why in `error` (one line for people) and, from now on, what kind of refusal it
is in `refusal` (superweight.scanner.errors.Refused.kind: unsafe, remote_code, architecture,
quantization, limit, gated, other). Rows refused before this column existed are given their kind
from the words every such reason was written with; anything else is "other".

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# (kind, LIKE pattern) in order: the first that matches an old row's error names its kind.
OLD_REASONS = (
    ("limit", "%(--max-params)%"),
    ("limit", "%(--max-cache-gb)%"),
    ("gated", "%gated%"),
    ("remote_code", "%custom code%"),
    ("unsafe", "%no safetensors weights%"),
    ("unsafe", "%only pickle weights%"),
    ("unsafe", "%only files inside the checkpoint are read%"),
    ("unsafe", "%only regular files are read%"),
    ("quantization", "%cannot dequantize%"),
    ("architecture", "%transformers%"),
    ("architecture", "%experts%"),
    ("architecture", "%MLP projection%"),
    ("architecture", "%decoder layers%"),
    ("architecture", "%tensor names%"),
)


def upgrade() -> None:
    with op.batch_alter_table("scans") as batch:
        batch.add_column(sa.Column("refusal", sa.String(32)))
    scans = sa.table("scans", sa.column("state", sa.String), sa.column("error", sa.Text),
                     sa.column("refusal", sa.String))
    refused = scans.c.state == "refused"
    for kind, pattern in OLD_REASONS:
        op.execute(scans.update().where(refused, scans.c.refusal.is_(None), scans.c.error.like(pattern))
                   .values(refusal=kind))
    op.execute(scans.update().where(refused, scans.c.refusal.is_(None)).values(refusal="other"))


def downgrade() -> None:
    with op.batch_alter_table("scans") as batch:
        batch.drop_column("refusal")
