"""The CRM read through the policy's candidate conditions plans exactly what a whole read plans.

For random CRMs (messy stored values on SQLite: flags as words, clocks as text in every form
the reading takes or refuses, placeholders, out-of-range years, ids as text and shared ids;
typed values on PostgreSQL; clocks on and around each rule's boundary, around daylight-saving
changes and year ends; open, ended and renewed memberships; leads without interactions, so
fallback clocks; holds in force and expired) and random as-of times, the plan, the quarantine
and the held rows made from the candidates equal those made from every row, and the counts
the plan-size guard weighs are the tables' sizes.
"""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pandas as pd
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retention.domain.candidates import candidates, surely_due
from retention.domain.conform import conform
from retention.domain.planning import plan_system
from retention.domain.policy import load_policy
from retention.domain.recheck import leave_alone
from retention.domain.statuses import Status
from retention.systems.base import Recheck
from retention.systems.crm import schema
from retention.systems.crm.adapter import CrmAdapter
from retention.systems.crm.client import CrmConnector

UTC = dt.UTC
STHLM = ZoneInfo("Europe/Stockholm")
POLICY = load_policy("include/policies/retention.yaml")
PG_DB = "retention_crm_candidates_test"

# As-of days: daylight-saving changes, a year's end, a leap day, an ordinary day.
AS_OF_DAYS = [dt.date(2025, 3, 30), dt.date(2025, 10, 26), dt.date(2026, 1, 1), dt.date(2024, 2, 29), dt.date(2026, 6, 15)]
# Days before the as-of day at which a clock lands: on and around each rule's period (P1Y,
# P90D, the invoice's 7 years from the next 1 January, P0D), and recent days.
OFFSETS = [0, 1, 2, 89, 90, 91, 92, 364, 365, 366, 367, 730, 2922, 2923, 3000, -1, -2]


@st.composite
def as_of_times(draw) -> tuple[dt.datetime, dt.datetime]:
    day = draw(st.sampled_from(AS_OF_DAYS))
    # Local midnight (where date deadlines fall), or some moment of the day.
    seconds = draw(st.sampled_from([0, 0, 1, 3600 * 2 + 1800, 3600 * 23 + 3599]) | st.integers(0, 86399))
    local = dt.datetime.combine(day, dt.time(), tzinfo=STHLM) + dt.timedelta(seconds=seconds)
    as_of = local.astimezone(UTC)
    now = as_of + dt.timedelta(seconds=draw(st.sampled_from([0, 1, 3600, 86400 * 3])))
    return as_of, now


def _clock(draw, as_of: dt.datetime, *, messy: bool, date_only: bool):
    """A stored clock near a boundary, in a form the CRM may keep it in."""
    if draw(st.integers(0, 9)) == 0:
        return None
    local_day = as_of.astimezone(STHLM).date() - dt.timedelta(days=draw(st.sampled_from(OFFSETS)))
    if messy and draw(st.integers(0, 5)) == 0:
        return draw(st.sampled_from(["soon", "", "0001-01-01", "9999-12-31", "2024-02-30", "1900-06-01", 20240101, 3.5, b"\xff\xfe"]))
    instant = dt.datetime.combine(local_day, dt.time(), tzinfo=STHLM) + dt.timedelta(
        seconds=draw(st.sampled_from([0, 1, 3600, 86399]) | st.integers(0, 86399))
    )
    if date_only and not messy:
        return local_day
    if not messy:
        return instant.astimezone(UTC)
    form = draw(st.integers(0, 6))
    u = instant.astimezone(UTC)
    return [
        local_day.isoformat(),
        u.strftime("%Y-%m-%d %H:%M:%S"),
        u.strftime("%Y-%m-%d %H:%M:%S.%f"),
        instant.isoformat(),  # with its offset: read, but not by SQL
        u.strftime("%Y-%m-%dT%H:%M:%SZ"),
        " " + local_day.isoformat(),  # blanks around: read, not by SQL
        u.strftime("%Y-%m-%d %H:%M"),
    ][form]


def _flag(draw, *, messy: bool):
    if messy:
        return draw(st.sampled_from([0, 1, 1, "yes", "no", "t", "maybe", "", " TRUE ", 2, 1.0]))  # NOT NULL in the reference schema
    return draw(st.sampled_from([False, True]))


