"""The Great Expectations suites: a clean frame passes, and a failing suite says what failed and
how often (counts only, never the values)."""

from __future__ import annotations

import pandas as pd
import pytest

from retention.checks import validation

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
