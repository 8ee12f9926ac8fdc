"""Erasure on request: one person, named by an e-mail address, erased from the CRM, the
newsletter provider and the ticketing system (the steps of the DAG ``erasure_request``).

The request overrides retention periods and the "active relationship" protections (the person
asked), never a legal hold:

* **CRM.** Every contact with the address (case-insensitive) goes, with its notes, event
  participations, course registrations and survey responses. An invoice still under the
  bookkeeping period (the policy's ``invoice`` rule, as of the request) stays and its contact is
  *minimised* (``invoice.contact_id`` set NULL, the invoice's legal fields kept); an invoice past
  that period is erased. A manual hold (the CRM's ``legal_hold`` table by record id, or the
  ledger's by pseudonym) keeps its record: a hold on a contact keeps everything of that contact;
  a held participation, registration or survey response keeps its contact too (a child cannot
  outlive its contact), the rest of the contact's records still go. The connector re-checks the
  CRM's holds inside each erasing transaction.
* **Newsletter.** The member (``subscriber_hash`` of the address) is deleted permanently
  (``actions/delete-permanent``, never the archiving ``DELETE``), whatever its status.
* **Ticketing.** End users whose primary address is the address (agents and admins are never
  touched); their solved and closed tickets are erased (soft, then permanent deletion), then the
  user. A ticket that is not solved (new/open/pending/hold) is never erased: it is ``deferred``,
  and so is its requester (Zendesk refuses to delete the requester of an unclosed ticket). Run
  the request again once the ticket is solved. Zendesk leaves *archived* tickets (closed for
  more than 120 days) out of a user's ticket list: those are not found here, and the nightly
  ``support-ticket`` rule erases them when their year is over.

Write-ahead ledger under the run's id, rule ``erasure-request``: ``planned`` before a record is
touched, then ``erased``/``already_gone``/``held``/``deferred``/``failed``. The ids of planned
records are kept in the run's staging area (deleted with the report), so a retried task finishes
what an interrupted one began even when the record can no longer be found by address. Every step
is idempotent: a record already gone is success, and the same request again finds nothing and
succeeds.

The address is validated before anything runs and then only used to look records up. It never
goes into a log line, an XCom, an exception message, the ledger or the report: these carry at
most the **request key** ``HMAC(pseudonym key, "erasure_request:" + lower-cased address)``, which
only the key holder can match against an address. Airflow itself keeps the trigger conf (the
address) with the DAG run in its metadata database.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote, quote_plus

from retention import config

log = logging.getLogger("retention")

DAG_ID = "erasure_request"
RULE_ID = "erasure-request"
SYSTEMS = ("crm", "newsletter", "ticketing")
UNSOLVED = ("new", "open", "pending", "hold")
EMAIL_MAX_LENGTH = 254
# One address, local@domain.tld: no spaces, exactly one @, a dotted domain without empty labels.
# The same text is the DAG param's JSON-schema pattern (validated by Airflow before a run is
# created) and, with ``fullmatch`` (no trailing newline either), the first task's re-check.
EMAIL_PATTERN = r'^[^@\s"(),:;<>\[\]\\]+@[^@\s"(),:;<>\[\]\\.]+(?:\.[^@\s"(),:;<>\[\]\\.]+)+$'
_EMAIL = re.compile(EMAIL_PATTERN)
_DONE = ("erased", "already_gone", "held")


class InvalidRequest(ValueError):
    """The request cannot be carried out as given (the message never repeats the address)."""


def normalise_email(value: object) -> str:
    """The address, checked and lower-cased (every system compares addresses case-insensitively).

    Raises :class:`InvalidRequest` with a message that does not repeat the value.
    """
    if not isinstance(value, str) or not value:
        raise InvalidRequest("erasure request: the email parameter is missing (expected one e-mail address)")
    if len(value) > EMAIL_MAX_LENGTH or not _EMAIL.fullmatch(value):
        raise InvalidRequest(
            "erasure request: not an e-mail address (expected exactly one address such as "
            "someone@example.se, without spaces or surrounding text); nothing was looked up or erased"
        )
    return value.lower()


def _pseudonymizer():
    from retention.domain.pseudonyms import Pseudonymizer

    return Pseudonymizer(config.pseudonym_key())


def request_key(email: str) -> str:
    """The request's pseudonym: what the ledger run and the report say instead of the address."""
    return _pseudonymizer().key_for("erasure_request", normalise_email(email))


