"""Time, exactly (issue 10, item 10): instants are compared, never local wall-clock values;
an end date is the last day of the relationship; opt-out ends marketing use at once.

Europe/Stockholm repeats 02:00-03:00 on the last Sunday of October (CEST, then CET) and skips
it on the last Sunday of March. 29 February plus P1Y is 28 February.
"""

from __future__ import annotations

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retention.checks.validation import plan_check_frame, validate_plan
from retention.config import DEFAULT_POLICY
from retention.domain.engine import explain_record, plan_record_type
from retention.domain.policy import load_policy

POLICY = load_policy(DEFAULT_POLICY)


def ts(s):
    return pd.Timestamp(s, tz="UTC")


def leads(clocks, opted_out=False):
    n = len(clocks)
    return pd.DataFrame(
        {
            "record_id": pd.Series([str(i + 1) for i in range(n)], dtype="string"),
            "kind": pd.Series(["lead"] * n, dtype="string"),
            "organisation_id": pd.Series([pd.NA] * n, dtype="string"),
            "membership_active": [False] * n,
            "membership_end": pd.Series([pd.NaT] * n, dtype="datetime64[us, UTC]"),
            "is_customer": [False] * n,
            "last_interaction_at": pd.to_datetime(pd.Series(clocks), utc=True).astype("datetime64[us, UTC]"),
            "opted_out": [opted_out] * n,
            "has_email": [True] * n,
            "created_at": pd.Series([ts("2015-01-01")] * n, dtype="datetime64[us, UTC]"),
            "has_invoice": [False] * n,
        }
    )


# ------------------------------------------------------------------------------ 1: instants
def test_a_run_in_the_repeated_october_hour_plans_only_what_validation_accepts():
    # Last interaction 02:10 CEST on 25 Oct 2025; P1Y later is 02:10 on 25 Oct 2026, a wall-clock
    # time that happens twice (00:10Z CEST, 01:10Z CET). The deadline is the later one (01:10Z:
    # ambiguity resolves to keeping longer). A run at 02:30 CEST (00:30Z), the first time round,
    # must not plan it: 02:10 <= 02:30 on the wall clock, but 01:10Z is after 00:30Z.
    frame = leads(["2025-10-25T00:10:00Z"])
    as_of = ts("2026-10-25T00:30:00Z")
    plan = plan_record_type(frame, "crm_contact", POLICY, as_of)
    outcome = validate_plan(plan_check_frame(plan, frame, "crm_contact", set()), "crm_contact", POLICY, as_of)
    assert outcome.success, outcome.failures()
    assert plan.empty
    # The second time round (02:30 CET = 01:30Z) it is due, and its deadline is that instant.
    later = plan_record_type(frame, "crm_contact", POLICY, ts("2026-10-25T01:30:00Z"))
    assert later["deadline"].tolist() == [ts("2026-10-25T01:10:00Z")]
    # explain says the same as the plan.
    verdict = explain_record(frame, "crm_contact", "1", POLICY, as_of)["rules"]
    assert [(v["rule"], v["due"], v["deadline"]) for v in verdict if v["applies"]] == [
        ("lead", False, "2026-10-25T01:10:00+00:00")
    ]


def test_a_deadline_in_the_first_pass_of_the_repeated_hour_is_due_in_the_second():
    # Deadline 02:40 CEST (00:40Z) is before a run at 02:30 CET (01:30Z): due, though 02:40 > 02:30
    # on the wall clock. (A last interaction 02:40 CEST on a day without a repeated hour: its
    # wall-clock time P1Y on is ambiguous and resolves to CET; use a P0D opted-out lead instead.)
    frame = leads(["2026-10-25T00:40:00Z"], opted_out=True)
    plan = plan_record_type(frame, "crm_contact", POLICY, ts("2026-10-25T01:30:00Z"))
    assert plan["record_id"].tolist() == ["1"]
    assert plan["deadline"].tolist() == [ts("2026-10-25T00:40:00Z")]


