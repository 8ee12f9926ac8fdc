"""Schema migrations of the erasure ledger: Alembic, configured in code (no alembic.ini).

``Ledger(...)`` calls :func:`upgrade_to_head` when it opens a ledger: one query when the
ledger is already at the newest revision; otherwise the upgrade runs in one transaction under
a lock, so that several tasks opening the same ledger at once migrate it once (PostgreSQL: a
transaction-level advisory lock; SQLite: ``BEGIN IMMEDIATE``, the database's write lock).
Whoever waited finds the ledger at head and has nothing left to do.

The revision history lives in ``versions/`` (``0001_baseline.py``, ...), the environment in
``env.py``. The version is kept in the table ``retention_ledger_version``, not Alembic's
default ``alembic_version``: a ledger pointed at a database that also holds Airflow's metadata
must not share (and overwrite) Airflow's own version table.

Adding a migration (see also ``python -m retention.store.migrations --help``)::

    python -m retention.store.migrations revision -m "what changes"
    # -> versions/0004_what_changes.py, revision "0004", revises the current head;
    #    write upgrade() with alembic.op, change the tables in ledger.py to match,
    #    and run tests/test_ledger.py (it checks that the two agree on SQLite and PostgreSQL).

Against a real ledger, the same command runs Alembic's other commands (``current``,
``history``, ``upgrade head``, ...) on ``-x url=...`` or else the configured ledger URL.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger("retention")

HERE = Path(__file__).resolve().parent
VERSION_TABLE = "retention_ledger_version"
# Key of the PostgreSQL advisory lock held by the transaction that migrates a ledger
# (the ASCII of "retledgr"; any constant other code of the database does not use).
LOCK_KEY = 0x7265746C65646772


class SchemaError(RuntimeError):
    """The ledger's schema is at a revision this code does not know (newer code migrated it)."""


def alembic_config(connection: sa.Connection | None = None) -> Config:
    """Alembic's configuration, built in code; ``connection``: the one to migrate (env.py uses it)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(HERE).replace("%", "%%"))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    cfg.set_main_option("truncate_slug_length", "40")
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


@functools.cache
def _script():
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


def head() -> str:
    """The newest revision this code knows."""
    return _script().get_current_head()


def known_revisions() -> frozenset[str]:
    return frozenset(s.revision for s in _script().walk_revisions())


def stored_versions(engine: sa.Engine) -> frozenset[str] | None:
    """The ledger's revision(s), by one query; ``None`` where it has no version table yet."""
    try:
        with engine.connect() as conn:
            return frozenset(conn.exec_driver_sql(f"SELECT version_num FROM {VERSION_TABLE}").scalars())
    except sa.exc.DBAPIError:
        # No version table (a new ledger, or one created before the migrations). A ledger that
        # cannot be reached fails again, with its own error, in upgrade().
        return None


def lock(conn: sa.Connection) -> None:
    """Begin the migration transaction on ``conn`` holding the lock that serialises migrations."""
    if conn.dialect.name == "postgresql":
        # Read committed (whatever the engine's default): each statement after the lock then
        # sees what the migration that held it before committed.
        conn.execution_options(isolation_level="READ COMMITTED")
    conn.begin()
    if conn.dialect.name == "postgresql":
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(LOCK_KEY)))
    elif conn.dialect.name == "sqlite" and not conn.connection.dbapi_connection.in_transaction:
        # The write lock now, not at the first write: a second process waits here (busy
        # timeout) instead of failing when both try to write. (An engine that emits its own
        # BEGIN, SQLAlchemy's recipe for pysqlite, is in a transaction already: not twice.)
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def upgrade(engine: sa.Engine, revision: str = "head") -> None:
    """Upgrade the ledger to ``revision`` in one transaction, under the migration lock."""
    from alembic import command

    with engine.connect() as conn:
        lock(conn)
        command.upgrade(alembic_config(conn), revision)
        conn.commit()


def upgrade_to_head(engine: sa.Engine) -> None:
    """Bring the ledger to the newest revision; one query when it is there already."""
    versions = stored_versions(engine)
    target = head()
    if versions == {target}:
        return
    unknown = (versions or frozenset()) - known_revisions()
    if unknown:
        raise SchemaError(
            f"the ledger's schema is at revision {', '.join(sorted(unknown))}, which this version of the "
            f"retention package does not know (its newest is {target}): upgrade the package"
        )
    # Alembic's own chatter ("Context impl ...", one line per step) would land on the stdout of
    # every command that opens the ledger (the CLI prints its result there); the version table
    # records the migration.
    chatter = logging.getLogger("alembic")
    level = chatter.level
    chatter.setLevel(logging.WARNING)
    try:
        upgrade(engine)
    finally:
        chatter.setLevel(level)
    log.debug("ledger schema migrated from %s to %s", ", ".join(sorted(versions)) if versions else "none", target)