def _ledger():
    from retention.store.ledger import Ledger

    return Ledger(config.ledger_url())


# --------------------------------------------------------------------------------------- run
@dataclass(frozen=True)
class RequestRun:
    dag_id: str
    run_id: str
    as_of: str
    policy_version: str
    policy_label: str
    dry_run: bool

    @property
    def staging(self):
        from retention.store.staging import RunStaging

        return RunStaging(self.dag_id, self.run_id)


def open_request(dag_id: str, run_id: str, email: object, *, dry_run: bool = False) -> dict:
    """Check the request before anything is looked up: the address, the policy, the pseudonym
    key; then record the run in the ledger (idempotent). Returns counts only."""
    from retention.domain.policy import load_policy

    normalise_email(email)
    policy = load_policy(config.policy_file())
    key = request_key(email)  # also fails now when the pseudonym key is missing
    now = datetime.now(UTC)
    _ledger().open_run(run_id, dag_id, now, policy.version, policy.version_label, bool(dry_run))
    log.info(
        "erasure request accepted: request key %s, policy %s (%s), dry_run=%s; the address is not logged",
        key, policy.version, policy.version_label, bool(dry_run),
    )
    return {"systems": len(SYSTEMS)}


def load_run(dag_id: str, run_id: str) -> RequestRun:
    """The run as ``open_request`` recorded it (as-of time, policy version, dry run)."""
    row = _ledger().run(run_id)
    if row is None:
        raise RuntimeError(f"erasure request run {run_id} was never opened (its first task did not succeed)")
    as_of = row["as_of"] if row["as_of"].tzinfo else row["as_of"].replace(tzinfo=UTC)
    return RequestRun(
        dag_id=dag_id, run_id=run_id, as_of=as_of.isoformat(), policy_version=row["policy_version"],
        policy_label=row["policy_label"] or "", dry_run=bool(row["dry_run"]),
    )


# ------------------------------------------------------------------------- errors and logs
def _address_forms(address: str) -> tuple[str, ...]:
    return tuple({address, quote(address, safe=""), quote_plus(address), quote(address)})


def _mentions(exc: BaseException, forms: tuple[str, ...]) -> bool:
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        text = f"{e!s} {e.args!r}".lower()
        if any(f.lower() in text for f in forms):
            return True
        stack.extend([e.__cause__, e.__context__])
    return False


@contextlib.contextmanager
def _address_withheld(system: str, address: str) -> Iterator[None]:
    """Re-raise an error whose message (or cause) names the address as one that does not."""
    try:
        yield
    except Exception as exc:
        if _mentions(exc, _address_forms(address)):
            raise RuntimeError(
                f"{system}: {type(exc).__name__} during the erasure request (its message named the "
                "address and is withheld); retry the task"
            ) from None
        raise


# ------------------------------------------------------------------------- plan and ledger
@dataclass
class Item:
    """One record of the person in one system, and what the request does with it."""

    record_type: str
    record_id: str
    action: str  # "erase", "minimise", "hold" (kept: a legal hold) or "defer" (not yet: unsolved ticket)
    hold: str | None = None
    detail: str | None = None
    key: str = ""


