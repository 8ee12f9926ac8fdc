"""The Great Expectations suites: a clean frame passes, and a failing suite says what failed and
how often (counts only, never the values)."""

from __future__ import annotations

import pandas as pd
import pytest

from retention.checks import validation
from retention.config import DEFAULT_POLICY
from retention.domain.policy import load_policy

POLICY = load_policy(DEFAULT_POLICY)

NOW = pd.Timestamp("2026-06-01", tz="UTC")


def members(ids: list[str], **overrides) -> pd.DataFrame:
    n = len(ids)
    frame = pd.DataFrame(
        {
            "record_id": pd.Series(ids, dtype="string"),
            "status": pd.Series(["unsubscribed"] * n, dtype="string"),
            "last_changed": pd.Series([pd.Timestamp("2025-01-01", tz="UTC")] * n),
            "timestamp_signup": pd.Series([pd.Timestamp("2024-01-01", tz="UTC")] * n),
            "has_email": [True] * n,
        }
    )
    return frame.assign(**overrides)


def failed(outcome: validation.ValidationOutcome) -> dict[tuple[str, str], int]:
    return {(c["expectation"], c["column"]): c["unexpected_count"] for c in outcome.failures()}


@pytest.mark.parametrize(
    "make_id, column",
    [
        (lambda i: f"{i:032x}", "record_id_fingerprint"),  # subscriber hashes
        (str, "record_id_fingerprint"),  # CRM and Zendesk ids, of different lengths
        (lambda i: f"é{i}", "record_id"),  # not ASCII: checked as text
    ],
)
def test_extract_suite_passes_a_clean_frame_and_counts_duplicates(make_id, column):
    ids = [make_id(i) for i in range(500)]
    assert validation.validate_extract(members(ids), "newsletter_member", NOW).success

    ids[400] = ids[7]
    ids[401] = ids[7]
    outcome = validation.validate_extract(members(ids), "newsletter_member", NOW)
    assert not outcome.success
    assert failed(outcome) == {("expect_column_values_to_be_unique", column): 3}


def test_extract_suite_counts_missing_addresses_and_future_times():
    ids = [f"{i:032x}" for i in range(100)]
    has_email = [True] * 100
    has_email[3] = has_email[50] = False
    changed = [pd.Timestamp("2025-01-01", tz="UTC")] * 100
    changed[9] = NOW + pd.Timedelta(days=30)
    outcome = validation.validate_extract(members(ids, has_email=has_email, last_changed=changed), "newsletter_member", NOW)
    assert failed(outcome) == {
        ("expect_column_values_to_be_in_set", "has_email"): 2,
        ("expect_column_max_to_be_between", "last_changed"): None,  # an aggregate: no count
    }
    observed = {c["column"]: c["observed"] for c in outcome.failures()}
    assert observed["last_changed"].startswith(str((NOW + pd.Timedelta(days=30)).date()))
    assert all("0000" not in str(c) for c in outcome.checks)  # no record ids in the outcome


def test_guard_reports_its_figures():
    ok = validation.run_guard(10, 100, 0.25)
    assert ok.success and ok.checks[0]["allowed"] == 25
    too_many = validation.run_guard(30, 100, 0.25)
    assert not too_many.success and too_many.checks[0]["planned"] == 30


def test_the_plan_check_frame_carries_each_rows_protecting_values_or_none():
    """Each plan row of the record type gets its record's protecting values from the clean
    extract (found by id, taken by position); a row whose record is not in the extract gets
    none, and a row the schema's exception uncovers (an active member who opted out) has its
    protecting values blanked. Only the plan columns the suite reads are kept."""
    plan = pd.DataFrame({
        "record_type": ["crm_event_participation"] * 4 + ["crm_contact"],
        "record_id": pd.Series(["3", "1", "2", "9", "1"], dtype="string"),
        "record_key": ["k3", "k1", "k2", "k9", "c1"],
        "action": ["erase", "erase", "hold", "erase", "erase"],
        "rule_id": ["event-participation"] * 4 + ["lead"],
        "deadline": pd.Timestamp("2020-01-01", tz="UTC"),
        "system": "crm",
        "fallback_clock": False,
    })
    clean = pd.DataFrame({
        "record_id": pd.Series(["1", "2", "3", "4"], dtype="string"),
        "membership_active": [True, False, True, True],
        "opted_out": [True, False, False, False],
        "event_date": pd.Timestamp("2019-01-01", tz="UTC"),
    })
    check = validation.plan_check_frame(plan, clean, "crm_event_participation", live_hold_ids={"2"})
    assert list(check.columns) == [
        "record_id", "record_key", "action", "rule_id", "deadline", "membership_active", "opted_out", "erases_held_record"]
    rows = check.astype(object).where(check.notna(), None)[["record_id", "membership_active", "opted_out", "erases_held_record"]]
    assert rows.values.tolist() == [
        ["3", True, False, False],  # an active member: protected
        ["1", None, True, False],  # active but opted out: uncovered, its protection blanked
        ["2", False, False, False],  # held, but the plan holds it too (not destructive)
        ["9", None, None, False],  # not in the extract: no values
    ]
    outcome = validation.validate_plan(check, "crm_event_participation", POLICY, pd.Timestamp("2026-01-01", tz="UTC"))
    failed = {(c["expectation"], c["column"]) for c in outcome.checks if not c["success"]}
    assert failed == {("expect_column_values_to_not_be_in_set", "membership_active")}, outcome.checks

    everything_in_extract = validation.plan_check_frame(plan[plan["record_id"] != "9"], clean, "crm_event_participation", set())
    assert everything_in_extract["opted_out"].tolist() == [False, True, False]
    none_in_extract = validation.plan_check_frame(plan, clean.iloc[:0], "crm_event_participation", set())
    assert none_in_extract["membership_active"].isna().all() and len(none_in_extract) == 4


def test_a_suite_keeps_no_frame_alive_once_it_has_run():
    """GX's execution engine keeps the last frame it checked; the validate step checks a
    partition at a time and must not hold the last one while it reads the next."""
    import gc
    import weakref

    check = pd.DataFrame({
        "record_id": pd.Series([f"{i:032x}" for i in range(100)], dtype="string"),
        "action": "erase",
        "rule_id": "newsletter-unsubscribed",
        "deadline": pd.Timestamp("2025-01-01", tz="UTC"),
        "status": pd.Series(["unsubscribed"] * 100, dtype="string"),
        "erases_held_record": False,
    })
    alive = weakref.ref(check)
    assert validation.validate_plan(check, "newsletter_member", POLICY, NOW).success  # the frame GX is given
    del check
    gc.collect()
    assert alive() is None
