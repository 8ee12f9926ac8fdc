"""Writing the synthetic CRM: bulk insert of column arrays (``COPY`` on PostgreSQL with foreign
keys and secondary indexes dropped during the load, ``executemany`` elsewhere) and the numpy
helpers that build text columns."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import sqlalchemy as sa

from retention.systems.crm import schema


class Writer:
    """Bulk insert of column arrays: COPY on PostgreSQL, executemany elsewhere."""

    def __init__(self, conn: sa.Connection):
        self.conn = conn
        self.pg = conn.dialect.name == "postgresql"
        self.counts: dict[str, int] = {}
        self._fks: list[tuple[str, str, list[str], str, list[str]]] = []
        self._indexes: list[sa.Index] = []
        if self.pg:
            conn.exec_driver_sql("SET LOCAL TIME ZONE 'UTC'")  # naive timestamps below are UTC
            self._drop_constraints()

    def _drop_constraints(self) -> None:
        """Bulk-load practice: drop foreign keys and secondary indexes of the (empty) tables,
        recreate them after the load (``finish``); one validation pass instead of per-row checks."""
        q = self.conn.dialect.identifier_preparer.quote
        insp = sa.inspect(self.conn)
        for t in schema.metadata.tables.values():
            for fk in insp.get_foreign_keys(t.name):
                self._fks.append(
                    (t.name, fk["name"], fk["constrained_columns"], fk["referred_table"], fk["referred_columns"])
                )
            present = {ix["name"] for ix in insp.get_indexes(t.name)}
            self._indexes += [ix for ix in t.indexes if ix.name in present]
        for table, name, *_ in self._fks:
            self.conn.exec_driver_sql(f"ALTER TABLE {q(table)} DROP CONSTRAINT {q(name)}")
        for ix in self._indexes:
            self.conn.exec_driver_sql(f"DROP INDEX {q(ix.name)}")

    def write(self, table: str, cols: dict[str, Any]) -> None:
        names = list(cols)
        n = len(cols[names[0]]) if names else 0
        if n == 0:
            return
        if self.pg:
            # Every non-null value quoted, NULL as an unquoted empty field: PostgreSQL's CSV
            # format then tells NULL from the empty string.
            buf = io.BytesIO()
            pacsv.write_csv(
                pa.table({k: _arrow(v) for k, v in cols.items()}),
                buf,
                pacsv.WriteOptions(include_header=False, quoting_style="all_valid"),
            )
            buf.seek(0)
            cur = self.conn.connection.cursor()
            try:
                cur.copy_expert(f"COPY {table} ({', '.join(names)}) FROM STDIN WITH (FORMAT csv)", buf)
            finally:
                cur.close()
        else:
            lists = [_pylist(cols[k]) for k in names]
            sql = f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
            self.conn.exec_driver_sql(sql, list(zip(*lists, strict=True)))
        self.counts[table] = self.counts.get(table, 0) + n

    def ts(self, epoch_s: np.ndarray) -> np.ndarray:
        """Epoch seconds → timestamp text as each backend stores it (UTC)."""
        s = np.datetime_as_string(np.asarray(epoch_s, dtype="int64").astype("datetime64[s]"), unit="s")
        if self.pg or s.size == 0:
            return s
        return concat(np.char.replace(s, "T", " "), ".000000")

    def finish(self) -> None:
        if self.pg:
            q = self.conn.dialect.identifier_preparer.quote
            for ix in self._indexes:
                ix.create(self.conn)
            for table, name, cols, ref, ref_cols in self._fks:
                self.conn.exec_driver_sql(
                    f"ALTER TABLE {q(table)} ADD CONSTRAINT {q(name)} FOREIGN KEY "
                    f"({', '.join(map(q, cols))}) REFERENCES {q(ref)} ({', '.join(map(q, ref_cols))})"
                )
            for t in schema.metadata.tables:
                self.conn.exec_driver_sql(
                    f"SELECT setval(pg_get_serial_sequence('{t}', 'id'), "
                    f"COALESCE((SELECT MAX(id) FROM {t}), 0) + 1, false)"
                )


def _arrow(v: Any) -> pa.Array:
    if isinstance(v, np.ndarray) and v.dtype != object:
        return pa.array(v)
    return pa.array(list(v))


def _pylist(v: Any) -> list:
    if isinstance(v, np.ndarray):
        if v.dtype == bool:
            return v.astype(int).tolist()
        return v.tolist()
    return [int(x) if isinstance(x, (bool, np.bool_)) else x for x in v]


def concat(*parts: Any) -> np.ndarray:
    """Element-wise string concatenation of arrays and scalars (empty arrays allowed, which
    numpy's own string functions reject)."""
    arrays = [p for p in parts if isinstance(p, np.ndarray)]
    n = len(arrays[0]) if arrays else 1
    if n == 0:
        return np.array([], dtype=str)
    out = np.full(n, "", dtype=str)
    for p in parts:
        out = np.strings.add(out, p.astype(str) if isinstance(p, np.ndarray) else str(p))
    return out


def zero_fill(a: np.ndarray, width: int) -> np.ndarray:
    return np.char.zfill(a.astype(str), width) if a.size else a.astype(str)


def date_text(d: np.ndarray) -> np.ndarray:
    return np.datetime_as_string(np.asarray(d, dtype="datetime64[D]"), unit="D")


def with_nulls(values: np.ndarray, null: np.ndarray) -> np.ndarray:
    out = values.astype(object)
    out[null] = None
    return out