class _Book:
    """The ledger of one system in one request run: write-ahead, resume, outcome counts."""

    def __init__(self, run: RequestRun, system: str, *, keep_ids: bool = True):
        self.run = run
        self.system = system
        self.keep_ids = keep_ids
        self.pseudo = _pseudonymizer()
        self.ledger = _ledger()
        self.done = {} if run.dry_run else self.ledger.statuses(run.run_id, system)
        self.ids: dict[str, dict[str, str]] = {}
        if keep_ids and not run.dry_run:
            self.ids = run.staging.read_json(system, "request_ids") or {}
        self.counts: dict[str, Counter] = {}
        self.holds = self._live_ledger_holds()

    def key(self, record_type: str, record_id: str) -> str:
        return self.pseudo.key_for(record_type, record_id)

    def _live_ledger_holds(self) -> dict[tuple[str, str], str]:
        as_of = datetime.fromisoformat(self.run.as_of)
        live = {}
        for h in self.ledger.holds():
            expires = h.get("expires_at")
            if expires is not None and (expires if expires.tzinfo else expires.replace(tzinfo=UTC)) <= as_of:
                continue
            live[(h["record_type"], h["record_key"])] = h["reason"]
        return live

    def ledger_hold(self, record_type: str, record_id: str) -> str | None:
        """The reason of a live manual hold on this record in the ledger (by pseudonym), if any."""
        return self.holds.get((record_type, self.key(record_type, record_id)))

    def unfinished(self, record_type: str) -> dict[str, str]:
        """key -> record id of this run's entries left ``planned``/``failed`` by an earlier attempt."""
        known = self.ids.get(record_type, {})
        return {
            key: known[key]
            for (rt, key), status in self.done.items()
            if rt == record_type and status in ("planned", "failed") and key in known
        }

    def plan(self, items: list[Item]) -> list[Item]:
        """Name the items by pseudonym, add what an earlier attempt left unfinished, keep the
        ids (staging) and write the ledger ahead. Returns the items still to be carried out."""
        for it in items:
            it.key = self.key(it.record_type, it.record_id)
        seen = {(it.record_type, it.key) for it in items}
        if self.keep_ids:
            for record_type in {rt for rt, _ in self.done}:
                for key, rid in self.unfinished(record_type).items():
                    if (record_type, key) not in seen:
                        items.append(Item(record_type, rid, "erase", key=key))
                        seen.add((record_type, key))
        lost = [k for k, s in self.done.items() if s in ("planned", "failed") and k not in seen]
        if lost:
            log.warning("%s: %d ledger entries of an earlier attempt cannot be resumed (ids not staged)", self.system, len(lost))
        if self.run.dry_run:
            for it in items:
                would = {"hold": "would_keep", "defer": "would_defer"}.get(it.action, "would_erase")
                self.counts.setdefault(it.record_type, Counter())[would] += 1
            return []
        if self.keep_ids and items:
            for it in items:
                self.ids.setdefault(it.record_type, {})[it.key] = it.record_id
            self.run.staging.write_json(self.system, "request_ids", self.ids)
        new = [it for it in items if (it.record_type, it.key) not in self.done]
        self.ledger.write_ahead(self.run.run_id, self.run.policy_version, self.system, _rows([i for i in new if i.action == "hold"]), status="held")
        self.ledger.write_ahead(self.run.run_id, self.run.policy_version, self.system, _rows([i for i in new if i.action != "hold"]))
        for it in new:
            self.done[(it.record_type, it.key)] = "held" if it.action == "hold" else "planned"
        todo = []
        for it in items:
            status = self.done[(it.record_type, it.key)]
            if status in _DONE:
                continue
            if it.action == "defer":
                self.complete(it.record_type, {it.key: "deferred"}, {it.key: it.detail or "not yet"})
            else:
                todo.append(it)
        return todo

    def complete(self, record_type: str, outcomes: dict[str, str], detail: dict[str, str] | None = None) -> None:
        if not outcomes:
            return
        self.ledger.complete(self.run.run_id, self.system, record_type, outcomes, detail)
        for key, status in outcomes.items():
            self.done[(record_type, key)] = status

    def summary(self, **extra) -> dict:
        """Counts of the whole run in this system (earlier attempts included: the ledger's
        statuses), plus what the ledger does not list (notes erased with their contact; the
        counts of a dry run)."""
        counts: dict[str, Counter] = {rt: Counter(c) for rt, c in self.counts.items()}
        for (record_type, _), status in self.done.items():
            counts.setdefault(record_type, Counter())[status] += 1
        records = {rt: dict(sorted(c.items())) for rt, c in sorted(counts.items())}
        totals: Counter = Counter()
        for c in counts.values():
            totals.update(c)
        out = {"dry_run": self.run.dry_run, "records": records, "totals": dict(sorted(totals.items())), **extra}
        self.run.staging.write_json(self.system, "request", out)
        return out


