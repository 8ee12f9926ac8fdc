"""Records seen quarantined night after night: the stuck-quarantine alarm.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

Per system, record type and pseudonym (never a value): the reason's category, the first and the
last night (a run's as-of date) and run that saw the record quarantined, how many nights, and the
last run that saw it. Each nightly plan step replaces its system's set; the report counts the
records seen on more than the policy's ``quarantine_alarm_after`` nights. A ledger from before
this revision starts counting on its next run.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "quarantine_seen",
        sa.Column("system", sa.String(20), primary_key=True),
        sa.Column("record_type", sa.String(40), primary_key=True),
        sa.Column("record_key", sa.String(64), primary_key=True),
        sa.Column("reason", sa.String(100), nullable=False),
        sa.Column("first_night", sa.Date, nullable=False),
        sa.Column("last_night", sa.Date, nullable=False),
        sa.Column("nights", sa.Integer, nullable=False),
        sa.Column("first_run_id", sa.String(250), nullable=False),
        sa.Column("last_run_id", sa.String(250), nullable=False),
        sa.Column("seen_run_id", sa.String(250), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("quarantine_seen")