# Instants around the DST changes of 2024-2028 (both directions) and around 29 Feb 2024/2028.
_EDGES = [
    ts(t)
    for t in (
        "2024-03-31T01:00:00Z", "2024-10-27T01:00:00Z", "2025-03-30T01:00:00Z", "2025-10-26T01:00:00Z",
        "2026-03-29T01:00:00Z", "2026-10-25T01:00:00Z", "2027-03-28T01:00:00Z", "2027-10-31T01:00:00Z",
        "2024-02-28T23:00:00Z", "2024-02-29T23:00:00Z", "2025-02-28T23:00:00Z", "2028-02-28T23:00:00Z",
    )
]
near_edge = st.builds(
    lambda edge, secs: edge + pd.Timedelta(seconds=secs), st.sampled_from(_EDGES), st.integers(-3 * 3600, 3 * 3600)
)
one_year_before_an_edge = near_edge.map(lambda t: t - pd.DateOffset(years=1))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(near_edge, one_year_before_an_edge), min_size=1, max_size=12), st.booleans(), near_edge, near_edge)
def test_property_validation_never_rejects_what_the_engine_planned_and_plans_grow_with_as_of(clocks, opted, a, b):
    frame = leads(clocks, opted_out=opted)
    early, late = sorted((a, b))
    p_early = plan_record_type(frame, "crm_contact", POLICY, early)
    p_late = plan_record_type(frame, "crm_contact", POLICY, late)
    # What validation checks ("deadline after as-of") never fails on the engine's own plan.
    assert (p_early["deadline"] <= early).all()
    assert (p_late["deadline"] <= late).all()
    assert set(p_early["record_id"]) <= set(p_late["record_id"])


# ------------------------------------------------------------------------------ through Airflow
def _crm(tmp_path, monkeypatch, contacts: list[dict], memberships: list[dict] = (), events: list[dict] = ()):
    """A small reference CRM in SQLite behind the Connection the DAG reads."""
    import datetime as dt
    import json

    import sqlalchemy as sa

    from retention.systems.crm import schema

    url = f"sqlite:///{tmp_path / 'crm.db'}"
    engine = sa.create_engine(url)
    schema.create_schema(engine)
    base = {
        "kind": "lead", "organisation_id": None, "first_name": "Tid", "last_name": "Testsson",
        "email": "time@example.org", "opted_out": False, "created_at": dt.datetime(2020, 1, 1, tzinfo=dt.UTC),
    }
    with engine.begin() as conn:
        orgs = sorted({m["organisation_id"] for m in memberships})
        if orgs:
            conn.execute(schema.organisation.insert(), [{"id": o, "name": f"Org {o}"} for o in orgs])
            conn.execute(schema.membership.insert(), list(memberships))
        conn.execute(schema.contact.insert(), [{**base, **c} for c in contacts])
        if events:
            conn.execute(schema.event_participation.insert(), list(events))
    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_CRM", json.dumps({"conn_type": "retention_crm", "extra": {"sqlalchemy_url": url}}))
    return engine


def _ids(engine, table: str) -> set[int]:
    with engine.connect() as conn:
        return {int(i) for i in conn.exec_driver_sql(f"SELECT id FROM {table}").scalars()}


@pytest.mark.airflow
def test_airflow_run_in_the_repeated_october_hour_erases_what_is_due_and_nothing_early(tmp_path, monkeypatch, retention_home):
    import datetime as dt

    from airflow_run import run_dag, task_states

    # 1: its deadline is 02:10 CET (01:10Z), after the run's as-of 02:30 CEST (00:30Z);
    # 2: long due. Today the plan holds 1 and validation rejects the whole CRM plan.
    engine = _crm(
        tmp_path, monkeypatch,
        [
            {"id": 1, "last_interaction_at": dt.datetime(2025, 10, 25, 0, 10, tzinfo=dt.UTC)},
            {"id": 2, "last_interaction_at": dt.datetime(2024, 1, 10, 12, tzinfo=dt.UTC)},
        ],
    )
    dr = run_dag({"systems": ["crm"], "max_plan_share": 1.0}, logical_date=dt.datetime(2026, 10, 25, 0, 30, tzinfo=dt.UTC))
    states = task_states(dr)
    assert dr.state == "success", states
    assert states["crm.validate"] == "success" and states["crm.erase"] == "success", states
    assert _ids(engine, "contact") == {1}
    engine.dispose()


