from datetime import UTC

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from retention.config import DEFAULT_POLICY
from retention.domain.engine import explain_record, plan_record_type, plan_records
from retention.domain.policy import load_policy, parse_policy

POLICY = load_policy(DEFAULT_POLICY)
UTC = UTC


def ts(s):
    return pd.Timestamp(s, tz="UTC")


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


def planned(plan):
    return dict(zip(plan["record_id"], plan["rule_id"]))


def test_newsletter_rules():
    frame = members(
        [
            ("a", "unsubscribed", "2026-11-24T10:00:00Z", "2020-01-01T00:00:00Z"),
            ("b", "subscribed", "2020-01-01T00:00:00Z", "2020-01-01T00:00:00Z"),
            ("c", "cleaned", "2026-11-25T00:00:00Z", "2020-01-01T00:00:00Z"),
            ("d", "archived", "2021-01-01T00:00:00Z", "2020-01-01T00:00:00Z"),
            ("e", "pending", "2026-10-26T00:00:00Z", "2026-10-26T00:00:00Z"),  # 30 days before as_of, Stockholm midnight+1h
            ("f", "pending", "2026-10-27T00:00:00Z", "2026-10-27T00:00:00Z"),  # 29 days
            ("g", "transactional", "2019-01-01T00:00:00Z", "2019-01-01T00:00:00Z"),
            ("h", "unsubscribed", "2026-11-26T00:00:00Z", "2020-01-01T00:00:00Z"),  # after as_of: next run
        ]
    )
    plan = plan_record_type(frame, "newsletter_member", POLICY, ts("2026-11-25T00:00:00Z"))
    assert planned(plan) == {
        "a": "newsletter-unsubscribed", "c": "newsletter-unsubscribed", "d": "newsletter-unsubscribed",
        "e": "newsletter-pending",
    }
    assert set(plan["action"]) == {"erase"}
    row = plan.set_index("record_id").loc["e"]
    assert row["deadline"] == ts("2026-11-25T00:00:00Z")  # same Stockholm wall clock, 30 days on


def test_calendar_year_from_leap_day_and_dst():
    frame = members([("x", "unsubscribed", "2024-02-29T12:00:00Z", "2024-01-01T00:00:00Z")])
    text = DEFAULT_POLICY.read_text().replace("    period: P0D\n    period_source: notice\n    action: erase\n\n  - id: newsletter-pending",
                                               "    period: P1Y\n    period_source: notice\n    action: erase\n\n  - id: newsletter-pending")
    policy = parse_policy(text, "p1y.yaml")
    plan = plan_record_type(frame, "newsletter_member", policy, ts("2025-03-01T00:00:00Z"))
    # 29 Feb 2024 13:00 Stockholm + P1Y = 28 Feb 2025 13:00 Stockholm = 12:00 UTC
    assert plan["deadline"].iloc[0] == ts("2025-02-28T12:00:00Z")
    assert plan_record_type(frame, "newsletter_member", policy, ts("2025-02-28T11:59:59Z")).empty
    # 30 days across the spring DST change keep the wall-clock time: 23:00 UTC+1 -> 23:00 UTC+2
    pend = members([("p", "pending", "2026-03-10T22:00:00Z", "2026-03-10T22:00:00Z")])
    deadline = plan_record_type(pend, "newsletter_member", POLICY, ts("2026-05-01T00:00:00Z"))["deadline"].iloc[0]
    assert deadline == ts("2026-04-09T21:00:00Z")


def contacts(rows):
    """rows: (id, kind, active, membership_end, last_interaction, opted_out, has_invoice)"""
    return pd.DataFrame(
        {
            "record_id": pd.Series([r[0] for r in rows], dtype="string"),
            "kind": [r[1] for r in rows],
            "organisation_id": pd.array([1 if r[1] == "member" else None for r in rows], dtype="Int64"),
            "membership_active": [r[2] for r in rows],
            "membership_end": pd.to_datetime([r[3] for r in rows], utc=True),
            "is_customer": [r[1] == "member" for r in rows],
            "last_interaction_at": pd.to_datetime([r[4] for r in rows], utc=True),
            "opted_out": [r[5] for r in rows],
            "has_email": True,
            "created_at": ts("2015-01-01"),
            "has_invoice": [r[6] for r in rows],
        }
    )


