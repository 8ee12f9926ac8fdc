"""Baseline: the ledger's tables as Ledger created them before migrations, where missing.

Revision ID: 0001
Revises:
Create Date: 2026-05-01

A ledger created by ``metadata.create_all`` (every version before the migrations) is adopted
as it is: tables it has are left alone with their rows, tables it lacks (``system_lock`` in
the oldest ledgers) are created. The tables are defined here, frozen, not imported from
ledger.py: later revisions change them from this starting point.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _baseline() -> sa.MetaData:
    m = sa.MetaData()
    sa.Table(
        "erasure_run",
        m,
        sa.Column("run_id", sa.String(250), primary_key=True),
        sa.Column("dag_id", sa.String(250), nullable=False),
        sa.Column("as_of", sa.DateTime(timezone=True), nullable=False),
        sa.Column("policy_version", sa.String(64), nullable=False),
        sa.Column("policy_label", sa.String(100)),
        sa.Column("dry_run", sa.Boolean, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("state", sa.String(20), nullable=False),
        sa.Column("report", sa.Text),
    )
    sa.Table(
        "erasure_ledger",
        m,
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(250), nullable=False),
        sa.Column("policy_version", sa.String(64), nullable=False),
        sa.Column("system", sa.String(20), nullable=False),
        sa.Column("record_type", sa.String(40), nullable=False),
        sa.Column("record_key", sa.String(64), nullable=False),
        sa.Column("rule_id", sa.String(60), nullable=False),
        sa.Column("action", sa.String(20), nullable=False),
        sa.Column("hold", sa.String(200)),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("planned_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True)),
        sa.Column("detail", sa.String(200)),
        sa.UniqueConstraint("run_id", "system", "record_type", "record_key", name="uq_ledger_run_record"),
        sa.Index("ix_ledger_record_key", "record_key"),
        # A new ledger gets the current physical design at once (0002 brings old ones to it).
        postgresql_with={"fillfactor": 50},
    )
    sa.Table(
        "legal_hold",
        m,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("record_type", sa.String(40), nullable=False),
        sa.Column("record_key", sa.String(64), nullable=False),
        sa.Column("reason", sa.String(200), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Index("ix_hold_key", "record_type", "record_key"),
    )
    sa.Table(
        "system_lock",
        m,
        sa.Column("system", sa.String(20), primary_key=True),
        sa.Column("run_id", sa.String(250), nullable=False),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
    )
    return m


def upgrade() -> None:
    _baseline().create_all(op.get_bind(), checkfirst=True)


def downgrade() -> None:
    raise NotImplementedError("the baseline is never dropped by a migration: the ledger is the record of erasures")
