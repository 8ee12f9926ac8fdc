"""The CRM part of retention_nightly end to end, on SQLite and on a real PostgreSQL.

A synthetic CRM (``retention_dev.synthetic.crm``: a bulk block plus its edge cases) goes through
open_run → extract → plan → validate → erase → verify → report, called directly; one test runs
the real DAG with ``dag.test()``. Every outcome is judged from the database itself with plain
SQL, against expectations this module computes on its own from the privacy notice's rules
(``Oracle``), never from the pipeline's frames or plan (the late-hold test reads the plan only
to pick which records to put on hold):

* calendar periods in Europe/Stockholm (``P1Y`` from 29 February is 28 February);
* a calendar date that ends something (membership end, event date, course end) is the last
  day of it: a period counted from it starts when that local day is over, and ends at the start
  of a local day;
* a membership is running while a period has no end or ends today or later (local date);
* invoices are erasable from 1 January of (financial-year-end year + 8), whatever month the
  financial year ends in, and until then they keep their contact minimised, not erased;
* the event participation of an active member who opted out goes once the event's day is over;
* records under a live manual hold, records of active relationships and records that cannot be
  judged (a missing, impossible or future clock) are left alone.

PostgreSQL: ``scripts/postgres.sh retention_crm_pipeline_test`` (own database); its ``public``
schema is dropped and recreated around every test. A missing PostgreSQL fails, never skips.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import os
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa

from retention.runs import nightly as P
from retention.systems.crm.adapter import CrmAdapter
from retention.systems.crm.client import CrmConnector
from retention_dev.synthetic import crm as synthetic

LOCAL = ZoneInfo("Europe/Stockholm")
UTC = dt.UTC
DAG_ID = "retention_nightly"
PG_DB = "retention_crm_pipeline_test"
CONTACTS = 2500
SEED = 20261125
DUE_SHARE = 0.05
TABLES = (
    "organisation", "membership", "contact", "communication_note", "event_participation",
    "course_registration", "survey_response", "invoice", "legal_hold",
)
CHILD_TABLES = {
    "crm_event_participation": "event_participation",
    "crm_course_registration": "course_registration",
    "crm_survey_response": "survey_response",
}
TYPE_TABLE = {
    "crm_contact": "contact",
    "crm_event_participation": "event_participation",
    "crm_course_registration": "course_registration",
    "crm_survey_response": "survey_response",
    "crm_invoice": "invoice",
}
INVOICE_LEGAL_FIELDS = ("invoice_number", "issued_on", "financial_year_end", "amount", "billing_name", "billing_address")


# ------------------------------------------------------------------------------ fixtures
@dataclass
class Crm:
    backend: str
    url: str
    engine: sa.Engine

    def connector_engine(self) -> sa.Engine:
        return sa.create_engine(self.url)


@pytest.fixture(params=["sqlite", "postgresql"])
def crm(request, tmp_path, retention_home):
    """An empty CRM database: a fresh SQLite file, or the PostgreSQL test database with a
    freshly recreated ``public`` schema."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'crm.db'}"
        engine = sa.create_engine(url)
    else:
        url = pg_url(request)
        engine = sa.create_engine(url)
        reset_pg(engine)
    yield Crm(request.param, url, engine)
    engine.dispose()
    if request.param != "sqlite":
        reset_pg(engine)
        engine.dispose()


def pg_url(request) -> str:
    try:
        return request.getfixturevalue("postgres_url_for")(PG_DB)
    except Exception as exc:  # noqa: BLE001 - a missing PostgreSQL is a failure, not a skip
        pytest.fail(f"PostgreSQL for the CRM pipeline tests could not be started: {exc}", pytrace=False)