def test_crm_contact_rules_opt_out_invoice_and_active_member():
    as_of = ts("2026-11-25T12:00:00Z")
    frame = contacts(
        [
            ("1", "member", False, "2025-11-24", "2020-01-01", False, False),  # ended > 1 year ago
            ("2", "member", False, "2025-11-26", "2020-01-01", False, False),  # not yet a year
            ("3", "member", False, "2026-11-01", "2020-01-01", True, False),  # opted out: at once
            ("4", "member", True, None, "2010-01-01", True, False),  # active: never
            ("5", "lead", False, None, "2025-11-01", False, False),  # lead, no activity for a year
            ("6", "lead", False, None, "2026-11-01", True, False),  # opted-out lead
            ("7", "lead", False, None, "2026-11-01", False, False),  # recent lead
            ("8", "member", False, "2020-01-01", "2020-01-01", False, True),  # has invoice: minimise
        ]
    )
    plan = plan_record_type(frame, "crm_contact", POLICY, as_of)
    assert planned(plan) == {"1": "former-member-contact", "3": "former-member-contact", "5": "lead", "6": "lead", "8": "former-member-contact"}
    actions = dict(zip(plan["record_id"], plan["action"]))
    assert actions["8"] == "minimise" and actions["1"] == "erase"
    assert plan.set_index("record_id").loc["8", "hold"] == "bookkeeping"


def test_invoice_erasable_from_first_january_of_fy_end_year_plus_eight():
    frame = pd.DataFrame(
        {
            "record_id": pd.Series(["cal", "june", "june19", "cal19"], dtype="string"),
            "contact_id": [1, 2, 3, 4],
            "financial_year_end": pd.to_datetime(["2018-12-31", "2018-06-30", "2019-06-30", "2019-12-31"], utc=True),
        }
    )
    # FY ending in 2018: kept through 31 Dec 2025 (seventh year after 2018), erasable 1 Jan 2026.
    assert plan_record_type(frame, "crm_invoice", POLICY, ts("2025-12-31T22:59:59Z")).empty  # 23:59:59 Stockholm
    plan = plan_record_type(frame, "crm_invoice", POLICY, ts("2025-12-31T23:00:00Z"))  # 2026-01-01 00:00 Stockholm
    assert set(plan["record_id"]) == {"cal", "june"}
    assert set(plan_record_type(frame, "crm_invoice", POLICY, ts("2026-12-31T22:59:59Z"))["record_id"]) == {"cal", "june"}
    assert set(plan_record_type(frame, "crm_invoice", POLICY, ts("2026-12-31T23:00:00Z"))["record_id"]) == {"cal", "june", "june19", "cal19"}


def test_event_participation_uses_later_of_event_and_relationship_end():
    frame = pd.DataFrame(
        {
            "record_id": pd.Series(["guest", "former", "active", "optout"], dtype="string"),
            "contact_id": [1, 2, 3, 4],
            "event_date": pd.to_datetime(["2025-10-01", "2023-01-01", "2020-01-01", "2026-10-01"], utc=True),
            "membership_active": [False, False, True, False],
            "membership_end": pd.to_datetime([None, "2026-01-01", None, None], utc=True),
            "is_customer": [False, True, True, False],
            "opted_out": [False, False, False, True],
        }
    )
    plan = plan_record_type(frame, "crm_event_participation", POLICY, ts("2026-11-25"))
    assert set(plan["record_id"]) == {"guest", "optout"}


def test_manual_hold_blocks_erasure_until_it_expires():
    frame = members([("a", "unsubscribed", "2025-01-01T00:00:00Z", "2020-01-01T00:00:00Z")])
    holds = pd.DataFrame(
        {"record_type": ["newsletter_member"], "record_id": ["a"], "reason": ["litigation"], "expires_at": pd.to_datetime(["2026-12-01"], utc=True)}
    )
    plan = plan_record_type(frame, "newsletter_member", POLICY, ts("2026-11-25"), holds)
    # The plan (and so the ledger) names the hold, never its free-text reason.
    assert list(plan["action"]) == ["hold"] and list(plan["hold"]) == ["the system's legal_hold list"]
    plan = plan_record_type(frame, "newsletter_member", POLICY, ts("2026-12-02"), holds)
    assert list(plan["action"]) == ["erase"]