def _rows(items: list[Item]) -> list[dict]:
    return [
        {
            "record_type": it.record_type, "record_key": it.key, "rule_id": RULE_ID,
            "action": "erase" if it.action == "defer" else it.action, "hold": (it.hold or None) and it.hold[:200],
        }
        for it in items
    ]


def _finish(book: _Book, verified: int, still_present: int) -> dict:
    """XCom-safe counts; raises when anything failed or an erased record is still there."""
    summary = book.summary(verified=verified, still_present=still_present)
    totals = summary["totals"]
    log.info(
        "%s: %s%s", book.system, ", ".join(f"{k} {v}" for k, v in totals.items()) or "nothing found",
        f"; verified {verified} gone" if verified else "",
    )
    if still_present:
        raise RuntimeError(f"{book.system}: {still_present} records the ledger marks erased are still present")
    if totals.get("failed") or totals.get("planned"):
        n = totals.get("failed", 0) + totals.get("planned", 0)
        raise RuntimeError(f"{book.system}: {n} erasures failed or unfinished (see the ledger); retry the task to resume")
    counts = {k: int(v) for k, v in totals.items()}
    counts["found"] = sum(counts.values())
    return counts


# --------------------------------------------------------------------------------- systems
def erase_newsletter(run: RequestRun, email: str, client, list_id: str) -> dict:
    """The newsletter member with this address, deleted permanently."""
    address = normalise_email(email)
    with _address_withheld("newsletter", address):
        book = _Book(run, "newsletter", keep_ids=False)  # the id (subscriber hash) follows from the address
        sub_hash = client.subscriber_hash(address)
        key = book.key("newsletter_member", sub_hash)
        member = client.get_member(list_id, sub_hash, fields=("id", "status"))
        items = []
        if member is not None or book.done.get(("newsletter_member", key)) in ("planned", "failed"):
            hold = book.ledger_hold("newsletter_member", sub_hash)
            items.append(Item("newsletter_member", sub_hash, "hold" if hold else "erase", hold=hold))
        todo = book.plan(items)
        if todo:
            outcomes = client.delete_permanent_many(list_id, [it.record_id for it in todo])
            book.complete("newsletter_member", {it.key: _status(outcomes.get(it.record_id)) for it in todo})
        gone = [it.record_id for it in items if book.done.get((it.record_type, it.key)) in ("erased", "already_gone")]
        present = [h for h, exists in client.exists_many(list_id, gone).items() if exists] if gone else []
        return _finish(book, len(gone), len(present))


