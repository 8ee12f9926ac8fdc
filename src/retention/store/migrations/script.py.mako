"""${message}

Revision ID: ${up_revision}
Revises: ${down_revision | comma,n}
Create Date: ${create_date}

Runs inside the transaction that holds the migration lock (see migrations/__init__.py). Write
it for every dialect the ledger runs on (PostgreSQL and SQLite at least): inspect what is there
(sa.inspect(op.get_bind())) rather than assume, and use op.batch_alter_table to change a table
on SQLite. Never import the live tables from ledger.py: they change later, a revision must not.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
${imports if imports else ""}

revision = ${repr(up_revision)}
down_revision = ${repr(down_revision)}
branch_labels = ${repr(branch_labels)}
depends_on = ${repr(depends_on)}


def upgrade() -> None:
    ${upgrades if upgrades else "pass"}


def downgrade() -> None:
    ${downgrades if downgrades else "pass"}
