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