def erase_ticketing(run: RequestRun, email: str, client) -> dict:
    """The person's end-user accounts and the tickets they requested (unsolved ones deferred)."""
    address = normalise_email(email)
    with _address_withheld("ticketing", address):
        book = _Book(run, "ticketing")
        items: list[Item] = []
        tickets_of: dict[str, list[str]] = {}
        for uid in client.find_user_ids_by_email(address):
            user = str(uid)
            unsolved = held = False
            tickets_of[user] = []
            for ticket in client.iter_requested_tickets(uid):
                tid = str(int(ticket["id"]))
                hold = book.ledger_hold("support_ticket", tid)
                if hold:
                    items.append(Item("support_ticket", tid, "hold", hold=hold))
                    held = True
                elif ticket.get("status") in UNSOLVED:
                    items.append(Item("support_ticket", tid, "defer", detail="unsolved ticket: erase after it is solved"))
                    unsolved = True
                else:
                    items.append(Item("support_ticket", tid, "erase"))
                    tickets_of[user].append(tid)
            hold = book.ledger_hold("ticket_user", user)
            if hold:
                items.append(Item("ticket_user", user, "hold", hold=hold))
            elif unsolved:
                items.append(Item("ticket_user", user, "defer", detail="requester of an unsolved ticket"))
            elif held:
                items.append(Item("ticket_user", user, "hold", hold="requester of a ticket under legal hold"))
            else:
                items.append(Item("ticket_user", user, "erase"))
        todo = book.plan(items)
        tickets = [it for it in todo if it.record_type == "support_ticket"]
        if tickets:
            result = client.erase_tickets([int(it.record_id) for it in tickets])
            book.complete("support_ticket", {it.key: _status(result.get(int(it.record_id))) for it in tickets})
        failed_tickets = {
            it.record_id for it in items
            if it.record_type == "support_ticket" and book.done.get((it.record_type, it.key)) == "failed"
        }
        for it in (i for i in todo if i.record_type == "ticket_user"):
            if failed_tickets & set(tickets_of.get(it.record_id, ())):
                book.complete("ticket_user", {it.key: "failed"}, {it.key: "a ticket of theirs could not be erased"})
                continue
            outcome = client.erase_users([int(it.record_id)]).get(int(it.record_id))
            status = _status(outcome)
            detail = {it.key: "Zendesk: requester of a ticket that is not closed"} if status == "deferred" else None
            book.complete("ticket_user", {it.key: status}, detail)
        verified = still = 0
        for record_type, remaining in (("support_ticket", client.remaining_tickets), ("ticket_user", client.remaining_users)):
            gone = [int(it.record_id) for it in items if it.record_type == record_type
                    and book.done.get((record_type, it.key)) in ("erased", "already_gone")]
            if gone:
                verified += len(gone)
                still += len(remaining(gone))
        return _finish(book, verified, still)


