"""The record index: per system, every record as the last extract left it, kept in the ledger
database, and the system's change-feed cursor.

A night that reads only what changed (``systems.base.ChangeFeed``) applies the changes here and
then plans from the whole index, so that its plan is the plan a full read gives. A full read
(the first night, a due or requested reconciliation) rebuilds the index and counts the drift: the
rows the index lacked, held in excess, or held otherwise than the system does.

What a row holds: the record's id and its columns of the domain's record schema
(``domain.records``: ids, statuses, clocks, flags; never a name or an address), as one JSON object
with the clocks as integer microseconds (exact, whatever the year). Any other column of a frame is
refused. Set-based and in bounded memory: frames go into a temporary table a chunk at a time
(COPY on PostgreSQL), the last word on each record is kept, and one statement applies them; the
index is read back a chunk at a time.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from retention.domain.conform import conform
from retention.domain.records import DTYPES, KEY, RECORD_TYPES, TIME, UNREADABLE
from retention.store.ledger import record_cursor, record_index

CHUNK_ROWS = 50_000
GONE_SUFFIX = ":gone"

# What one extract brought (``fields`` NULL: gone), before it is applied: one row per record and
# chunk (``chunk``: the flush it came in; within a chunk the last word is kept before writing).
# No key, so that writing it is a plain append (COPY on PostgreSQL); ``finish`` keeps each
# record's last chunk. A temporary table of the updating connection; not part of the schema.
_incoming = sa.Table(
    "record_index_incoming",
    sa.MetaData(),
    sa.Column("chunk", sa.Integer, nullable=False),
    sa.Column("record_type", sa.String(40), nullable=False),
    sa.Column("record_id", sa.String(250), nullable=False),
    sa.Column("fields", sa.Text),
    prefixes=["TEMPORARY"],
)

@dataclass(frozen=True)
class FeedState:
    """Where a system's change feed stands."""

    cursor: str | None
    read_at: datetime
    reconciled_at: datetime


def _columns(record_type: str) -> dict[str, str]:
    return dict(RECORD_TYPES[record_type].extracted_columns)


def fields_of(record_type: str, frame: pd.DataFrame) -> list[str]:
    """Each row's schema columns as one JSON text (keys in the schema's order; clocks as integer
    microseconds since 1970, null when missing; ``unreadable`` only where a row has it). A frame
    column outside the schema is refused: the index never stores what the schema does not name."""
    columns = _columns(record_type)
    _refuse_other_columns(record_type, frame)
    frame = conform(record_type, frame)
    out = {}
    for column, kind in columns.items():
        s = frame[column]
        if kind == TIME:
            ints = s.to_numpy(dtype="datetime64[us]").view("int64")
            s = pd.Series(ints, index=frame.index, dtype="Int64").mask(s.isna())
        out[column] = s
    lines = pd.DataFrame(out, index=frame.index).to_json(orient="records", lines=True)
    texts = lines.split("\n")[: len(frame)] if len(frame) else []
    if UNREADABLE in frame:
        flagged = frame[UNREADABLE].astype("string")
        texts = [
            t if pd.isna(u) else f'{t[:-1]},"{UNREADABLE}":{json.dumps(str(u))}}}'
            for t, u in zip(texts, flagged.tolist(), strict=True)
        ]
    return texts


def _refuse_other_columns(record_type: str, frame: pd.DataFrame) -> None:
    extra = sorted(set(frame.columns) - {"record_id", UNREADABLE, *_columns(record_type)})
    if extra:
        raise ValueError(f"{record_type}: column(s) {', '.join(extra)} are not in the record schema; not indexed")