@st.composite
def crms(draw, *, messy: bool):
    as_of, now = draw(as_of_times())
    orgs = draw(st.integers(1, 4))
    memberships = []
    for org in range(1, orgs + 1):
        for _ in range(draw(st.integers(0, 2))):
            open_ = draw(st.integers(0, 3)) == 0
            end = None if open_ else _clock(draw, as_of, messy=messy, date_only=True)
            if messy and isinstance(end, dt.date):
                end = end.isoformat()
            memberships.append({"organisation_id": org, "starts_on": dt.date(2000, 1, 1), "ends_on": end})
    contacts = []
    for cid in range(1, draw(st.integers(1, 12)) + 1):
        lead = draw(st.booleans())
        kind = "lead" if lead else "member"
        if messy and draw(st.integers(0, 15)) == 0:
            kind = draw(st.sampled_from(["other", "Member", b"\xff"]))
        contacts.append({
            "id": cid, "kind": kind, "organisation_id": None if lead else draw(st.integers(1, orgs + messy)),  # messy: no such organisation
            "email": draw(st.sampled_from([None, "", "x@example.org"])),
            "last_interaction_at": _clock(draw, as_of, messy=messy, date_only=False),
            "created_at": _clock(draw, as_of, messy=messy, date_only=False),
            "opted_out": _flag(draw, messy=messy),
        })
    n = len(contacts)
    events = [
        {"id": i, "contact_id": draw(st.integers(1, n + messy)), "event_date": _clock(draw, as_of, messy=messy, date_only=True)}
        for i in range(1, draw(st.integers(0, 10)) + 1)
    ]
    courses = [
        {"id": i, "contact_id": draw(st.integers(1, n)), "course_end": _clock(draw, as_of, messy=messy, date_only=True)}
        for i in range(1, draw(st.integers(0, 6)) + 1)
    ]
    # Survey ids as a foreign CRM may keep them (messy: text, shared, not numbers).
    survey_ids = st.sampled_from(["1", "2", "2", "3", "x7", None, "4"]) if messy else st.integers(1, 10**6)
    surveys = [
        {"id": draw(survey_ids), "contact_id": draw(st.integers(1, n)),
         "survey_closed_at": _clock(draw, as_of, messy=messy, date_only=False)}
        for _ in range(draw(st.integers(0, 6)))
    ]
    if not messy:
        surveys = list({s["id"]: s for s in surveys}.values())
    invoices = [
        {"id": i, "contact_id": draw(st.none() | st.integers(1, n)), "invoice_number": f"F{i}", "issued_on": dt.date(2010, 1, 1),
         "amount": 1, "financial_year_end": _clock(draw, as_of, messy=messy, date_only=True)}
        for i in range(1, draw(st.integers(0, 5)) + 1)
    ]
    holds = []
    for _ in range(draw(st.integers(0, 4))):
        record_type = draw(st.sampled_from(["crm_contact", "crm_event_participation", "crm_invoice", "crm_course_registration"]))
        expires = draw(st.sampled_from([None, as_of - dt.timedelta(days=1), as_of + dt.timedelta(days=1)]))
        holds.append({"record_type": record_type, "record_id": draw(st.integers(1, 12)), "reason": "audit", "expires_at": expires})
    tables = {
        "organisation": [{"id": o, "name": f"Org {o}"} for o in range(1, orgs + 1)], "membership": memberships,
        "contact": contacts, "event_participation": events, "course_registration": courses, "survey_response": surveys,
        "invoice": invoices, "legal_hold": holds,
    }
    return as_of, now, tables


