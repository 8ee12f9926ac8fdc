"""What the CRM connector's reads and erasure share: the mapped tables and dialect-aware SQL.

Ids go to the database as one array parameter (``= ANY(:ids)`` on PostgreSQL, ``json_each`` on
SQLite), so statement text and planning do not grow with the batch; timestamps and dates are
bound in the form the stored clock columns compare with.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import sqlite3
from collections.abc import Iterator, Sequence
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from retention.systems.crm.mapping import CrmMapping, MappedTable
from retention.systems.crm.values import as_utc


class ConnectorBase:
    """The state and SQL helpers of :class:`~retention.systems.crm.client.CrmConnector`, which
    sets them up; its reads (:mod:`~retention.systems.crm.reads`) and erasure
    (:mod:`~retention.systems.crm.erasure`) build on them."""

    engine: sa.Engine
    mapping: CrmMapping
    chunk_size: int
    local_tz: ZoneInfo
    _checked: bool

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    def check(self) -> None:
        """Check the mapping against the database (raises ``MappingError``)."""
        self.mapping.check(self.engine)
        self._checked = True

    def _ensure_checked(self) -> None:
        if not self._checked:
            self.check()

    def _t(self, logical: str) -> MappedTable:
        return self.mapping[logical]

    def _in_ids(self, col: sa.ColumnElement, ids: Sequence[int], name: str) -> sa.ColumnElement:
        """``col IN ids`` as one bound parameter, whatever the number of ids."""
        if self.dialect == "postgresql" and self.engine.dialect.driver == "psycopg2":
            # An array literal of unknown type takes the column's own array type: bigint[] for
            # the reference schema (its index is used), text[] for a CRM that keeps ids as text.
            literal = "{" + ",".join(str(int(i)) for i in ids) + "}"
            return col == sa.any_(sa.bindparam(name, literal, type_=sa.types.NullType()))
        if self.dialect == "postgresql":
            return col == sa.any_(sa.bindparam(name, list(ids), type_=postgresql.ARRAY(sa.BigInteger)))
        if self.dialect == "sqlite":
            # Cast: json_each's numbers would not equal the ids of a column kept as text; a cast
            # value takes the column's affinity (and its index is still used).
            each = sa.select(sa.literal_column("CAST(value AS INTEGER)")).select_from(
                sa.func.json_each(sa.bindparam(name, json.dumps(list(ids)), type_=sa.String))
            )
            return col.in_(each.scalar_subquery())
        return col.in_(sa.bindparam(name, list(ids), expanding=True))

    @staticmethod
    @contextlib.contextmanager
    def _raw_text(conn: sa.Connection) -> Iterator[None]:
        """Text comes through as the driver finds it, even when it is not UTF-8 (a ``SQL_ASCII``
        PostgreSQL, SQLite text written as bytes): as bytes for :mod:`values` to judge per value,
        instead of one undecodable row failing the whole read (with its value in the error)."""
        raw = conn.connection.dbapi_connection
        if isinstance(raw, sqlite3.Connection):
            raw.text_factory = _text_or_bytes  # valid UTF-8 is text, as before; kept on the connection
            yield
            return
        try:
            from psycopg2 import extensions as pg_ext
        except ImportError:  # another driver decodes as it does
            pg_ext = None
        if pg_ext is None or not isinstance(raw, pg_ext.connection):
            yield
            return
        pg_ext.register_type(pg_ext.BYTES, raw)
        try:
            yield
        finally:
            pg_ext.register_type(pg_ext.UNICODE, raw)

    def _ts_param(self, name: str, value: dt.datetime) -> sa.BindParameter:
        """A UTC timestamp parameter comparable with the stored clock columns."""
        value = as_utc(value)
        if self.dialect == "sqlite":  # stored as naive UTC text, compared lexically
            return sa.bindparam(name, value.strftime("%Y-%m-%d %H:%M:%S.%f"), type_=sa.String)
        return sa.bindparam(name, value, type_=sa.DateTime(timezone=True))

    def _date_param(self, name: str, value: dt.date) -> sa.BindParameter:
        if self.dialect == "sqlite":
            return sa.bindparam(name, value.isoformat(), type_=sa.String)
        return sa.bindparam(name, value, type_=sa.Date)

    def _live_hold(self, h, record_type: str, now_param: sa.BindParameter) -> sa.ColumnElement:
        return sa.and_(
            h.c.record_type == sa.literal(record_type, sa.String),
            sa.or_(h.c.expires_at.is_(None), h.c.expires_at > now_param),
        )


def _text_or_bytes(value: bytes) -> str | bytes:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value