# ------------------------------------------------------------------------------ 2: end dates
def _connector(engine):
    from retention.systems.crm.client import CrmConnector

    return CrmConnector(engine)


def test_a_membership_end_date_is_the_last_day_of_the_relationship(tmp_path, monkeypatch, retention_home):
    """Membership ending 2025-03-31 (a DATE): active that whole day; P1Y ends at the end of
    2026-03-31 local time, due from 2026-04-01 00:00 Europe/Stockholm (2026-03-31T22:00Z), the
    same in the connector's clock, the engine's plan and explain."""
    import datetime as dt

    from retention.runs.explain import explain
    from retention.systems.crm.adapter import CrmAdapter

    engine = _crm(
        tmp_path, monkeypatch,
        [{"id": 1, "kind": "member", "organisation_id": 1, "last_interaction_at": dt.datetime(2024, 1, 1, tzinfo=dt.UTC)}],
        [{"id": 1, "organisation_id": 1, "starts_on": dt.date(2020, 1, 1), "ends_on": dt.date(2025, 3, 31)}],
    )
    conn = _connector(engine)
    last_minute = conn.read_frame("crm_contact", now=dt.datetime(2025, 3, 31, 21, 59, tzinfo=dt.UTC))  # 23:59 local
    assert bool(last_minute["membership_active"].iloc[0])
    after = conn.read_frame("crm_contact", now=dt.datetime(2025, 3, 31, 22, 0, tzinfo=dt.UTC))
    assert not bool(after["membership_active"].iloc[0])
    assert after["membership_end"].iloc[0] == ts("2025-03-31T22:00:00Z")  # 2025-04-01 00:00 CEST
    frame = after.assign(record_id=after["record_id"].astype("string"))
    assert plan_record_type(frame, "crm_contact", POLICY, ts("2026-03-31T21:59:59Z")).empty
    plan = plan_record_type(frame, "crm_contact", POLICY, ts("2026-03-31T22:00:00Z"))
    assert plan["deadline"].tolist() == [ts("2026-03-31T22:00:00Z")]
    adapter = CrmAdapter(conn)
    try:
        said = explain(adapter, POLICY, "crm_contact", record_id="1", as_of=dt.datetime(2026, 3, 31, 21, 59, tzinfo=dt.UTC))
    finally:
        adapter.close()
    former = [v for v in said["rules"] if v["rule"] == "former-member-contact"][0]
    assert (former["deadline"], former["due"]) == ("2026-03-31T22:00:00+00:00", False)
    assert said["decision"].startswith("not planned")


def test_other_end_dates_end_with_their_day_and_invoices_stay_aligned(tmp_path, monkeypatch):
    import datetime as dt

    from retention.systems.crm import schema

    engine = _crm(tmp_path, monkeypatch, [{"id": 1, "last_interaction_at": dt.datetime(2026, 1, 1, tzinfo=dt.UTC)}])
    with engine.begin() as c:
        c.execute(schema.course_registration.insert(), [{"id": 1, "contact_id": 1, "course_end": dt.date(2026, 1, 31)}])
        c.execute(schema.event_participation.insert(), [{"id": 1, "contact_id": 1, "event_date": dt.date(2026, 1, 31)}])
        c.execute(
            schema.invoice.insert(),
            [
                {"id": 1, "contact_id": 1, "invoice_number": "A1", "issued_on": dt.date(2025, 3, 1), "financial_year_end": dt.date(2025, 12, 31), "amount": 10},
                {"id": 2, "contact_id": 1, "invoice_number": "A2", "issued_on": dt.date(2025, 3, 1), "financial_year_end": dt.date(2025, 6, 30), "amount": 10},
            ],
        )
    conn = _connector(engine)
    now = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)

    def frame(rt):
        f = conn.read_frame(rt, now=now)
        return f.assign(record_id=f["record_id"].astype("string"))

    course = frame("crm_course_registration")
    assert course["course_end"].tolist() == [ts("2026-01-31T23:00:00Z")]  # 1 Feb 00:00 CET
    # P90D from the end of 31 January: due from 2 May 00:00 CEST.
    assert plan_record_type(course, "crm_course_registration", POLICY, ts("2026-05-01T21:59:59Z")).empty
    assert len(plan_record_type(course, "crm_course_registration", POLICY, ts("2026-05-01T22:00:00Z"))) == 1
    events = frame("crm_event_participation")
    assert events["event_date"].tolist() == [ts("2026-01-31T23:00:00Z")]
    # An invoice of a financial year ending 31 Dec 2025 or 30 Jun 2025: erasable from 1 Jan 2033.
    inv = frame("crm_invoice")
    assert plan_record_type(inv, "crm_invoice", POLICY, ts("2032-12-31T22:59:59Z")).empty
    assert set(plan_record_type(inv, "crm_invoice", POLICY, ts("2032-12-31T23:00:00Z"))["record_id"]) == {"1", "2"}


