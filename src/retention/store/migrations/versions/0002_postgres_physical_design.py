"""PostgreSQL: no index on status, pages half full (heap-only completions).

Revision ID: 0002
Revises: 0001
Create Date: 2026-05-01

Ledgers created before b1ae054 have ``ix_ledger_status`` and the default fillfactor (100), so
completing an entry updates an index and rarely finds room on its page. This drops the index
where it is and sets fillfactor 50; pages written from now on are half full, pages already
full stay so until the table is rewritten (VACUUM FULL, an operator's decision: it locks the
table). SQLite has no fillfactor and its old ledgers keep the index: nothing happens there.
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP INDEX IF EXISTS ix_ledger_status")
    op.execute("ALTER TABLE erasure_ledger SET (fillfactor = 50)")


def downgrade() -> None:
    pass  # the older physical design was slower, not different: nothing to undo