def test_protection_wins_even_over_a_policy_that_targets_subscribers():
    text = DEFAULT_POLICY.read_text().replace("when: {status: [unsubscribed, cleaned, archived]}", "when: {status: [subscribed, unsubscribed]}")
    # A policy file without the subscriber protection is refused (tests/test_policy.py); the code
    # floor holds even for a policy object that lacks it.
    policy = parse_policy(text, "greedy.yaml")
    policy = policy.model_copy(update={"protections": [p for p in policy.protections if p.records != "newsletter_member"]})
    assert all(p.records != "newsletter_member" for p in policy.protections)
    frame = members([("s", "subscribed", "2020-01-01T00:00:00Z", "2020-01-01T00:00:00Z")])
    assert plan_record_type(frame, "newsletter_member", policy, ts("2026-11-25")).empty


def test_explain_says_why():
    frame = members(
        [
            ("s", "subscribed", "2020-01-01T00:00:00Z", "2020-01-01T00:00:00Z"),
            ("u", "unsubscribed", "2026-01-01T00:00:00Z", "2020-01-01T00:00:00Z"),
        ]
    )
    e = explain_record(frame, "newsletter_member", "s", POLICY, ts("2026-11-25"))
    assert e["protected"] and e["decision"].startswith("protected")
    e = explain_record(frame, "newsletter_member", "u", POLICY, ts("2026-11-25"))
    assert e["decision"] == "planned: erase under rule newsletter-unsubscribed"
    assert e["policy_version"] == POLICY.version
    assert explain_record(frame, "newsletter_member", "zz", POLICY, ts("2026-11-25"))["found"] is False


# --- properties -------------------------------------------------------------------------

STATUSES = ["subscribed", "unsubscribed", "cleaned", "pending", "archived", "transactional"]
EPOCH = pd.Timestamp("2020-01-01", tz="UTC")


@st.composite
def member_frames(draw):
    n = draw(st.integers(min_value=0, max_value=60))
    status = draw(st.lists(st.sampled_from(STATUSES), min_size=n, max_size=n))
    changed = draw(st.lists(st.integers(0, 7 * 365 * 86400), min_size=n, max_size=n))
    signup = draw(st.lists(st.integers(0, 7 * 365 * 86400), min_size=n, max_size=n))
    return pd.DataFrame(
        {
            "record_id": pd.Series([f"m{i}" for i in range(n)], dtype="string"),
            "status": pd.Series(status, dtype="string"),
            "last_changed": EPOCH + pd.to_timedelta(np.array(changed, dtype="int64"), unit="s"),
            "timestamp_signup": EPOCH + pd.to_timedelta(np.array(signup, dtype="int64"), unit="s"),
            "has_email": True,
        }
    )


as_of_seconds = st.integers(0, 8 * 365 * 86400)


@settings(max_examples=150, deadline=None)
@given(member_frames(), as_of_seconds)
def test_property_subscribed_member_is_never_planned(frame, secs):
    plan = plan_records({"newsletter_member": frame}, POLICY, EPOCH + pd.Timedelta(seconds=secs))
    protected = set(frame.loc[frame["status"].isin(["subscribed", "transactional"]), "record_id"])
    assert not protected & set(plan["record_id"])


@settings(max_examples=150, deadline=None)
@given(member_frames(), as_of_seconds, as_of_seconds)
def test_property_earlier_as_of_plans_a_subset(frame, a, b):
    early, late = sorted((a, b))
    p_early = plan_records({"newsletter_member": frame}, POLICY, EPOCH + pd.Timedelta(seconds=early))
    p_late = plan_records({"newsletter_member": frame}, POLICY, EPOCH + pd.Timedelta(seconds=late))
    assert set(p_early["record_id"]) <= set(p_late["record_id"])


def _with_pending_period(period: str):
    text = DEFAULT_POLICY.read_text().replace("    period: P30D\n", f"    period: {period}\n", 1)
    return parse_policy(text, f"pending-{period}.yaml")