def load(engine: sa.Engine, tables: dict[str, list[dict]], *, messy: bool) -> None:
    schema.drop_schema(engine)
    if engine.dialect.name == "sqlite":
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE IF EXISTS survey_response")
    schema.create_schema(engine)
    with engine.begin() as conn:
        if messy:  # a foreign CRM: survey ids and clocks as text, no key; no CHECK on kind
            conn.exec_driver_sql("DROP TABLE survey_response")
            conn.exec_driver_sql(
                "CREATE TABLE survey_response (id TEXT, contact_id BIGINT, survey_name TEXT, survey_closed_at TEXT, answers TEXT)"
            )
            conn.exec_driver_sql("PRAGMA ignore_check_constraints = ON")
        for name in ("organisation", "membership", "contact", "event_participation", "course_registration",
                     "survey_response", "invoice", "legal_hold"):
            rows = tables[name]
            if not rows:
                continue
            if messy:  # the values as they are, whatever the column's declared type
                cols = list(rows[0])
                sql = f"INSERT INTO {name} ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})"
                raw = conn.connection.dbapi_connection
                raw.executemany(sql, [tuple(_raw(r[c]) for c in cols) for r in rows])
            else:
                conn.execute(sa.insert(schema.metadata.tables[name]), rows)


def _raw(v):
    if isinstance(v, dt.datetime):
        return v.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    if isinstance(v, dt.date):
        return v.isoformat()
    return v


def plan_both(engine: sa.Engine, as_of: dt.datetime, now: dt.datetime):
    """(whole read's plan, candidates' plan, rows read, totals) for one CRM."""
    adapter = CrmAdapter(CrmConnector(engine, chunk_size=7))
    results = []
    for narrowed in (False, True):
        parts: dict[str, list[pd.DataFrame]] = {}

        def write(rt: str, f: pd.DataFrame, parts=parts) -> None:
            parts.setdefault(rt, []).append(conform(rt, f))

        kwargs = {"policy": POLICY, "as_of": as_of} if narrowed else {}
        totals = adapter.extract(write, now, **kwargs)
        frames = {rt: pd.concat(fs, ignore_index=True) for rt, fs in parts.items()}
        sp = plan_system("crm", frames, POLICY, as_of, now=now)
        results.append((sp, {rt: len(f) for rt, f in frames.items()}, totals))
    adapter.close()
    return results