def frame_of(record_type: str, ids: list[str], fields: list[str]) -> pd.DataFrame:
    """The frame ``fields_of`` was made from: record_id and the schema's columns, conformed."""
    columns = _columns(record_type)
    rows = [json.loads(f) for f in fields]
    raw: dict[str, object] = {"record_id": pd.array(ids, dtype=DTYPES[KEY])}
    for column, kind in columns.items():
        values = [r.get(column) for r in rows]
        if kind == TIME:
            ints = np.array([np.iinfo(np.int64).min if v is None else int(v) for v in values], dtype=np.int64)
            raw[column] = pd.Series(ints.view("datetime64[us]")).dt.tz_localize(UTC)
        else:
            raw[column] = pd.Series(values, dtype=object)
    if any(UNREADABLE in r for r in rows):
        raw[UNREADABLE] = pd.array([r.get(UNREADABLE) for r in rows], dtype="string")
    return conform(record_type, pd.DataFrame(raw))


class RecordIndex:
    """One system's record index and feed cursor in the ledger database (``engine``)."""

    def __init__(self, engine: sa.Engine, system: str):
        self.engine = engine
        self.system = system
        self._postgres = engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg2"

    def state(self) -> FeedState | None:
        t = record_cursor
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(t.c.cursor, t.c.read_at, t.c.reconciled_at).where(t.c.system == self.system)).first()
        if row is None:
            return None
        return FeedState(row[0], _aware(row[1]), _aware(row[2]))

    def counts(self) -> dict[str, int]:
        t = record_index
        q = sa.select(t.c.record_type, sa.func.count()).where(t.c.system == self.system).group_by(t.c.record_type)
        with self.engine.connect() as conn:
            return {rt: int(n) for rt, n in conn.execute(q)}

    def frames(self, record_type: str, chunk_rows: int = CHUNK_ROWS) -> Iterator[pd.DataFrame]:
        """The index's records of ``record_type``, by id, a chunk at a time (streamed)."""
        t = record_index
        q = (
            sa.select(t.c.record_id, t.c.fields)
            .where(t.c.system == self.system, t.c.record_type == record_type)
            .order_by(t.c.record_id)
        )
        with self.engine.connect() as conn:
            result = conn.execution_options(stream_results=True, yield_per=chunk_rows).execute(q)
            for part in result.partitions():
                yield frame_of(record_type, [r[0] for r in part], [r[1] for r in part])

    def forget(self, record_type: str, record_ids: list[str]) -> int:
        """Drop records known gone for good (erased and verified by a run): a feed may never say so."""
        t = record_index
        dropped = 0
        with self.engine.begin() as conn:
            for i in range(0, len(record_ids), 900):
                chunk = [str(x) for x in record_ids[i : i + 900]]
                dropped += conn.execute(
                    t.delete().where(t.c.system == self.system, t.c.record_type == record_type, t.c.record_id.in_(chunk))
                ).rowcount
        return dropped

    @contextmanager
    def update(self, *, full: bool) -> Iterator[IndexUpdate]:
        """An update of the index, applied by ``IndexUpdate.finish`` in the same transaction as
        the new cursor; nothing changes when the block raises (the old cursor stays). ``full``:
        what is written is every record of the system, and the index is rebuilt from it."""
        with self.engine.begin() as conn:
            # A failed update rolls back; where a temporary table outlives that (SQLite's DDL is
            # not transactional under pysqlite), the next update starts from an empty one.
            _incoming.drop(conn, checkfirst=True)
            _incoming.create(conn)
            update = IndexUpdate(self, conn, full=full)
            yield update
            if not update.finished:
                raise RuntimeError("record index update left without finish(): nothing applied")
            _incoming.drop(conn)