def erase_crm(run: RequestRun, email: str, connector, policy=None) -> dict:
    """The person's contacts and everything of theirs, except what a legal hold keeps."""
    import pandas as pd

    from retention.domain.engine import active_holds, plan_record_type
    from retention.domain.policy import load_policy

    address = normalise_email(email)
    connector.engine.hide_parameters = True  # a database error must not print the address it was given
    with _address_withheld("crm", address):
        policy = policy or load_policy(config.policy_file())
        as_of = pd.Timestamp(run.as_of)
        book = _Book(run, "crm")
        contacts = connector.find_contact_ids_by_email(address)
        owned = connector.contact_records(contacts)
        holds = active_holds(connector.read_frame("crm_legal_hold"), as_of)
        crm_holds = {(str(t), str(int(i))): str(r) for t, i, r in zip(holds["record_type"], holds["record_id"], holds["reason"]) if pd.notna(i)}

        def hold_of(record_type: str, record_id: str) -> str | None:
            return crm_holds.get((record_type, record_id)) or book.ledger_hold(record_type, record_id)

        invoices = owned["crm_invoice"].assign(record_id=owned["crm_invoice"]["record_id"].astype("string"))
        due = set(plan_record_type(invoices, "crm_invoice", policy, as_of)["record_id"].astype(str))
        children = ("crm_event_participation", "crm_course_registration", "crm_survey_response")
        items: list[Item] = []
        for cid in (str(c) for c in contacts):
            contact_hold = hold_of("crm_contact", cid)
            child_held = invoice_kept = False
            for record_type in children:
                frame = owned[record_type]
                for rid in frame.loc[frame["contact_id"].astype("string") == cid, "record_id"].astype(str):
                    hold = contact_hold or hold_of(record_type, rid)
                    child_held |= bool(hold)
                    items.append(Item(record_type, rid, "hold" if hold else "erase", hold=hold))
            for rid in invoices.loc[invoices["contact_id"].astype("string") == cid, "record_id"].astype(str):
                hold = contact_hold or hold_of("crm_invoice", rid) or (None if rid in due else "bookkeeping")
                invoice_kept |= bool(hold)
                items.append(Item("crm_invoice", rid, "hold" if hold else "erase", hold=hold))
            if contact_hold:
                items.append(Item("crm_contact", cid, "hold", hold=contact_hold))
            elif child_held:
                items.append(Item("crm_contact", cid, "hold", hold="a record of this contact is under legal hold"))
            elif invoice_kept:
                items.append(Item("crm_contact", cid, "minimise", hold="bookkeeping"))
            else:
                items.append(Item("crm_contact", cid, "erase"))
        todo = book.plan(items)
        for record_type in (*children, "crm_invoice"):
            batch = [it for it in todo if it.record_type == record_type]
            if batch:
                result = connector.erase(record_type, [int(it.record_id) for it in batch])
                book.complete(record_type, {it.key: _status(result.get(int(it.record_id))) for it in batch})
        batch = [it for it in todo if it.record_type == "crm_contact"]
        notes = 0
        if batch:
            # Minimising detaches what invoices remain and takes the notes and every other
            # child with the contact; a contact without invoices is simply erased.
            result = connector.minimise_contacts([int(it.record_id) for it in batch])
            book.complete("crm_contact", {it.key: _status(result.get(int(it.record_id))) for it in batch})
            note_counts = owned["communication_note"]
            erased = {it.record_id for it in batch if result.get(int(it.record_id)) in ("erased", "minimised")}
            notes = int(note_counts.loc[note_counts["contact_id"].astype("string").isin(erased), "n"].sum())
        if notes:
            book.counts.setdefault("communication_note", Counter())["erased"] += notes
        verified = still = 0
        for record_type in (*children, "crm_invoice", "crm_contact"):
            gone = [int(it.record_id) for it in items if it.record_type == record_type
                    and book.done.get((record_type, it.key)) in ("erased", "already_gone")]
            if gone:
                verified += len(gone)
                still += len(connector.existing(record_type, gone))
        return _finish(book, verified, still)


_CONNECTOR_STATUS = {
    "erased": "erased",
    "minimised": "erased",
    "already_gone": "already_gone",
    "held_legal_hold": "held",
    "held_invoice": "deferred",
    "not_yet": "deferred",
}


def _status(outcome: str | None) -> str:
    return _CONNECTOR_STATUS.get(outcome or "", "failed")


def erase_system(run: RequestRun, system: str, email: str) -> dict:
    """One system's part of the request, through its Airflow Connection (task run time only)."""
    if system == "newsletter":
        from retention.systems.newsletter.hook import MailchimpHook

        hook = MailchimpHook()
        try:
            return erase_newsletter(run, email, hook.get_conn(), hook.list_id)
        finally:
            hook.close()
    if system == "ticketing":
        from retention.systems.ticketing.hook import ZendeskHook

        hook = ZendeskHook()
        try:
            return erase_ticketing(run, email, hook.get_conn())
        finally:
            hook.close()
    if system == "crm":
        from retention.systems.crm.hook import CrmHook

        connector = CrmHook().get_conn()
        try:
            return erase_crm(run, email, connector)
        finally:
            connector.engine.dispose()
    raise ValueError(f"unknown system {system!r}")


# ---------------------------------------------------------------------------------- report
def _ledger_counts(run_id: str) -> dict:
    import sqlalchemy as sa

    from retention.store.ledger import erasure_ledger as t

    q = (
        sa.select(t.c.system, t.c.record_type, t.c.status, sa.func.count().label("n"))
        .where(t.c.run_id == run_id)
        .group_by(t.c.system, t.c.record_type, t.c.status)
    )
    out: dict = {}
    with _ledger().engine.connect() as conn:
        for system, record_type, status, n in conn.execute(q):
            out.setdefault(system, {}).setdefault(record_type, {})[status] = int(n)
    return out


