"""The CRM connector's reads: frames for the rule engine, and look-ups for erasure requests.

Frames carry what the rules need and nothing else (no names, e-mail addresses, phone numbers or
addresses ever leave the database through a frame); their columns and dtypes are
``FRAME_COLUMNS`` (documented in :mod:`retention.systems.crm.client`), their values converted by
:mod:`retention.systems.crm.values`.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import sqlalchemy as sa

from retention.domain.candidates import Condition
from retention.domain.records import FLAG, KEY, SOURCE_HOLD_COLUMNS, TEXT, TIME, UNREADABLE
from retention.domain.records import RECORD_TYPES as SCHEMA
from retention.systems.crm.predicates import Column, Compiler
from retention.systems.crm.sql import ConnectorBase
from retention.systems.crm.values import TS, as_utc, distinct_ids, to_frame

# The connector's logger, whichever module of it logs (benchmarks quiet the per-batch lines by it).
log = logging.getLogger("retention.systems.crm.client")

RECORD_TYPES = (
    "crm_contact",
    "crm_event_participation",
    "crm_course_registration",
    "crm_survey_response",
    "crm_invoice",
    "crm_legal_hold",
)

#: Frame columns and dtypes per record type (``ts`` = ``datetime64[us, UTC]``).
# How the CRM's values are read, by the column types of the domain's record schema (the one
# place that says which columns a record type has): ids stay exact integers here (a record id
# is never NULL, a reference may be), and become the ledger's text keys in the adapter.
_READ_AS = {KEY: "Int64", TEXT: "str", FLAG: "bool", TIME: TS}

#: Frame columns and dtypes per record type (``ts`` = ``datetime64[us, UTC]``).
FRAME_COLUMNS: dict[str, dict[str, str]] = {
    **{
        rt: {"record_id": "int64", **{c: _READ_AS[kind] for c, kind in SCHEMA[rt].extracted_columns.items()}}
        for rt in RECORD_TYPES if rt != "crm_legal_hold"
    },
    "crm_legal_hold": {c: ("Int64" if c == "record_id" else _READ_AS[kind]) for c, kind in SOURCE_HOLD_COLUMNS.items()},
}
#: The clocks whose calendar dates are the end of their day (the record schema's ``end_of_day``).
END_OF_DAY: dict[str, tuple[str, ...]] = {rt: SCHEMA[rt].end_of_day for rt in RECORD_TYPES if rt in SCHEMA}


# Rows with unreadable values named one by one in the log, per record type and extract.
_LOGGED_ROWS = 100
# The logical table each record type is read from, and the frame columns read from another
# table or column (the rest: the record type's table, the same name).
_TABLES = {
    "crm_contact": "contact",
    "crm_event_participation": "event_participation",
    "crm_course_registration": "course_registration",
    "crm_survey_response": "survey_response",
    "crm_invoice": "invoice",
    "crm_legal_hold": "legal_hold",
}
# Frame columns the connector computes (0 or 1 whatever is stored): never unreadable.
_COMPUTED = frozenset({"membership_active", "is_customer", "has_email", "has_invoice"})
_SOURCES = {
    "crm_contact": {"membership_end": ("membership", "ends_on"), "has_email": ("contact", "email")},
    "crm_event_participation": {"membership_end": ("membership", "ends_on"), "opted_out": ("contact", "opted_out")},
}


# Rows fetched from the database at a time, each fetch made columns at once: a frame's rows as
# Python values took 50 MB more at 50,000 rows of contacts than the frame they became.
FETCH_ROWS = 10_000


def _concat(pieces: list[pd.DataFrame]) -> pd.DataFrame:
    """One frame of the pieces of a read, in order (the unreadable-value column, which only a
    piece with such a value has, comes through as <NA> on the other pieces' rows)."""
    return pieces[0] if len(pieces) == 1 else pd.concat(pieces, ignore_index=True)


@dataclass(frozen=True)
class FrameParts:
    """A record type's frame in SQL: each frame column's expression, the joined tables, the
    order, and the logical tables joined on their id (the frame's key is unique when theirs are)."""

    columns: dict[str, sa.ColumnElement]
    source: sa.FromClause
    order: sa.ColumnElement
    keyed: tuple[str, ...] = ()


class FrameReads(ConnectorBase):
    """Reading the CRM: frames of every record type, and what belongs to given contacts."""

    def iter_frames(
        self, record_type: str, *, now: dt.datetime | None = None, candidates: Condition | None = None
    ) -> Iterator[pd.DataFrame]:
        """Yield the records of ``record_type`` in frames of at most ``chunk_size`` rows; with
        ``candidates`` (the domain's condition, ``retention.domain.candidates``), only the rows
        it may be true of (compiled by :mod:`~retention.systems.crm.predicates`).

        Bounded memory: a server-side cursor on PostgreSQL, ``fetchmany`` elsewhere. Rows come
        in ascending record id (legal holds: by hold id). A table with no rows yields one empty
        frame with the documented columns and dtypes.
        """
        if record_type not in FRAME_COLUMNS:
            raise ValueError(f"unknown record type {record_type!r}; expected one of {RECORD_TYPES}")
        self._ensure_checked()
        now = as_utc(now or dt.datetime.now(dt.UTC))
        stmt = self._frame_query(record_type, now, candidates)
        columns = FRAME_COLUMNS[record_type]
        ends = END_OF_DAY.get(record_type, ())
        rows_total = 0
        chunks = 0
        unreadable = 0
        with self.engine.connect() as conn, self._raw_text(conn):
            if self.dialect == "postgresql":
                with conn.begin():
                    # A cursor reads everything: plan for total, not first-rows, cost.
                    conn.exec_driver_sql("SET LOCAL cursor_tuple_fraction = 1.0")
                    result = conn.execution_options(
                        stream_results=True, yield_per=min(self.chunk_size, FETCH_ROWS)
                    ).execute(stmt)
                    for frame in self._frames(result.fetchmany, columns, ends):
                        unreadable += self._log_unreadable(record_type, frame, rows_total, unreadable)
                        rows_total += len(frame)
                        chunks += 1
                        yield frame
            else:
                result = conn.execute(stmt)
                try:
                    for frame in self._frames(result.fetchmany, columns, ends):
                        unreadable += self._log_unreadable(record_type, frame, rows_total, unreadable)
                        rows_total += len(frame)
                        chunks += 1
                        yield frame
                finally:
                    result.close()
        if chunks == 0:
            yield to_frame([], columns, ends)
        if unreadable > _LOGGED_ROWS:
            log.warning("crm extract %s: %d rows with unreadable values or no id in all (quarantined)", record_type, unreadable)
        log.info("crm extract %s: %d rows in %d chunk(s)", record_type, rows_total, max(chunks, 1))

    def _frames(self, fetchmany, columns: dict[str, str], ends: tuple[str, ...]) -> Iterator[pd.DataFrame]:
        """Frames of ``chunk_size`` rows (the last one smaller) of the rows ``fetchmany(n)``
        gives, fetched ``FETCH_ROWS`` at most at a time: each fetch becomes columns at once, and
        the frame is their concatenation."""
        while True:
            pieces: list[pd.DataFrame] = []
            held = 0
            while held < self.chunk_size:
                part = fetchmany(min(FETCH_ROWS, self.chunk_size - held))
                if not part:
                    break
                pieces.append(to_frame(part, columns, ends))
                held += len(part)
                del part  # the Python rows go before the next fetch
            if pieces:
                yield _concat(pieces)
            if held < self.chunk_size:
                return

    def count_rows(self, record_type: str, *, now: dt.datetime | None = None) -> int:
        """How many rows a whole read of ``record_type`` gives (``COUNT(*)`` over its frame's
        tables), without reading them: what the plan-size guard weighs a narrowed plan against."""
        if record_type not in FRAME_COLUMNS:
            raise ValueError(f"unknown record type {record_type!r}; expected one of {RECORD_TYPES}")
        self._ensure_checked()
        parts = self._frame_parts(record_type, as_utc(now or dt.datetime.now(dt.UTC)))
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(parts.source)).scalar_one())

    def _candidate_filter(
        self, record_type: str, parts: FrameParts, candidates: Condition, *, narrow: bool = False
    ) -> sa.ColumnElement:
        """The domain's candidate condition for ``record_type`` as a WHERE clause of its frame (a
        superset of its rows), or with ``narrow`` a condition such as ``surely_due`` (a subset)."""
        kinds = {"int64": "id", "Int64": "id", "bool": "flag", "str": "text", TS: "clock"}
        columns = {}
        for name, expr in parts.columns.items():
            logical, col = _SOURCES.get(record_type, {}).get(name, (_TABLES[record_type], name))
            columns[name] = Column(
                expr, kinds[FRAME_COLUMNS[record_type][name]], computed=name in _COMPUTED,
                sql_type=None if name in _COMPUTED else self._column_type(logical, "id" if col == "record_id" else col),
            )
        duplicate = None
        if not narrow and not all(self._keyed_by_id(t) for t in parts.keyed):
            key = parts.columns["record_id"]
            shared = sa.select(key).select_from(parts.source).group_by(key).having(sa.func.count() > 1)
            duplicate = key.in_(shared.scalar_subquery())
        return Compiler(self.dialect, columns, duplicate, narrow=narrow)(candidates)

    def _reflected(self, logical: str) -> tuple[dict[str, object], list[str]]:
        """(physical column -> SQL type, primary key columns) of a mapped table, read once."""
        cache = self.__dict__.setdefault("_reflection", {})
        if logical not in cache:
            t = self._t(logical)
            inspector = sa.inspect(self.engine)
            types = {col["name"]: col["type"] for col in inspector.get_columns(t.name, schema=t.schema)}
            pk = inspector.get_pk_constraint(t.name, schema=t.schema).get("constrained_columns") or []
            cache[logical] = (types, list(pk))
        return cache[logical]

    def _column_type(self, logical: str, column: str):
        physical = self._t(logical).columns.get(column)
        return self._reflected(logical)[0].get(physical)

    def _keyed_by_id(self, logical: str) -> bool:
        """The table's id is its primary key on its own (so no two rows share it)."""
        return self._reflected(logical)[1] == [self._t(logical).columns.get("id")]

    def _log_unreadable(self, record_type: str, frame: pd.DataFrame, start: int, logged: int) -> int:
        """Name table, column and key of each row with an unreadable value or no id (the first
        ``_LOGGED_ROWS``), never the value; the key is the row's id, else its position in the
        extract (ordered by id). Returns the number of such rows."""
        no_id = frame["record_id"].isna().to_numpy()
        columns = frame[UNREADABLE] if UNREADABLE in frame else pd.Series(pd.NA, index=frame.index, dtype="string")
        bad = columns.notna().to_numpy() | no_id
        for pos in np.flatnonzero(bad)[: max(_LOGGED_ROWS - logged, 0)]:
            rid = frame["record_id"].iloc[pos]
            key = f"id {rid}" if not pd.isna(rid) else f"row {start + pos + 1} of the extract (ordered by id)"
            which = columns.iloc[pos]
            where = ", ".join(self._source(record_type, c) for c in which.split(",")) if not pd.isna(which) else None
            if where:
                log.warning("crm extract %s: %s has an unreadable value in %s; quarantined", record_type, key, where)
            else:
                log.warning("crm extract %s: %s has a NULL %s; quarantined", record_type, key, self._source(record_type, "record_id"))
        return int(bad.sum())

    def _source(self, record_type: str, column: str) -> str:
        """``table.column`` (physical names) a frame column is read from."""
        logical, col = _SOURCES.get(record_type, {}).get(column, (_TABLES.get(record_type), column))
        if logical is None:
            return column
        t = self._t(logical)
        physical = "id" if col == "record_id" else col
        return f"{t.name}.{t.columns.get(physical) or physical}"

    def _frame_of(self, conn: sa.Connection, record_type: str, ids: Sequence[int], now: dt.datetime) -> pd.DataFrame:
        """The current frame rows of ``ids`` (a batch being erased, re-checked): the extract's own
        query for these ids only, looked up by row (:meth:`_frame_parts`). A row not UTF-8 now
        comes as bytes and is judged unreadable, not a crash."""
        query = self._frame_query(record_type, now, by_row=True).order_by(None).subquery("now")
        with self._raw_text(conn):
            rows = conn.execute(sa.select(query).where(self._in_ids(query.c.record_id, ids, "now_ids"))).all()
        return to_frame(rows, FRAME_COLUMNS[record_type], END_OF_DAY.get(record_type, ()))

    def read_frame(self, record_type: str, *, now: dt.datetime | None = None) -> pd.DataFrame:
        """All records of ``record_type`` in one frame (convenience for small CRMs and tests)."""
        frames = list(self.iter_frames(record_type, now=now))
        return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)

    def _membership_stats(self, today: dt.date, of_org: sa.ColumnElement | None = None):
        """Per organisation: a membership open ``today`` (``active``) and the last end. With
        ``of_org``, the one organisation of each outer row, looked up (a LATERAL subquery)."""
        m = self._t("membership").table
        mc = self._t("membership").c
        today_p = self._date_param("today", today)
        active = sa.case((sa.or_(mc.ends_on.is_(None), mc.ends_on >= today_p), 1), else_=0)
        stats = sa.select(
            mc.organisation_id.label("org"),
            sa.func.max(active).label("active"),
            sa.func.max(mc.ends_on).label("last_end"),
        ).select_from(m)
        if of_org is not None:
            return stats.where(mc.organisation_id == of_org).group_by(mc.organisation_id).lateral("ms")
        return stats.group_by(mc.organisation_id).subquery("ms")

    def _by_row(self, *lookups: tuple[str, str]) -> bool:
        """Whether a read of given ids looks its joined rows up one by one: on PostgreSQL, when
        each ``(logical table, column)`` leads an index of the CRM's own. Its planner prices tens
        of thousands of index probes above one scan of the whole table (its default
        ``random_page_cost`` assumes disk), and joins every contact and membership to re-check
        a batch: 5.0 s against 1.9 s for 250,000 event participations of the benchmark's CRM.
        Without such an index the whole-table join stays (a probe would be a scan)."""
        return self.dialect == "postgresql" and all(c in self._indexed(t) for t, c in lookups)

    def _indexed(self, logical: str) -> set[str]:
        """The logical columns of a mapped table that lead an index, its primary key or a unique
        constraint, read once. A partial index (one with a ``WHERE``) does not count: a look-up
        of a row outside its predicate could not use it."""
        cache = self.__dict__.setdefault("_index_leads", {})
        if logical not in cache:
            t = self._t(logical)
            inspector = sa.inspect(self.engine)
            leads = [
                ix["column_names"][:1]
                for ix in inspector.get_indexes(t.name, schema=t.schema)
                if not ix.get("dialect_options", {}).get("postgresql_where")
            ]
            leads += [uq["column_names"][:1] for uq in inspector.get_unique_constraints(t.name, schema=t.schema)]
            leads.append(self._reflected(logical)[1][:1])
            physical = {p for lead in leads for p in lead if p}
            cache[logical] = {name for name, p in t.columns.items() if p in physical}
        return cache[logical]

    def _relationship_columns(self, ms) -> dict[str, sa.ColumnElement]:
        return {
            "membership_active": sa.func.coalesce(ms.c.active, 0),
            "membership_end": sa.case((ms.c.active == 1, sa.null()), else_=ms.c.last_end),
            "is_customer": sa.case((ms.c.org.is_(None), 0), else_=1),
        }

    def _frame_query(
        self, record_type: str, now: dt.datetime, candidates: Condition | None = None, *, by_row: bool = False
    ) -> sa.Select:
        """The record type's frame as one statement (only the rows ``candidates`` may be true of,
        when given; ``by_row`` as for :meth:`_frame_parts`)."""
        parts = self._frame_parts(record_type, now, by_row=by_row)
        stmt = sa.select(*(e.label(n) for n, e in parts.columns.items())).select_from(parts.source)
        if candidates is not None:
            stmt = stmt.where(self._candidate_filter(record_type, parts, candidates))
        return stmt.order_by(parts.order)

    def _frame_parts(self, record_type: str, now: dt.datetime, *, by_row: bool = False) -> FrameParts:
        """The record type's frame in SQL. ``by_row``: for a read of a batch of given ids (the
        erasure's re-checks), where the CRM's indexes allow it (:meth:`_by_row`), each row's
        contact, memberships and invoices are looked up by index instead of joining the whole
        tables: the same rows with the same values, one probe per row instead of a scan."""
        today = now.astimezone(self.local_tz).date()
        if record_type == "crm_contact":
            c = self._t("contact").alias("c")
            inv = self._t("invoice")
            look_up = by_row and self._by_row(("membership", "organisation_id"), ("invoice", "contact_id"))
            ms = self._membership_stats(today, of_org=c.c.organisation_id if look_up else None)
            invoiced = sa.select(inv.c.contact_id.label("cid")).group_by(inv.c.contact_id)
            if look_up:
                with_inv = invoiced.where(inv.c.contact_id == c.c.id).lateral("inv")
                source = c.table.outerjoin(ms, sa.true()).outerjoin(with_inv, sa.true())
            else:
                with_inv = invoiced.where(inv.c.contact_id.is_not(None)).subquery("inv")
                source = c.table.outerjoin(ms, ms.c.org == c.c.organisation_id).outerjoin(with_inv, with_inv.c.cid == c.c.id)
            has_email = sa.case(
                (sa.and_(c.c.email.is_not(None), sa.func.trim(c.c.email) != ""), 1), else_=0
            )
            return FrameParts(
                {
                    "record_id": c.c.id,
                    "kind": c.c.kind,
                    "organisation_id": c.c.organisation_id,
                    **self._relationship_columns(ms),
                    "last_interaction_at": c.c.last_interaction_at,
                    "opted_out": c.c.opted_out,
                    "has_email": has_email,
                    "created_at": c.c.created_at,
                    "has_invoice": sa.case((with_inv.c.cid.is_(None), 0), else_=1),
                },
                source,
                c.c.id,
                keyed=("contact",),
            )
        if record_type == "crm_event_participation":
            e = self._t("event_participation").alias("e")
            ct = self._t("contact")
            if by_row and self._keyed_by_id("contact") and self._by_row(("membership", "organisation_id")):
                # OFFSET 0 keeps the planner from folding the look-up back into a join of every contact.
                wanted = [ct.c[n] for n in ("id", "opted_out", "organisation_id")]
                c = ct.through(sa.select(*wanted).where(ct.c.id == e.c.contact_id).offset(0).lateral("c"))
                ms = self._membership_stats(today, of_org=c.c.organisation_id)
                source = e.table.outerjoin(c.table, sa.true()).outerjoin(ms, sa.true())
            else:
                c = ct.alias("c")
                ms = self._membership_stats(today)
                source = e.table.outerjoin(c.table, c.c.id == e.c.contact_id).outerjoin(ms, ms.c.org == c.c.organisation_id)
            return FrameParts(
                {
                    "record_id": e.c.id,
                    "contact_id": e.c.contact_id,
                    "event_date": e.c.event_date,
                    **self._relationship_columns(ms),
                    "opted_out": c.c.opted_out,
                },
                source,
                e.c.id,
                # Joined on the contact's id: a contact id held twice would double the row.
                keyed=("event_participation", "contact"),
            )
        simple = {
            "crm_course_registration": ("course_registration", "course_end"),
            "crm_survey_response": ("survey_response", "survey_closed_at"),
            "crm_invoice": ("invoice", "financial_year_end"),
        }
        if record_type in simple:
            logical, clock = simple[record_type]
            t = self._t(logical)
            return FrameParts(
                {"record_id": t.c.id, "contact_id": t.c.contact_id, clock: t.c[clock]}, t.table, t.c.id, keyed=(logical,)
            )
        h = self._t("legal_hold")
        order = h.c.id if h.columns.get("id") else h.c.record_id
        return FrameParts(
            {"record_type": h.c.record_type, "record_id": h.c.record_id, "reason": h.c.reason, "expires_at": h.c.expires_at},
            h.table,
            order,
        )

    # ------------------------------------------------------------------ look-ups
    def find_contact_ids_by_email(self, email: str) -> list[int]:
        """Ids of contacts with this e-mail address (case- and surrounding-space-insensitive)."""
        needle = (email or "").strip().lower()
        if not needle:
            return []
        self._ensure_checked()
        c = self._t("contact")
        stmt = (
            sa.select(c.c.id)
            .where(sa.func.lower(c.c.email) == sa.bindparam("email", needle, type_=sa.String))
            .order_by(c.c.id)
        )
        with self.engine.connect() as conn:
            ids = [int(i) for i in conn.execute(stmt).scalars()]
            if not ids:  # stored with stray spaces: slower trimmed comparison
                stmt2 = (
                    sa.select(c.c.id)
                    .where(
                        sa.func.lower(sa.func.trim(c.c.email))
                        == sa.bindparam("email", needle, type_=sa.String)
                    )
                    .order_by(c.c.id)
                )
                ids = [int(i) for i in conn.execute(stmt2).scalars()]
        return ids

    def contact_records(self, contact_ids: Sequence[int]) -> dict[str, pd.DataFrame]:
        """What belongs to these contacts, for an erasure request: one frame per record type.

        ``crm_event_participation``, ``crm_course_registration``, ``crm_survey_response``:
        record_id (int64), contact_id (Int64); ``crm_invoice`` also financial_year_end (ts);
        ``communication_note``: contact_id (Int64) and n (int64), the number of notes per
        contact (notes have no record type of their own: they go with their contact).
        """
        ids = distinct_ids(contact_ids)
        self._ensure_checked()
        owned = {
            "crm_event_participation": "event_participation",
            "crm_course_registration": "course_registration",
            "crm_survey_response": "survey_response",
            "crm_invoice": "invoice",
        }
        out: dict[str, pd.DataFrame] = {}
        with self.engine.connect() as conn:
            for record_type, logical in owned.items():
                t = self._t(logical)
                columns = {"record_id": "int64", "contact_id": "Int64"}
                cols = [t.c.id.label("record_id"), t.c.contact_id.label("contact_id")]
                if record_type == "crm_invoice":
                    columns["financial_year_end"] = TS
                    cols.append(t.c.financial_year_end.label("financial_year_end"))
                rows = (
                    conn.execute(sa.select(*cols).where(self._in_ids(t.c.contact_id, ids, "ids")).order_by(t.c.id)).all()
                    if ids
                    else []
                )
                out[record_type] = to_frame(rows, columns, END_OF_DAY.get(record_type, ()))
            n = self._t("communication_note")
            rows = (
                conn.execute(
                    sa.select(n.c.contact_id, sa.func.count().label("n"))
                    .where(self._in_ids(n.c.contact_id, ids, "ids"))
                    .group_by(n.c.contact_id)
                ).all()
                if ids
                else []
            )
            out["communication_note"] = to_frame(rows, {"contact_id": "Int64", "n": "int64"})
        return out