class IndexUpdate:
    """Frames of one extract on their way into the index (see ``RecordIndex.update``)."""

    def __init__(self, index: RecordIndex, conn: sa.Connection, *, full: bool):
        self.index = index
        self.conn = conn
        self.full = full
        self.finished = False
        # Frames (and gone ids) gathered per record type until a chunk's worth: converting and
        # writing 50,000 rows at once costs a fraction of doing it for every page of 1,000.
        self._pending: dict[str, list[pd.DataFrame | list[str]]] = {}
        self._pending_rows: dict[str, int] = {}
        self._chunks = 0

    def write(self, record_type: str, frame: pd.DataFrame) -> None:
        """A frame as an adapter writes it: records of ``record_type``, or ``<type>:gone`` with
        a ``record_id`` column of records the system reports gone."""
        if record_type.endswith(GONE_SUFFIX):
            base = record_type[: -len(GONE_SUFFIX)]
            self._add(base, [str(i) for i in frame["record_id"].astype("string").tolist()], len(frame))
            return
        if record_type not in RECORD_TYPES or RECORD_TYPES[record_type].system != self.index.system:
            raise ValueError(f"{record_type!r} is no record type of {self.index.system}")
        if not len(frame):
            return
        _refuse_other_columns(record_type, frame)  # at once, not when the chunk is written
        self._add(record_type, frame, len(frame))

    def _add(self, record_type: str, part: pd.DataFrame | list[str], rows: int) -> None:
        self._pending.setdefault(record_type, []).append(part)
        self._pending_rows[record_type] = self._pending_rows.get(record_type, 0) + rows
        if self._pending_rows[record_type] >= CHUNK_ROWS:
            self._flush(record_type)

    def _rows(self, record_type: str, parts: list[pd.DataFrame | list[str]]) -> Iterator[tuple[str, str | None]]:
        """The parts' rows in the order they came: frames converted a run of them at a time."""
        frames: list[pd.DataFrame] = []

        def converted() -> Iterator[tuple[str, str | None]]:
            if frames:
                frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
                ids = [str(i) for i in frame["record_id"].astype("string").tolist()]
                yield from zip(ids, fields_of(record_type, frame), strict=True)
                frames.clear()

        for part in parts:
            if isinstance(part, pd.DataFrame):
                frames.append(part)
            else:
                yield from converted()
                yield from ((i, None) for i in part)
        yield from converted()

    def _flush(self, record_type: str) -> None:
        parts = self._pending.pop(record_type, [])
        self._pending_rows.pop(record_type, None)
        if not parts:
            return
        self._chunks += 1
        chunk = self._chunks
        rows = dict(self._rows(record_type, parts)).items()  # the last word on each record within the chunk
        if self.index._postgres:
            buffer = io.StringIO()
            writer = csv.writer(buffer, lineterminator="\n")
            # In CSV an unquoted empty field is NULL (gone); JSON texts are never empty.
            writer.writerows((chunk, record_type, i, "" if f is None else f) for i, f in rows)
            buffer.seek(0)
            with self.conn.connection.dbapi_connection.cursor() as cursor:
                cursor.copy_expert(
                    f"COPY {_incoming.name} (chunk, record_type, record_id, fields) FROM STDIN WITH (FORMAT csv)", buffer
                )
        else:
            self.conn.execute(
                _incoming.insert(),
                [{"chunk": chunk, "record_type": record_type, "record_id": i, "fields": f} for i, f in rows],
            )

    def _keep_the_last_word(self) -> None:
        """Leave in ``_incoming`` one row per record, the one of the last chunk that named it. A
        record read twice in one extract is rare (a page boundary that moved): one aggregate
        finds none, and only records read twice are deleted from."""
        inc, conn = _incoming, self.conn
        key = [inc.c.record_type, inc.c.record_id]
        twice = conn.execute(
            sa.select(*key, sa.func.max(inc.c.chunk)).group_by(*key).having(sa.func.count() > 1)
        ).all()
        for part in range(0, len(twice), 500):
            conn.execute(inc.delete().where(sa.or_(*(
                sa.and_(inc.c.record_type == rt, inc.c.record_id == rid, inc.c.chunk < last)
                for rt, rid, last in twice[part : part + 500]
            ))))
        # The comparisons and the upsert join it with the index by record: SQLite needs an index
        # to do that well; PostgreSQL needs the table's size (temporary tables are never analysed).
        if conn.dialect.name == "sqlite":
            conn.execute(sa.text(f"CREATE UNIQUE INDEX {inc.name}_key ON {inc.name} (record_type, record_id)"))
        else:
            conn.execute(sa.text(f"ANALYZE {inc.name}"))

    def finish(self, cursor: str | None, read_at: datetime) -> dict:
        """Apply what was written and store ``cursor``; returns the counts per record type:
        ``changed`` and ``gone`` (an incremental update) or ``drift`` (a full one: index rows
        ``missing``, ``extra`` and ``different`` from what the full read found)."""
        for record_type in list(self._pending):
            self._flush(record_type)
        self._keep_the_last_word()
        conn, system, t, new = self.conn, self.index.system, record_index, _incoming
        mine = t.c.system == system
        joined = sa.and_(mine, t.c.record_type == new.c.record_type, t.c.record_id == new.c.record_id)
        out: dict = {}
        if self.full:
            present = new.c.fields.is_not(None)
            missing = _per_type(conn, sa.select(new.c.record_type, sa.func.count()).where(
                present, ~sa.exists().where(joined)).group_by(new.c.record_type))
            different = _per_type(conn, sa.select(new.c.record_type, sa.func.count()).select_from(
                new.join(t, joined)).where(present, t.c.fields != new.c.fields).group_by(new.c.record_type))
            extra = _per_type(conn, sa.select(t.c.record_type, sa.func.count()).where(
                mine, ~sa.exists().where(joined, present)).group_by(t.c.record_type))
            kinds = sorted(set(missing) | set(different) | set(extra))
            out["drift"] = {
                rt: {"missing": missing.get(rt, 0), "extra": extra.get(rt, 0), "different": different.get(rt, 0)}
                for rt in kinds
            }
            # The index becomes what was read by changing only where it differs: a reconciliation
            # with little drift writes little (the first read inserts everything).
            if extra:
                conn.execute(t.delete().where(mine, ~sa.exists().where(joined, present)))
            if different:
                conn.execute(t.update().values(fields=new.c.fields).where(joined, present, t.c.fields != new.c.fields))
            if missing:
                conn.execute(t.insert().from_select(
                    ["system", "record_type", "record_id", "fields"],
                    sa.select(sa.literal(system, sa.String), new.c.record_type, new.c.record_id, new.c.fields)
                    .where(present, ~sa.exists().where(joined)),
                ))
            out["records"] = _per_type(conn, sa.select(new.c.record_type, sa.func.count()).where(present).group_by(new.c.record_type))
        else:
            out["changed"] = _per_type(conn, sa.select(new.c.record_type, sa.func.count()).where(
                new.c.fields.is_not(None)).group_by(new.c.record_type))
            out["gone"] = _per_type(conn, sa.select(new.c.record_type, sa.func.count()).where(
                new.c.fields.is_(None)).group_by(new.c.record_type))
            gone = sa.select(new.c.record_id).where(
                new.c.fields.is_(None), new.c.record_type == t.c.record_type, new.c.record_id == t.c.record_id)
            conn.execute(t.delete().where(mine, sa.exists(gone)))
            insert = postgresql.insert if conn.dialect.name == "postgresql" else sqlite_insert
            stmt = insert(t).from_select(
                ["system", "record_type", "record_id", "fields"],
                sa.select(sa.literal(system, sa.String), new.c.record_type, new.c.record_id, new.c.fields)
                .where(new.c.fields.is_not(None)),  # SQLite: an upsert from a SELECT needs its WHERE
            )
            conn.execute(stmt.on_conflict_do_update(
                index_elements=[t.c.system, t.c.record_type, t.c.record_id], set_={"fields": stmt.excluded.fields},
                where=t.c.fields != stmt.excluded.fields,
            ))
        self._store_cursor(cursor, read_at)
        self.finished = True
        return out

    def _store_cursor(self, cursor: str | None, read_at: datetime) -> None:
        t, system = record_cursor, self.index.system
        values = {"cursor": cursor, "read_at": read_at}
        if self.full:
            values["reconciled_at"] = read_at
        done = self.conn.execute(t.update().where(t.c.system == system).values(**values)).rowcount
        if not done:
            self.conn.execute(t.insert().values(system=system, **{"reconciled_at": read_at, **values}))


def _per_type(conn: sa.Connection, query) -> dict[str, int]:
    return {rt: int(n) for rt, n in conn.execute(query) if n}


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo else value.replace(tzinfo=UTC)