def report(dag_id: str, run_id: str, email: str) -> dict | None:
    """Counts per system and record type, written to ``RETENTION_HOME/reports/`` and the ledger.

    ``None`` when the request was never accepted (nothing ran). State ``success`` when every
    system finished with nothing planned or failed left over; ``outstanding`` counts what was
    deferred (an unsolved ticket and its requester): run the request again later for those.
    """
    ledger = _ledger()
    row = ledger.run(run_id)
    if row is None:
        return None
    run = load_run(dag_id, run_id)
    staging = run.staging
    per_system = {}
    complete = True
    ledger_counts = _ledger_counts(run_id)
    for system in SYSTEMS:
        summary = staging.read_json(system, "request")
        complete &= summary is not None
        records = dict((summary or {}).get("records") or {})
        for record_type, statuses in ledger_counts.get(system, {}).items():  # the ledger is the truth
            records[record_type] = {**records.get(record_type, {}), **statuses}
        per_system[system] = {
            "completed": summary is not None,
            "records": records,
            "verified_gone": (summary or {}).get("verified", 0),
        }
    totals: Counter = Counter()
    for s in per_system.values():
        for statuses in s["records"].values():
            totals.update(statuses)
    unfinished = totals.get("planned", 0) + totals.get("failed", 0)
    state = "success" if complete and not unfinished else "failed"
    rep = {
        "dag_id": dag_id, "run_id": run_id, "request_key": request_key(email), "as_of": run.as_of,
        "policy_version": run.policy_version, "policy_label": run.policy_label, "dry_run": run.dry_run,
        "rule_id": RULE_ID, "state": state, "outstanding": int(totals.get("deferred", 0)),
        "totals": dict(sorted(totals.items())), "systems": per_system,
        "note": (
            "Counts only: no address, name or record id. The request key is the keyed pseudonym of the "
            "lower-cased address. Airflow keeps the address itself in this DAG run's conf in its "
            "metadata database: delete the DAG run there when the request is closed."
        ),
    }
    text = render_report(rep)
    out = config.reports_dir()
    stem = f"{dag_id}__{run_id}".replace(":", "_").replace("+", "_")
    (out / f"{stem}.json").write_text(json.dumps(rep, indent=2, default=str))
    (out / f"{stem}.txt").write_text(text)
    for line in text.splitlines():
        log.info("%s", line)
    ledger.close_run(run_id, state, rep)
    if state == "success":
        staging.remove()
    return {
        "state": state, "erased": int(totals.get("erased", 0)), "already_gone": int(totals.get("already_gone", 0)),
        "held": int(totals.get("held", 0)), "deferred": int(totals.get("deferred", 0)), "failed": int(unfinished),
    }


def render_report(rep: dict) -> str:
    lines = [
        f"Erasure request {rep['run_id']} ({'DRY RUN, nothing erased' if rep['dry_run'] else 'erasing'}), "
        f"request key {rep['request_key']}",
        f"  as of {rep['as_of']}, policy {rep['policy_version']} ({rep['policy_label']}), state {rep['state']}"
        + (f", {rep['outstanding']} deferred: run the request again once they are due" if rep["outstanding"] else ""),
    ]
    for system, s in rep["systems"].items():
        if not s["completed"]:
            lines.append(f"  {system}: did not finish")
        elif not s["records"]:
            lines.append(f"  {system}: nothing found")
        else:
            lines.append(f"  {system}:")
            for record_type, statuses in sorted(s["records"].items()):
                lines.append(f"    {record_type:<26} " + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())))
    return "\n".join(lines)


__all__: list[str] = [
    "DAG_ID", "EMAIL_PATTERN", "InvalidRequest", "RequestRun", "erase_crm", "erase_newsletter", "erase_system",
    "erase_ticketing", "load_run", "normalise_email", "open_request", "report", "request_key",
]
