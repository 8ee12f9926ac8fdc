"""Airflow hook for the CRM: an Airflow Connection → a ready ``CrmConnector``.

The Connection names the database:

* ``postgresql://user:pass@host:5432/dbname`` (Airflow stores it as conn_type ``postgres``),
* ``sqlite:////absolute/path/crm.db`` (conn_type ``sqlite``),
* or conn_type ``retention_crm`` with the database in the extra.

Extra fields (JSON) override or complete it::

    {"sqlalchemy_url": "postgresql+psycopg2://...",   # wins over the URI parts
     "mapping": "include/crm_mapping.yaml",            # table/column mapping (default: identity)
     "chunk_size": 50000,                              # rows per extracted frame
     "erase_connections": 2}                           # transactions side by side per erase call (PostgreSQL)

A relative mapping path is looked up in the working directory, then in the project root (the
directory holding ``plugins/`` and ``include/``). A ``retention_crm`` connection without
``sqlalchemy_url`` is taken as PostgreSQL built from host/login/password/port/schema. The URL is
built by :func:`retention.config.database_url` (as Airflow's Postgres provider builds its
``sqlalchemy_url``); the other extras are the hook's settings, never driver parameters.

Nothing is read at import time; the Connection is fetched by ``get_conn()``. The database
password never appears in logs or errors (only the dialect and host are logged).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa

from retention.config import PROJECT_ROOT, create_engine, database_url
from retention.systems.crm.client import CrmConnector
from retention.systems.crm.mapping import CrmMapping
from retention.systems.forms import CRM_CHUNK_SIZE as DEFAULT_CHUNK_SIZE
from retention.systems.forms import CRM_ERASE_CONNECTIONS as DEFAULT_ERASE_CONNECTIONS
from retention.systems.hooks import RetentionHook


class CrmHook(RetentionHook):
    """Connects to the CRM database and returns a :class:`CrmConnector`."""

    conn_name_attr = "crm_conn_id"
    default_conn_name = "retention_crm"
    conn_type = "retention_crm"
    hook_name = "CRM (retention)"
    role = "the CRM database"
    test_ok_message = "CRM database reachable and mapping matches"
    crm_conn_id: str

    def __init__(self, crm_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(crm_conn_id, **kwargs)
        self._engine: sa.Engine | None = None

    # -------------------------------------------------------------------------------------
    def get_sqlalchemy_url(self) -> sa.URL:
        """The database URL from the Connection (``extra.sqlalchemy_url`` wins)."""
        return database_url(
            self.connection,
            conn_id=self.crm_conn_id,
            extra=self.extras,
            postgres_driver="postgresql+psycopg2",
            postgres_types=(self.conn_type,),
        )

    def get_engine(self) -> sa.Engine:
        if self._engine is None:
            url = self.get_sqlalchemy_url()
            kwargs: dict[str, Any] = {}
            if url.get_backend_name() != "sqlite":
                kwargs["pool_pre_ping"] = True
            # Failures to connect are one line naming this Connection, never the URL or password.
            self._engine = create_engine(url, f"connection {self.crm_conn_id!r} ({self.role})", **kwargs)
            self.log.info("CRM connection %s: %s database", self.crm_conn_id, url.get_backend_name())
        return self._engine

    def get_mapping(self) -> CrmMapping:
        path = self.extra_option("mapping", str)
        if not path:
            return CrmMapping.default()
        return CrmMapping.load(resolve_path(path))

    def create_conn(self) -> CrmConnector:
        chunk_size = self.extra_option("chunk_size", int, DEFAULT_CHUNK_SIZE, minimum=1)
        parts = self.extra_option("erase_connections", int, DEFAULT_ERASE_CONNECTIONS, minimum=1)
        return CrmConnector(self.get_engine(), self.get_mapping(), chunk_size=chunk_size, erase_connections=parts)

    def get_conn(self) -> CrmConnector:
        """A connector on the Connection's database, with its mapping and chunk size (created
        once per hook, then reused)."""
        return super().get_conn()

    def close(self) -> None:
        """Let the connector go and close the engine's pooled connections."""
        super().close()
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.dispose()

    def probe(self) -> None:
        self.get_conn().check()


def resolve_path(path: str) -> Path:
    """A mapping path as given, else relative to the project root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    candidate = PROJECT_ROOT / p
    return candidate if candidate.exists() else p