def reset_pg(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP SCHEMA IF EXISTS public CASCADE")
        conn.exec_driver_sql("CREATE SCHEMA public")


def pick_as_of() -> dt.datetime:
    """Now, unless it is within three hours after local midnight: then just before midnight.

    Date-clocked deadlines fall at the start of a local day; the pipeline currently puts them
    one to two hours later (see ``test_date_deadlines_fall_at_local_midnight``). Keeping the
    main runs out of that window keeps them deterministic whatever the time of day; the
    expectations are computed for whatever as-of time is chosen.
    """
    now = dt.datetime.now(UTC)
    local = now.astimezone(LOCAL)
    if local.hour >= 3:
        return now
    return local.replace(hour=0, minute=0, second=0, microsecond=0).astimezone(UTC) - dt.timedelta(seconds=1)


def generate(crm: Crm, *, contacts: int = CONTACTS, malformed: bool = False) -> dict[str, list[int]]:
    """The synthetic CRM as of now; with the generator's due share the old event tags alone
    come close to the policy's 25% plan guard, so fewer bulk contacts are due here."""
    synthetic.generate(crm.engine, contacts=contacts, seed=SEED, now=dt.datetime.now(UTC), due_share=DUE_SHARE)
    return synthetic.generate_malformed(crm.engine, now=dt.datetime.now(UTC)) if malformed else {}


# ------------------------------------------------------------------------------ the pipeline
@dataclass
class Run:
    info: P.RunInfo
    steps: dict = field(default_factory=dict)

    @property
    def report(self) -> dict:
        return json.loads(Path(self.steps["report"]["report"]).read_text())


def run_pipeline(
    crm: Crm,
    as_of: dt.datetime,
    *,
    dry_run: bool = False,
    max_plan_share: float | None = None,
    before_erase=None,
    plan_only: bool = False,
) -> Run:
    run_id = f"manual__crm_pipeline_test_{uuid.uuid4().hex[:8]}"
    run = Run(P.RunInfo.from_dict(P.open_run(DAG_ID, run_id, as_of, dry_run=dry_run, max_plan_share=max_plan_share)))
    adapter = CrmAdapter(CrmConnector(crm.connector_engine()))
    try:
        run.steps["extract"] = P.extract(run.info, "crm", adapter)
        run.steps["plan"] = P.plan(run.info, "crm")
        if plan_only:
            run.steps["plan_frame"] = run.info.staging.read_frame("crm", "plan")
            return run
        run.steps["validate"] = P.validate(run.info, "crm")
        if before_erase is not None:
            before_erase(run)
        run.steps["erase"] = P.erase(run.info, "crm", adapter)
        run.steps["verify"] = P.verify(run.info, "crm", adapter)
    finally:
        adapter.close()
        # Like the DAG's report task (trigger rule all_done): always, so the run's system lock
        # in the ledger is released even when a step failed or the run stopped after planning.
        run.steps["report"] = P.report(run.info, ("crm",))
    return run


def ledger_rows(home, run_id: str | None = None) -> list[dict]:
    path = home / "ledger.db"
    if not path.exists():
        return []
    engine = sa.create_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            rows = [dict(r) for r in conn.exec_driver_sql("SELECT * FROM erasure_ledger").mappings()]
    finally:
        engine.dispose()
    return [r for r in rows if run_id is None or r["run_id"] == run_id]


def pseudonym(record_type: str, record_id: int) -> str:
    """HMAC-SHA256(key, "<type>:<id>")[:32], as the policy brief describes the ledger keys."""
    key = os.environ["RETENTION_PSEUDONYM_KEY"].encode()
    return hmac.new(key, f"{record_type}:{record_id}".encode(), hashlib.sha256).hexdigest()[:32]


# ------------------------------------------------------------------------------ the database
Snapshot = dict[str, dict[int, dict]]


def snapshot(engine: sa.Engine) -> Snapshot:
    """Every row of every CRM table, raw as the driver returns it, by id."""
    with engine.connect() as conn:
        return {
            t: {int(r["id"]): dict(r) for r in conn.exec_driver_sql(f"SELECT * FROM {t}").mappings()}
            for t in TABLES
        }


def parse_date(v) -> dt.date | None:
    if v is None:
        return None
    if isinstance(v, dt.datetime):
        return v.date()
    if isinstance(v, dt.date):
        return v
    try:
        return dt.date.fromisoformat(str(v)[:10])
    except ValueError:
        return None


def parse_ts(v) -> dt.datetime | None:
    """A stored timestamp as aware UTC (SQLite keeps naive UTC text); None when unusable."""
    if v is None:
        return None
    if not isinstance(v, dt.datetime):
        try:
            v = dt.datetime.fromisoformat(str(v))
        except ValueError:
            return None
    return v.replace(tzinfo=UTC) if v.tzinfo is None else v.astimezone(UTC)


def add_years(d, years: int):
    try:
        return d.replace(year=d.year + years)
    except ValueError:  # 29 February → 28 February
        return d.replace(year=d.year + years, day=28)


def local_naive(ts: dt.datetime) -> dt.datetime:
    return ts.astimezone(LOCAL).replace(tzinfo=None)


def day_start(d: dt.date) -> dt.datetime:
    return dt.datetime(d.year, d.month, d.day)


def day_over(d: dt.date) -> dt.date:
    """The day after ``d``: a period counted from an end date starts when its day is over."""
    return d + dt.timedelta(days=1)


# ------------------------------------------------------------------------------ the oracle
@dataclass
class Oracle:
    """What the notice's rules say should happen to a CRM snapshot as of a time.

    ``planned``: (record_type, id) → (rule, action, ledger status) of every record due;
    ``survivors``: ids per table expected to remain; ``detached``: invoices whose contact is
    minimised (contact_id NULL afterwards); ``unjudgeable``: (record_type, id) left alone
    because a clock is missing, impossible or in the future.
    """

    before: Snapshot
    as_of: dt.datetime
    today: dt.date
    now: dt.datetime
    planned: dict = field(default_factory=dict)
    survivors: dict = field(default_factory=dict)
    detached: set = field(default_factory=set)
    unjudgeable: set = field(default_factory=set)
    active_contacts: set = field(default_factory=set)

    def __post_init__(self) -> None:
        b = self.before
        as_of = local_naive(self.as_of)
        future = self.now + dt.timedelta(days=1)
        holds = {
            (h["record_type"], int(h["record_id"]))
            for h in b["legal_hold"].values()
            if h["expires_at"] is None or parse_ts(h["expires_at"]) > self.as_of
        }
        ends: dict[int, list] = {}
        for m in b["membership"].values():
            ends.setdefault(int(m["organisation_id"]), []).append(parse_date(m["ends_on"]))
        active_orgs = {o for o, e in ends.items() if any(x is None or x >= self.today for x in e)}
        last_end = {o: max(e) for o, e in ends.items() if o not in active_orgs and e}
        invoices_of: dict[int, list[int]] = {}
        for i in b["invoice"].values():
            if i["contact_id"] is not None:
                invoices_of.setdefault(int(i["contact_id"]), []).append(int(i["id"]))

        due: dict[tuple[str, int], str] = {}  # (type, id) -> rule
        for c in b["contact"].values():
            cid, org, opted = int(c["id"]), c["organisation_id"], bool(c["opted_out"])
            last, created = parse_ts(c["last_interaction_at"]), parse_ts(c["created_at"])
            if (last and last > future) or (created and created > future):
                self.unjudgeable.add(("crm_contact", cid))
                continue
            if org is not None and int(org) in active_orgs:
                self.active_contacts.add(cid)
                continue
            if c["kind"] == "member":
                end = last_end.get(int(org)) if org is not None else None
                if end is None:
                    self.unjudgeable.add(("crm_contact", cid))
                    continue
                deadline, rule = day_start(day_over(end) if opted else day_over(add_years(end, 1))), "former-member-contact"
            else:
                if last is None:
                    self.unjudgeable.add(("crm_contact", cid))
                    continue
                deadline, rule = local_naive(last) if opted else add_years(local_naive(last), 1), "lead"
            if deadline <= as_of:
                due[("crm_contact", cid)] = rule

        contacts = b["contact"]
        for e in b["event_participation"].values():
            eid, c = int(e["id"]), contacts.get(int(e["contact_id"]))
            org = c["organisation_id"] if c else None
            opted = bool(c["opted_out"]) if c else False
            active = org is not None and int(org) in active_orgs
            if active and not opted:
                continue
            on = parse_date(e["event_date"])
            if on is None:
                self.unjudgeable.add(("crm_event_participation", eid))
                continue
            if active:  # opt-out ends marketing use at once, for active members too
                if day_start(day_over(on)) <= as_of:
                    due[("crm_event_participation", eid)] = "event-participation-opted-out"
                continue
            clock = max(on, last_end[int(org)]) if org is not None and int(org) in last_end else on
            if opted:
                # Both rules apply; the earliest deadline wins, a tie goes to the first rule id.
                by_event, by_relationship = day_start(day_over(on)), day_start(day_over(clock))
                if by_relationship <= by_event:
                    if by_relationship <= as_of:
                        due[("crm_event_participation", eid)] = "event-participation"
                elif by_event <= as_of:
                    due[("crm_event_participation", eid)] = "event-participation-opted-out"
            elif day_start(day_over(add_years(clock, 1))) <= as_of:
                due[("crm_event_participation", eid)] = "event-participation"
        for r in b["course_registration"].values():
            end = parse_date(r["course_end"])
            if end is None:
                self.unjudgeable.add(("crm_course_registration", int(r["id"])))
            elif day_start(day_over(end) + dt.timedelta(days=90)) <= as_of:
                due[("crm_course_registration", int(r["id"]))] = "course-registration"
        for s in b["survey_response"].values():
            closed = parse_ts(s["survey_closed_at"])
            if closed is None:
                self.unjudgeable.add(("crm_survey_response", int(s["id"])))
            elif local_naive(closed) + dt.timedelta(days=90) <= as_of:
                due[("crm_survey_response", int(s["id"]))] = "survey-response"
        for i in b["invoice"].values():
            fy_end = parse_date(i["financial_year_end"])
            if fy_end is None:
                self.unjudgeable.add(("crm_invoice", int(i["id"])))
            elif dt.datetime(fy_end.year + 8, 1, 1) <= as_of:
                due[("crm_invoice", int(i["id"]))] = "invoice"

        # Children under a live hold make their contact's erasure refuse (held).
        held_children = {(t, i) for t, i in holds if t in CHILD_TABLES}
        child_contact = {
            (t, i): int(b[table][i]["contact_id"]) for t, table in CHILD_TABLES.items() for i in b[table]
        }
        blocked = {child_contact[k] for k in held_children if k in child_contact}
        gone: dict[str, set[int]] = {t: set() for t in TABLES}
        for (rtype, rid), rule in due.items():
            action = "minimise" if rtype == "crm_contact" and rid in invoices_of else "erase"
            if (rtype, rid) in holds:
                action, status = "hold", "held"
            elif rtype == "crm_contact" and rid in blocked:
                status = "held"
            else:
                status = "erased"
                gone[TYPE_TABLE[rtype]].add(rid)
            self.planned[(rtype, rid)] = (rule, action, status)
        erased_contacts = gone["contact"]
        for table in ("communication_note", "event_participation", "course_registration", "survey_response"):
            gone[table] |= {i for i, r in b[table].items() if int(r["contact_id"]) in erased_contacts}
        self.detached = {
            i for c in erased_contacts for i in invoices_of.get(c, []) if i not in gone["invoice"]
        }
        self.survivors = {t: set(b[t]) - gone[t] for t in TABLES}

    def ledger_expectation(self) -> Counter:
        return Counter(
            (rtype, pseudonym(rtype, rid), rule, action, status)
            for (rtype, rid), (rule, action, status) in self.planned.items()
        )


def diff(label: str, got: set, want: set) -> str:
    extra, missing = sorted(got - want), sorted(want - got)
    return f"{label}: {len(extra)} unexpected {extra[:10]}, {len(missing)} missing {missing[:10]}"


def assert_db_matches(oracle: Oracle, after: Snapshot) -> None:
    """Exactly the expected rows remain, unchanged except invoices detached from a minimised
    contact."""
    for t in TABLES:
        assert set(after[t]) == oracle.survivors[t], diff(f"{t} rows remaining", set(after[t]), oracle.survivors[t])
        for rid, row in after[t].items():
            old = dict(oracle.before[t][rid])
            if t == "invoice" and rid in oracle.detached:
                old["contact_id"] = None
            assert row == old, f"{t} {rid} changed: {old} -> {row}"


def assert_ledger_matches(oracle: Oracle, rows: list[dict], report: dict) -> None:
    got = Counter((r["record_type"], r["record_key"], r["rule_id"], r["action"], r["status"]) for r in rows)
    want = oracle.ledger_expectation()
    assert got == want, (
        f"ledger differs from the rules: {len(got - want)} unexpected rows, {len(want - got)} missing; "
        f"got {Counter((k[0], k[3], k[4]) for k in got.elements())}, want {Counter((k[0], k[3], k[4]) for k in want.elements())}"
    )
    assert all(r["completed_at"] is not None and r["policy_version"] for r in rows)
    per_rule: dict = {}
    for r in rows:
        per_rule.setdefault(r["rule_id"], Counter())[r["status"]] += 1
    assert report["ledger"].get("crm", {}) == {k: dict(v) for k, v in per_rule.items()}
    statuses = Counter(r["status"] for r in rows)
    assert report["systems"]["crm"]["erase"]["outcomes"] == dict(statuses)
    assert report["systems"]["crm"]["verify"] == {"dry_run": False, "checked": statuses["erased"], "still_present": 0}
    planned = Counter()
    for rule, action, _ in oracle.planned.values():
        planned[f"{rule}/{action}"] += 1
    assert report["systems"]["crm"]["planned"] == dict(planned)


def edge_contacts(before: Snapshot) -> dict[str, int]:
    """The generator's edge-case contacts, found by organisation name or by their data."""
    org_names = {i: r["name"] for i, r in before["organisation"].items()}
    out: dict[str, int] = {}
    for cid, c in sorted(before["contact"].items()):
        if c["first_name"] != "Edge":
            continue
        if c["organisation_id"] is not None:
            out[org_names[int(c["organisation_id"])].removeprefix("Edge: ")] = cid
        elif c["email"] == "":
            out["lead without e-mail"] = cid
        elif c["opted_out"]:
            recent = parse_ts(c["last_interaction_at"]) > dt.datetime.now(UTC) - dt.timedelta(days=100)
            out["opted-out lead, recent" if recent else "opted-out lead, stale"] = cid
        else:
            out["lead, last interaction exactly a year ago"] = cid
    return out


# ------------------------------------------------------------------------------ 1
def test_run_erases_exactly_what_is_due(crm, retention_home):
    generate(crm)
    as_of = pick_as_of()
    before = snapshot(crm.engine)
    today = dt.datetime.now(LOCAL).date()
    run = run_pipeline(crm, as_of)
    oracle = Oracle(before, as_of, today, dt.datetime.now(UTC))
    after = snapshot(crm.engine)
    rows = ledger_rows(retention_home, run.info.run_id)
    report = run.report

    assert report["state"] == "success"
    assert_db_matches(oracle, after)
    assert_ledger_matches(oracle, rows, report)
    assert not oracle.unjudgeable, "the synthetic data has no malformed rows here"
    # The ledger against the database directly: every record it marks erased is gone, every
    # record it marks held is still there, and whatever else went was a note, tag, registration
    # or response that went with an erased contact.
    vanished = {
        (rtype, i) for rtype, table in TYPE_TABLE.items() for i in set(before[table]) - set(after[table])
    }
    key_of = {(rtype, pseudonym(rtype, i)): (rtype, i) for rtype, table in TYPE_TABLE.items() for i in before[table]}
    erased = {key_of[(r["record_type"], r["record_key"])] for r in rows if r["status"] == "erased"}
    held = {key_of[(r["record_type"], r["record_key"])] for r in rows if r["status"] == "held"}
    assert len(erased) == sum(r["status"] == "erased" for r in rows) and erased <= vanished and not held & vanished
    erased_contacts = {i for t, i in erased if t == "crm_contact"}
    for rtype, i in vanished - erased:
        assert rtype != "crm_contact" and rtype != "crm_invoice", (rtype, i)
        assert int(before[TYPE_TABLE[rtype]][i]["contact_id"]) in erased_contacts, (rtype, i)
    gone_notes = set(before["communication_note"]) - set(after["communication_note"])
    assert all(int(before["communication_note"][n]["contact_id"]) in erased_contacts for n in gone_notes)
    # Sanity of the fixture: the rules found work of every kind.
    kinds = Counter((k[0], v[1], v[2]) for k, v in oracle.planned.items())
    for rtype in TYPE_TABLE:
        assert kinds[(rtype, "erase", "erased")] > 0, f"nothing of {rtype} was due: the test would prove little"
    assert kinds[("crm_contact", "minimise", "erased")] > 0 and kinds[("crm_contact", "hold", "held")] > 0

    # Nothing past its deadline any more: planning again as of the same time plans nothing destructive.
    again = run_pipeline(crm, as_of, plan_only=True)
    assert set(again.steps["plan_frame"]["action"]) <= {"hold"}
    assert sum(again.steps["plan"]["planned"].values()) == len([v for v in oracle.planned.values() if v[2] == "held"])

    # Active memberships: contact, notes and tags untouched (own SQL over the raw tables), but
    # for the tags of an active member who opted out: opt-out ends marketing use at once.
    with crm.engine.connect() as conn:
        active = {
            int(r[0])
            for r in conn.execute(
                sa.text(
                    "SELECT c.id FROM contact c JOIN membership m ON m.organisation_id = c.organisation_id "
                    "WHERE m.ends_on IS NULL OR m.ends_on >= :today"
                ),
                {"today": today.isoformat()},
            )
        }
    assert active == oracle.active_contacts and active
    opted_out = {i for i, c in before["contact"].items() if c["opted_out"]}
    for t in ("contact", "communication_note", "event_participation"):
        key = "id" if t == "contact" else "contact_id"
        mine_before = {
            i: r for i, r in before[t].items()
            if int(r[key]) in active and not (t == "event_participation" and int(r[key]) in opted_out)
        }
        mine_after = {
            i: r for i, r in after[t].items()
            if int(r[key]) in active and not (t == "event_participation" and int(r[key]) in opted_out)
        }
        assert mine_after == mine_before, f"{t} of active members changed"

    # Invoices in their bookkeeping period (erasable from 1 January of FY-end year + 8) stay, with
    # their legal fields; financial years ending 30 June as well as 31 December.
    as_of_local = local_naive(as_of)
    running = {i for i, r in before["invoice"].items() if dt.datetime(parse_date(r["financial_year_end"]).year + 8, 1, 1) > as_of_local}
    over = set(before["invoice"]) - running
    assert {parse_date(before["invoice"][i]["financial_year_end"]).month for i in running} >= {6, 12}
    assert {parse_date(before["invoice"][i]["financial_year_end"]).month for i in over} >= {6, 12}
    for i in running:
        assert i in after["invoice"], f"invoice {i} erased inside its bookkeeping period"
        for f in INVOICE_LEGAL_FIELDS:
            assert after["invoice"][i][f] == before["invoice"][i][f]
    held_invoices = {
        int(h["record_id"])
        for h in before["legal_hold"].values()
        if h["record_type"] == "crm_invoice" and (h["expires_at"] is None or parse_ts(h["expires_at"]) > as_of)
    }
    assert over - set(after["invoice"]) == over - held_invoices

    edge = edge_contacts(before)
    one_year_ago = add_years(today, -1)

    def gone(name: str) -> bool:
        return edge[name] not in after["contact"]

    # The invoiced former member is minimised: person, notes and tags gone, invoices kept and detached.
    billed = edge["former member with invoices"]
    assert gone("former member with invoices")
    assert not [n for n in after["communication_note"].values() if int(n["contact_id"]) == billed]
    billed_invoices = {i for i, r in before["invoice"].items() if r["contact_id"] is not None and int(r["contact_id"]) == billed}
    kept = billed_invoices & set(after["invoice"])
    assert kept and kept == billed_invoices & (running | held_invoices)
    assert all(after["invoice"][i]["contact_id"] is None for i in kept)
    assert {r["action"] for r in rows if r["record_key"] == pseudonym("crm_contact", billed)} == {"minimise"}

    # Manual holds: live protects (ledger: held), expired does not.
    held = edge["former member under a live manual hold"]
    assert held in after["contact"] and after["contact"][held] == before["contact"][held]
    assert [r["status"] for r in rows if r["record_key"] == pseudonym("crm_contact", held)] == ["held"]
    for i in held_invoices:
        assert i in after["invoice"]
        assert [r["status"] for r in rows if r["record_key"] == pseudonym("crm_invoice", i)] in ([], ["held"])
    assert gone("former member whose hold expired")

    # Opt-out: leads and former members go at once; an active organisation still protects its member.
    assert gone("opted-out lead, recent") and gone("opted-out lead, stale")
    assert not gone("opted-out member of an active organisation")
    remaining_opted = {
        i for i, c in after["contact"].items()
        if c["opted_out"] and i not in active and ("crm_contact", i) not in oracle.planned
    }
    assert not remaining_opted, f"opted-out non-members kept: {sorted(remaining_opted)[:10]}"

    # Boundaries, computed here: a period from an end date starts when that local day is over,
    # and ends at the start of a local day.
    def due_from(day: dt.date) -> bool:
        return day_start(day) <= as_of_local

    assert not gone("membership ends today")  # still a member today
    assert gone("membership ended exactly one year ago") == due_from(day_over(add_years(one_year_ago, 1)))
    assert gone("membership ended one year ago minus one day") == due_from(day_over(add_years(one_year_ago + dt.timedelta(days=1), 1)))
    assert not gone("membership ended one year ago minus one day")
    assert gone("membership ended 2024-02-29") == due_from(dt.date(2025, 3, 1))
    assert not gone("renewed membership (ended period, then open)")
    assert not gone("fixed-term membership still running")
    assert not gone("active member with old data")
    exact_lead = before["contact"][edge["lead, last interaction exactly a year ago"]]
    assert gone("lead, last interaction exactly a year ago") == (
        add_years(local_naive(parse_ts(exact_lead["last_interaction_at"])), 1) <= as_of_local
    )
    assert not gone("lead without e-mail")
    if as_of.astimezone(LOCAL).date() == today:  # the usual case: pick_as_of() kept today
        # Its last day was today a year ago: the one-year window ends at the end of today.
        assert not gone("membership ended exactly one year ago")
        assert gone("lead, last interaction exactly a year ago")


# ------------------------------------------------------------------------------ 2
def test_malformed_rows_are_quarantined_counted_and_kept(crm, retention_home):
    malformed = generate(crm, contacts=600, malformed=True)
    as_of = pick_as_of()
    before = snapshot(crm.engine)
    today = dt.datetime.now(LOCAL).date()
    run = run_pipeline(crm, as_of)
    after = snapshot(crm.engine)
    oracle = Oracle(before, as_of, today, dt.datetime.now(UTC))
    report = run.report

    assert report["state"] == "success" and run.steps["verify"]["still_present"] == 0
    assert oracle.unjudgeable == {(t, i) for t, ids in malformed.items() for i in ids}
    for rtype, ids in malformed.items():
        table = TYPE_TABLE[rtype]
        for i in ids:
            assert after[table].get(i) == before[table][i], f"malformed {rtype} {i} was touched"
    rows = ledger_rows(retention_home, run.info.run_id)
    bad_keys = {pseudonym(t, i) for t, ids in malformed.items() for i in ids}
    assert not bad_keys & {r["record_key"] for r in rows}, "a quarantined record reached the ledger"

    quarantined = report["systems"]["crm"]["quarantined"]
    assert set(quarantined) == set(malformed)
    for rtype, ids in malformed.items():
        assert sum(quarantined[rtype].values()) == len(ids), rtype
    # Per reason: the contact with a last interaction ten years ahead, and missing/impossible clocks.
    contact_reasons = quarantined["crm_contact"]
    assert [n for r, n in contact_reasons.items() if "future" in r] == [1]
    assert sum(n for r, n in contact_reasons.items() if "future" not in r) == len(malformed["crm_contact"]) - 1
    for rtype, clock in (
        ("crm_event_participation", "event_date"),
        ("crm_course_registration", "course_end"),
        ("crm_survey_response", "survey_closed_at"),
        ("crm_invoice", "financial_year_end"),
    ):
        assert list(quarantined[rtype]) == [r for r in quarantined[rtype] if clock in r], quarantined[rtype]
    text = (retention_home / "reports" / f"{DAG_ID}__{run.info.run_id}.txt".replace(":", "_").replace("+", "_")).read_text()
    assert "quarantined (never erased)" in text

    # Everything else went by the rules.
    assert_db_matches(oracle, after)
    assert_ledger_matches(oracle, rows, report)


# ------------------------------------------------------------------------------ 3
def test_second_run_erases_nothing(crm, retention_home):
    generate(crm, contacts=1200, malformed=True)
    as_of = pick_as_of()
    first = run_pipeline(crm, as_of)
    assert any(r["status"] == "erased" for r in ledger_rows(retention_home, first.info.run_id))
    between = snapshot(crm.engine)

    second = run_pipeline(crm, as_of)
    assert snapshot(crm.engine) == between
    rows = ledger_rows(retention_home, second.info.run_id)
    assert {r["status"] for r in rows} <= {"held"}
    assert len(rows) == len([r for r in ledger_rows(retention_home, first.info.run_id) if r["status"] == "held"])
    report = second.report
    assert report["state"] == "success"
    assert report["systems"]["crm"]["erase"]["outcomes"].get("erased", 0) == 0
    assert report["systems"]["crm"]["verify"]["checked"] == 0
    assert set(report["ledger"].get("crm", {}).get("former-member-contact", {})) <= {"held"}


# ------------------------------------------------------------------------------ 5
def test_dry_run_changes_nothing(crm, retention_home):
    generate(crm, contacts=1200)
    as_of = pick_as_of()
    before = snapshot(crm.engine)
    today = dt.datetime.now(LOCAL).date()
    run = run_pipeline(crm, as_of, dry_run=True)
    assert snapshot(crm.engine) == before
    assert ledger_rows(retention_home) == []
    report = run.report
    assert report["dry_run"] is True and report["state"] == "success"
    assert report["ledger"] == {}
    oracle = Oracle(before, as_of, today, dt.datetime.now(UTC))
    would = Counter()
    for rule, action, _ in oracle.planned.values():
        would[f"{rule}/{action}"] += 1
    assert report["systems"]["crm"]["erase"] == {"dry_run": True, "would": dict(would)}
    assert report["systems"]["crm"]["verify"]["checked"] == 0


# ------------------------------------------------------------------------------ 6
def test_hold_added_after_validation_still_stops_the_erasure(crm, retention_home):
    generate(crm, contacts=1200)
    as_of = pick_as_of()
    before = snapshot(crm.engine)
    chosen: dict[str, int] = {}

    def add_holds(run: Run) -> None:
        plan = run.info.staging.read_frame("crm", "plan")
        erase = plan[plan["action"] == "erase"]
        destructive = plan[plan["action"].isin(["erase", "minimise"])]
        contact_ids = [int(i) for i in erase.loc[erase["record_type"] == "crm_contact", "record_id"]]
        leaving = {int(i) for i in destructive.loc[destructive["record_type"] == "crm_contact", "record_id"]}
        event_ids = [int(i) for i in erase.loc[erase["record_type"] == "crm_event_participation", "record_id"]]
        parent_of = {e: int(r["contact_id"]) for e, r in before["event_participation"].items()}
        # A contact due for erasure; an event due on its own (its contact stays); and a contact
        # due whose event is not (a hold on that event has to stop the contact's erasure, which
        # would delete the event with it).
        chosen["contact"] = contact_ids[0]
        chosen["event"] = next(e for e in event_ids if parent_of[e] not in leaving)
        chosen["child"], chosen["parent"] = next(
            (e, c) for e, c in parent_of.items() if c in contact_ids[1:] and e not in set(event_ids)
        )
        with crm.engine.begin() as conn:
            for rtype, rid in (
                ("crm_contact", chosen["contact"]),
                ("crm_event_participation", chosen["event"]),
                ("crm_event_participation", chosen["child"]),
            ):
                conn.execute(
                    sa.text("INSERT INTO legal_hold (record_type, record_id, reason, expires_at) VALUES (:t, :i, :r, NULL)"),
                    {"t": rtype, "i": rid, "r": "Late hold (test)"},
                )

    run = run_pipeline(crm, as_of, before_erase=add_holds)
    after = snapshot(crm.engine)
    assert run.report["state"] == "success"
    assert after["contact"][chosen["contact"]] == before["contact"][chosen["contact"]]
    assert after["event_participation"][chosen["event"]] == before["event_participation"][chosen["event"]]
    assert after["contact"][chosen["parent"]] == before["contact"][chosen["parent"]]
    assert after["event_participation"][chosen["child"]] == before["event_participation"][chosen["child"]]
    rows = {(r["record_type"], r["record_key"]): r for r in ledger_rows(retention_home, run.info.run_id)}
    for rtype, rid in (
        ("crm_contact", chosen["contact"]),
        ("crm_event_participation", chosen["event"]),
        ("crm_contact", chosen["parent"]),
    ):
        assert rows[(rtype, pseudonym(rtype, rid))]["status"] == "held", (rtype, rid)
    assert ("crm_event_participation", pseudonym("crm_event_participation", chosen["child"])) not in rows
    # The other planned erasures went ahead.
    assert Counter(r["status"] for r in rows.values())["erased"] > 0
    outcomes = run.report["systems"]["crm"]["erase"]["outcomes"]
    assert outcomes["held"] == sum(1 for r in rows.values() if r["status"] == "held")


def test_a_renewal_or_new_activity_between_plan_and_erase_keeps_the_records(crm, retention_home):
    """After validation an organisation renews its membership and a lead gets in touch: inside
    the erasing transaction the CRM re-reads their records and the domain judges them again, so
    the renewed organisation's contact and its event tags stay, and so does the lead; the rest
    planned is erased."""
    generate(crm, contacts=1200)
    as_of = pick_as_of()
    before = snapshot(crm.engine)
    chosen: dict[str, int] = {}

    def renew_and_touch(run: Run) -> None:
        plan = run.info.staging.read_frame("crm", "plan")
        former = plan[(plan["rule_id"] == "former-member-contact") & (plan["action"] == "erase")]
        leads = plan[(plan["rule_id"] == "lead") & (plan["action"] == "erase")]
        tags = plan[(plan["record_type"] == "crm_event_participation") & (plan["action"] == "erase")]
        contact_of_tag = {int(e): int(r["contact_id"]) for e, r in before["event_participation"].items()}
        # A former member with a planned event tag of its own, so both the contact and the tag
        # are protected by the renewal.
        # Not one who opted out: an active member who opted out loses their tags (opt-out ends
        # marketing use at once).
        tagged = {contact_of_tag[int(e)] for e in tags["record_id"]}
        chosen["member"] = next(
            int(c) for c in former["record_id"] if int(c) in tagged and not before["contact"][int(c)]["opted_out"]
        )
        chosen["tag"] = next(int(e) for e in tags["record_id"] if contact_of_tag[int(e)] == chosen["member"])
        chosen["lead"] = int(leads["record_id"].iloc[0])
        org = before["contact"][chosen["member"]]["organisation_id"]
        with crm.engine.begin() as conn:
            next_id = conn.exec_driver_sql("SELECT COALESCE(MAX(id), 0) + 1 FROM membership").scalar()
            conn.execute(
                sa.text("INSERT INTO membership (id, organisation_id, starts_on, ends_on) VALUES (:i, :o, :s, NULL)"),
                {"i": next_id, "o": org, "s": dt.date.today()},
            )
            conn.execute(sa.text("UPDATE contact SET last_interaction_at = :t WHERE id = :i"),
                         {"t": dt.datetime.now(UTC), "i": chosen["lead"]})

    run = run_pipeline(crm, as_of, before_erase=renew_and_touch)
    after = snapshot(crm.engine)
    assert run.report["state"] == "success"
    assert chosen["member"] in after["contact"], "a contact whose organisation renewed was erased"
    assert chosen["tag"] in after["event_participation"], "an event tag of a renewed member was erased"
    assert chosen["lead"] in after["contact"], "a lead who got in touch after the plan was erased"
    rows = {(r["record_type"], r["record_key"]): r for r in ledger_rows(retention_home, run.info.run_id)}
    for rtype, rid in (("crm_contact", chosen["member"]), ("crm_event_participation", chosen["tag"]), ("crm_contact", chosen["lead"])):
        row = rows[(rtype, pseudonym(rtype, rid))]
        assert row["status"] == "deferred" and row["detail"], (rtype, rid, row["status"])
    assert Counter(r["status"] for r in rows.values())["erased"] > 100, "the rest planned went ahead"


# ------------------------------------------------------------------------------ boundaries
def small_crm(crm: Crm, contacts: list[dict], memberships: list[dict]) -> None:
    from retention.systems.crm import schema

    schema.create_schema(crm.engine)
    base = {
        "kind": "lead", "organisation_id": None, "first_name": "Gränsfall", "last_name": "Testsson",
        "email": "boundary@example.org", "phone": "555-0142", "opted_out": False,
        "created_at": dt.datetime(2020, 1, 1, tzinfo=UTC),
    }
    with crm.engine.begin() as conn:
        orgs = sorted({m["organisation_id"] for m in memberships})
        if orgs:
            conn.execute(schema.organisation.insert(), [{"id": o, "name": f"Boundary org {o}"} for o in orgs])
            conn.execute(schema.membership.insert(), memberships)
        conn.execute(schema.contact.insert(), [{**base, **c} for c in contacts])


def at_local(*args) -> dt.datetime:
    return dt.datetime(*args, tzinfo=LOCAL).astimezone(UTC)


def test_leap_day_plus_one_year_is_28_february(crm, retention_home):
    """P1Y is a calendar year: from 29 Feb 2024 10:00 due on 28 Feb 2025 10:00 (not 1 March),
    from 28 Feb 2024 13:00 not before 28 Feb 2025 13:00 (365 days would be the 27th); a
    membership whose last day was 29 Feb 2024 has its window end with 28 Feb 2025, due from
    1 March 00:00. Backfills on 28 Feb 2025 at noon and at 13:30 and on 1 March at midnight,
    local time."""
    member, march, lead_leap, lead_late, lead_feb28 = 1, 2, 3, 4, 5
    small_crm(
        crm,
        [
            {"id": member, "kind": "member", "organisation_id": 1, "last_interaction_at": at_local(2024, 2, 1, 9)},
            {"id": march, "kind": "member", "organisation_id": 2, "last_interaction_at": at_local(2024, 2, 1, 9)},
            {"id": lead_leap, "last_interaction_at": at_local(2024, 2, 29, 10)},
            {"id": lead_late, "last_interaction_at": at_local(2024, 2, 29, 13)},
            {"id": lead_feb28, "last_interaction_at": at_local(2024, 2, 28, 13)},
        ],
        [
            {"id": 1, "organisation_id": 1, "starts_on": dt.date(2020, 3, 1), "ends_on": dt.date(2024, 2, 29)},
            {"id": 2, "organisation_id": 2, "starts_on": dt.date(2020, 3, 1), "ends_on": dt.date(2024, 3, 1)},
        ],
    )

    def present() -> set[int]:
        with crm.engine.connect() as conn:
            return {int(i) for i in conn.exec_driver_sql("SELECT id FROM contact").scalars()}

    def backfill(as_of: dt.datetime) -> Run:
        run = run_pipeline(crm, as_of, max_plan_share=1.0)  # five contacts: any erasure is over 25%
        assert run.report["state"] == "success"
        return run

    run = backfill(at_local(2025, 2, 28, 12))
    assert present() == {member, march, lead_late, lead_feb28}
    assert run.report["ledger"]["crm"] == {"lead": {"erased": 1}}
    backfill(at_local(2025, 2, 28, 13, 30))
    assert present() == {member, march}
    run = backfill(at_local(2025, 3, 1, 0, 0))
    assert present() == {march}
    assert run.report["ledger"]["crm"] == {"former-member-contact": {"erased": 1}}


def test_date_deadlines_fall_at_local_midnight(crm, retention_home):
    """As of today 00:00 Europe/Stockholm (a scheduled run's data_interval_end), a membership
    whose last day was one year and a day ago and a course that ended 91 days ago are due: an
    end date's day is over at the next local midnight, and the period counts from then."""
    today = dt.datetime.now(LOCAL).date()
    midnight = dt.datetime(today.year, today.month, today.day, tzinfo=LOCAL).astimezone(UTC)
    small_crm(
        crm,
        [
            {"id": 1, "kind": "member", "organisation_id": 1, "last_interaction_at": midnight - dt.timedelta(days=500)},
            {"id": 2, "kind": "member", "organisation_id": 2, "last_interaction_at": midnight - dt.timedelta(days=5)},
        ]
        + [{"id": 10 + i, "kind": "member", "organisation_id": 2, "last_interaction_at": midnight} for i in range(8)],
        [
            {"id": 1, "organisation_id": 1, "starts_on": dt.date(2015, 1, 1), "ends_on": add_years(today, -1) - dt.timedelta(days=1)},
            {"id": 2, "organisation_id": 2, "starts_on": dt.date(2015, 1, 1), "ends_on": None},
        ],
    )
    from retention.systems.crm import schema

    with crm.engine.begin() as conn:
        conn.execute(
            schema.course_registration.insert(),
            [{"id": 1, "contact_id": 2, "course_name": "Boundary course", "course_end": today - dt.timedelta(days=91)}],
        )
    run = run_pipeline(crm, midnight)
    with crm.engine.connect() as conn:
        contacts = {int(i) for i in conn.exec_driver_sql("SELECT id FROM contact").scalars()}
        courses = {int(i) for i in conn.exec_driver_sql("SELECT id FROM course_registration").scalars()}
    assert run.report["state"] == "success"
    assert 1 not in contacts, "membership's window ended at the end of yesterday: due at the start of today"
    assert not courses, "90 days after the end of the course's last day: due at the start of today"


# ------------------------------------------------------------------------------ 4
@pytest.mark.airflow
def test_airflow_run_on_postgresql(retention_home, monkeypatch, capfd, request):
    from airflow_run import run_dag, task_states, xcom_values

    url = pg_url(request)
    engine = sa.create_engine(url)
    reset_pg(engine)
    try:
        crm = Crm("postgresql", url, engine)
        generate(crm, contacts=1500)
        before = snapshot(engine)
        monkeypatch.setenv("AIRFLOW_CONN_RETENTION_CRM", json.dumps({"conn_type": "retention_crm", "extra": {"sqlalchemy_url": url}}))
        dr = run_dag({"systems": ["crm"]})
        states = task_states(dr)
        assert dr.state == "success", states
        for step in ("extract", "plan", "validate", "erase", "verify"):
            assert states[f"crm.{step}"] == "success", states
            assert states[f"newsletter.{step}"] == "skipped", states
            assert states[f"ticketing.{step}"] == "skipped", states
        assert states["open_run"] == "success" and states["report"] == "success"
        after = snapshot(engine)

        rows = ledger_rows(retention_home, dr.run_id)
        erased = [r for r in rows if r["status"] == "erased"]
        assert erased and {r["status"] for r in rows} <= {"erased", "held"}
        vanished = {
            (rtype, pseudonym(rtype, i)) for rtype, table in TYPE_TABLE.items() for i in set(before[table]) - set(after[table])
        }
        assert {(r["record_type"], r["record_key"]) for r in erased} <= vanished
        held = [r for r in rows if r["status"] == "held"]
        for r in held:
            table = TYPE_TABLE[r["record_type"]]
            assert (r["record_type"], r["record_key"]) not in vanished, f"held {table} row erased"
        report = json.loads((retention_home / "reports" / "latest.json").read_text())
        assert report["run_id"] == dr.run_id and report["state"] == "success"
        assert report["systems"]["crm"]["verify"]["checked"] == len(erased)
        assert sum(n for s in report["ledger"]["crm"].values() for n in s.values()) == len(rows)

        # No name, e-mail address, phone number, address or billing name of the CRM anywhere we
        # leave text behind.
        contacts = before["contact"].values()
        secrets = {
            *(f"{c['first_name']} {c['last_name']}".lower() for c in contacts),
            *(c["email"].lower() for c in contacts if c["email"]),
            *(c["phone"] for c in contacts if c["phone"]),
            *(c["address"].lower() for c in contacts if c["address"]),
            *(i["billing_name"].lower() for i in before["invoice"].values() if i["billing_name"]),
        }
        out, err = capfd.readouterr()
        texts = {
            "task output": (out + err).lower(),
            "xcom": " ".join(xcom_values(dr)).lower(),
            "ledger": json.dumps(rows, default=str).lower(),
            "report": "\n".join(p.read_text() for p in (retention_home / "reports").iterdir()).lower(),
        }
        assert len(secrets) > 1000
        for where, text in texts.items():
            leaked = sorted(s for s in secrets if s in text)
            assert not leaked, f"personal data leaked into the {where}: {leaked[:5]}"
    finally:
        engine.dispose()
        reset_pg(engine)
        engine.dispose()

