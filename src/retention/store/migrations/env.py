"""Alembic environment of the erasure ledger (run by Alembic; configured in __init__.py).

Programmatic use (``Ledger``, ``migrations.upgrade``) hands in a connection that already holds
the migration lock inside its transaction: the migrations run in that transaction and the
caller commits. From the command line (``python -m retention.store.migrations``) this opens
the ledger of ``-x url=...`` (else the configured one), takes the same lock and commits.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from retention.store import migrations
from retention.store.ledger import metadata


def run_migrations(connection: sa.Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=migrations.VERSION_TABLE,
        compare_type=True,
        # SQLite changes tables by copying them (op.batch_alter_table); autogenerate writes that.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


def main() -> None:
    if context.is_offline_mode():
        raise SystemExit("the ledger's migrations inspect the database they change: no offline (--sql) mode")
    connection = context.config.attributes.get("connection")
    if connection is not None:
        run_migrations(connection)
        return
    url = context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        from retention import config

        url = config.ledger_url()
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            migrations.lock(conn)
            run_migrations(conn)
            conn.commit()
    finally:
        engine.dispose()


main()
