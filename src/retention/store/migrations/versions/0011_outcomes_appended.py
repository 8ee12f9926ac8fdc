"""Outcomes appended, not updated: ``erasure_entry`` (written ahead), ``erasure_outcome`` (how
each ended), and ``erasure_ledger`` a view of both.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05

Booking an erasure's outcome was an ``UPDATE`` of its entry: a lookup through the unique index
and a new row version, 12 s of the server's time for 834,765 entries on this project's benchmark
machine, as much as the connector's deletions. Appending the outcomes to a table with one small
index takes 3 s (measured with ``COPY`` per 50,000). So:

- the entries table (the old ``erasure_ledger``, rows and indexes kept) is ``erasure_entry``; an
  entry's own status is the one it was written with (``planned``, ``held``, ``deferred``), and
  the statuses of entries completed before this revision stay there;
- ``erasure_outcome`` gets one row per outcome booked, in the order booked (``id``): an entry
  tried again by a retry has several, the last one counts;
- ``erasure_ledger`` is a view with the old table's columns and each entry's current status
  (its last outcome, else its own), so that what reads the ledger (the report, replay, a
  person's own SQL) reads it as before.

PostgreSQL takes the last outcome with ``DISTINCT ON``; SQLite, which has no ``DISTINCT ON``,
with ``max(id)``, whose row gives the other columns of its group (documented SQLite behaviour).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None

_KEY = ("run_id", "system", "record_type", "record_key")

_LAST_OUTCOME = {
    "postgresql": (
        "SELECT DISTINCT ON (run_id, system, record_type, record_key) "
        "run_id, system, record_type, record_key, status, completed_at, detail "
        "FROM erasure_outcome ORDER BY run_id, system, record_type, record_key, id DESC"
    ),
    "sqlite": (
        "SELECT run_id, system, record_type, record_key, status, completed_at, detail, max(id) AS last_id "
        "FROM erasure_outcome GROUP BY run_id, system, record_type, record_key"
    ),
}


def view_sql(dialect: str) -> str:
    """The ``erasure_ledger`` view on ``dialect``; the code's table in ``store/ledger.py``
    describes the same columns."""
    on = " AND ".join(f"o.{c} = e.{c}" for c in _KEY)
    return (
        "CREATE VIEW erasure_ledger AS SELECT e.id, e.run_id, e.policy_version, e.system, e.record_type, "
        "e.record_key, e.rule_id, e.action, e.hold, COALESCE(o.status, e.status) AS status, e.planned_at, "
        "CASE WHEN o.status IS NULL THEN e.completed_at ELSE o.completed_at END AS completed_at, "
        "CASE WHEN o.status IS NULL THEN e.detail ELSE o.detail END AS detail "
        f"FROM erasure_entry e LEFT JOIN ({_LAST_OUTCOME[dialect]}) o ON {on}"
    )


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.rename_table("erasure_ledger", "erasure_entry")
    if dialect == "postgresql":  # the names PostgreSQL gave after the table's, as a new table would have them
        op.execute("ALTER INDEX IF EXISTS erasure_ledger_pkey RENAME TO erasure_entry_pkey")
        op.execute("ALTER SEQUENCE IF EXISTS erasure_ledger_id_seq RENAME TO erasure_entry_id_seq")
    op.create_table(
        "erasure_outcome",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(250), nullable=False),
        sa.Column("system", sa.String(20), nullable=False),
        sa.Column("record_type", sa.String(40), nullable=False),
        sa.Column("record_key", sa.String(64), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True)),
        sa.Column("detail", sa.String(200)),
    )
    # A run's outcomes (its report, its retry, its verify) without reading every run's; no
    # index on the key, which would double the cost of booking (measured: 7.3 s against 3.7 s
    # for 834,765 outcomes).
    op.create_index("ix_outcome_run", "erasure_outcome", ["run_id", "system"])
    op.execute(view_sql(dialect if dialect in _LAST_OUTCOME else "postgresql"))


def downgrade() -> None:
    # Each entry takes its current status back, then the view and the outcomes go.
    dialect = op.get_bind().dialect.name
    same = " AND ".join(f"o.{c} = erasure_entry.{c}" for c in _KEY)
    op.execute("DROP VIEW erasure_ledger")
    if dialect == "sqlite":
        op.execute(
            "UPDATE erasure_entry SET (status, completed_at, detail) = "
            f"(SELECT o.status, o.completed_at, o.detail FROM ({_LAST_OUTCOME['sqlite']}) o WHERE {same}) "
            f"WHERE EXISTS (SELECT 1 FROM erasure_outcome o WHERE {same})"
        )
    else:
        op.execute(
            "UPDATE erasure_entry SET status = o.status, completed_at = o.completed_at, detail = o.detail "
            f"FROM ({_LAST_OUTCOME['postgresql']}) o WHERE {same}"
        )
    op.drop_index("ix_outcome_run", table_name="erasure_outcome")
    op.drop_table("erasure_outcome")
    op.rename_table("erasure_entry", "erasure_ledger")
    if dialect == "postgresql":
        op.execute("ALTER INDEX IF EXISTS erasure_entry_pkey RENAME TO erasure_ledger_pkey")
        op.execute("ALTER SEQUENCE IF EXISTS erasure_entry_id_seq RENAME TO erasure_ledger_id_seq")