def test_the_schema_says_which_date_clocks_are_ends():
    from retention.domain.records import RECORD_TYPES

    assert RECORD_TYPES["crm_contact"].end_of_day == ("membership_end",)
    assert set(RECORD_TYPES["crm_event_participation"].end_of_day) == {"event_date", "membership_end"}
    assert RECORD_TYPES["crm_course_registration"].end_of_day == ("course_end",)
    assert RECORD_TYPES["crm_invoice"].end_of_day == ("financial_year_end",)


@pytest.mark.airflow
def test_airflow_run_on_the_last_day_of_the_marketing_window_keeps_the_former_member(tmp_path, monkeypatch, retention_home):
    import datetime as dt

    from airflow_run import run_dag, task_states

    engine = _crm(
        tmp_path, monkeypatch,
        [
            {"id": 1, "kind": "member", "organisation_id": 1, "last_interaction_at": dt.datetime(2024, 1, 1, tzinfo=dt.UTC)},
            {"id": 2, "kind": "member", "organisation_id": 2, "last_interaction_at": dt.datetime(2024, 1, 1, tzinfo=dt.UTC)},
        ],
        [
            {"id": 1, "organisation_id": 1, "starts_on": dt.date(2020, 1, 1), "ends_on": dt.date(2025, 3, 31)},
            {"id": 2, "organisation_id": 2, "starts_on": dt.date(2020, 1, 1), "ends_on": dt.date(2025, 3, 30)},
        ],
    )
    # As of 23:30 on 31 March 2026, local time: 1's window ends at midnight, 2's ended a day ago.
    dr = run_dag({"systems": ["crm"], "max_plan_share": 1.0}, logical_date=dt.datetime(2026, 3, 31, 21, 30, tzinfo=dt.UTC))
    assert dr.state == "success", task_states(dr)
    assert _ids(engine, "contact") == {1}
    engine.dispose()


# ------------------------------------------------------------------------------ 4: opt-out
def _events(rows):
    """rows: (id, contact, event_date, membership_active, opted_out)"""
    return pd.DataFrame(
        {
            "record_id": pd.Series([r[0] for r in rows], dtype="string"),
            "contact_id": pd.Series([r[1] for r in rows], dtype="string"),
            "event_date": pd.to_datetime([r[2] for r in rows], utc=True).astype("datetime64[us, UTC]"),
            "membership_active": [r[3] for r in rows],
            "membership_end": pd.Series([pd.NaT] * len(rows), dtype="datetime64[us, UTC]"),
            "is_customer": [True] * len(rows),
            "opted_out": [r[4] for r in rows],
        }
    )


def test_an_opted_out_active_members_participation_tags_are_due_at_once_and_opting_in_again_protects_them():
    from retention.domain.recheck import leave_alone

    frame = _events(
        [
            ("1", "7", "2026-05-31T22:00:00Z", True, True),  # active member, opted out: goes
            ("2", "8", "2026-05-31T22:00:00Z", True, False),  # active member: stays
            ("3", "7", "2026-12-24T23:00:00Z", True, True),  # an event not yet over: not yet
        ]
    )
    as_of = ts("2026-12-01T00:00:00Z")
    plan = plan_record_type(frame, "crm_event_participation", POLICY, as_of)
    assert dict(zip(plan["record_id"], plan["rule_id"])) == {"1": "event-participation-opted-out"}
    outcome = validate_plan(
        plan_check_frame(plan, frame, "crm_event_participation", set()), "crm_event_participation", POLICY, as_of
    )
    assert outcome.success, outcome.failures()
    # Opted in again between plan and erase: protected again.
    now = frame.assign(opted_out=[False, False, True])
    assert leave_alone("crm_event_participation", now, plan, POLICY, as_of) == {
        "1": "protected now (an active relationship since the plan)"
    }
    # The contact itself, an active member, is never planned.
    assert plan_record_type(
        leads(["2010-01-01"], opted_out=True).assign(kind="member", membership_active=True), "crm_contact", POLICY, as_of
    ).empty