def _sorted(frame: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    return frame.sort_values(by, kind="stable").reset_index(drop=True) if len(frame) else frame.reset_index(drop=True)


def assert_same_plan(whole, narrowed) -> None:
    (full, read_all, none), (cand, read, totals) = whole, narrowed
    assert none is None
    key = ["record_type", "record_id"]
    pd.testing.assert_frame_equal(_sorted(cand.plan, key), _sorted(full.plan, key), check_dtype=False)
    q_cols = ["record_type", "record_id", "reason"]
    pd.testing.assert_frame_equal(
        _sorted(cand.quarantined[q_cols], q_cols), _sorted(full.quarantined[q_cols], q_cols), check_dtype=False
    )
    assert cand.quarantine_counts == full.quarantine_counts
    # The guard's numbers: what the tables hold, whatever was read.
    assert totals == read_all
    assert all(read[rt] <= read_all[rt] for rt in read_all)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(crms(messy=True))
def test_sqlite_candidates_plan_as_a_whole_read(case):
    as_of, now, tables = case
    engine = sa.create_engine("sqlite://")
    load(engine, tables, messy=True)
    assert_same_plan(*plan_both(engine, as_of, now))
    engine.dispose()


@pytest.fixture(scope="module")
def pg_engine(postgres_url_for):
    try:
        url = postgres_url_for(PG_DB)
    except Exception as exc:  # noqa: BLE001 - a missing PostgreSQL is a failure, not a skip
        pytest.fail(f"PostgreSQL could not be started: {exc}", pytrace=False)
    engine = sa.create_engine(url)
    yield engine
    schema.drop_schema(engine)
    engine.dispose()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(crms(messy=False))
def test_postgresql_candidates_plan_as_a_whole_read(pg_engine, case):
    as_of, now, tables = case
    load(pg_engine, tables, messy=False)
    assert_same_plan(*plan_both(pg_engine, as_of, now))


# ------------------------------------------------------------------ the re-checks' reads, by row
# The erasure re-checks a batch on its current frame rows, read for its ids only; on PostgreSQL
# each row's contact, memberships and invoices are then looked up by index (LATERAL) instead of
# the whole tables being joined. The rows and values must be the whole read's.
BY_ROW = ("crm_contact", "crm_event_participation")


def assert_read_by_row_as_a_whole_read(engine: sa.Engine, now: dt.datetime, every: int) -> int:
    """For each record type read by row: the frame of some of its ids (and one no record has)
    equals the whole read's rows of those ids. Returns how many rows were compared."""
    connector = CrmConnector(engine)
    compared = 0
    for record_type in BY_ROW:
        whole = connector.read_frame(record_type, now=now)
        ids = sorted(int(i) for i in whole["record_id"])[::every] + [10**9]
        with engine.connect() as conn:
            read = connector._frame_of(conn, record_type, ids, now)
        expected = whole[whole["record_id"].isin(ids)]
        pd.testing.assert_frame_equal(_sorted(read, ["record_id"]), _sorted(expected, ["record_id"]))
        compared += len(read)
    return compared


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(crms(messy=False), st.integers(1, 3))
def test_postgresql_reads_a_batch_by_row_as_a_whole_read(pg_engine, case, every):
    _, now, tables = case
    load(pg_engine, tables, messy=False)
    # The reference schema has the indexes: the look-ups by row are what is compared here.
    assert CrmConnector(pg_engine)._by_row(("membership", "organisation_id"), ("invoice", "contact_id"))
    assert_read_by_row_as_a_whole_read(pg_engine, now, every)


def test_a_crm_without_the_indexes_reads_a_batch_by_joining_the_tables(pg_engine):
    """Where a probe would be a scan (no index leads with the looked-up column), the batch's rows
    come from the whole-table join, and are still the whole read's."""
    as_of = dt.datetime(2026, 6, 15, 10, tzinfo=UTC)
    old = as_of - dt.timedelta(days=400)
    tables = {name: [] for name in ("course_registration", "survey_response", "legal_hold")}
    tables["organisation"] = [{"id": 1, "name": "Org 1"}, {"id": 2, "name": "Org 2"}]
    tables["membership"] = [
        {"organisation_id": 1, "starts_on": dt.date(2000, 1, 1), "ends_on": dt.date(2024, 1, 31)},
        {"organisation_id": 1, "starts_on": dt.date(2000, 1, 1), "ends_on": dt.date(2025, 3, 31)},
        {"organisation_id": 2, "starts_on": dt.date(2000, 1, 1), "ends_on": None},
    ]
    tables["contact"] = [
        {"id": i, "kind": "member" if i < 3 else "lead", "organisation_id": i if i < 3 else None, "email": None,
         "last_interaction_at": old, "created_at": old, "opted_out": i == 2}
        for i in (1, 2, 3)
    ]
    tables["event_participation"] = [{"id": i, "contact_id": 1 + i % 3, "event_date": dt.date(2024, 5, i)} for i in range(1, 7)]
    tables["invoice"] = [{"id": 1, "contact_id": 2, "invoice_number": "F1", "issued_on": dt.date(2010, 1, 1), "amount": 1,
                          "financial_year_end": dt.date(2010, 12, 31)}]
    load(pg_engine, tables, messy=False)
    assert CrmConnector(pg_engine)._by_row(("membership", "organisation_id"))
    assert assert_read_by_row_as_a_whole_read(pg_engine, as_of, 1) == 9
    with pg_engine.begin() as conn:
        for name in ("membership", "invoice"):
            for ix in sa.inspect(conn).get_indexes(name):
                conn.exec_driver_sql(f'DROP INDEX "{ix["name"]}"')
        # A partial index covers only the rows of its predicate: it is no index for a look-up.
        conn.exec_driver_sql("CREATE INDEX membership_open_org ON membership (organisation_id) WHERE ends_on IS NULL")
    connector = CrmConnector(pg_engine)
    assert not connector._by_row(("membership", "organisation_id"))
    assert not connector._by_row(("invoice", "contact_id"))
    assert assert_read_by_row_as_a_whole_read(pg_engine, as_of, 1) == 9
    with pg_engine.begin() as conn:
        conn.exec_driver_sql("CREATE INDEX membership_org ON membership (organisation_id)")
    assert CrmConnector(pg_engine)._by_row(("membership", "organisation_id"))


def test_the_candidates_leave_out_what_no_rule_can_plan():
    """A condition that cannot fail is no test: recent records are not read, due ones are."""
    as_of = dt.datetime(2026, 6, 15, 10, tzinfo=UTC)
    engine = sa.create_engine("sqlite://")
    tables = {name: [] for name in ("organisation", "membership", "event_participation", "survey_response", "invoice", "legal_hold")}
    recent, old = as_of - dt.timedelta(days=30), as_of - dt.timedelta(days=400)
    tables["contact"] = [
        {"id": 1, "kind": "lead", "organisation_id": None, "email": None, "last_interaction_at": recent, "created_at": recent, "opted_out": False},
        {"id": 2, "kind": "lead", "organisation_id": None, "email": None, "last_interaction_at": old, "created_at": old, "opted_out": False},
        {"id": 3, "kind": "lead", "organisation_id": None, "email": None, "last_interaction_at": recent, "created_at": recent, "opted_out": True},
    ]
    tables["course_registration"] = [{"id": 1, "contact_id": 1, "course_end": dt.date(2026, 6, 1)}]
    load(engine, tables, messy=False)
    (full, _, _), (cand, read, totals) = plan_both(engine, as_of, as_of)
    assert read["crm_contact"] == 2 and totals["crm_contact"] == 3
    assert read["crm_course_registration"] == 0 and totals["crm_course_registration"] == 1
    assert sorted(cand.plan["record_id"]) == sorted(full.plan["record_id"]) == ["2", "3"]
    assert candidates("crm_contact", POLICY, as_of, as_of) is not None



# ------------------------------------------------------------------ surely due (the erasure's DELETE)
# The record types the CRM's erasure lets go in its DELETE when the domain's condition is true
# of them now (contacts always go through the recheck: children, invoices, minimisation).
SURELY = ("crm_event_participation", "crm_course_registration", "crm_survey_response", "crm_invoice")
TABLE = {"crm_event_participation": "event_participation", "crm_course_registration": "course_registration",
         "crm_survey_response": "survey_response", "crm_invoice": "invoice"}


def let_go_by_the_recheck(connector: CrmConnector, record_type: str, ids: list[int], as_of: dt.datetime) -> set[int]:
    """The records of ``ids`` the recheck as of ``as_of`` lets go, judged on their current frame."""
    frame = connector.read_frame(record_type, now=dt.datetime.now(UTC))
    current = conform(record_type, frame.assign(record_id=frame["record_id"].astype("string")))
    current = current[current["record_id"].isin([str(i) for i in ids])]
    planned = pd.DataFrame({"record_id": [str(i) for i in ids], "action": "erase", "clock": pd.NaT})
    left = leave_alone(record_type, current, planned, POLICY, as_of)
    return {int(i) for i in current["record_id"].astype(str) if i not in left}


def erased_in_the_delete(engine: sa.Engine, record_type: str, ids: list[int], as_of: dt.datetime) -> set[int]:
    """What the erasure deletes by its condition alone: the recheck it is given leaves every record
    it is shown alone, so only the DELETE of the surely-due ones erases anything."""
    shown: list[int] = []

    def nothing_goes(current: pd.DataFrame) -> dict[str, str]:
        shown.extend(int(i) for i in current["record_id"])
        return {str(i): "left alone by the test" for i in current["record_id"]}

    recheck = Recheck(since=as_of, leave_alone=nothing_goes, surely_due=surely_due(record_type, POLICY, as_of))
    # Not closed: disposing of the engine would drop an in-memory SQLite database.
    out = dict(CrmAdapter(CrmConnector(engine)).erase(record_type, "erase", [str(i) for i in ids], recheck))
    erased = {int(i) for i, s in out.items() if s == Status.ERASED}
    assert not erased & set(shown), "a record both read for the recheck and erased in the DELETE"
    return erased


def assert_surely_due_is_let_go(engine: sa.Engine, as_of: dt.datetime) -> int:
    """For every record type, what the DELETE erases the recheck would have let go, and none is
    under a live hold. Returns how many it erased (to show the property is not empty)."""
    connector = CrmConnector(engine)
    erased_total = 0
    for record_type in SURELY:
        with engine.connect() as conn:
            stored = conn.exec_driver_sql(f"SELECT id FROM {TABLE[record_type]}").scalars().all()
        ids = sorted({int(i) for i in stored if isinstance(i, int) or (isinstance(i, str) and i.isdigit())})
        if not ids:
            continue
        with engine.connect() as conn:
            held = {int(r) for r, exp in conn.exec_driver_sql(
                "SELECT record_id, expires_at FROM legal_hold WHERE record_type = ?" if engine.dialect.name == "sqlite"
                else "SELECT record_id, expires_at FROM legal_hold WHERE record_type = %s", (record_type,)
            ) if exp is None}
        let_go = let_go_by_the_recheck(connector, record_type, ids, as_of)
        erased = erased_in_the_delete(engine, record_type, ids, as_of)
        assert erased <= let_go, f"{record_type}: erased in the DELETE though the recheck keeps {sorted(erased - let_go)}"
        assert not erased & held, f"{record_type}: erased under a live hold"
        erased_total += len(erased)
    return erased_total


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(crms(messy=True))
def test_sqlite_what_the_delete_lets_go_the_recheck_lets_go(case):
    """On messy stored values (flags as words, clocks as text in every form, out-of-range years,
    shared text ids), as of times around every rule's boundary: the erasure's DELETE never erases
    a record the recheck of its current frame would keep."""
    as_of, _, tables = case
    engine = sa.create_engine("sqlite://")
    load(engine, tables, messy=True)
    assert_surely_due_is_let_go(engine, as_of)
    engine.dispose()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(crms(messy=False))
def test_postgresql_what_the_delete_lets_go_the_recheck_lets_go(pg_engine, case):
    as_of, _, tables = case
    load(pg_engine, tables, messy=False)
    assert_surely_due_is_let_go(pg_engine, as_of)


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_the_delete_erases_what_is_long_due_and_leaves_the_rest_to_the_recheck(dialect, request):
    """A condition that is never true would pass the property above: records long past their
    deadline go in the DELETE, unread; a recent one, an active member's event, a held one and one
    on the rule's very boundary (inside the margin) are read and judged by the recheck."""
    engine = sa.create_engine("sqlite://") if dialect == "sqlite" else request.getfixturevalue("pg_engine")
    as_of = dt.datetime(2026, 6, 15, 10, tzinfo=UTC)
    long_ago, recent = dt.date(2020, 1, 1), dt.date(2026, 6, 1)
    boundary = (as_of.astimezone(STHLM) - dt.timedelta(days=366)).date()  # due, but within the narrowing's margin
    tables = {name: [] for name in ("membership", "survey_response", "invoice")}
    tables["organisation"] = [{"id": 1, "name": "Org 1"}, {"id": 2, "name": "Org 2"}]
    tables["membership"] = [{"organisation_id": 1, "starts_on": dt.date(2000, 1, 1), "ends_on": None}]
    tables["contact"] = [
        {"id": c, "kind": "lead" if org is None else "member", "organisation_id": org, "email": None,
         "last_interaction_at": as_of, "created_at": as_of, "opted_out": False}
        for c, org in ((1, None), (2, 1))
    ]
    tables["event_participation"] = [
        {"id": 1, "contact_id": 1, "event_date": long_ago}, {"id": 2, "contact_id": 1, "event_date": long_ago},
        {"id": 3, "contact_id": 1, "event_date": recent}, {"id": 4, "contact_id": 2, "event_date": long_ago},
        {"id": 5, "contact_id": 1, "event_date": long_ago}, {"id": 6, "contact_id": 1, "event_date": boundary},
    ]
    tables["course_registration"] = [{"id": 1, "contact_id": 1, "course_end": long_ago}]
    tables["legal_hold"] = [{"record_type": "crm_event_participation", "record_id": 5, "reason": "audit", "expires_at": None}]
    load(engine, tables, messy=False)
    erased = erased_in_the_delete(engine, "crm_event_participation", [1, 2, 3, 4, 5, 6, 99], as_of)
    assert erased == {1, 2}
    assert erased_in_the_delete(engine, "crm_course_registration", [1], as_of) == {1}
    # The recheck itself lets event 6 go (it is due): only the margin kept it out of the DELETE.
    assert let_go_by_the_recheck(CrmConnector(engine), "crm_event_participation", [3, 4, 5, 6], as_of) == {5, 6}
    if dialect == "sqlite":
        engine.dispose()
