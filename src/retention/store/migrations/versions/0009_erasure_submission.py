"""Batches handed to a system whose outcomes are not booked yet.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04

One row per destructive batch, written and committed right before the batch goes to its
system: the run, system and record type, and the batch's record keys (pseudonyms, as a JSON
array). It replaces marking each of the batch's ledger entries ``submitted`` one by one (an
UPDATE of every entry, as costly as booking the outcomes). An entry still ``planned`` whose key
is in a submission of its run reads as ``submitted`` (``Ledger.statuses`` and the counts). A batch's row
is deleted once its outcomes are booked (the table holds the batches in flight); a killed step
leaves its rows for its retry. Ledger entries written ``submitted`` by an earlier version keep that status.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "erasure_submission",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(250), nullable=False),
        sa.Column("system", sa.String(20), nullable=False),
        sa.Column("record_type", sa.String(40), nullable=False),
        sa.Column("record_keys", sa.Text, nullable=False),
        sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_submission_run", "erasure_submission", ["run_id", "system"])


def downgrade() -> None:
    op.drop_index("ix_submission_run", table_name="erasure_submission")
    op.drop_table("erasure_submission")
