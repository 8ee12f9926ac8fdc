"""Erasure on request: one person, named by an e-mail address, erased from the CRM, the
newsletter provider and the ticketing system (the steps of the DAG ``erasure_request``).

Per system: the adapter finds the person's records (``SourceSystem.find_person``), the domain
decides what the request does with each (``domain.requests``: legal holds kept, an invoice under
the bookkeeping period kept and its contact minimised, an unsolved ticket and its requester
deferred), and the plan goes to the one erasure engine under the run's id, rule
``erasure-request``. The plan is staged (ids, deleted with the report), so a retried task
finishes what an interrupted one began even when the record can no longer be found by address.
Every step is idempotent: a record already gone is success, and the same request again finds
nothing and succeeds.

The request names its person in one of two ways (exactly one): ``email``, the address itself in
the DAG run's conf (for automation; Airflow then keeps the address with the run in its metadata
database), or ``request_id``, a request filed through the request inbox (the plugin
plugins/retention_requests.py, ``store.inbox``): the address is kept there encrypted, each task
reads it back by id, and the report deletes it once the request is complete (success, nothing
deferred, not a dry run); a failed or incomplete request keeps it for its retry.

The address is validated before anything runs and then only used to look records up. It never
goes into a log line, an XCom, an exception message, the ledger or the report: these carry at
most the **request key** ``HMAC(pseudonym key, "erasure_request:" + lower-cased address)``, which
only the key holder can match against an address, and the request id.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterator
from urllib.parse import quote, quote_plus

import pandas as pd

from retention.domain.addresses import EMAIL_MAX_LENGTH, EMAIL_PATTERN, InvalidRequest, normalise_email
from retention.domain.holds import Holds
from retention.domain.records import SOURCE_HOLDS, SYSTEMS
from retention.domain.requests import RULE_ID, plan_request
from retention.domain.statuses import UNFINISHED, Status
from retention.runs.context import RunInfo, open_run, pseudonymizer, task_ledger
from retention.runs.context import load_run as _load_run
from retention.runs.erasing import ErasureEngine
from retention.store.inbox import RequestInbox
from retention.store.reports import ledger_counts, status_line, total, write_report
from retention.systems.base import SourceSystem, adapter_for

log = logging.getLogger("retention")

DAG_ID = "erasure_request"
PLAN = "request_plan"

__all__ = [
    "DAG_ID", "EMAIL_MAX_LENGTH", "EMAIL_PATTERN", "RULE_ID", "InvalidRequest", "address_of", "erase_person", "erase_system",
    "load_run", "normalise_email", "open_request", "report", "request_key",
]


def request_key(email: str) -> str:
    """The request's pseudonym: what the ledger run and the report say instead of the address."""
    return pseudonymizer().key_for("erasure_request", normalise_email(email))


def address_of(email: object, request_id: object = None) -> str:
    """The request's address, checked and lower-cased: the ``email`` param, or the request
    inbox's address for ``request_id``; exactly one of them. :class:`InvalidRequest` (or a
    ``ConfigError`` for the request key) in one line that never repeats an address."""
    has_email, has_id = email not in (None, ""), request_id not in (None, "")
    if has_email and has_id:
        raise InvalidRequest("erasure request: give either email or request_id, not both")
    if has_id:
        return RequestInbox.configured().address(request_id)
    if not has_email:
        raise InvalidRequest("erasure request: give either email or request_id (the request form's id); neither was given")
    return normalise_email(email)


def open_request(dag_id: str, run_id: str, email: object, *, request_id: object = None, dry_run: bool = False) -> dict:
    """Check the request before anything is looked up: the address (or the filed request), the
    policy, the pseudonym key; then record the run in the ledger (idempotent). Counts only."""
    address = address_of(email, request_id)
    key = request_key(address)  # also fails now when the pseudonym key is missing
    run = RunInfo.from_dict(open_run(dag_id, run_id, None, dry_run=dry_run, max_plan_share=None))
    log.info(
        "erasure request accepted: request key %s%s, policy %s (%s), dry_run=%s; the address is not logged",
        key, f", request id {request_id}" if request_id else "", run.policy_version, run.policy_label, run.dry_run,
    )
    return {"systems": len(SYSTEMS)}


