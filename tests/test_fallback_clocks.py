"""Fallback clocks (issue 10, item 6): a record whose rule's own clock is missing is judged by
the rule's fallback clock, the organisation's decision stated in the policy, instead of sitting
in quarantine for ever; an invoice without its financial-year end is never erased by a guess."""

from __future__ import annotations

import pandas as pd
import pytest

from retention.config import DEFAULT_POLICY
from retention.domain.engine import explain_record, plan_record_type
from retention.domain.planning import plan_system
from retention.domain.policy import PolicyError, load_policy, parse_policy
from retention.domain.quarantine import split_quarantine

POLICY = load_policy(DEFAULT_POLICY)
TEXT = DEFAULT_POLICY.read_text()
AS_OF = pd.Timestamp("2026-11-25T12:00:00Z")
NOW = AS_OF


def ts(s):
    return pd.Timestamp(s, tz="UTC") if s else pd.NaT


def members(rows):
    """rows: (id, status, last_changed, timestamp_signup)"""
    return pd.DataFrame(
        {
            "record_id": pd.Series([r[0] for r in rows], dtype="string"),
            "status": pd.Series([r[1] for r in rows], dtype="string"),
            "last_changed": pd.to_datetime([r[2] for r in rows], utc=True),
            "timestamp_signup": pd.to_datetime([r[3] for r in rows], utc=True),
            "has_email": True,
        }
    )


def tickets(rows):
    """rows: (id, status, solved_at, updated_at)"""
    return pd.DataFrame(
        {
            "record_id": pd.Series([r[0] for r in rows], dtype="string"),
            "status": pd.Series([r[1] for r in rows], dtype="string"),
            "requester_id": pd.Series(["u1"] * len(rows), dtype="string"),
            "solved_at": pd.to_datetime([r[2] for r in rows], utc=True),
            "created_at": pd.to_datetime(["2020-01-01"] * len(rows), utc=True),
            "updated_at": pd.to_datetime([r[3] for r in rows], utc=True),
        }
    )


def leads(rows):
    """rows: (id, last_interaction_at, created_at)"""
    n = len(rows)
    return pd.DataFrame(
        {
            "record_id": pd.Series([r[0] for r in rows], dtype="string"),
            "kind": pd.Series(["lead"] * n, dtype="string"),
            "organisation_id": pd.Series([pd.NA] * n, dtype="string"),
            "membership_active": [False] * n,
            "membership_end": pd.to_datetime([None] * n, utc=True),
            "is_customer": [False] * n,
            "last_interaction_at": pd.to_datetime([r[1] for r in rows], utc=True),
            "opted_out": [False] * n,
            "has_email": [True] * n,
            "created_at": pd.to_datetime([r[2] for r in rows], utc=True),
            "has_invoice": [False] * n,
        }
    )


def planned(plan):
    return dict(zip(plan["record_id"], plan["rule_id"]))


def by_fallback(plan):
    return set(plan.loc[plan["fallback_clock"].to_numpy(dtype=bool), "record_id"])


# --- the policy -------------------------------------------------------------------------------


def test_shipped_policy_states_the_fallbacks_as_the_organisations_decision():
    fallbacks = {r.id: r.fallback for r in POLICY.rules if r.fallback is not None}
    assert {k: v.clocks for k, v in fallbacks.items()} == {
        "newsletter-pending": ["last_changed"],
        "support-ticket": ["updated_at"],
        "lead": ["created_at"],
    }
    for fallback in fallbacks.values():
        assert fallback.source == "decision" and fallback.decided_by
    assert POLICY.rule("invoice").fallback is None, "an invoice is never erased by a guessed financial-year end"
    assert POLICY.quarantine_alarm_after == 7


NEWSLETTER_FALLBACK = "    fallback:\n      clock: last_changed\n"


@pytest.mark.parametrize(
    "old,new,expected",
    [
        ("      clock: last_changed\n", "      clock: solved_at\n",
         "bad.yaml: rule 'newsletter-pending' (rules[1]): field 'fallback.clock': 'solved_at' is not a clock of newsletter_member"),
        ("      clock: last_changed\n", "      clock: timestamp_signup\n",
         "bad.yaml: rule 'newsletter-pending' (rules[1]): field 'fallback.clock': 'timestamp_signup' is the rule's own clock"),
        ("      source: decision\n      decided_by: \"IIS data protection coordinator (members added by API",
         "      source: decision\n      decided_byx: \"IIS data protection coordinator (members added by API",
         "bad.yaml: rule 'newsletter-pending' (rules[1]), field 'fallback.decided_byx'"),
        ("      source: decision\n      decided_by: \"IIS data protection coordinator (members added by API",
         "      source: notice\n      decided_by: \"IIS data protection coordinator (members added by API",
         "bad.yaml: rule 'newsletter-pending' (rules[1]), field 'fallback.source'"),
    ],
)
def test_broken_fallback_names_file_rule_and_field(old, new, expected):
    text = TEXT[TEXT.index("  - id: newsletter-pending"):]
    assert NEWSLETTER_FALLBACK in text and old in text, "the shipped newsletter-pending fallback moved"
    with pytest.raises(PolicyError) as err:
        parse_policy(TEXT.replace(old, new, 1), "bad.yaml")
    assert expected in str(err.value)
    assert "\n" not in str(err.value)


def test_fallback_without_decided_by_is_refused():
    start = TEXT.index("      decided_by: \"IIS data protection coordinator (members added by API")
    end = TEXT.index("\n", start) + 1
    with pytest.raises(PolicyError) as err:
        parse_policy(TEXT[:start] + TEXT[end:], "bad.yaml")
    assert str(err.value).startswith("bad.yaml: rule 'newsletter-pending' (rules[1]): field 'fallback.decided_by'")


