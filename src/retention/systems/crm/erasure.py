"""The CRM connector's erasure: set-based, idempotent deletes and minimisation, holds checked inside.

Each call is one transaction with a fixed number of statements, whatever the batch size (the
caller batches, e.g. 5,000 ids): one hold/invoice check, then one set-based ``DELETE`` per
table. Children of a contact are deleted explicitly (no reliance on ``ON DELETE CASCADE``). The
outcomes are documented in :mod:`retention.systems.crm.client`.

On PostgreSQL a large call is split into ``erase_connections`` parts (default 2), each its own
transaction on its own connection, side by side: most of a batch's time is the server's (the
rows locked, re-read and judged, then deleted), and one connection keeps one of its CPUs busy
at a time. The parts hold disjoint ids (and so disjoint children and invoices): they lock no
row the other needs. Each part checks its own records inside its own transaction, as a whole
call does. SQLite takes one writer at a time: one transaction there.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import pandas as pd
import sqlalchemy as sa

from retention.domain.candidates import Condition
from retention.systems.crm.sql import ConnectorBase
from retention.systems.crm.values import distinct_ids

# The caller's check of current records: their frame -> the ids to leave alone.
Recheck = Callable[[pd.DataFrame], set[int]]

# The connector's logger, whichever module of it logs (benchmarks quiet the per-batch lines by it).
log = logging.getLogger("retention.systems.crm.client")

ERASED = "erased"
ALREADY_GONE = "already_gone"
MINIMISED = "minimised"
HELD_INVOICE = "held_invoice"
HELD_LEGAL_HOLD = "held_legal_hold"
# Left alone by the caller's check of the records' current state, read inside the transaction.
CHANGED = "changed_since_plan"

#: record type -> logical table, for the record types that ``erase``/``existing`` accept.
ERASABLE = {
    "crm_contact": "contact",
    "crm_event_participation": "event_participation",
    "crm_course_registration": "course_registration",
    "crm_survey_response": "survey_response",
    "crm_invoice": "invoice",
}
#: Fewest ids a part of a split call gets: below it, a second transaction costs more than it saves.
MIN_PART = 2_000
#: Tables holding a contact's personal data besides the contact row (deleted with it).
CONTACT_CHILDREN = ("communication_note", "event_participation", "course_registration", "survey_response")
#: Child tables whose rows can be on a manual hold (logical table -> record type).
HOLDABLE_CHILDREN = {
    "event_participation": "crm_event_participation",
    "course_registration": "crm_course_registration",
    "survey_response": "crm_survey_response",
}


class Erasure(ConnectorBase):
    """Erasing and minimising CRM records, and checking which are still there."""

    erase_connections: int = 1  # the connector sets its own (default 2)

    def existing(self, record_type: str, ids: Sequence[int]) -> set[int]:
        """The subset of ``ids`` that still exist (for verification after erasure)."""
        logical = _erasable(record_type)
        ids = distinct_ids(ids)
        if not ids:
            return set()
        self._ensure_checked()
        t = self._t(logical)
        with self.engine.connect() as conn:
            found = conn.execute(sa.select(t.c.id).where(self._in_ids(t.c.id, ids, "ids"))).scalars()
            return {int(i) for i in found}

    # ------------------------------------------------------------------ erasure
    def erase(
        self, record_type: str, ids: Sequence[int], recheck: Recheck | None = None, surely_due: Condition | None = None
    ) -> dict[int, str]:
        """Delete the records ``ids`` of ``record_type`` in one transaction (one per part, each
        part side by side on its own connection, when the call is split: see the module).

        ``crm_contact`` takes the contact's communication notes, event participations, course
        registrations and survey responses with it; a contact that still has an invoice is
        refused with ``held_invoice`` (use ``minimise_contacts``). Records under a live manual
        hold are refused with ``held_legal_hold``. ``crm_legal_hold`` cannot be erased. With
        ``recheck``, the records' current frame is read first inside the transaction (their rows
        locked on PostgreSQL) and those ``recheck(frame)`` returns are left alone (``changed_since_plan``).

        ``surely_due`` (with ``recheck``; the domain's :func:`~retention.domain.candidates.surely_due`
        for this record type): the records it is true of now, read in the very ``DELETE`` (a
        subset of what ``recheck`` lets go, compiled narrowed), and under no live hold, are
        deleted by that one statement, without their frame; ``recheck`` judges the rest as above.
        """
        logical = _erasable(record_type)
        ids = distinct_ids(ids)
        if not ids:
            return {}
        self._ensure_checked()
        surely = surely_due if recheck is not None and logical != "contact" else None
        outcome = self._in_parts(lambda part: self._erase_part(record_type, logical, part, recheck, surely), ids)
        _log_outcomes("erase", record_type, outcome)
        return outcome

    def _erase_part(
        self, record_type: str, logical: str, ids: list[int], recheck: Recheck | None, surely: Condition | None
    ) -> dict[int, str]:
        now = dt.datetime.now(dt.UTC)
        now_p = self._ts_param("now", now)
        with self.engine.begin() as conn:
            surely_gone = self._delete_surely_due(conn, record_type, logical, ids, now, now_p, surely) if surely else set()
            ids = [i for i in ids if i not in surely_gone]
            changed = self._left_alone(conn, record_type, ids, now, recheck) if ids else set()
            ids = [i for i in ids if i not in changed]
            if logical == "contact":
                refused = self._refused_contacts(conn, ids, now_p, invoices_refuse=True)
                ok = [i for i in ids if i not in refused]
                gone = self._delete_contacts(conn, ok) if ok else set()
            else:
                refused = dict.fromkeys(self._held(conn, record_type, ids, now_p), HELD_LEGAL_HOLD)
                ok = [i for i in ids if i not in refused]
                gone = self._delete_returning(conn, self._t(logical), ok) if ok else set()
        outcome = {i: refused.get(i) or (ERASED if i in gone else ALREADY_GONE) for i in ids}
        outcome.update(dict.fromkeys(changed, CHANGED))
        outcome.update(dict.fromkeys(surely_gone, ERASED))
        return outcome

    def _delete_surely_due(
        self, conn: sa.Connection, record_type: str, logical: str, ids: list[int], now: dt.datetime,
        now_p: sa.BindParameter, surely: Condition,
    ) -> set[int]:
        """One ``DELETE``: the records of ``ids`` under no live hold whose current frame row
        ``surely`` is true of (compiled narrowed), the rows it deletes locked by it. Nothing when
        the frame's key may repeat (a joined table without its id as primary key): one row of a
        record would then speak for another."""
        parts = self._frame_parts(record_type, now, by_row=True)
        if not all(self._keyed_by_id(t) for t in parts.keyed):
            return set()
        held = self._held(conn, record_type, ids, now_p)
        free = [i for i in ids if i not in held]
        if not free:
            return set()
        key = parts.columns["record_id"]
        due = (
            sa.select(key).select_from(parts.source)
            .where(self._in_ids(key, free, "due_ids"), self._candidate_filter(record_type, parts, surely, narrow=True))
        )
        t = self._t(logical)
        where = sa.and_(self._in_ids(t.c.id, free, "ids"), t.c.id.in_(due.scalar_subquery()))
        if conn.dialect.delete_returning:
            return {int(i) for i in conn.execute(sa.delete(t.table).where(where).returning(t.c.id)).scalars()}
        found = {int(i) for i in conn.execute(sa.select(t.c.id).where(where)).scalars()}
        if found:
            conn.execute(sa.delete(t.table).where(self._in_ids(t.c.id, sorted(found), "ids")))
        return found

    def _held(self, conn: sa.Connection, record_type: str, ids: list[int], now_p: sa.BindParameter) -> set[int]:
        """The records of ``ids`` under a live hold in the CRM's own hold list, now."""
        h = self._t("legal_hold")
        stmt = sa.select(h.c.record_id).where(self._live_hold(h, record_type, now_p), self._in_ids(h.c.record_id, ids, "held_ids"))
        return {int(i) for i in conn.execute(stmt).scalars()}

    def minimise_contacts(self, ids: Sequence[int], recheck: Recheck | None = None) -> dict[int, str]:
        """Delete everything about these contacts except what bookkeeping law keeps.

        In one transaction: detach their invoices (``invoice.contact_id`` set NULL; the invoice
        keeps invoice_number, issued_on, financial_year_end, amount, billing_name,
        billing_address), delete their notes, event participations, course registrations and
        survey responses, and the contact row. Outcome ``minimised`` (had invoices),
        ``erased`` (had none), ``already_gone`` or ``held_legal_hold`` (live manual hold on the
        contact or on a child record that would be deleted; a manual hold on one of its
        invoices does not block minimisation, since the invoice itself is kept). ``recheck`` as
        for :meth:`erase`.
        """
        ids = distinct_ids(ids)
        if not ids:
            return {}
        self._ensure_checked()
        outcome = self._in_parts(lambda part: self._minimise_part(part, recheck), ids)
        _log_outcomes("minimise", "crm_contact", outcome)
        return outcome

    def _minimise_part(self, ids: list[int], recheck: Recheck | None) -> dict[int, str]:
        now = dt.datetime.now(dt.UTC)
        now_p = self._ts_param("now", now)
        inv = self._t("invoice")
        with self.engine.begin() as conn:
            changed = self._left_alone(conn, "crm_contact", ids, now, recheck)
            ids = [i for i in ids if i not in changed]
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
        outcome = dict.fromkeys(changed, CHANGED)
        for i in ids:
            if i in refused:
                outcome[i] = refused[i]
            elif i in gone:
                outcome[i] = MINIMISED if i in had_invoice else ERASED
            else:
                outcome[i] = ALREADY_GONE
        return outcome

    def _in_parts(self, work: Callable[[list[int]], dict[int, str]], ids: list[int]) -> dict[int, str]:
        """``work`` on ``ids`` split into up to ``erase_connections`` parts, side by side, each
        part its own transaction (PostgreSQL; one part otherwise). Every part runs to its end
        before a failure of one is raised: a part that committed is not left half-known to the
        caller's retry, which finds its records gone."""
        n = self.erase_connections if self.engine.dialect.name == "postgresql" else 1
        n = max(1, min(n, len(ids) // MIN_PART))
        if n == 1:
            return work(ids)
        size = -(-len(ids) // n)
        parts = [ids[i : i + size] for i in range(0, len(ids), size)]
        with ThreadPoolExecutor(len(parts), thread_name_prefix="crm-erase") as pool:
            futures = [pool.submit(work, part) for part in parts]
        outcome: dict[int, str] = {}
        for future in futures:  # all done (the pool's exit waited): the first failure, if any, is raised
            outcome.update(future.result())
        return outcome

    def _left_alone(
        self, conn: sa.Connection, record_type: str, ids: list[int], now: dt.datetime, recheck: Recheck | None
    ) -> set[int]:
        """The ids ``recheck`` leaves alone, judged on their current frame read in this
        transaction (rows locked first on PostgreSQL, so they cannot change before the commit)."""
        if recheck is None:
            return set()
        t = self._t(_erasable(record_type))
        if conn.dialect.name == "postgresql":
            conn.execute(sa.select(t.c.id).where(self._in_ids(t.c.id, ids, "lock_ids")).with_for_update())
        return {int(i) for i in recheck(self._frame_of(conn, record_type, ids, now))}

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
                # Compared as text: a CRM may keep a table's ids as text (PostgreSQL compares no
                # text with bigint); the hold list is small, the children come by contact_id.
                .select_from(ch.table.join(hh.table, sa.cast(hh.c.record_id, sa.String) == sa.cast(ch.c.id, sa.String)))
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


def _erasable(record_type: str) -> str:
    if record_type == "crm_legal_hold":
        raise ValueError("crm_legal_hold records are managed by people and are never erased here")
    try:
        return ERASABLE[record_type]
    except KeyError:
        raise ValueError(f"unknown record type {record_type!r}; expected one of {tuple(ERASABLE)}") from None



def _log_outcomes(action: str, record_type: str, outcome: dict[int, str]) -> None:
    counts: dict[str, int] = {}
    for v in outcome.values():
        counts[v] = counts.get(v, 0) + 1
    log.info("crm %s %s: %d id(s) %s", action, record_type, len(outcome), dict(sorted(counts.items())))
