"""Planning a record type a part at a time gives the plan of planning it whole (issue 12, item 5).

The nightly plan step reads the staged extract a part at a time (``planning.plan_parts``) to
keep its memory flat; the preview, explain and the tests plan frames whole. Whatever the parts,
the plan (in erase order), the frames judged, the quarantine and its counts must be the same.
The messy cases are what a part could get wrong: a key duplicated across two parts, a ticket
listed again by the incremental export in a later part, a requester whose tickets fall in
different parts, a user listed twice, missing ids.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retention.config import DEFAULT_POLICY
from retention.domain.conform import from_rows
from retention.domain.planning import erase_order, plan_system
from retention.domain.policy import load_policy
from retention.domain.pseudonyms import Pseudonymizer
from retention.domain.records import record_types_of
from retention.domain.statuses import DESTRUCTIVE

POLICY = load_policy(DEFAULT_POLICY)
AS_OF = pd.Timestamp("2026-11-25T12:00:00Z")
PSEUDO = Pseudonymizer(b"k" * 32)
STATUSES = ["new", "open", "pending", "hold", "solved", "closed", "deleted"]
ROLES = ["end-user", "end-user", "end-user", "agent", "admin"]
MEMBER_STATUSES = ["subscribed", "unsubscribed", "cleaned", "pending", "archived", "transactional"]


def _when(draw, *, missing: bool = True) -> str | None:
    if missing and draw(st.integers(0, 9)) == 0:
        return None
    day = draw(st.integers(0, 7 * 365))
    return (pd.Timestamp("2020-01-01T00:00:00Z") + pd.Timedelta(days=day, hours=draw(st.integers(0, 23)))).isoformat()


@st.composite
def zendesks(draw):
    users = draw(st.integers(1, 12))
    pool = [str(10 + i) for i in range(users)]
    if draw(st.integers(0, 3)) == 0:
        # Now and then an id that is not an integer's canonical text: "010" is not "10", and
        # the requesters' sums leave their integer path for exact texts.
        pool.append("010")
    party = st.one_of(st.sampled_from(pool), st.just("99"))  # 99: named on a ticket, no account
    tickets = []
    for _ in range(draw(st.integers(0, 30))):
        solved = _when(draw)
        ccs = draw(st.lists(party, max_size=3))
        tickets.append({
            # Few ids: the export's later listings of a ticket; now and then one without an id.
            "id": None if draw(st.integers(0, 40)) == 0 else draw(st.integers(1, 15)),
            "status": draw(st.sampled_from(STATUSES)),
            "requester_id": None if draw(st.integers(0, 20)) == 0 else draw(party),
            "solved_at": solved,
            "created_at": _when(draw, missing=False),
            "updated_at": solved or _when(draw, missing=False),
            "cc_ids": " ".join(ccs),
        })
    accounts = [
        {"id": u, "role": draw(st.sampled_from(ROLES)), "created_at": (c := _when(draw, missing=False)), "updated_at": c}
        for u in draw(st.lists(st.sampled_from(pool), max_size=2 * users))  # a user listed twice
    ]
    return {"support_ticket": from_rows("support_ticket", tickets), "ticket_user": from_rows("ticket_user", accounts)}


@st.composite
def newsletters(draw):
    n = draw(st.integers(0, 40))
    rows = [
        {
            "record_id": None if draw(st.integers(0, 30)) == 0 else f"m{draw(st.integers(0, 30))}",  # duplicates
            "status": draw(st.sampled_from(MEMBER_STATUSES)),
            "last_changed": _when(draw),
            "timestamp_signup": _when(draw),
            "has_email": draw(st.booleans()),
        }
        for _ in range(n)
    ]
    frame = pd.DataFrame(rows, columns=["record_id", "status", "last_changed", "timestamp_signup", "has_email"])
    for col in ("last_changed", "timestamp_signup"):
        frame[col] = pd.to_datetime(frame[col], utc=True)
    frame["record_id"] = frame["record_id"].astype("string")
    frame["status"] = frame["status"].astype("string")
    return {"newsletter_member": frame}


def _in_erase_order(sp, system: str) -> pd.DataFrame:
    return sp.plan.iloc[erase_order(sp.plan, record_types_of(system))].reset_index(drop=True)


def assert_same(system: str, frames: dict, part_rows: int) -> None:
    kwargs = {"now": AS_OF, "pseudonymizer": PSEUDO}
    whole = plan_system(system, frames, POLICY, AS_OF, **kwargs)
    parts = plan_system(system, frames, POLICY, AS_OF, part_rows=part_rows, **kwargs)
    pd.testing.assert_frame_equal(_in_erase_order(parts, system), _in_erase_order(whole, system))
    assert parts.clean.keys() == whole.clean.keys()
    for record_type, clean in whole.clean.items():
        pd.testing.assert_frame_equal(parts.clean[record_type], clean)
    pd.testing.assert_frame_equal(parts.quarantined, whole.quarantined)
    assert parts.summary() == whole.summary()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(zendesks(), st.integers(1, 7))
def test_tickets_and_requesters_planned_in_parts_as_whole(frames, part_rows):
    assert_same("ticketing", frames, part_rows)


@settings(max_examples=200, deadline=None)
@given(newsletters(), st.integers(1, 7))
def test_members_planned_in_parts_as_whole(frames, part_rows):
    assert_same("newsletter", frames, part_rows)


def _reference_users(users: pd.DataFrame, plan_so_far: pd.DataFrame, tickets: pd.DataFrame) -> pd.DataFrame:
    """The requesters' derivation as it was written before planning took parts (whole frames,
    pandas throughout): the oracle ``derive.TicketParties`` is held to."""
    from retention.domain.derive import cc_pairs

    users = users.drop_duplicates("record_id", keep="last")
    planned = plan_so_far[(plan_so_far["record_type"] == "support_ticket") & plan_so_far["action"].isin(DESTRUCTIVE)]
    deadline = planned.set_index("record_id")["deadline"] if len(planned) else pd.Series(dtype="datetime64[us, UTC]")
    ccs = cc_pairs(tickets).rename(columns={"user_id": "requester_id"})
    t = pd.concat([tickets[["record_id", "requester_id"]].astype("string"), ccs], ignore_index=True).drop_duplicates()
    t["gone"] = t["record_id"].isin(deadline.index)
    remaining = t.loc[~t["gone"]].groupby("requester_id").size()
    out = users.copy()
    ids = out["record_id"].astype("string")
    out["tickets_remaining"] = ids.map(remaining).fillna(0).astype("int64").to_numpy()
    out["had_ticket"] = ids.astype(str).isin(set(t["requester_id"].dropna().astype(str))).to_numpy()
    updated = pd.to_datetime(out["updated_at"], utc=True)
    gone = t.loc[t["gone"], ["record_id", "requester_id"]]
    if len(gone):
        gone = gone.assign(deadline=gone["record_id"].map(deadline).to_numpy())
        gone_at = gone.groupby("requester_id")["deadline"].max()
        last = out[["record_id"]].merge(gone_at.rename("last").reset_index(), left_on="record_id", right_on="requester_id", how="left")["last"]
        last.index = out.index
        out["last_ticket_gone_at"] = pd.concat([pd.to_datetime(last, utc=True), updated], axis=1).max(axis=1)
    else:
        out["last_ticket_gone_at"] = updated
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(zendesks())
def test_requesters_derived_as_before_planning_took_parts(frames):
    from retention.domain.derive import derive_ticket_users, latest_tickets
    from retention.domain.engine import plan_record_type
    from retention.domain.quarantine import split_quarantine

    tickets = latest_tickets(frames["support_ticket"])
    clean, _, _ = split_quarantine(tickets, "support_ticket", POLICY, AS_OF)
    plan = plan_record_type(clean, "support_ticket", POLICY, AS_OF)
    so_far = plan[["record_type", "record_id", "action", "deadline"]]
    mine = derive_ticket_users(frames["ticket_user"], so_far, {"support_ticket": tickets})
    pd.testing.assert_frame_equal(mine, _reference_users(frames["ticket_user"], so_far, tickets))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(zendesks(), st.integers(1, 7))
def test_requesters_summed_as_integers_as_texts(frames, part_rows):
    """``TicketParties`` sums canonical integer ids as int64 and anything else as texts: the two
    paths give every user the same derivation, whatever the parts."""
    from retention.domain.derive import TicketParties, latest_tickets
    from retention.domain.engine import plan_record_type
    from retention.domain.quarantine import split_quarantine

    tickets = latest_tickets(frames["support_ticket"])
    clean, _, _ = split_quarantine(tickets, "support_ticket", POLICY, AS_OF)
    plan = plan_record_type(clean, "support_ticket", POLICY, AS_OF)[["record_type", "record_id", "action", "deadline"]]
    plan = pd.concat([plan, plan.iloc[::2]], ignore_index=True)  # a ticket planned twice counts its latest deadline
    plan.loc[plan.index[len(plan) // 2 :], "deadline"] += pd.Timedelta(days=1)
    unique = bool(tickets["record_id"].notna().all() and tickets["record_id"].is_unique)
    users = frames["ticket_user"].drop_duplicates("record_id", keep="last")
    derived = []
    for int_ids in (True, False):
        parties = TicketParties(unique_tickets=unique, int_ids=int_ids)
        for start in range(0, max(len(tickets), 1), part_rows):
            parties.add_tickets(tickets.iloc[start : start + part_rows])
        for start in range(0, max(len(plan), 1), part_rows):
            parties.add_plan(plan.iloc[start : start + part_rows])
        derived.append(pd.concat([parties.derive_users(users.iloc[s : s + part_rows]) for s in range(0, max(len(users), 1), part_rows)]))
    pd.testing.assert_frame_equal(derived[0], derived[1])


def test_requesters_sum_integer_ids_exactly():
    """The integer path: a party "10" is not the user "010"; a ticket erased twice counts its
    latest deadline; a requester with a ticket left is not done; an id that is not canonical
    turns the gathering to texts with the same answer."""
    from retention.domain.derive import TicketParties

    tickets = pd.DataFrame({
        "record_id": pd.Series(["1", "2", "3"], dtype="string"),
        "requester_id": pd.Series(["10", "10", "11"], dtype="string"),
        "cc_ids": pd.Series(["11", "", "12 12"], dtype="string"),
    })
    day = pd.Timestamp("2026-01-01T00:00:00Z")
    plan = pd.DataFrame({
        "record_type": "support_ticket", "record_id": pd.Series(["1", "3", "1"], dtype="string"),
        "action": "erase", "deadline": [day, day + pd.Timedelta(days=1), day + pd.Timedelta(days=5)],
    })
    users = pd.DataFrame({
        "record_id": pd.Series(["10", "11", "12", "010", "13"], dtype="string"),
        "updated_at": pd.to_datetime(["2020-01-01"] * 5, utc=True),
    })
    answers = []
    for extra in (None, "u7"):
        parties = TicketParties()
        parties.add_tickets(tickets)
        if extra is not None:  # a party that is not an integer: the rest follow as texts
            parties.add_tickets(pd.DataFrame({"record_id": pd.Series(["4"], dtype="string"), "requester_id": pd.Series([extra], dtype="string")}))
        parties.add_plan(plan)
        assert parties._ints is (extra is None)
        out = parties.derive_users(users)
        assert out["tickets_remaining"].tolist() == [1, 0, 0, 0, 0]
        assert out["had_ticket"].tolist() == [True, True, True, False, False]
        assert out["last_ticket_gone_at"].tolist()[:3] == [day + pd.Timedelta(days=5)] * 2 + [day + pd.Timedelta(days=1)]
        answers.append(out)
    pd.testing.assert_frame_equal(answers[0], answers[1])


def test_a_key_duplicated_across_parts_is_quarantined_in_both():
    frame = pd.DataFrame({
        "record_id": pd.Series(["a", "b", "c", "a"], dtype="string"),
        "status": pd.Series(["unsubscribed"] * 4, dtype="string"),
        "last_changed": pd.to_datetime(["2020-01-01"] * 4, utc=True),
        "timestamp_signup": pd.to_datetime(["2020-01-01"] * 4, utc=True),
        "has_email": True,
    })
    sp = plan_system("newsletter", {"newsletter_member": frame}, POLICY, AS_OF, now=AS_OF, part_rows=2)
    assert sorted(sp.quarantined["record_id"]) == ["a", "a"]
    assert sorted(sp.plan["record_id"]) == ["b", "c"]
    assert np.array_equal(sp.plan["action"].isin(DESTRUCTIVE).to_numpy(), [True, True])


def test_parts_that_are_not_the_rows_of_the_ids_stop_the_plan():
    """Duplicates are found over the ids, read apart from the rows: rows that are not those ids
    (an extract changed between the reads) must stop planning, not leave a duplicate unmarked."""
    import pytest

    from retention.domain.planning import InMemoryExtract, plan_parts

    frame = pd.DataFrame({
        "record_id": pd.Series(["a", "b", "a"], dtype="string"),
        "status": pd.Series(["unsubscribed"] * 3, dtype="string"),
        "last_changed": pd.to_datetime(["2020-01-01"] * 3, utc=True),
        "timestamp_signup": pd.to_datetime(["2020-01-01"] * 3, utc=True),
        "has_email": True,
    })

    class Shorter(InMemoryExtract):
        def ids(self, record_type):
            yield self.frames[record_type]["record_id"].iloc[:2]

    class Longer(InMemoryExtract):
        def ids(self, record_type):
            yield pd.concat([self.frames[record_type]["record_id"]] * 2, ignore_index=True)

    for extract, message in ((Shorter, "parts hold more rows than its ids"), (Longer, "parts hold 3 rows, its ids 6")):
        with pytest.raises(RuntimeError, match=message):
            list(plan_parts("newsletter", extract({"newsletter_member": frame}), POLICY, AS_OF, now=AS_OF))
