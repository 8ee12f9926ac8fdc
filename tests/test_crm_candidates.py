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

from retention.domain.candidates import candidates
from retention.domain.conform import conform
from retention.domain.planning import plan_system
from retention.domain.policy import load_policy
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