def load_run(dag_id: str, run_id: str) -> RunInfo:
    """The run as ``open_request`` recorded it (as-of time, policy version, dry run)."""
    with task_ledger() as ledger:
        return _load_run(dag_id, run_id, ledger)


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


# --------------------------------------------------------------------------------- one system
def _with_earlier_attempt(run: RunInfo, system: str, plan: pd.DataFrame) -> pd.DataFrame:
    """This attempt's plan, plus the rows of an earlier attempt's plan it no longer finds (a
    contact minimised before the task died cannot be found by its address any more)."""
    try:
        earlier = run.staging.read_frame(system, PLAN)
    except FileNotFoundError:
        return plan
    seen = set(zip(plan["record_type"].tolist(), plan["record_key"].tolist()))
    lost = earlier[[(t, k) not in seen for t, k in zip(earlier["record_type"].tolist(), earlier["record_key"].tolist())]]
    return pd.concat([plan, lost.astype(plan.dtypes.to_dict())], ignore_index=True) if len(lost) else plan


def _notes_erased(found: dict[str, pd.DataFrame], plan: pd.DataFrame, status: dict) -> int:
    """Communication notes have no record type of their own: they went with the contacts found
    now and erased (CRM)."""
    notes = found.get("communication_note")
    if notes is None or notes.empty:
        return 0
    contacts = plan[plan["record_type"] == "crm_contact"]
    erased = {i for i, k in zip(contacts["record_id"].tolist(), contacts["record_key"].tolist())
              if status.get(("crm_contact", k)) == Status.ERASED}
    return int(notes.loc[notes["contact_id"].astype("string").isin(erased), "n"].sum())


def erase_person(run: RunInfo, system: str, email: str, adapter: SourceSystem) -> dict:
    """One system's part of the request: find, plan, hand to the engine, verify. XCom-safe counts;
    raises when anything failed or an erased record is still there."""
    address = normalise_email(email)
    with _address_withheld(system, address), task_ledger() as ledger:
        policy = run.policy()
        as_of = pd.Timestamp(run.as_of)
        found = adapter.find_person(address)
        holds = Holds.at(as_of, source=found.get(SOURCE_HOLDS), ledger=ledger.holds())
        plan = plan_request(system, found, policy, as_of, holds, pseudonymizer())
        engine = ErasureEngine(ledger, run.run_id, system, adapter, run.policy_version)
        extra: dict[str, dict[str, int]] = {}
        if run.dry_run:
            records = engine.count(plan).would_by_type
            verified = still = 0
        else:
            plan = _with_earlier_attempt(run, system, plan)
            if len(plan):
                run.staging.write_frame(system, PLAN, plan)
            engine.erase(plan)
            verified, still = engine.verify(plan)
            status = ledger.statuses(run.run_id, system)
            records = {}
            for (record_type, _), s in status.items():
                records.setdefault(record_type, Counter())[s] += 1
            records = {rt: dict(sorted(c.items())) for rt, c in sorted(records.items())}
            notes = _notes_erased(found, plan, status)
            if notes:
                extra["communication_note"] = {"erased": notes}
    records = {**records, **extra}
    totals = total(records.values())
    summary = {"dry_run": run.dry_run, "records": records, "totals": totals, "verified": verified, "still_present": still}
    run.staging.write_json(system, "request", summary)
    log.info(
        "%s: %s%s", system, ", ".join(f"{k} {v}" for k, v in totals.items()) or "nothing found",
        f"; verified {verified} gone" if verified else "",
    )
    if still:
        raise RuntimeError(f"{system}: {still} records the ledger marks erased are still present")
    unfinished = sum(totals.get(s, 0) for s in UNFINISHED)
    if unfinished:
        raise RuntimeError(f"{system}: {unfinished} erasures failed or unfinished (see the ledger); retry the task to resume")
    return {**totals, "found": sum(totals.values())}