@settings(max_examples=100, deadline=None)
@given(member_frames(), as_of_seconds, st.integers(0, 400), st.integers(0, 400), st.sampled_from(["D", "M", "W"]))
def test_property_longer_period_never_plans_more(frame, secs, n1, n2, unit):
    short, long_ = sorted((n1, n2))
    as_of = EPOCH + pd.Timedelta(seconds=secs)
    p_short = plan_records({"newsletter_member": frame}, _with_pending_period(f"P{short}{unit}"), as_of)
    p_long = plan_records({"newsletter_member": frame}, _with_pending_period(f"P{long_}{unit}"), as_of)
    assert set(p_long["record_id"]) <= set(p_short["record_id"])


# Fallback clocks (issue 10, item 6): a record judged by a fallback clock, because its rule's own
# clock is missing, is still never planned when protected, and only ever "hold" when held.
@st.composite
def fallback_frames(draw):
    n = draw(st.integers(min_value=0, max_value=40))
    status = draw(st.lists(st.sampled_from(STATUSES), min_size=n, max_size=n))
    changed = draw(st.lists(st.integers(0, 7 * 365 * 86400), min_size=n, max_size=n))
    signup = draw(st.lists(st.one_of(st.none(), st.integers(0, 7 * 365 * 86400)), min_size=n, max_size=n))
    held = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    frame = pd.DataFrame(
        {
            "record_id": pd.Series([f"m{i}" for i in range(n)], dtype="string"),
            "status": pd.Series(status, dtype="string"),
            "last_changed": EPOCH + pd.to_timedelta(np.array(changed, dtype="int64"), unit="s"),
            "timestamp_signup": pd.to_datetime(
                [None if s is None else EPOCH + pd.Timedelta(seconds=s) for s in signup], utc=True
            ).astype("datetime64[us, UTC]"),
            "has_email": True,
        }
    )
    holds = pd.DataFrame(
        {
            "record_type": "newsletter_member",
            "record_id": pd.Series([f"m{i}" for i in range(n) if held[i]], dtype="string"),
            "reason": "dispute",
            "expires_at": pd.NaT,
        }
    )
    return frame, holds


@settings(max_examples=150, deadline=None)
@given(fallback_frames(), as_of_seconds)
def test_property_fallback_clock_never_plans_a_protected_or_held_record(drawn, secs):
    from retention.domain.planning import plan_system

    frame, holds = drawn
    sp = plan_system("newsletter", {"newsletter_member": frame}, POLICY, EPOCH + pd.Timedelta(seconds=secs),
                     now=EPOCH + pd.Timedelta(days=9 * 365), source_holds=holds)
    plan = sp.plan
    protected = set(frame.loc[frame["status"].isin(["subscribed", "transactional"]), "record_id"])
    assert not protected & set(plan["record_id"])
    destructive = set(plan.loc[plan["action"].isin(["erase", "minimise"]), "record_id"])
    assert not destructive & set(holds["record_id"])
    # Every pending member without a signup is judged (none quarantined), by its fallback clock.
    by_fallback = set(plan.loc[plan["fallback_clock"].to_numpy(dtype=bool), "record_id"])
    no_signup = set(frame.loc[frame["timestamp_signup"].isna(), "record_id"])
    assert by_fallback <= no_signup
    assert sp.quarantine_counts == {}


# --- Zendesk users are due only with no basis left (issue 10, item 2) -------------------------

from retention.domain.conform import from_rows  # noqa: E402
from retention.domain.planning import plan_system  # noqa: E402

ZD_AS_OF = ts("2026-11-25T12:00:00")
LONG_AGO = "2020-01-01T00:00:00Z"


def _zd_plan(tickets: list[dict], users: list[dict], as_of=ZD_AS_OF):
    frames = {"support_ticket": from_rows("support_ticket", tickets), "ticket_user": from_rows("ticket_user", users)}
    return plan_system("ticketing", frames, POLICY, as_of, now=as_of).plan


def _ticket(tid, status, requester, cc="", solved=None):
    return {"id": tid, "status": status, "requester_id": requester, "solved_at": solved,
            "created_at": "2023-01-01T00:00:00Z", "updated_at": solved or "2023-01-01T00:00:00Z", "cc_ids": cc}


def _user(uid, role="end-user", created=LONG_AGO):
    return {"id": uid, "role": role, "created_at": created, "updated_at": created}


