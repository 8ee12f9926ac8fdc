"""The fingerprint of the pseudonym key the ledger is written under.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

One row (id 1): an HMAC of a fixed label under the key (``config.key_fingerprint``), which
cannot give the key back, and when it was first used. Runs and the hold commands record it on
first use and refuse another key: under a new key every pseudonym in the ledger, manual holds
included, would match nothing. A ledger from before this revision gets the fingerprint of
whichever key is configured when it is next used.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "pseudonym_key",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("pseudonym_key")
