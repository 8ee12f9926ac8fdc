"""CRM connector: chunked frames in, set-based erasure out.

The rule engine decides what is due; this module only

* reads the CRM into pandas frames that carry what the rules need and nothing else (no names,
  e-mail addresses, phone numbers or addresses ever leave the database through a frame), and
* erases (or minimises) the records the engine hands back, idempotently and set-based.

Frames (``iter_frames``) — every clock column is ``datetime64[us, UTC]``; calendar dates come
through as midnight Europe/Stockholm of that date; NULL, impossible or unparsable stored values come
through as ``NaT`` (the pipeline quarantines them) instead of failing the extract:

=========================== =================================================================
record type                 columns (dtype)
=========================== =================================================================
crm_contact                 record_id int64, kind str, organisation_id Int64,
                            membership_active bool, membership_end ts, is_customer bool,
                            last_interaction_at ts, opted_out bool, has_email bool,
                            created_at ts, has_invoice bool
crm_event_participation     record_id int64, contact_id Int64, event_date ts,
                            membership_active bool, membership_end ts, is_customer bool,
                            opted_out bool
crm_course_registration     record_id int64, contact_id Int64, course_end ts
crm_survey_response         record_id int64, contact_id Int64, survey_closed_at ts
crm_invoice                 record_id int64, contact_id Int64, financial_year_end ts
crm_legal_hold              record_type str, record_id Int64, reason str, expires_at ts
=========================== =================================================================

``membership_active``: the contact's organisation has a period with ``ends_on`` NULL or
``ends_on >= today``, where *today* is the calendar date of ``now`` in Europe/Stockholm (a
period ending today is still active today). ``membership_end``: the latest ``ends_on`` of the
organisation when it is not active, else NaT (always NaT for contacts without organisation,
i.e. leads). ``is_customer``: the organisation ever had a membership period. NULL booleans read
as False.

Erasure outcomes (``erase`` / ``minimise_contacts``), per distinct id:

* ``"erased"`` — deleted by this call;
* ``"already_gone"`` — not there (idempotent success);
* ``"minimised"`` — ``minimise_contacts`` only: the contact and all its personal data were
  deleted and its invoice(s) detached (``contact_id`` set NULL), keeping the bookkeeping fields;
* ``"held_invoice"`` — ``erase("crm_contact")`` only: the contact still has an invoice, so it
  is **refused** (nothing of it is touched); use ``minimise_contacts``;
* ``"held_legal_hold"`` — refused because a live manual hold (``legal_hold`` row with this
  record type and id, ``expires_at`` NULL or in the future at the time of the call) covers the
  record, or for a contact, covers one of the child records the erasure would delete.

Each call is one transaction with a fixed number of statements, whatever the batch size (the
caller batches, e.g. 5,000 ids): one hold/invoice check, then one set-based ``DELETE`` per
table. Ids are passed as one array parameter (``= ANY(:ids)`` on PostgreSQL, ``json_each`` on
SQLite), so statement text and planning do not grow with the batch. Children of a contact are
deleted explicitly (no reliance on ``ON DELETE CASCADE``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from retention.systems.crm.mapping import CrmMapping

log = logging.getLogger(__name__)

RECORD_TYPES = (
    "crm_contact",
    "crm_event_participation",
    "crm_course_registration",
    "crm_survey_response",
    "crm_invoice",
    "crm_legal_hold",
)

ERASED = "erased"
ALREADY_GONE = "already_gone"
MINIMISED = "minimised"
HELD_INVOICE = "held_invoice"
HELD_LEGAL_HOLD = "held_legal_hold"

#: record type -> logical table, for the record types that ``erase``/``existing`` accept.
ERASABLE = {
    "crm_contact": "contact",
    "crm_event_participation": "event_participation",
    "crm_course_registration": "course_registration",
    "crm_survey_response": "survey_response",
    "crm_invoice": "invoice",
}
#: Tables holding a contact's personal data besides the contact row (deleted with it).
CONTACT_CHILDREN = ("communication_note", "event_participation", "course_registration", "survey_response")
#: Child tables whose rows can be on a manual hold (logical table -> record type).
HOLDABLE_CHILDREN = {
    "event_participation": "crm_event_participation",
    "course_registration": "crm_course_registration",
    "survey_response": "crm_survey_response",
}

TS = "datetime64[us, UTC]"
#: Frame columns and dtypes per record type (``ts`` = ``datetime64[us, UTC]``).
FRAME_COLUMNS: dict[str, dict[str, str]] = {
    "crm_contact": {
        "record_id": "int64",
        "kind": "str",
        "organisation_id": "Int64",
        "membership_active": "bool",
        "membership_end": TS,
        "is_customer": "bool",
        "last_interaction_at": TS,
        "opted_out": "bool",
        "has_email": "bool",
        "created_at": TS,
        "has_invoice": "bool",
    },
    "crm_event_participation": {
        "record_id": "int64",
        "contact_id": "Int64",
        "event_date": TS,
        "membership_active": "bool",
        "membership_end": TS,
        "is_customer": "bool",
        "opted_out": "bool",
    },
    "crm_course_registration": {"record_id": "int64", "contact_id": "Int64", "course_end": TS},
    "crm_survey_response": {"record_id": "int64", "contact_id": "Int64", "survey_closed_at": TS},
    "crm_invoice": {"record_id": "int64", "contact_id": "Int64", "financial_year_end": TS},
    "crm_legal_hold": {"record_type": "str", "record_id": "Int64", "reason": "str", "expires_at": TS},
}

LOCAL_TZ = "Europe/Stockholm"
_TRUE_STRINGS = frozenset({"t", "true", "1", "y", "yes", "on"})


class CrmConnector:
    """Read the CRM as frames and erase what the rule engine decided is due.

    ``engine`` is any SQLAlchemy engine (PostgreSQL in production, SQLite embedded). ``mapping``
    names the physical tables/columns (default: the reference schema); it is checked against
    the database once, before the first operation (``check()`` does it explicitly).
    """

    def __init__(
        self,
        engine: sa.Engine,
        mapping: CrmMapping | None = None,
        *,
        chunk_size: int = 50_000,
        local_tz: str = LOCAL_TZ,
    ):
        if chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        self.engine = engine
        self.mapping = mapping or CrmMapping.default()
        self.chunk_size = int(chunk_size)
        self.local_tz = ZoneInfo(local_tz)
        self._checked = False

    # ------------------------------------------------------------------ helpers
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

    def _t(self, logical: str):
        return self.mapping[logical]

    def _in_ids(self, col: sa.ColumnElement, ids: Sequence[int], name: str) -> sa.ColumnElement:
        """``col IN ids`` as one bound parameter, whatever the number of ids."""
        if self.dialect == "postgresql":
            return col == sa.any_(sa.bindparam(name, list(ids), type_=postgresql.ARRAY(sa.BigInteger)))
        if self.dialect == "sqlite":
            each = sa.select(sa.literal_column("value")).select_from(
                sa.func.json_each(sa.bindparam(name, json.dumps(list(ids)), type_=sa.String))
            )
            return col.in_(each.scalar_subquery())
        return col.in_(sa.bindparam(name, list(ids), expanding=True))

    def _ts_param(self, name: str, value: dt.datetime) -> sa.BindParameter:
        """A UTC timestamp parameter comparable with the stored clock columns."""
        value = _as_utc(value)
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

    # ------------------------------------------------------------------ frames
    def iter_frames(self, record_type: str, *, now: dt.datetime | None = None) -> Iterator[pd.DataFrame]:
        """Yield the records of ``record_type`` in frames of at most ``chunk_size`` rows.

        Bounded memory: a server-side cursor on PostgreSQL, ``fetchmany`` elsewhere. Rows come
        in ascending record id (legal holds: by hold id). A table with no rows yields one empty
        frame with the documented columns and dtypes.
        """
        if record_type not in FRAME_COLUMNS:
            raise ValueError(f"unknown record type {record_type!r}; expected one of {RECORD_TYPES}")
        self._ensure_checked()
        now = _as_utc(now or dt.datetime.now(dt.UTC))
        stmt = self._frame_query(record_type, now)
        columns = FRAME_COLUMNS[record_type]
        rows_total = 0
        chunks = 0
        with self.engine.connect() as conn:
            if self.dialect == "postgresql":
                with conn.begin():
                    # A cursor reads everything: plan for total, not first-rows, cost.
                    conn.exec_driver_sql("SET LOCAL cursor_tuple_fraction = 1.0")
                    result = conn.execution_options(
                        stream_results=True, yield_per=self.chunk_size
                    ).execute(stmt)
                    for part in result.partitions(self.chunk_size):
                        rows_total += len(part)
                        chunks += 1
                        yield _frame(part, columns)
            else:
                result = conn.execute(stmt)
                try:
                    while part := result.fetchmany(self.chunk_size):
                        rows_total += len(part)
                        chunks += 1
                        yield _frame(part, columns)
                finally:
                    result.close()
        if chunks == 0:
            yield _frame([], columns)
        log.info("crm extract %s: %d rows in %d chunk(s)", record_type, rows_total, max(chunks, 1))

    def read_frame(self, record_type: str, *, now: dt.datetime | None = None) -> pd.DataFrame:
        """All records of ``record_type`` in one frame (convenience for small CRMs and tests)."""
        frames = list(self.iter_frames(record_type, now=now))
        return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)

    def _membership_stats(self, today: dt.date):
        m = self._t("membership").table
        mc = self._t("membership").c
        today_p = self._date_param("today", today)
        active = sa.case((sa.or_(mc.ends_on.is_(None), mc.ends_on >= today_p), 1), else_=0)
        return (
            sa.select(
                mc.organisation_id.label("org"),
                sa.func.max(active).label("active"),
                sa.func.max(mc.ends_on).label("last_end"),
            )
            .select_from(m)
            .group_by(mc.organisation_id)
            .subquery("ms")
        )

    def _relationship_columns(self, ms) -> list[sa.ColumnElement]:
        return [
            sa.func.coalesce(ms.c.active, 0).label("membership_active"),
            sa.case((ms.c.active == 1, sa.null()), else_=ms.c.last_end).label("membership_end"),
            sa.case((ms.c.org.is_(None), 0), else_=1).label("is_customer"),
        ]

    def _frame_query(self, record_type: str, now: dt.datetime) -> sa.Select:
        today = now.astimezone(self.local_tz).date()
        if record_type == "crm_contact":
            c = self._t("contact").alias("c")
            inv = self._t("invoice")
            ms = self._membership_stats(today)
            with_inv = (
                sa.select(inv.c.contact_id.label("cid"))
                .where(inv.c.contact_id.is_not(None))
                .group_by(inv.c.contact_id)
                .subquery("inv")
            )
            has_email = sa.case(
                (sa.and_(c.c.email.is_not(None), sa.func.trim(c.c.email) != ""), 1), else_=0
            )
            return (
                sa.select(
                    c.c.id.label("record_id"),
                    c.c.kind.label("kind"),
                    c.c.organisation_id.label("organisation_id"),
                    *self._relationship_columns(ms),
                    c.c.last_interaction_at.label("last_interaction_at"),
                    c.c.opted_out.label("opted_out"),
                    has_email.label("has_email"),
                    c.c.created_at.label("created_at"),
                    sa.case((with_inv.c.cid.is_(None), 0), else_=1).label("has_invoice"),
                )
                .select_from(
                    c.table.outerjoin(ms, ms.c.org == c.c.organisation_id).outerjoin(
                        with_inv, with_inv.c.cid == c.c.id
                    )
                )
                .order_by(c.c.id)
            )
        if record_type == "crm_event_participation":
            e = self._t("event_participation").alias("e")
            c = self._t("contact").alias("c")
            ms = self._membership_stats(today)
            return (
                sa.select(
                    e.c.id.label("record_id"),
                    e.c.contact_id.label("contact_id"),
                    e.c.event_date.label("event_date"),
                    *self._relationship_columns(ms),
                    c.c.opted_out.label("opted_out"),
                )
                .select_from(
                    e.table.outerjoin(c.table, c.c.id == e.c.contact_id).outerjoin(
                        ms, ms.c.org == c.c.organisation_id
                    )
                )
                .order_by(e.c.id)
            )
        simple = {
            "crm_course_registration": ("course_registration", "course_end"),
            "crm_survey_response": ("survey_response", "survey_closed_at"),
            "crm_invoice": ("invoice", "financial_year_end"),
        }
        if record_type in simple:
            logical, clock = simple[record_type]
            t = self._t(logical)
            return sa.select(
                t.c.id.label("record_id"),
                t.c.contact_id.label("contact_id"),
                t.c[clock].label(clock),
            ).order_by(t.c.id)
        h = self._t("legal_hold")
        order = h.c.id if h.columns.get("id") else h.c.record_id
        return sa.select(
            h.c.record_type.label("record_type"),
            h.c.record_id.label("record_id"),
            h.c.reason.label("reason"),
            h.c.expires_at.label("expires_at"),
        ).order_by(order)

    # ------------------------------------------------------------------ look-ups
    def existing(self, record_type: str, ids: Sequence[int]) -> set[int]:
        """The subset of ``ids`` that still exist (for verification after erasure)."""
        logical = _erasable(record_type)
        ids = _distinct_ids(ids)
        if not ids:
            return set()
        self._ensure_checked()
        t = self._t(logical)
        with self.engine.connect() as conn:
            found = conn.execute(sa.select(t.c.id).where(self._in_ids(t.c.id, ids, "ids"))).scalars()
            return {int(i) for i in found}

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
        ids = _distinct_ids(contact_ids)
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
                out[record_type] = _frame(rows, columns)
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
            out["communication_note"] = _frame(rows, {"contact_id": "Int64", "n": "int64"})
        return out

    # ------------------------------------------------------------------ erasure
    def erase(self, record_type: str, ids: Sequence[int]) -> dict[int, str]:
        """Delete the records ``ids`` of ``record_type`` in one transaction.

        ``crm_contact`` takes the contact's communication notes, event participations, course
        registrations and survey responses with it; a contact that still has an invoice is
        refused with ``held_invoice`` (use ``minimise_contacts``). Records under a live manual
        hold are refused with ``held_legal_hold``. ``crm_legal_hold`` cannot be erased.
        """
        logical = _erasable(record_type)
        ids = _distinct_ids(ids)
        if not ids:
            return {}
        self._ensure_checked()
        now_p = self._ts_param("now", dt.datetime.now(dt.UTC))
        with self.engine.begin() as conn:
            if logical == "contact":
                refused = self._refused_contacts(conn, ids, now_p, invoices_refuse=True)
                ok = [i for i in ids if i not in refused]
                gone = self._delete_contacts(conn, ok) if ok else set()
            else:
                h = self._t("legal_hold")
                held_stmt = sa.select(h.c.record_id).where(
                    self._live_hold(h, record_type, now_p), self._in_ids(h.c.record_id, ids, "ids")
                )
                refused = {int(i): HELD_LEGAL_HOLD for i in conn.execute(held_stmt).scalars()}
                ok = [i for i in ids if i not in refused]
                gone = self._delete_returning(conn, self._t(logical), ok) if ok else set()
        outcome = {i: refused.get(i) or (ERASED if i in gone else ALREADY_GONE) for i in ids}
        _log_outcomes("erase", record_type, outcome)
        return outcome

    def minimise_contacts(self, ids: Sequence[int]) -> dict[int, str]:
        """Delete everything about these contacts except what bookkeeping law keeps.

        In one transaction: detach their invoices (``invoice.contact_id`` set NULL; the invoice
        keeps invoice_number, issued_on, financial_year_end, amount, billing_name,
        billing_address), delete their notes, event participations, course registrations and
        survey responses, and the contact row. Outcome ``minimised`` (had invoices),
        ``erased`` (had none), ``already_gone`` or ``held_legal_hold`` (live manual hold on the
        contact or on a child record that would be deleted; a manual hold on one of its
        invoices does not block minimisation, since the invoice itself is kept).
        """
        ids = _distinct_ids(ids)
        if not ids:
            return {}
        self._ensure_checked()
        now_p = self._ts_param("now", dt.datetime.now(dt.UTC))
        inv = self._t("invoice")
        with self.engine.begin() as conn:
            flags = self._refused_contacts(conn, ids, now_p, invoices_refuse=False)
            refused = {i: f for i, f in flags.items() if f == HELD_LEGAL_HOLD}
            had_invoice = {i for i, f in flags.items() if f == HELD_INVOICE}
            ok = [i for i in ids if i not in refused]
            gone: set[int] = set()
            if ok:
                conn.execute(
                    sa.update(inv.table)
                    .where(self._in_ids(inv.c.contact_id, ok, "ids"))
                    .values({inv.columns["contact_id"]: None})
                )
                gone = self._delete_contacts(conn, ok)
        outcome = {}
        for i in ids:
            if i in refused:
                outcome[i] = refused[i]
            elif i in gone:
                outcome[i] = MINIMISED if i in had_invoice else ERASED
            else:
                outcome[i] = ALREADY_GONE
        _log_outcomes("minimise", "crm_contact", outcome)
        return outcome

    def _refused_contacts(
        self, conn: sa.Connection, ids: list[int], now_p: sa.BindParameter, *, invoices_refuse: bool
    ) -> dict[int, str]:
        """One statement: contacts with an invoice (``held_invoice``) or under a live manual
        hold on the contact or on a child the erasure would delete (``held_legal_hold``)."""
        h = self._t("legal_hold")
        inv = self._t("invoice")
        parts = [
            sa.select(inv.c.contact_id.label("cid"), sa.literal(HELD_INVOICE, sa.String).label("why")).where(
                self._in_ids(inv.c.contact_id, ids, "ids_inv")
            ),
            sa.select(h.c.record_id.label("cid"), sa.literal(HELD_LEGAL_HOLD, sa.String).label("why")).where(
                self._live_hold(h, "crm_contact", now_p), self._in_ids(h.c.record_id, ids, "ids_hold")
            ),
        ]
        for logical, rtype in HOLDABLE_CHILDREN.items():
            ch = self._t(logical).alias(f"ch_{logical}")
            hh = h.alias(f"h_{logical}")
            parts.append(
                sa.select(ch.c.contact_id.label("cid"), sa.literal(HELD_LEGAL_HOLD, sa.String).label("why"))
                .select_from(ch.table.join(hh.table, hh.c.record_id == ch.c.id))
                .where(
                    self._live_hold(hh, rtype, now_p),
                    self._in_ids(ch.c.contact_id, ids, f"ids_{logical}"),
                )
            )
        flags: dict[int, str] = {}
        for cid, why in conn.execute(sa.union(*parts)):
            if cid is None:
                continue
            cid = int(cid)
            if why == HELD_LEGAL_HOLD or cid not in flags:
                flags[cid] = why
        return flags

    def _delete_contacts(self, conn: sa.Connection, ids: list[int]) -> set[int]:
        for logical in CONTACT_CHILDREN:
            child = self._t(logical)
            conn.execute(sa.delete(child.table).where(self._in_ids(child.c.contact_id, ids, "ids")))
        return self._delete_returning(conn, self._t("contact"), ids)

    def _delete_returning(self, conn: sa.Connection, t, ids: list[int]) -> set[int]:
        where = self._in_ids(t.c.id, ids, "ids")
        if conn.dialect.delete_returning:
            return {int(i) for i in conn.execute(sa.delete(t.table).where(where).returning(t.c.id)).scalars()}
        present = {int(i) for i in conn.execute(sa.select(t.c.id).where(where)).scalars()}
        conn.execute(sa.delete(t.table).where(where))
        return present


# ---------------------------------------------------------------------- module helpers
def _erasable(record_type: str) -> str:
    if record_type == "crm_legal_hold":
        raise ValueError("crm_legal_hold records are managed by people and are never erased here")
    try:
        return ERASABLE[record_type]
    except KeyError:
        raise ValueError(f"unknown record type {record_type!r}; expected one of {tuple(ERASABLE)}") from None


def _distinct_ids(ids: Iterable[Any]) -> list[int]:
    seen: dict[int, None] = {}
    for i in ids:
        if isinstance(i, (bool, np.bool_)) or i is None:
            raise TypeError("record ids must be integers")
        seen[int(i)] = None
    return list(seen)


def _as_utc(value: dt.datetime) -> dt.datetime:
    if isinstance(value, pd.Timestamp):
        value = value.to_pydatetime()
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)


def _log_outcomes(action: str, record_type: str, outcome: dict[int, str]) -> None:
    counts: dict[str, int] = {}
    for v in outcome.values():
        counts[v] = counts.get(v, 0) + 1
    log.info("crm %s %s: %d id(s) %s", action, record_type, len(outcome), dict(sorted(counts.items())))


def _frame(rows: Sequence[Any], columns: dict[str, str]) -> pd.DataFrame:
    names = list(columns)
    data = list(zip(*rows, strict=True)) if rows else [() for _ in names]
    out = {}
    for name, values, dtype in zip(names, data, columns.values(), strict=True):
        raw = np.empty(len(values), dtype=object)
        raw[:] = values
        s = pd.Series(raw, dtype=object)
        if dtype == TS:
            out[name] = _to_utc(s)
        elif dtype == "bool":
            out[name] = _to_bool(s)
        elif dtype == "int64":
            out[name] = pd.to_numeric(s, errors="raise").astype("int64")
        elif dtype == "Int64":
            try:  # exact for any 64-bit id (no detour through float)
                out[name] = pd.Series(pd.array(raw, dtype="Int64"))
            except (TypeError, ValueError):  # text or junk in an id column of a foreign CRM
                out[name] = pd.to_numeric(s, errors="coerce").astype("Int64")
        else:
            out[name] = s.astype("str")
    return pd.DataFrame(out, columns=names)


def _to_utc(s: pd.Series) -> pd.Series:
    """Any stored clock value (date, datetime, text, NULL) → ``datetime64[us, UTC]``; NaT when
    NULL, impossible or unparsable. Naive datetimes are taken as UTC. A calendar date (a date
    object, or text ``YYYY-MM-DD``) is the start of that day in Europe/Stockholm, so a period
    counted from it ends at local midnight, when the nightly run looks."""
    if isinstance(s.dtype, pd.DatetimeTZDtype) or s.dtype.kind == "M":
        conv = s if getattr(s.dt, "tz", None) is not None else s.dt.tz_localize("UTC")
        return conv.dt.tz_convert("UTC").dt.as_unit("us")
    values = s.astype(object)
    try:
        conv = pd.to_datetime(values, errors="coerce", utc=True, format="ISO8601")
    except (ValueError, TypeError, OverflowError):
        conv = pd.Series([_one_ts(v) for v in values], index=s.index, dtype=TS)
    conv = conv.astype(TS)
    is_date = np.fromiter(
        ((isinstance(v, dt.date) and not isinstance(v, dt.datetime)) or (isinstance(v, str) and len(v) == 10) for v in values),
        dtype=bool,
        count=len(values),
    )
    if is_date.any():
        days = pd.to_datetime(values[is_date].astype(str), errors="coerce", format="%Y-%m-%d")
        local = days.dt.tz_localize(LOCAL_TZ, nonexistent="shift_forward", ambiguous=False).dt.tz_convert("UTC")
        conv[is_date] = local.astype(TS)
    return conv


def _one_ts(v: Any) -> pd.Timestamp:
    try:
        ts = pd.to_datetime(v, errors="coerce", utc=True, format="ISO8601")
    except (ValueError, TypeError, OverflowError):
        return pd.NaT
    return ts if isinstance(ts, pd.Timestamp) else pd.NaT


def _to_bool(s: pd.Series) -> pd.Series:
    """NULL → False; numbers: non-zero; text: t/true/1/y/yes/on (case-insensitive)."""
    if s.dtype == bool:
        return s
    if s.dtype.kind in "iuf":
        return s.fillna(0).astype(bool)
    values = s.to_numpy(dtype=object)
    null = pd.isna(values)
    present = values[~null]
    if len(present) and isinstance(present[0], str):  # a database column has one type
        out = np.array([_text_bool(v) for v in np.where(null, False, values)], dtype=bool)
    else:
        out = np.zeros(len(values), dtype=bool)
        out[~null] = present.astype(bool)
    return pd.Series(out, index=s.index, dtype=bool)


def _text_bool(v: Any) -> bool:
    return v.strip().lower() in _TRUE_STRINGS if isinstance(v, str) else bool(v)
