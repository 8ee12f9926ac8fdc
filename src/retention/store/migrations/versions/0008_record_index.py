"""The record index and each system's change-feed cursor (incremental extraction).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02

``record_index``: per system, record type and record id, the record's columns of the domain's
record schema as one JSON object (ids, statuses, clocks and flags; no names, no addresses).
``record_cursor``: per system, the adapter's opaque change-feed cursor, when it was read and when
the index was last rebuilt from a full read. A ledger from before this revision has neither: its
next night reads every record in full and builds the index.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "record_index",
        sa.Column("system", sa.String(20), primary_key=True),
        sa.Column("record_type", sa.String(40), primary_key=True),
        sa.Column("record_id", sa.String(250), primary_key=True),
        sa.Column("fields", sa.Text, nullable=False),
    )
    op.create_table(
        "record_cursor",
        sa.Column("system", sa.String(20), primary_key=True),
        sa.Column("cursor", sa.Text),
        sa.Column("read_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reconciled_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("record_cursor")
    op.drop_table("record_index")