def test_zendesk_users_are_due_only_with_no_basis_left():
    long_solved = "2024-01-10T10:00:00Z"
    tickets = [
        _ticket(1, "closed", 10, solved=long_solved),          # due: its requester 10 goes with it
        _ticket(2, "open", 11, cc="20 30"),                   # live: keeps 11, CC 20, follower (agent) 30
        _ticket(3, "closed", 12, cc="21", solved=long_solved),  # due: requester 12 and CC 21 go after it
        _ticket(4, "solved", 13, cc="22", solved="2026-10-01T10:00:00Z"),  # not due: keeps 13 and CC 22
    ]
    users = [
        _user(10), _user(11), _user(12), _user(13), _user(20), _user(21), _user(22), _user(30, "agent"),
        _user(40, created="2026-11-24T09:00:00Z"),  # created yesterday, no ticket yet
        _user(41, created="2025-12-01T00:00:00Z"),  # no ticket, created within the year
        _user(42),                                  # no ticket, created long ago
        _user(43, "admin"),
    ]
    plan = _zd_plan(tickets, users)
    planned_users = planned(plan[plan["record_type"] == "ticket_user"])
    assert planned_users == {
        "10": "ticket-requester", "12": "ticket-requester", "21": "ticket-requester", "42": "ticket-user-without-ticket",
    }
    tickets_planned = plan[plan["record_type"] == "support_ticket"].set_index("record_id")
    assert set(tickets_planned.index) == {"1", "3"}
    # The engine erases a ticket's parties (requester, CCs, followers) only once it is gone.
    assert tickets_planned.loc["3", "blocks"] == "12 21" and tickets_planned.loc["1", "blocks"] == "10"


_ZD_STATUSES = ("new", "open", "pending", "hold", "solved", "closed", "deleted")


@st.composite
def zendesk_accounts(draw):
    n_users = draw(st.integers(1, 8))
    uids = list(range(100, 100 + n_users))
    roles = draw(st.lists(st.sampled_from(("end-user", "end-user", "agent", "admin")), min_size=n_users, max_size=n_users))
    days = draw(st.lists(st.one_of(st.integers(0, 3 * 365), st.sampled_from((363, 364, 365, 366))), min_size=n_users, max_size=n_users))
    users = [_user(u, r, (ZD_AS_OF - pd.Timedelta(days=d, hours=1)).isoformat()) for u, r, d in zip(uids, roles, days)]
    tickets = []
    for tid in range(1, draw(st.integers(0, 10)) + 1):
        status = draw(st.sampled_from(_ZD_STATUSES))
        solved = (ZD_AS_OF - pd.Timedelta(days=draw(st.integers(1, 800)))).isoformat() if status in ("solved", "closed", "deleted") else None
        ccs = draw(st.lists(st.sampled_from(uids), max_size=3, unique=True))
        tickets.append(_ticket(tid, status, draw(st.sampled_from(uids)), " ".join(map(str, ccs)), solved))
    return tickets, users


@given(zendesk_accounts())
@settings(max_examples=150, deadline=None)
def test_property_a_user_with_a_live_basis_is_never_planned(accounts):
    """Whatever the tickets: a user planned for erasure is an end user who requested, is CC'd on
    and follows no ticket that stays, whom every ticket this plan erases and names lists among
    the records it must go before, and who, named by no ticket, was created over a year ago."""
    tickets, users = accounts
    plan = _zd_plan(tickets, users)
    erased = set(plan.loc[(plan["record_type"] == "support_ticket") & (plan["action"] == "erase"), "record_id"])
    for row in plan[plan["record_type"] == "ticket_user"].itertuples():
        uid = int(row.record_id)
        user = next(u for u in users if u["id"] == uid)
        assert user["role"] == "end-user"
        named = [t for t in tickets if t["requester_id"] == uid or str(uid) in t["cc_ids"].split()]
        assert not [t for t in named if str(t["id"]) not in erased], "requested, CC'd on or following a ticket that stays"
        blocks = plan[plan["record_type"] == "support_ticket"].set_index("record_id")["blocks"]
        assert all(str(uid) in str(blocks[str(t["id"])]).split() for t in named), "erased before a ticket of theirs"
        if not named:
            # (364 days: a calendar year in Europe/Stockholm is 365 or 366 days, give or take an hour)
            assert pd.Timestamp(user["created_at"]) + pd.Timedelta(days=364) < ZD_AS_OF, "a new account with no ticket yet"