def erase_system(run: RunInfo, system: str, email: str) -> dict:
    """One system's part of the request, through its Airflow Connection (task run time only)."""
    adapter = adapter_for(system)
    try:
        return erase_person(run, system, email, adapter)
    finally:
        adapter.close()


# ---------------------------------------------------------------------------------- report
def report(dag_id: str, run_id: str, email: str | None, request_id: str | None = None) -> dict | None:
    """Counts per system and record type, written by the one report writer.

    ``None`` when the request was never accepted (nothing ran). State ``success`` when every
    system finished with nothing planned or failed left over; ``outstanding`` counts what was
    deferred (an unsolved ticket and its requester): run the request again later for those.

    A request filed through the inbox (``request_id``) is complete when its state is success,
    nothing is outstanding and it was no dry run: then its encrypted address is deleted from the
    inbox, after the report is written. Otherwise it stays there for the retry or the next run.
    """
    with task_ledger() as ledger:
        if ledger.run(run_id) is None:
            return None
        address = address_of(email, request_id)
        run = _load_run(dag_id, run_id, ledger)
        staging = run.staging
        per_system = {}
        complete = True
        counts = ledger_counts(ledger, run_id, by="record_type")
        for system in SYSTEMS:
            summary = staging.read_json(system, "request")
            complete &= summary is not None
            records = dict((summary or {}).get("records") or {})
            for record_type, statuses in counts.get(system, {}).items():  # the ledger is the truth
                records[record_type] = {**records.get(record_type, {}), **statuses}
            per_system[system] = {
                "completed": summary is not None,
                "records": records,
                "verified_gone": (summary or {}).get("verified", 0),
            }
        totals = total(statuses for s in per_system.values() for statuses in s["records"].values())
        unfinished = sum(totals.get(s, 0) for s in UNFINISHED)
        state = "success" if complete and not unfinished else "failed"
        rep = {
            "dag_id": dag_id, "run_id": run_id, "request_key": request_key(address), "request_id": request_id, "as_of": run.as_of,
            "policy_version": run.policy_version, "policy_label": run.policy_label, "dry_run": run.dry_run,
            "rule_id": RULE_ID, "state": state, "outstanding": int(totals.get(Status.DEFERRED, 0)),
            "totals": totals, "systems": per_system,
            "note": (
                "Counts only: no address, name or record id. The request key is the keyed pseudonym of the "
                "lower-cased address. " + (
                    "The address was kept encrypted in the request inbox under the request id, never in Airflow; "
                    "it is deleted there once the request is complete."
                    if request_id else
                    "Airflow keeps the address itself in this DAG run's conf in its metadata database: delete the "
                    "DAG run there when the request is closed (or file requests through the request form)."
                )
            ),
        }
        write_report(ledger, staging, rep, render_report(rep))
    if request_id:
        _close_filed_request(request_id, complete=state == "success" and not rep["outstanding"] and not run.dry_run)
    return {
        "state": state, "erased": int(totals.get(Status.ERASED, 0)), "already_gone": int(totals.get(Status.ALREADY_GONE, 0)),
        "held": int(totals.get(Status.HELD, 0)), "deferred": int(totals.get(Status.DEFERRED, 0)), "failed": int(unfinished),
    }


def _close_filed_request(request_id: str, *, complete: bool) -> None:
    """Delete a complete request's address from the inbox; say why an incomplete one keeps it."""
    if complete:
        RequestInbox.configured().forget(request_id)
        log.info("erasure request %s complete: its address deleted from the request inbox", request_id)
    else:
        log.info(
            "erasure request %s not complete (failed, deferred records or a dry run): its address stays encrypted "
            "in the request inbox; trigger erasure_request with {\"request_id\": \"%s\"} again to finish it",
            request_id, request_id,
        )


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
                lines.append(status_line(record_type, statuses))
    return "\n".join(lines)

