"""Manual holds can be lifted, with the time and the reason recorded.

Revision ID: 0003
Revises: 0002
Create Date: 2026-05-01

A lift is a row of its own (``legal_hold_lift``, at most one per hold) rather than columns on
``legal_hold``: the hold's row is never changed, and code that selects ``legal_hold`` as it was
(policy preview, reading a ledger it does not migrate) keeps working on ledgers of any revision.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "legal_hold_lift",
        sa.Column("hold_id", sa.Integer, sa.ForeignKey("legal_hold.id", name="fk_hold_lift_hold"), primary_key=True),
        sa.Column("lifted_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.String(200), nullable=False),
    )


def downgrade() -> None:
    # Lifted holds are in force again: the safe direction for a ledger of erasures.
    op.drop_table("legal_hold_lift")