def test_validation_still_refuses_a_planned_tag_of_an_active_member_who_did_not_opt_out():
    frame = _events([("2", "8", "2026-05-31T22:00:00Z", True, False)])
    as_of = ts("2026-12-01T00:00:00Z")
    # A plan made from a wrong state (not a member, opted out) checked against the extract.
    forged = plan_record_type(
        frame.assign(membership_active=False, opted_out=True), "crm_event_participation", POLICY, as_of
    )
    assert len(forged) == 1
    outcome = validate_plan(
        plan_check_frame(forged, frame, "crm_event_participation", set()), "crm_event_participation", POLICY, as_of
    )
    assert not outcome.success


def test_a_policy_may_not_lift_the_protection_for_more_than_the_code_does():
    from retention.domain.policy import PolicyError, parse_policy

    text = DEFAULT_POLICY.read_text()
    assert "unless: {opted_out: [true]}" in text
    with pytest.raises(PolicyError, match="unless"):
        parse_policy(text.replace("unless: {opted_out: [true]}", "unless: {is_customer: [true]}"), "wider.yaml")


@pytest.mark.airflow
def test_airflow_run_erases_the_tags_of_an_opted_out_active_member_and_nothing_else_of_theirs(tmp_path, monkeypatch, retention_home):
    import datetime as dt

    from airflow_run import run_dag, task_states

    recent = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    engine = _crm(
        tmp_path, monkeypatch,
        [
            {"id": 1, "kind": "member", "organisation_id": 1, "opted_out": True, "last_interaction_at": recent},
            {"id": 2, "kind": "member", "organisation_id": 1, "opted_out": False, "last_interaction_at": recent},
        ],
        [{"id": 1, "organisation_id": 1, "starts_on": dt.date(2020, 1, 1), "ends_on": None}],
        [
            {"id": 10, "contact_id": 1, "event_name": "Träff", "event_date": dt.date(2026, 5, 1), "kind": "event"},
            {"id": 11, "contact_id": 1, "event_name": "Tjänst", "event_date": dt.date(2025, 9, 1), "kind": "service"},
            {"id": 20, "contact_id": 2, "event_name": "Träff", "event_date": dt.date(2026, 5, 1), "kind": "event"},
        ],
    )
    dr = run_dag({"systems": ["crm"], "max_plan_share": 1.0})
    assert dr.state == "success", task_states(dr)
    assert _ids(engine, "event_participation") == {20}
    assert _ids(engine, "contact") == {1, 2}
    engine.dispose()


# ------------------------------------------------------------------------------ 3: start date
@pytest.mark.airflow
def test_a_run_before_the_dags_start_date_fails_saying_so(tmp_path, monkeypatch, retention_home, capfd):
    import datetime as dt

    from airflow_run import run_dag, task_states

    engine = _crm(tmp_path, monkeypatch, [{"id": 1, "last_interaction_at": dt.datetime(2020, 1, 1, tzinfo=dt.UTC)}])
    dr = run_dag({"systems": ["crm"], "max_plan_share": 1.0}, logical_date=dt.datetime(2025, 6, 1, tzinfo=dt.UTC))
    states = task_states(dr)
    # Today: a success in which Airflow created no task at all.
    assert dr.state == "failed", states
    assert states["open_run"] == "failed" and states["crm.extract"] == "upstream_failed", states
    out, err = capfd.readouterr()
    assert (
        "as-of 2025-06-01T00:00:00+00:00 is before the start date of retention_nightly (2026-01-01T00:00:00+01:00)"
        in out + err
    )
    assert _ids(engine, "contact") == {1}  # nothing erased
    engine.dispose()
