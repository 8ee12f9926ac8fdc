"""Entries written ahead at less cost: one index on the key instead of two, full pages.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05

The write-ahead of a million-row plan is a ``COPY`` into ``erasure_entry`` beside the erase
loop, and what it costs the server slows the loop's own batches (on the project's 2-core
benchmark machine). Its indexes were most of that cost: 834,765 entries took 10 to 12 s with the
unique index on (run, system, record type, key) and the index on the key, 3.4 s with the primary
key alone. So:

- the unique constraint puts the key first, ``uq_entry_record`` (record_key, record_type,
  system, run_id): it still refuses an entry twice, and it serves what the key index served (an
  erasure looked up by key across runs, ``carried_over``) and a run's entries of given keys
  (``statuses_of``); ``ix_ledger_record_key`` goes;
- ``ix_entry_run`` (run_id, system) serves what reads a run as a whole (its statuses, counts,
  report, retry). Every entry of a run has the same pair, which PostgreSQL's B-tree
  deduplication stores once per page, and the pair only grows at the end of the index;
- on PostgreSQL the pages are filled again (fillfactor back to the default, 100): they were
  half full (revision 0002) for updates in place, and since revision 0011 an entry is never
  updated. Pages already written keep their free space.

Measured with ``COPY`` per 50,000 (the write-ahead's own way) into the table alone: 6.8 to 7.0 s
against 10.2 to 10.5 s before.

SQLite cannot drop a constraint in place: the table is copied (Alembic's batch mode), with the
view dropped around it.
"""

from __future__ import annotations

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def _view(dialect: str) -> str:
    # The view of revision 0011, as it stands (revisions do not import each other).
    key = ("run_id", "system", "record_type", "record_key")
    last = {
        "postgresql": (
            "SELECT DISTINCT ON (run_id, system, record_type, record_key) "
            "run_id, system, record_type, record_key, status, completed_at, detail "
            "FROM erasure_outcome ORDER BY run_id, system, record_type, record_key, id DESC"
        ),
        "sqlite": (
            "SELECT run_id, system, record_type, record_key, status, completed_at, detail, max(id) AS last_id "
            "FROM erasure_outcome GROUP BY run_id, system, record_type, record_key"
        ),
    }[dialect]
    on = " AND ".join(f"o.{c} = e.{c}" for c in key)
    return (
        "CREATE VIEW erasure_ledger AS SELECT e.id, e.run_id, e.policy_version, e.system, e.record_type, "
        "e.record_key, e.rule_id, e.action, e.hold, COALESCE(o.status, e.status) AS status, e.planned_at, "
        "CASE WHEN o.status IS NULL THEN e.completed_at ELSE o.completed_at END AS completed_at, "
        "CASE WHEN o.status IS NULL THEN e.detail ELSE o.detail END AS detail "
        f"FROM erasure_entry e LEFT JOIN ({last}) o ON {on}"
    )


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP VIEW erasure_ledger")
        with op.batch_alter_table("erasure_entry", recreate="always") as batch:
            batch.drop_constraint("uq_ledger_run_record", type_="unique")
            batch.drop_index("ix_ledger_record_key")
            batch.create_unique_constraint("uq_entry_record", ["record_key", "record_type", "system", "run_id"])
            batch.create_index("ix_entry_run", ["run_id", "system"])
        op.execute(_view("sqlite"))
        return
    op.create_unique_constraint("uq_entry_record", "erasure_entry", ["record_key", "record_type", "system", "run_id"])
    op.create_index("ix_entry_run", "erasure_entry", ["run_id", "system"])
    op.drop_constraint("uq_ledger_run_record", "erasure_entry", type_="unique")
    op.drop_index("ix_ledger_record_key", table_name="erasure_entry")
    op.execute("ALTER TABLE erasure_entry RESET (fillfactor)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP VIEW erasure_ledger")
        with op.batch_alter_table("erasure_entry", recreate="always") as batch:
            batch.drop_constraint("uq_entry_record", type_="unique")
            batch.drop_index("ix_entry_run")
            batch.create_unique_constraint("uq_ledger_run_record", ["run_id", "system", "record_type", "record_key"])
            batch.create_index("ix_ledger_record_key", ["record_key"])
        op.execute(_view("sqlite"))
        return
    op.create_unique_constraint("uq_ledger_run_record", "erasure_entry", ["run_id", "system", "record_type", "record_key"])
    op.create_index("ix_ledger_record_key", "erasure_entry", ["record_key"])
    op.drop_constraint("uq_entry_record", "erasure_entry", type_="unique")
    op.drop_index("ix_entry_run", table_name="erasure_entry")
    op.execute("ALTER TABLE erasure_entry SET (fillfactor = 50)")
