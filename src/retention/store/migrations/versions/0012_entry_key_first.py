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
view dropped around it and created again from its own stored SQL.
"""

from __future__ import annotations

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


_KEY_FIRST = ["record_key", "record_type", "system", "run_id"]
_RUN_FIRST = ["run_id", "system", "record_type", "record_key"]


def _replace(drop: tuple[str, str], unique: tuple[str, list[str]], index: tuple[str, list[str]]) -> None:
    """Drop the unique constraint and the index named in ``drop``; create ``unique`` and
    ``index`` (name, columns) in their place."""
    old_unique, old_index = drop
    if op.get_bind().dialect.name != "sqlite":
        op.create_unique_constraint(unique[0], "erasure_entry", unique[1])
        op.create_index(index[0], "erasure_entry", index[1])
        op.drop_constraint(old_unique, "erasure_entry", type_="unique")
        op.drop_index(old_index, table_name="erasure_entry")
        return
    # SQLite copies the table; the view on it goes for the while and comes back as it was.
    view = op.get_bind().exec_driver_sql("SELECT sql FROM sqlite_master WHERE type = 'view' AND name = 'erasure_ledger'").scalar_one()
    op.execute("DROP VIEW erasure_ledger")
    with op.batch_alter_table("erasure_entry", recreate="always") as batch:
        batch.drop_constraint(old_unique, type_="unique")
        batch.drop_index(old_index)
        batch.create_unique_constraint(*unique)
        batch.create_index(*index)
    op.execute(view)


def upgrade() -> None:
    _replace(("uq_ledger_run_record", "ix_ledger_record_key"), ("uq_entry_record", _KEY_FIRST), ("ix_entry_run", ["run_id", "system"]))
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE erasure_entry RESET (fillfactor)")


def downgrade() -> None:
    _replace(("uq_entry_record", "ix_entry_run"), ("uq_ledger_run_record", _RUN_FIRST), ("ix_ledger_record_key", ["record_key"]))
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE erasure_entry SET (fillfactor = 50)")