def test_alarm_after_must_be_a_positive_number_of_nights():
    with pytest.raises(PolicyError, match="field 'quarantine_alarm_after'"):
        parse_policy(TEXT.replace("quarantine_alarm_after: 7", "quarantine_alarm_after: 0"), "bad.yaml")


# --- the engine -------------------------------------------------------------------------------


def test_pending_member_without_signup_is_judged_by_last_changed():
    frame = members(
        [
            ("old", "pending", "2026-09-01T00:00:00Z", None),  # no signup: last change 85 days ago
            ("recent", "pending", "2026-11-20T00:00:00Z", None),  # no signup, changed 5 days ago
            ("own", "pending", "2026-01-01T00:00:00Z", "2026-11-20T00:00:00Z"),  # own clock wins: not due
            ("sub", "subscribed", "2020-01-01T00:00:00Z", None),  # protected, whatever the clocks
        ]
    )
    clean, _, counts = split_quarantine(frame, "newsletter_member", POLICY, NOW)
    assert counts == {}, "a pending member without signup is no longer quarantined"
    plan = plan_record_type(clean, "newsletter_member", POLICY, AS_OF)
    assert planned(plan) == {"old": "newsletter-pending"}
    assert by_fallback(plan) == {"old"}
    assert plan["clock"].iloc[0] == ts("2026-09-01T00:00:00Z")


def test_solved_ticket_without_solved_at_is_judged_by_its_last_update():
    frame = tickets(
        [
            ("merged", "closed", None, "2025-06-01T00:00:00Z"),  # merged: closed, never "solved"
            ("young", "solved", None, "2026-06-01T00:00:00Z"),
            ("own", "closed", "2025-06-01T00:00:00Z", "2026-11-01T00:00:00Z"),  # own clock, a year and more
            ("open", "open", None, "2020-01-01T00:00:00Z"),
        ]
    )
    clean, _, counts = split_quarantine(frame, "support_ticket", POLICY, NOW)
    assert counts == {}
    plan = plan_record_type(clean, "support_ticket", POLICY, AS_OF)
    assert planned(plan) == {"merged": "support-ticket", "own": "support-ticket"}
    assert by_fallback(plan) == {"merged"}


def test_lead_without_last_interaction_is_judged_by_when_it_was_created():
    frame = leads([("old", None, "2024-01-01T00:00:00Z"), ("new", None, "2026-06-01T00:00:00Z"),
                   ("own", "2026-06-01T00:00:00Z", "2010-01-01T00:00:00Z")])
    clean, _, counts = split_quarantine(frame, "crm_contact", POLICY, NOW)
    assert counts == {}
    plan = plan_record_type(clean, "crm_contact", POLICY, AS_OF)
    assert planned(plan) == {"old": "lead"}
    assert by_fallback(plan) == {"old"}
    # Without any clock at all, the lead stays quarantined.
    _, bad, _ = split_quarantine(leads([("none", None, None)]), "crm_contact", POLICY, NOW)
    assert list(bad["record_id"]) == ["none"]


def test_invoice_without_financial_year_end_stays_quarantined():
    frame = pd.DataFrame(
        {
            "record_id": pd.Series(["i1", "i2"], dtype="string"),
            "contact_id": pd.Series(["1", "2"], dtype="string"),
            "financial_year_end": pd.to_datetime([None, "2010-12-31"], utc=True),
        }
    )
    clean, bad, _ = split_quarantine(frame, "crm_invoice", POLICY, NOW)
    assert list(bad["record_id"]) == ["i1"]
    assert planned(plan_record_type(clean, "crm_invoice", POLICY, AS_OF)) == {"i2": "invoice"}


def test_plan_summary_counts_what_a_fallback_clock_planned():
    frame = members([("old", "pending", "2026-09-01T00:00:00Z", None), ("u", "unsubscribed", "2026-01-01T00:00:00Z", None)])
    sp = plan_system("newsletter", {"newsletter_member": frame}, POLICY, AS_OF, now=NOW)
    assert sp.summary()["fallback_clock"] == {"newsletter-pending": 1}


def test_explain_says_a_fallback_clock_decided():
    frame = members([("old", "pending", "2026-09-01T00:00:00Z", None)])
    out = explain_record(frame, "newsletter_member", "old", POLICY, AS_OF)
    verdict = next(v for v in out["rules"] if v["rule"] == "newsletter-pending")
    assert verdict["due"] and verdict["clock_used"] == "last_changed" and verdict["fallback_clock"]
    assert out["decision"] == "planned: erase under rule newsletter-pending (fallback clock last_changed: the organisation's decision)"


def test_explain_of_a_rule_with_two_own_clocks_is_no_fallback():
    frame = pd.DataFrame(
        {
            "record_id": pd.Series(["e1"], dtype="string"),
            "contact_id": pd.Series(["1"], dtype="string"),
            "event_date": pd.to_datetime(["2020-01-01"], utc=True),
            "membership_active": [False],
            "membership_end": pd.to_datetime(["2021-01-01"], utc=True),
            "is_customer": [True],
            "opted_out": [False],
        }
    )
    out = explain_record(frame, "crm_event_participation", "e1", POLICY, AS_OF)
    verdict = out["rules"][0]
    assert verdict["clock_used"] == "event_date/membership_end" and verdict["fallback_clock"] is False
    assert out["decision"] == "planned: erase under rule event-participation"
