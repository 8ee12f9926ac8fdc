"""Airflow hook for the CRM: an Airflow Connection → a ready ``CrmConnector``.

The Connection names the database:

* ``postgresql://user:pass@host:5432/dbname`` (Airflow stores it as conn_type ``postgres``),
* ``sqlite:////absolute/path/crm.db`` (conn_type ``sqlite``),
* or conn_type ``retention_crm`` with the database in the extra.

Extra fields (JSON) override or complete it::

    {"sqlalchemy_url": "postgresql+psycopg2://...",   # wins over the URI parts
     "mapping": "include/crm_mapping.yaml",            # table/column mapping (default: identity)
     "chunk_size": 50000}                              # rows per extracted frame

A relative mapping path is looked up in the working directory, then in the project root (the
directory holding ``plugins/`` and ``include/``). A ``crm`` connection without
``sqlalchemy_url`` is taken as PostgreSQL built from host/login/password/port/schema.

Nothing is read at import time; the Connection is fetched by ``get_conn()``. The database
password never appears in logs (only the dialect and host are logged).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from airflow.sdk.bases.hook import BaseHook

from retention.config import PROJECT_ROOT
from retention.systems.crm.client import CrmConnector
from retention.systems.crm.mapping import CrmMapping



class CrmHook(BaseHook):
    """Connects to the CRM database and returns a :class:`CrmConnector`."""

    conn_name_attr = "crm_conn_id"
    default_conn_name = "retention_crm"
    conn_type = "retention_crm"
    hook_name = "CRM (retention)"

    def __init__(self, crm_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.crm_conn_id = crm_conn_id
        self._engine: sa.Engine | None = None
        self._conn: Any = None

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return {
            "hidden_fields": [],
            "relabeling": {"schema": "Database"},
            "placeholders": {
                "extra": '{"sqlalchemy_url": "postgresql+psycopg2://...", '
                '"mapping": "include/crm_mapping.yaml", "chunk_size": 50000}',
            },
        }

    # -------------------------------------------------------------------------------------
    def _extra(self, conn: Any) -> dict[str, Any]:
        extra = conn.extra_dejson or {}
        if not isinstance(extra, dict):
            raise TypeError(f"connection {self.crm_conn_id!r}: extra must be a JSON object")
        return extra

    def _connection(self) -> Any:
        """The Airflow Connection, fetched once per hook."""
        if self._conn is None:
            self._conn = self.get_connection(self.crm_conn_id)
        return self._conn

    def get_sqlalchemy_url(self) -> sa.URL:
        """The database URL from the Connection (``extra.sqlalchemy_url`` wins)."""
        conn = self._connection()
        return self._url(conn, self._extra(conn))

    def _url(self, conn: Any, extra: dict[str, Any]) -> sa.URL:
        if extra.get("sqlalchemy_url"):
            return sa.make_url(str(extra["sqlalchemy_url"]))
        kind = (conn.conn_type or "").lower()
        if kind == "sqlite":
            path = conn.schema or conn.host or ""
            return sa.URL.create("sqlite", database=path or None)
        if kind in ("postgres", "postgresql", "retention_crm"):
            return sa.URL.create(
                "postgresql+psycopg2",
                username=conn.login or None,
                password=conn.password or None,
                host=conn.host or None,
                port=conn.port or None,
                database=conn.schema or None,
            )
        raise ValueError(
            f"connection {self.crm_conn_id!r}: unsupported conn_type {conn.conn_type!r}; "
            "use postgres, sqlite or crm with extra.sqlalchemy_url"
        )

    def get_engine(self) -> sa.Engine:
        if self._engine is None:
            url = self.get_sqlalchemy_url()
            kwargs: dict[str, Any] = {}
            if url.get_backend_name() != "sqlite":
                kwargs["pool_pre_ping"] = True
            self._engine = sa.create_engine(url, **kwargs)
            self.log.info("CRM connection %s: %s database", self.crm_conn_id, url.get_backend_name())
        return self._engine

    def get_mapping(self) -> CrmMapping:
        path = self._extra(self._connection()).get("mapping")
        if not path:
            return CrmMapping.default()
        return CrmMapping.load(resolve_path(str(path)))

    def get_conn(self) -> CrmConnector:
        """A connector on the Connection's database, with its mapping and chunk size."""
        extra = self._extra(self._connection())
        chunk_size = int(extra.get("chunk_size") or 50_000)
        return CrmConnector(self.get_engine(), self.get_mapping(), chunk_size=chunk_size)

    def test_connection(self) -> tuple[bool, str]:
        try:
            self.get_conn().check()
        except Exception as exc:  # noqa: BLE001 - reported to the UI, not raised
            return False, f"{type(exc).__name__}: {exc}"
        return True, "CRM database reachable and mapping matches"


def resolve_path(path: str) -> Path:
    """A mapping path as given, else relative to the project root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    candidate = PROJECT_ROOT / p
    return candidate if candidate.exists() else p
