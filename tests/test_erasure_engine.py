"""The one erasure engine (``runs.erasing``), on its own and as the three flows use it.

The system behind the port is an in-memory one here (``MemorySystem``): what is tested is the
engine's bookkeeping (write-ahead, resume, the checks before each batch, outcomes booked as they
arrive, verify), which does not depend on which system is behind the port. The flows' end-to-end
tests run the same engine against the stand-ins over real HTTP.
"""

from __future__ import annotations

import datetime as dt
import itertools
import time
from collections import Counter

import pandas as pd
import pyarrow as pa
import pytest
import sqlalchemy as sa

from retention import config
from retention.domain.statuses import Status
from retention.runs.context import RunInfo, open_run, pseudonymizer
from retention.runs.erasing import ErasureEngine
from retention.store.ledger import Ledger


class MemorySystem:
    """A system behind the port that holds records in memory and can be told to fail."""

    system = "ticketing"
    record_types = ("support_ticket", "ticket_user")
    erase_batch = 3

    def __init__(self, records: dict[str, set[str]], fail: set[str] = frozenset(), die_after: int | None = None, pause: float = 0.0,
                 probe=None):
        self.records = {rt: set(ids) for rt, ids in records.items()}
        self.fail, self.die_after, self.pause, self.probe = set(fail), die_after, pause, probe
        self.calls: list[tuple[str, str, list[str]]] = []
        self.erased = 0

    def erase(self, record_type, action, record_ids, recheck=None):
        self.calls.append((record_type, action, list(record_ids)))
        for rid in record_ids:
            if self.die_after is not None and self.erased >= self.die_after:
                raise KeyboardInterrupt("task killed")
            if self.probe:
                self.probe(self.erased)
            if rid in self.fail:
                yield rid, Status.FAILED
            elif rid in self.records[record_type]:
                self.records[record_type].discard(rid)
                self.erased += 1
                time.sleep(self.pause)
                yield rid, Status.ERASED
            else:
                yield rid, Status.ALREADY_GONE

    def still_present(self, record_type, record_ids):
        return set(record_ids) & self.records[record_type]

    def close(self):
        pass


def plan_of(rows: list[tuple], rule: str = "support-ticket") -> pd.DataFrame:
    """Plan rows (record_type, record_id, action[, blocks]) with keys and rules."""
    pseudo = pseudonymizer()
    frame = pd.DataFrame(
        [{"record_type": r[0], "record_id": r[1], "action": r[2], "blocks": r[3] if len(r) > 3 else None} for r in rows]
    )
    frame["record_key"] = pseudo.column(frame["record_type"], frame["record_id"])
    frame["rule_id"] = [rule if t == "support_ticket" else "ticket-requester" for t in frame["record_type"]]
    frame["hold"] = pd.Series([None] * len(frame), dtype="string")
    return frame.astype({c: "string" for c in frame.columns})


@pytest.fixture
def ledger(retention_home):
    led = Ledger(config.ledger_url())
    yield led
    led.engine.dispose()


def entries(ledger: Ledger, run_id: str) -> dict[tuple[str, str], dict]:
    return {(r["record_type"], r["record_key"]): r for r in ledger.entries(run_id)}


TICKETS = {"support_ticket": {"1", "2", "3", "4", "5"}, "ticket_user": {"u1", "u2"}}
PLAN = [
    ("support_ticket", "1", "erase", "u1"), ("support_ticket", "2", "erase", "u1"), ("support_ticket", "3", "erase", "u2"),
    ("support_ticket", "4", "hold", "u2"), ("ticket_user", "u1", "erase"),
]


def test_write_ahead_then_erase_then_verify(ledger):
    system = MemorySystem(TICKETS)
    engine = ErasureEngine(ledger, "run-1", "ticketing", system, "v1")
    plan = plan_of(PLAN)
    result = engine.erase(plan)
    rows = entries(ledger, "run-1")
    assert len(rows) == len(plan)
    key = dict(zip(plan["record_id"], plan["record_key"]))
    assert {rid: rows[(t, key[rid])]["status"] for t, rid in zip(plan["record_type"], plan["record_id"])} == {
        "1": "erased", "2": "erased", "3": "erased", "4": "held", "u1": "erased",
    }
    assert all(r["completed_at"] and r["policy_version"] == "v1" for r in rows.values())
    assert result.totals() == {"erased": 4, "held": 1} and not result.failed
    assert system.records == {"support_ticket": {"4", "5"}, "ticket_user": {"u2"}}
    # Batches of three, tickets before their requesters; the held ticket is never sent.
    assert [(t, len(ids)) for t, _, ids in system.calls] == [("support_ticket", 3), ("ticket_user", 1)]
    assert engine.verify(plan) == (4, 0)
    system.records["support_ticket"].add("2")  # a restore brought one back
    assert engine.verify(plan) == (4, 1)


class CountingSystem(MemorySystem):
    """Notes how many ids each ``still_present`` call was given."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.looked_up: list[tuple[str, int]] = []

    def still_present(self, record_type, record_ids):
        self.looked_up.append((record_type, len(record_ids)))
        return super().still_present(record_type, record_ids)


def test_verify_takes_the_plan_a_chunk_at_a_time_with_the_same_answer(ledger):
    """Bounded memory: verify looks a chunk of the plan up in the ledger and the system at a
    time (never more ids than a chunk in one call) and counts exactly what a whole-plan verify
    counts, whether given a frame or the plan's Arrow record batches."""
    import pyarrow as pa

    records = {"support_ticket": {str(i) for i in range(1, 12)}, "ticket_user": {"u1", "u2", "u3"}}
    rows = [("support_ticket", str(i), "erase") for i in range(1, 11)] + [("ticket_user", "u1", "erase"), ("ticket_user", "u2", "erase")]
    system = CountingSystem(records)
    engine = ErasureEngine(ledger, "run-chunks", "ticketing", system, "v1")
    plan = plan_of(rows)
    engine.erase(plan)
    system.records["support_ticket"] |= {"3", "9"}  # a restore brought two back
    system.records["ticket_user"].add("u2")
    assert engine.verify(plan) == (12, 3)
    assert system.looked_up == [("support_ticket", 10), ("ticket_user", 2)]

    engine.verify_chunk = 4
    system.looked_up.clear()
    assert engine.verify(plan) == (12, 3)
    assert max(n for _, n in system.looked_up) <= 4 and sum(n for _, n in system.looked_up) == 12

    engine.verify_chunk = ErasureEngine.verify_chunk
    system.verify_batch = 3  # an adapter's own chunk wins
    system.looked_up.clear()
    assert engine.verify(plan) == (12, 3)
    assert max(n for _, n in system.looked_up) <= 3 and sum(n for _, n in system.looked_up) == 12

    system.looked_up.clear()
    batches = pa.Table.from_pandas(plan[["record_type", "record_id", "record_key", "action"]], preserve_index=False).to_batches(max_chunksize=5)
    assert engine.verify(iter(batches)) == (12, 3)
    assert max(n for _, n in system.looked_up) <= 3 and sum(n for _, n in system.looked_up) == 12
    # Batches as given do not split the system's calls: the gone ids gather up to ``verify_rows``.
    system.verify_batch = None
    system.looked_up.clear()
    assert engine.verify(iter(batches)) == (12, 3)
    assert system.looked_up == [("support_ticket", 10), ("ticket_user", 2)]

    # A system checked in one pass (a large ``verify_batch``) gets a chunk's ids at once, while
    # the ledger is asked a ``verify_chunk`` of them at a time.
    asked: list[int] = []
    statuses_of = ledger.statuses_of
    ledger.statuses_of = lambda run, system_, record_type, keys: asked.append(len(keys)) or statuses_of(run, system_, record_type, keys)
    system.verify_batch, engine.verify_chunk = 100, 4
    system.looked_up.clear()
    assert engine.verify(plan) == (12, 3)
    assert system.looked_up == [("support_ticket", 10), ("ticket_user", 2)]
    assert max(asked) <= 4 and sum(asked) == 12
    batches = pa.Table.from_pandas(plan[["record_type", "record_id", "record_key", "action"]], preserve_index=False).to_batches(max_chunksize=100)
    asked.clear()
    assert engine.verify(iter(batches)) == (12, 3)
    assert max(asked) <= 4 and sum(asked) == 12


def test_statuses_of_reads_only_the_keys_asked(ledger):
    system = MemorySystem(TICKETS)
    engine = ErasureEngine(ledger, "run-keys", "ticketing", system, "v1")
    plan = plan_of(PLAN)
    engine.erase(plan)
    key = dict(zip(plan["record_id"], plan["record_key"]))
    got = ledger.statuses_of("run-keys", "ticketing", "support_ticket", [key["1"], key["4"], key["u1"], "no-such-key"])
    assert got == {key["1"]: "erased", key["4"]: "held"}  # u1 is a ticket_user: not of this record type
    assert ledger.statuses_of("run-keys", "ticketing", "support_ticket", []) == {}
    assert ledger.statuses_of("other-run", "ticketing", "support_ticket", [key["1"]]) == {}


def test_a_requester_waits_for_every_ticket_of_theirs(ledger):
    """A ticket that failed keeps its requester: deferred, and erased once the ticket is gone."""
    system = MemorySystem(TICKETS, fail={"2"})
    engine = ErasureEngine(ledger, "run-2", "ticketing", system, "v1")
    plan = plan_of(PLAN)
    result = engine.erase(plan)
    assert result.failed == 1
    assert system.records["ticket_user"] == {"u1", "u2"}, "a requester went before a ticket of theirs"
    user = entries(ledger, "run-2")[("ticket_user", plan["record_key"].iloc[4])]
    assert user["status"] == "deferred" and "support_ticket" in user["detail"]

    system.fail.clear()  # the retry: the ticket goes, then its requester
    again = engine.erase(plan)
    assert again.totals() == {"erased": 4, "held": 1}
    assert system.records["ticket_user"] == {"u2"}
    assert [c for c in system.calls if c[0] == "support_ticket"][-1][2] == ["2"], "a finished ticket was sent again"


def test_a_cc_or_follower_waits_for_the_ticket_like_its_requester(ledger):
    """A ticket's ``blocks`` names all its parties (requester, CCs, followers): when it fails,
    every one of them is deferred, not only its requester (issue 10, item 2)."""
    records = {"support_ticket": {"1", "2"}, "ticket_user": {"u1", "u2", "u3"}}
    system = MemorySystem(records, fail={"1"})
    engine = ErasureEngine(ledger, "run-cc", "ticketing", system, "v1")
    plan = plan_of([
        ("support_ticket", "1", "erase", "u1 u2"), ("support_ticket", "2", "erase", "u3"),
        ("ticket_user", "u1", "erase"), ("ticket_user", "u2", "erase"), ("ticket_user", "u3", "erase"),
    ])
    engine.erase(plan)
    assert system.records["ticket_user"] == {"u1", "u2"}, "a CC went before the ticket naming them"
    rows = entries(ledger, "run-cc")
    key = dict(zip(plan["record_id"], plan["record_key"]))
    assert [rows[("ticket_user", key[u])]["status"] for u in ("u1", "u2", "u3")] == ["deferred", "deferred", "erased"]
    system.fail.clear()
    assert engine.erase(plan).totals() == {"erased": 5}
    assert system.records == {"support_ticket": set(), "ticket_user": set()}


def test_a_requester_waits_for_tickets_whatever_kept_them(ledger):
    """Tickets in several batches end every way a ticket can: erased, already gone, failed,
    kept by a hold in the plan, deferred by the plan. Each requester goes only when all of
    theirs went (erased or already gone); and what went is not held by key to the end, only
    what did not."""
    records = {"support_ticket": {"1", "2", "3", "4", "5", "6", "7"}, "ticket_user": {f"u{i}" for i in range(1, 8)}}
    system = MemorySystem(records, fail={"3"})
    system.records["support_ticket"].discard("2")  # already gone
    engine = ErasureEngine(ledger, "run-why", "ticketing", system, "v1")
    plan = plan_of([
        ("support_ticket", "1", "erase", "u1"), ("support_ticket", "2", "erase", "u2 u1"),
        ("support_ticket", "3", "erase", "u3"), ("support_ticket", "4", "hold", "u4"),
        ("support_ticket", "5", "defer", "u5"), ("support_ticket", "6", "erase", "u6"),
        ("support_ticket", "7", "erase", "u6 u7"),
        *[("ticket_user", f"u{i}", "erase") for i in range(1, 8)],
    ])
    result = engine.erase(plan)
    assert system.records["ticket_user"] == {"u3", "u4", "u5"}, "a requester went before a ticket of theirs"
    assert result.statuses["support_ticket"] == Counter({"erased": 3, "already_gone": 1, "failed": 1, "held": 1, "deferred": 1})
    assert result.statuses["ticket_user"] == Counter({"erased": 4, "deferred": 3})
    key = dict(zip(plan["record_id"], plan["record_key"]))
    # Of the tickets, only those that did not go are still held by key.
    assert set(engine._status.by_type["support_ticket"]) == {key["3"], key["4"], key["5"]}
    rows = entries(ledger, "run-why")
    assert [rows[("ticket_user", key[f"u{i}"])]["status"] for i in range(1, 8)] == [
        "erased", "erased", "deferred", "deferred", "deferred", "erased", "erased"]


def test_a_requester_waiting_for_a_ticket_erased_after_it_stops_the_run(ledger):
    """An adapter that would erase requesters before their tickets is refused before anything
    is written: the check that a requester's tickets are gone relies on that order."""
    system = MemorySystem(TICKETS)
    system.record_types = ("ticket_user", "support_ticket")
    engine = ErasureEngine(ledger, "run-order", "ticketing", system, "v1")
    with pytest.raises(ValueError, match="ticket_user waits for support_ticket, which the adapter erases after it"):
        engine.erase(plan_of(PLAN))
    assert entries(ledger, "run-order") == {} and system.calls == []


def test_a_hold_added_after_the_plan_is_kept(ledger):
    plan = plan_of(PLAN)
    ledger.add_hold("support_ticket", plan["record_key"].iloc[0], "dispute after planning", None)
    system = MemorySystem(TICKETS)
    ErasureEngine(ledger, "run-3", "ticketing", system, "v1").erase(plan)
    assert "1" in system.records["support_ticket"]
    row = entries(ledger, "run-3")[("support_ticket", plan["record_key"].iloc[0])]
    hold_id = ledger.holds()[0]["id"]
    assert row["status"] == "held" and row["detail"] == f"under manual hold #{hold_id}, added after the plan"
    # The reason is free text that may name a person: it stays in the hold's own row.
    assert "dispute" not in str(row)
    # Its requester keeps a ticket, so stays too.
    assert "u1" in system.records["ticket_user"]


def test_outcomes_are_booked_as_they_arrive(ledger):
    """A task killed in the middle of a batch: what the system reported before is in the ledger
    (erased, not already_gone on the retry); the rest is still planned."""
    records = {"support_ticket": {str(i) for i in range(1, 9)}, "ticket_user": set()}
    plan = plan_of([("support_ticket", str(i), "erase") for i in range(1, 9)])
    booked_while_erasing: dict[int, int] = {}

    def probe(erased_so_far: int) -> None:  # what the ledger holds while the batch is still going
        booked_while_erasing[erased_so_far] = [r["status"] for r in entries(ledger, "run-4").values()].count("erased")

    system = MemorySystem(records, die_after=5, pause=0.3, probe=probe)
    system.erase_batch = 100
    engine = ErasureEngine(ledger, "run-4", "ticketing", system, "v1")
    engine.flush_seconds = 0.5
    with pytest.raises(KeyboardInterrupt):
        engine.erase(plan)
    statuses = [r["status"] for r in entries(ledger, "run-4").values()]
    assert statuses.count("erased") == 5 and statuses.count("submitted") == 3
    assert booked_while_erasing[4] >= 2, f"outcomes waited for the end of the batch: {booked_while_erasing}"
    system.die_after, system.probe = None, None
    engine.erase(plan)
    statuses = [r["status"] for r in entries(ledger, "run-4").values()]
    assert statuses.count("erased") == 8 and "already_gone" not in statuses


def test_an_outcome_the_system_never_reported_is_failed(ledger):
    class Silent(MemorySystem):
        def erase(self, record_type, action, record_ids, recheck=None):
            yield from list(super().erase(record_type, action, record_ids))[:1]

    plan = plan_of([("support_ticket", "1", "erase"), ("support_ticket", "2", "erase")])
    result = ErasureEngine(ledger, "run-5", "ticketing", Silent(TICKETS), "v1").erase(plan)
    assert result.totals() == {"erased": 1, "failed": 1}


def test_dry_run_counts_and_writes_nothing(ledger):
    system = MemorySystem(TICKETS)
    result = ErasureEngine(ledger, "run-6", "ticketing", system, "v1").count(plan_of(PLAN))
    assert result.would_by_rule == {"support-ticket/erase": 3, "support-ticket/hold": 1, "ticket-requester/erase": 1}
    assert result.would_by_type == {"support_ticket": {"would_erase": 3, "would_keep": 1}, "ticket_user": {"would_erase": 1}}
    assert entries(ledger, "run-6") == {} and not system.calls


def test_the_three_flows_book_the_same_plan_alike(ledger, retention_home, monkeypatch):
    """The same plan handed over by the nightly run, the replay and the erasure request gives the
    same ledger entries (but for the run and the times)."""
    from retention.runs import nightly, replay, request

    plan = plan_of(PLAN)

    def nightly_flow(system):
        run = RunInfo.from_dict(open_run("retention_nightly", "n1", None, dry_run=False, max_plan_share=1.0))
        run.staging.write_frame("ticketing", "plan", plan)
        run.staging.write_json("ticketing", "validation", {"success": True})
        nightly.erase(run, "ticketing", system)
        return run.run_id

    def replay_flow(system):
        run = RunInfo.from_dict(replay.open_run("r1", dry_run=False))
        decisions = plan["action"].map({"erase": "replay", "hold": "held"})
        run.staging.write_frame("ticketing", "replay_plan", plan.assign(decision=decisions, policy_version=run.policy_version))
        run.staging.write_json("ticketing", "replay_find", {})
        replay.erase(run, "ticketing", system)
        return run.run_id

    def request_flow(system):
        request.open_request("erasure_request", "q1", "person@example.org")
        run = request.load_run("erasure_request", "q1")
        monkeypatch.setattr(request, "plan_request", lambda *a, **k: plan.assign(detail=pd.Series([None] * len(plan), dtype="string")))
        system.find_person = lambda email: {}
        request.erase_person(run, "ticketing", "person@example.org", system)
        return run.run_id

    seen = []
    for flow in (nightly_flow, replay_flow, request_flow):
        run_id = flow(MemorySystem(TICKETS))
        seen.append({
            k: {c: v for c, v in e.items() if c not in ("id", "run_id", "planned_at", "completed_at")}
            for k, e in entries(ledger, run_id).items()
        })
    assert len(seen[0]) == len(plan)
    assert seen[0] == seen[1] == seen[2]


# --- properties: a record that becomes protected or held after the plan is never erased ----------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from retention.config import DEFAULT_POLICY  # noqa: E402
from retention.domain.policy import load_policy  # noqa: E402
from retention.domain.recheck import leave_alone  # noqa: E402
from retention.runs.erasing import StateCheck  # noqa: E402
from retention.systems.base import Recheck  # noqa: E402

POLICY = load_policy(DEFAULT_POLICY)
AS_OF = pd.Timestamp("2026-11-25T12:00:00Z")
OLD = pd.Timestamp("2020-01-01T00:00:00Z")


def due_frame(record_type: str, n: int, prefix: str = "r") -> pd.DataFrame:
    """``n`` records of ``record_type`` that the policy has due as of AS_OF."""
    ids = pd.Series([f"{prefix}{i}" for i in range(n)], dtype="string")
    base = {
        "newsletter_member": {"status": "unsubscribed", "last_changed": OLD, "timestamp_signup": OLD, "has_email": True},
        "crm_contact": {"kind": "member", "organisation_id": "1", "membership_active": False, "membership_end": OLD,
                        "is_customer": True, "last_interaction_at": OLD, "opted_out": False, "has_email": True,
                        "created_at": OLD, "has_invoice": False},
        "crm_event_participation": {"contact_id": "1", "event_date": OLD, "membership_active": False, "membership_end": OLD,
                                    "is_customer": True, "opted_out": False},
        "support_ticket": {"status": "closed", "requester_id": "9", "solved_at": OLD, "created_at": OLD, "updated_at": OLD,
                           "cc_ids": ""},
        "ticket_user": {"role": "end-user", "created_at": OLD, "updated_at": OLD, "tickets_remaining": 0, "last_ticket_gone_at": OLD,
                        "had_ticket": True},
    }[record_type]
    return pd.DataFrame({"record_id": ids, **{c: [v] * n for c, v in base.items()}})


PROTECTING = {  # record type -> (column, a value the code protects)
    "newsletter_member": ("status", ["subscribed", "transactional"]),
    "crm_contact": ("membership_active", [True]),
    "crm_event_participation": ("membership_active", [True]),
    "support_ticket": ("status", ["new", "open", "pending", "hold"]),
    "ticket_user": ("role", ["agent", "admin"]),
}


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(sorted(PROTECTING)), st.integers(2, 12), st.data())
def test_a_record_protected_since_the_plan_is_always_left_alone(record_type, n, data):
    from retention.domain.engine import plan_record_type

    planned_frame = due_frame(record_type, n)
    planned = plan_record_type(planned_frame, record_type, POLICY, AS_OF)
    assert len(planned) == n, "the fixture's records are due"
    column, values = PROTECTING[record_type]
    changed = data.draw(st.sets(st.integers(0, n - 1), min_size=1))
    now = planned_frame.copy()
    now[column] = now[column].astype(object)
    for i in changed:
        now.loc[i, column] = data.draw(st.sampled_from(values))
    left = leave_alone(record_type, now, planned, POLICY, AS_OF)
    assert set(left) == {f"r{i}" for i in changed}


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 12), st.data())
def test_a_user_a_live_ticket_names_now_is_always_left_alone(n, data):
    """Right before deletion Zendesk counts each user's live tickets (requested or CC'd on): a
    user named by any, filed or CC'd since the plan, is left alone (issue 10, item 2)."""
    from retention.domain.engine import plan_record_type

    planned_frame = due_frame("ticket_user", n)
    planned = plan_record_type(planned_frame, "ticket_user", POLICY, AS_OF)
    assert len(planned) == n
    named = data.draw(st.sets(st.integers(0, n - 1)))
    now = planned_frame.drop(columns=["last_ticket_gone_at", "had_ticket"])
    now["tickets_remaining"] = [data.draw(st.integers(1, 5)) if i in named else 0 for i in range(n)]
    left = leave_alone("ticket_user", now, planned, POLICY, AS_OF)
    assert set(left) == {f"r{i}" for i in named}
    # Without the count (a system that cannot tell), nothing is left alone for it.
    assert leave_alone("ticket_user", now.drop(columns=["tickets_remaining"]), planned, POLICY, AS_OF) == {}


EXAMPLES = itertools.count()


class ChangingSystem(MemorySystem):
    """Newsletter members in memory whose status can change after the plan; its erase reads
    their current state right before deleting, as the real adapters do."""

    system = "newsletter"
    record_types = ("newsletter_member",)

    def __init__(self, frame: pd.DataFrame):
        super().__init__({"newsletter_member": set(frame["record_id"])})
        self.frame = frame.set_index("record_id", drop=False)

    def erase(self, record_type, action, record_ids, recheck=None):
        ids = list(record_ids)
        if recheck is not None:
            left = recheck.leave_alone(self.frame.loc[ids].reset_index(drop=True))
            for rid in left:
                yield rid, Status.DEFERRED
            ids = [i for i in ids if i not in left]
        yield from super().erase(record_type, action, ids)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.integers(3, 20), st.data())
def test_the_engine_never_erases_a_member_who_subscribed_again_or_was_put_on_hold(ledger, n, data):
    from retention.domain.engine import plan_record_type

    run_id = f"prop-{next(EXAMPLES)}"  # a run and ids of its own per example: the ledger is shared
    frame = due_frame("newsletter_member", n, prefix=f"{run_id}-")
    plan = plan_record_type(frame, "newsletter_member", POLICY, AS_OF)
    plan["record_key"] = pseudonymizer().column(plan["record_type"], plan["record_id"])
    system = ChangingSystem(frame)
    resubscribed = data.draw(st.sets(st.sampled_from(list(frame["record_id"])), max_size=n))
    held = data.draw(st.sets(st.sampled_from(list(frame["record_id"])), max_size=n))
    for rid in resubscribed:
        system.frame.loc[rid, "status"] = "subscribed"
    for rid in held:
        ledger.add_hold("newsletter_member", pseudonymizer().key_for("newsletter_member", rid), "after the plan", None)
    check = StateCheck(policy=POLICY, as_of=AS_OF, extracted_at=OLD)
    ErasureEngine(ledger, run_id, "newsletter", system, "v1", check).erase(plan)
    kept = resubscribed | held
    assert kept <= system.records["newsletter_member"], "a member protected or held since the plan was erased"
    assert not (set(frame["record_id"]) - kept) & system.records["newsletter_member"], "an unchanged member was kept"


assert Recheck  # the port type the engine hands to adapters


class SlowBookingLedger(Ledger):
    """A ledger whose outcome bookings take ``seconds`` (``submitted`` and settling stay quick),
    noting when each booking ended, or failing them when ``fail`` is set."""

    def __init__(self, engine, seconds: float, fail: bool = False):
        super().__init__(engine)
        self.seconds, self.fail, self.booked_at = seconds, fail, []

    def complete(self, run_id, system, record_type, outcomes, detail=None):
        if set(map(str, outcomes.values())) <= {"submitted"}:
            return super().complete(run_id, system, record_type, outcomes, detail)
        time.sleep(self.seconds)
        if self.fail:
            raise sa.exc.OperationalError("UPDATE erasure_ledger", {}, RuntimeError("ledger unreachable"))
        super().complete(run_id, system, record_type, outcomes, detail)
        self.booked_at.append(time.monotonic())


class TimedSystem(MemorySystem):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.started_at: list[float] = []

    def erase(self, record_type, action, record_ids, recheck=None):
        self.started_at.append(time.monotonic())
        yield from super().erase(record_type, action, record_ids, recheck)


def test_outcomes_are_booked_while_the_next_batch_goes_on(ledger):
    """The ledger's booking of a batch's outcomes and the system's next batch run side by side;
    every outcome is in the ledger when erase returns; each batch was submitted before it went."""
    slow = SlowBookingLedger(ledger.engine, 0.5)
    records = {"support_ticket": {str(i) for i in range(1, 10)}, "ticket_user": set()}
    plan = plan_of([("support_ticket", str(i), "erase") for i in range(1, 10)])
    system = TimedSystem(records)
    result = ErasureEngine(slow, "run-8", "ticketing", system, "v1").erase(plan)
    assert result.totals() == {"erased": 9}
    assert [r["status"] for r in entries(ledger, "run-8").values()] == ["erased"] * 9
    assert len(system.started_at) == 3 and len(slow.booked_at) == 3
    # The second batch went to the system before the first one's outcomes were booked.
    assert system.started_at[1] < slow.booked_at[0]


def test_a_failed_booking_stops_the_run(ledger):
    failing = SlowBookingLedger(ledger.engine, 0.2, fail=True)
    records = {"support_ticket": {str(i) for i in range(1, 13)}, "ticket_user": set()}
    plan = plan_of([("support_ticket", str(i), "erase") for i in range(1, 13)])
    system = TimedSystem(records)
    with pytest.raises(sa.exc.OperationalError):
        ErasureEngine(failing, "run-9", "ticketing", system, "v1").erase(plan)
    assert len(system.started_at) <= 2  # the batch after the one whose booking failed at most
    statuses = [r["status"] for r in entries(ledger, "run-9").values()]
    assert statuses.count("submitted") == 3 * len(system.started_at) and "erased" not in statuses


class Ticking(MemorySystem):
    """Each record takes one tick of a clock the engine reads: a budget in ticks, not seconds."""

    def __init__(self, records, clock):
        super().__init__(records)
        self.now = clock

    def erase(self, record_type, action, record_ids, recheck=None):
        for out in super().erase(record_type, action, record_ids, recheck):
            self.now[0] += 1.0
            yield out


def sent_ids(system: MemorySystem) -> list[str]:
    return [i for _, _, ids in system.calls for i in ids]


def test_a_spent_budget_carries_the_rest_over_and_the_next_runs_clear_it_first(ledger):
    """Issue 12, item 3: no batch starts once the erase budget is spent; what is left is booked
    carried_over (nothing sent for it); the next runs, planning it again beside new work, take
    it first, and in the end everything is erased exactly once."""
    now = [0.0]
    tickets = {str(i) for i in range(1, 301)}
    system = Ticking({"support_ticket": set(tickets), "ticket_user": set()}, now)
    system.erase_batch = 100

    def engine(run_id: str) -> ErasureEngine:
        e = ErasureEngine(ledger, run_id, "ticketing", system, "v1")
        e.clock = lambda: now[0]
        return e

    plan1 = plan_of([("support_ticket", str(i), "erase") for i in range(1, 301)])
    first = engine("night-1").erase(plan1, budget_seconds=120)
    # A first, full batch of 100 records (100 ticks), then one cut to the 20 ticks left at
    # the pace seen: the budget is kept.
    erased1 = set(sent_ids(system))
    assert first.totals()["carried_over"] == 300 - len(erased1) > 0
    assert now[0] == 120 and len(erased1) == 120, f"the budget of 120 ticks was not kept: {now[0]}"
    rows = entries(ledger, "night-1")
    carried_keys = {k for (t, k), r in rows.items() if r["status"] == "carried_over"}
    assert all(rows[k]["completed_at"] for k in rows)
    assert ledger.carried_over("ticketing", "support_ticket") == carried_keys

    # Night 2: what is left is due again, and ten new tickets fell due.
    new = [str(i) for i in range(301, 311)]
    left = sorted(system.records["support_ticket"], key=int)
    system.records["support_ticket"] |= set(new)
    plan2 = plan_of([("support_ticket", i, "erase") for i in new + left])  # new work listed first in the plan
    system.calls.clear()
    now[0] = 0.0
    engine("night-2").erase(plan2, budget_seconds=150)
    night2 = sent_ids(system)
    carried_ids = {i for i in plan1["record_id"] if (dict(zip(plan1["record_id"], plan1["record_key"]))[i]) in carried_keys}
    assert set(night2[: min(len(night2), len(carried_ids))]) <= carried_ids, "new work went before the carried-over backlog"

    # Night 3 (and on): no budget trouble; all gone, none sent twice.
    for night in range(3, 6):
        system.calls.clear()
        now[0] = 0.0
        still = sorted(system.records["support_ticket"], key=int)
        if not still:
            break
        engine(f"night-{night}").erase(plan_of([("support_ticket", i, "erase") for i in still]), budget_seconds=100)
    assert system.records["support_ticket"] == set()
    with ledger.engine.connect() as conn:
        erased = conn.execute(sa.text(
            "select record_key, count(*) from erasure_ledger where status = 'erased' group by record_key"
        )).all()
    assert len(erased) == 310 and {n for _, n in erased} == {1}, "a record erased twice or missed"
    assert ledger.carried_over("ticketing", "support_ticket") == set(), "a carried-over record is still a backlog once erased"


def test_batches_hold_neighbouring_ids_whatever_the_plan_order(ledger):
    """A batch holds records next to each other in the system's id order (numerically for whole
    numbers), so that a database touches neighbouring pages; what a night carried over still
    goes first, in the same order among itself."""
    system = MemorySystem({"support_ticket": {str(i) for i in range(1, 13)}, "ticket_user": {"b", "a", "c"}})
    order = ["12", "3", "10", "1", "7", "2", "11", "9", "4", "8", "6", "5"]
    plan = plan_of([("support_ticket", i, "erase") for i in order] + [("ticket_user", u, "erase") for u in "cab"])
    ErasureEngine(ledger, "run-ids", "ticketing", system, "v1").erase(plan)
    assert [ids for _, _, ids in system.calls] == [
        ["1", "2", "3"], ["4", "5", "6"], ["7", "8", "9"], ["10", "11", "12"], ["a", "b", "c"],
    ]

    # Carried over from an earlier night (ids 9 and 2) first, each part in id order.
    back = {"9", "2"}
    system = MemorySystem({"support_ticket": {str(i) for i in range(1, 13)}, "ticket_user": set()})
    pseudo = dict(zip(plan["record_id"], plan["record_key"]))
    ledger.open_run("night-0", "d", dt.datetime.now(dt.UTC), "v1", "l", False)
    ledger.write_ahead("night-0", "v1", "ticketing", [
        {"record_type": "support_ticket", "record_key": pseudo[i], "rule_id": "support-ticket", "action": "erase", "hold": None}
        for i in back
    ])
    ledger.complete("night-0", "ticketing", "support_ticket", {pseudo[i]: "carried_over" for i in back})
    ErasureEngine(ledger, "night-1", "ticketing", system, "v1").erase(plan_of([("support_ticket", i, "erase") for i in order]))
    assert sent_ids(system) == ["2", "9", "1", "3", "4", "5", "6", "7", "8", "10", "11", "12"]


def test_without_a_budget_nothing_is_carried_over(ledger):
    system = MemorySystem({"support_ticket": {str(i) for i in range(10)}, "ticket_user": set()}, pause=0.01)
    result = ErasureEngine(ledger, "nb", "ticketing", system, "v1").erase(plan_of([("support_ticket", str(i), "erase") for i in range(10)]))
    assert result.totals() == {"erased": 10}


@pytest.mark.parametrize("text, message", [
    ("abc", r"^RETENTION_ERASE_BUDGET: 'abc' is not an ISO 8601 duration"),
    ("P1M", r"^RETENTION_ERASE_BUDGET 'P1M': give days and hours \(e.g. PT2H\), not months or years$"),
    ("PT0S", r"^RETENTION_ERASE_BUDGET 'PT0S': give a time longer than zero, e.g. PT2H$"),
])
def test_a_bad_erase_budget_is_one_line(monkeypatch, text, message):
    monkeypatch.setenv("RETENTION_ERASE_BUDGET", text)
    with pytest.raises(config.ConfigError, match=message):
        config.erase_budget()
    monkeypatch.delenv("RETENTION_ERASE_BUDGET")
    assert config.erase_budget().total_seconds() == 2 * 3600


class SlowWriteAheadLedger(Ledger):
    """A ledger whose write-aheads take ``seconds`` each, noting when each one ended."""

    def __init__(self, engine, seconds: float):
        super().__init__(engine)
        self.seconds, self.written_at = seconds, []

    def write_ahead(self, *args, **kwargs):
        time.sleep(self.seconds)
        super().write_ahead(*args, **kwargs)
        self.written_at.append(time.monotonic())


class CheckedSystem(MemorySystem):
    """Notes when each batch starts, and which of its records had no ledger entry then."""

    def __init__(self, records, ledger: Ledger, run_id: str, **kwargs):
        super().__init__(records, **kwargs)
        self.ledger, self.run_id = ledger, run_id
        self.started_at: list[float] = []
        self.unwritten: list[str] = []
        self.in_flight: list[int] = []  # batches recorded as handed over, at each batch's start

    def erase(self, record_type, action, record_ids, recheck=None):
        self.started_at.append(time.monotonic())
        with self.ledger.engine.connect() as conn:
            self.in_flight.append(conn.execute(sa.text("select count(*) from erasure_submission")).scalar_one())
        pseudo = pseudonymizer()
        keys = {pseudo.key_for(record_type, i): i for i in record_ids}
        known = self.ledger.statuses_of(self.run_id, self.system, record_type, list(keys))
        self.unwritten += [i for k, i in keys.items() if k not in known]
        yield from super().erase(record_type, action, record_ids, recheck)


def test_the_first_batch_waits_for_its_own_entries_not_a_whole_chunk(ledger, monkeypatch):
    """A system that erases a few at a time (Zendesk: a hundred) has its first batch go once
    that batch's entries are in, not once a whole write-ahead chunk's are."""
    from retention.runs import erasing

    monkeypatch.setattr(erasing._WriteAhead, "chunk", 9)  # three batches of 3 per chunk
    sizes: list[int] = []  # entries per write-ahead

    class SizedLedger(SlowWriteAheadLedger):
        def write_ahead(self, run_id, policy_version, system, rows, **kwargs):
            if isinstance(rows, pa.Table):  # the engine's write-ahead of destructive rows
                sizes.append(rows.num_rows)
            else:  # frames of entries (held and deferred rows)
                rows = list(rows)
                sizes.append(sum(len(frame) for frame in rows))
            super().write_ahead(run_id, policy_version, system, rows, **kwargs)

    slow = SizedLedger(ledger.engine, 0.3)
    records = {"support_ticket": {str(i) for i in range(1, 13)}, "ticket_user": {"u1"}}
    plan = plan_of([("support_ticket", str(i), "erase") for i in range(1, 13)] + [("ticket_user", "u1", "erase")])
    system = CheckedSystem(records, ledger, "run-12")
    result = ErasureEngine(slow, "run-12", "ticketing", system, "v1").erase(plan)
    assert result.totals() == {"erased": 13}
    assert sizes == [3, 9, 1], "a group's first chunk is its first batch, then whole chunks"
    assert system.unwritten == [], "a batch went before its entries were written"
    assert system.started_at[0] < slow.written_at[1], "the first batch waited for more than its own entries"
    # The second batch's entries are in the second chunk: it waited for that chunk, not more.
    assert slow.written_at[1] <= system.started_at[1] < slow.written_at[2]


def test_batches_go_while_the_rest_of_the_plan_is_written_ahead(ledger, monkeypatch):
    """The plan's write-ahead runs beside the erasure, in the order the batches go: the first
    batch goes once its own entries are in, not once the whole plan's are; no batch ever goes
    before its entries are; and a run that stops on the way leaves every plan row in the ledger."""
    from retention.runs import erasing

    monkeypatch.setattr(erasing._WriteAhead, "chunk", 3)  # a chunk per batch of 3
    slow = SlowWriteAheadLedger(ledger.engine, 0.3)
    records = {"support_ticket": {str(i) for i in range(1, 13)}, "ticket_user": {f"u{i}" for i in range(1, 4)}}
    plan = plan_of([("support_ticket", str(i), "erase") for i in range(1, 13)] + [("ticket_user", f"u{i}", "erase") for i in range(1, 4)])
    system = CheckedSystem(records, ledger, "run-10")
    result = ErasureEngine(slow, "run-10", "ticketing", system, "v1").erase(plan)
    assert result.totals() == {"erased": 15}
    assert system.unwritten == [], "a batch went before its entries were written"
    assert len(slow.written_at) == 5 and len(system.started_at) == 5
    assert system.started_at[0] < slow.written_at[-1], "the first batch waited for the whole plan's write-ahead"
    assert [r["status"] for r in entries(ledger, "run-10").values()] == ["erased"] * 15
    # What the loop waited on is told: here, whose batches take no time, about the whole
    # write-ahead (five chunks of 0.3 s), at least the first chunk's.
    assert set(result.waited) == {"write_ahead", "bookings"}
    assert 0.25 <= result.waited["write_ahead"] <= 2.5, result.waited
    # A batch's record of being handed over goes once its outcomes are booked: this one's and at
    # most the previous one's are there when a batch goes, none when the step ends.
    assert system.in_flight[0] == 1 and max(system.in_flight) <= 2, system.in_flight
    with ledger.engine.connect() as conn:
        assert conn.execute(sa.text("select count(*) from erasure_submission")).scalar_one() == 0

    slow = SlowWriteAheadLedger(ledger.engine, 0.3)
    system = CheckedSystem(records | {"support_ticket": {str(i) for i in range(1, 13)}}, ledger, "run-11", die_after=2)
    with pytest.raises(KeyboardInterrupt):
        ErasureEngine(slow, "run-11", "ticketing", system, "v1").erase(plan)
    statuses = [r["status"] for r in entries(ledger, "run-11").values()]
    assert len(statuses) == 15, "every plan row is in the ledger when the run stops"
    assert statuses.count("erased") == 2 and statuses.count("submitted") == 1 and statuses.count("planned") == 12


@pytest.mark.parametrize("dtype", ["string[pyarrow]", "object", "category"])
def test_entries_are_shaped_from_plan_rows_of_any_text_dtype(dtype):
    """Every write-ahead (destructive, held and deferred rows alike) shapes its entries through
    ``_entry_table``: the rule id and the hold cut to their columns' widths, a missing or empty
    hold null, a deferral recorded as the erasure it puts off, whatever text dtype the plan uses."""
    from retention.runs.erasing import _arrow, _entry_table

    frame = pd.DataFrame({
        "record_type": ["crm_contact", "crm_invoice", "crm_contact", "crm_contact", "crm_contact"],
        "record_key": ["k1", "k2", "k3", "k4", "k5"],
        "rule_id": ["lead", "r" * 80, "lead", "lead", "lead"],
        "action": ["erase", "minimise", "defer", "hold", "erase"],
        "hold": [None, "", "h" * 250, 'complaint, "urgent"', float("nan")],
        "detail": ["not an entry column"] * 5,
    }).astype({c: dtype for c in ("record_type", "record_key", "rule_id", "action", "hold")})
    got = _entry_table(_arrow(frame)).to_pylist()
    assert got == [
        {"record_type": "crm_contact", "record_key": "k1", "rule_id": "lead", "action": "erase", "hold": None},
        {"record_type": "crm_invoice", "record_key": "k2", "rule_id": "r" * 60, "action": "minimise", "hold": None},
        {"record_type": "crm_contact", "record_key": "k3", "rule_id": "lead", "action": "erase", "hold": "h" * 200},
        {"record_type": "crm_contact", "record_key": "k4", "rule_id": "lead", "action": "hold", "hold": 'complaint, "urgent"'},
        {"record_type": "crm_contact", "record_key": "k5", "rule_id": "lead", "action": "erase", "hold": None},
    ]


def test_plan_rows_with_their_own_policy_version_are_written_ahead_under_it(ledger):
    """A plan may carry each row's policy version (a replay's); a row without one is the run's.
    Every destructive row is written ahead under its own, none left out."""
    system = MemorySystem(TICKETS)
    plan = plan_of(PLAN).assign(policy_version=pd.Series(["v0", None, "v0", "v0", None], dtype="string"))
    result = ErasureEngine(ledger, "run-13", "ticketing", system, "v1").erase(plan)
    rows = entries(ledger, "run-13")
    key = dict(zip(plan["record_id"], plan["record_key"]))
    assert {rid: rows[(t, key[rid])]["policy_version"] for t, rid in zip(plan["record_type"], plan["record_id"])} == {
        "1": "v0", "2": "v1", "3": "v0", "4": "v0", "u1": "v1",
    }
    assert result.totals() == {"erased": 4, "held": 1}


def test_a_write_ahead_chunk_that_loses_rows_stops_the_step_before_its_batch(ledger, monkeypatch):
    """The write-ahead counts what it writes against the rows it was given: a chunk that lost
    some (as Arrow's filter once dropped the rows without a policy version) stops the step
    before the batch waiting for it, rather than erasing records without entries."""
    import pyarrow.compute

    monkeypatch.setattr(pyarrow.compute, "fill_null", lambda column, value: column)  # the old bug, back
    system = MemorySystem(TICKETS)
    before = {t: set(ids) for t, ids in system.records.items()}
    plan = plan_of(PLAN).assign(policy_version=pd.Series(["v0", None, "v0", "v0", None], dtype="string"))
    with pytest.raises(RuntimeError, match="lost some of them"):
        ErasureEngine(ledger, "run-14", "ticketing", system, "v1").erase(plan)
    assert system.records == before, "nothing is erased"


@pytest.mark.parametrize("text_dtype", ["string", "category"])
def test_an_erase_counts_what_the_ledger_says_though_it_lets_go_of_the_keys(ledger, text_dtype):
    """Outcomes of record types no other waits for are counted and their keys let go (a million
    keys held to the end cost 110 MB): what ``erase`` returns is still, status by status, what
    the ledger holds, for an attempt killed on the way and for its retry, with held, failed,
    already gone and carried-over rows, and with the plan's texts as categoricals (as the
    nightly erase step reads them)."""
    contacts = {str(i) for i in range(1, 41)}
    invoices = {f"i{i}" for i in range(1, 11)}

    class Crm(MemorySystem):
        system = "crm"
        record_types = ("crm_invoice", "crm_contact")
        erase_batch = 7

    rows = [("crm_contact", str(i), "erase") for i in range(1, 46)]  # 41 to 45 are gone already
    rows += [("crm_invoice", f"i{i}", "minimise") for i in range(1, 11)] + [("crm_contact", "46", "hold")]
    plan = plan_of(rows, rule="lead")
    plan = plan.astype({c: text_dtype for c in ("record_type", "rule_id", "action")})

    def in_ledger(run_id: str) -> dict[tuple[str, str], int]:
        return dict(Counter((r["record_type"], r["status"]) for r in ledger.entries(run_id)))

    def returned(result) -> dict[tuple[str, str], int]:
        return {(t, s): n for t, counts in result.statuses.items() for s, n in counts.items() if n}

    first = Crm({"crm_contact": set(contacts), "crm_invoice": set(invoices)}, fail={"9"}, die_after=20)
    with pytest.raises(KeyboardInterrupt):
        ErasureEngine(ledger, "run-15", "crm", first, "v1").erase(plan)
    again = Crm(first.records, fail={"9"})
    engine = ErasureEngine(ledger, "run-15", "crm", again, "v1")
    result = engine.erase(plan)
    assert returned(result) == in_ledger("run-15")
    assert in_ledger("run-15") == {
        ("crm_invoice", "erased"): 10, ("crm_contact", "erased"): 39, ("crm_contact", "failed"): 1,
        ("crm_contact", "already_gone"): 5, ("crm_contact", "held"): 1,
    }

    # Under a budget spent after the first batch: the rest is carried over, and counted so.
    now = [0.0]
    fresh = Ticking({"crm_contact": set(contacts), "crm_invoice": set(invoices)}, now)
    fresh.system, fresh.record_types, fresh.erase_batch = "crm", ("crm_invoice", "crm_contact"), 7
    budgeted = ErasureEngine(ledger, "run-16", "crm", fresh, "v1")
    budgeted.clock = lambda: now[0]
    result = budgeted.erase(plan, budget_seconds=5)
    assert returned(result) == in_ledger("run-16")
    assert in_ledger("run-16")[("crm_invoice", "erased")] == 7 and ("crm_contact", "carried_over") in in_ledger("run-16")
    # A first attempt keeps by key only the row it settled before the loop (the held one).
    assert not budgeted._status.by_type.get("crm_invoice"), "the outcomes' keys are let go"
    assert set(budgeted._status.by_type.get("crm_contact", {})) == {plan["record_key"].iloc[-1]}, "only the held row is kept by key"


class SlicesOnly:
    """A staged plan the engine may read only a slice at a time: never whole. Notes the largest
    slice read."""

    def __init__(self, rows):
        self._rows, self.columns, self.num_rows, self.largest = rows, rows.columns, rows.num_rows, 0

    def chunks(self, columns, start=0, stop=None, rows=50_000, categories=()):
        for chunk in self._rows.chunks(columns, start, stop, rows, categories):
            self.largest = max(self.largest, len(chunk))
            yield chunk

    def whole(self, columns=None, categories=()):
        raise AssertionError("the plan was read whole")


def test_a_staged_plan_is_erased_a_slice_at_a_time_as_the_same_plan_in_memory(ledger, tmp_path, monkeypatch, caplog):
    """The nightly erase step hands the engine its staged plan, which the engine reads a batch's
    rows at a time (the step's memory does not grow with the plan): the same batches, outcomes
    and ledger as the same plan in memory; a killed attempt and its retry, a backlog taken
    first and a staged plan out of erase order (staged by an older version) alike."""
    from retention.domain.planning import erase_order
    from retention.runs import erasing
    from retention.store import staging as staging_module
    from retention.store.staging import RunStaging

    monkeypatch.setattr(erasing, "_ROWS", 4)  # slices of four rows
    monkeypatch.setattr(staging_module, "ROW_GROUP_ROWS", 5)
    monkeypatch.setattr(erasing._WriteAhead, "chunk", 5)
    records = {"support_ticket": {str(i) for i in range(1, 21)}, "ticket_user": {"u1", "u2", "u3"}}
    rows = [("support_ticket", str(i), "erase", f"u{i % 3 + 1}") for i in range(20, 0, -1)]
    rows += [("support_ticket", "21", "hold", "u3"), ("ticket_user", "u2", "erase"), ("ticket_user", "u3", "erase"),
             ("ticket_user", "u1", "erase"), ("support_ticket", "22", "erase", "u1")]  # 22: gone already
    plan = plan_of(rows)
    staging = RunStaging("retention_nightly", "manual__1", root=tmp_path)

    def staged(frame: pd.DataFrame, in_order: bool = True) -> SlicesOnly:
        staging.write_frame("ticketing", "plan", frame, order=erase_order(frame, MemorySystem.record_types) if in_order else None)
        return SlicesOnly(staging.rows("ticketing", "plan"))

    def statuses(run_id: str) -> dict[str, str]:
        return {k: r["status"] for (_, k), r in entries(ledger, run_id).items()}

    in_memory, from_staging = MemorySystem(records), MemorySystem(records)
    expected = ErasureEngine(ledger, "mem", "ticketing", in_memory, "v1").erase(plan)
    plan_rows = staged(plan)
    got = ErasureEngine(ledger, "staged", "ticketing", from_staging, "v1").erase(plan_rows)
    assert got.statuses == expected.statuses
    assert got.totals() == {"erased": 22, "already_gone": 1, "held": 1, "deferred": 1}  # u3 waits for the held 21
    assert from_staging.calls == in_memory.calls and from_staging.records == in_memory.records
    assert [len(ids) for t, _, ids in from_staging.calls if t == "support_ticket"] == [3] * 7
    assert statuses("staged") == statuses("mem")
    assert 0 < plan_rows.largest <= 4
    assert ErasureEngine(ledger, "dry", "ticketing", from_staging, "v1").count(plan_rows).would_by_type == {
        "support_ticket": {"would_erase": 21, "would_keep": 1}, "ticket_user": {"would_erase": 3},
    }

    # Killed after seven erasures; the retry skips what was done and books the rest.
    killed = MemorySystem(records, die_after=7)
    with pytest.raises(KeyboardInterrupt):
        ErasureEngine(ledger, "killed", "ticketing", killed, "v1").erase(staged(plan))
    assert len(entries(ledger, "killed")) == len(plan), "every plan row is in the ledger when the run stops"
    retry = MemorySystem(killed.records)
    result = ErasureEngine(ledger, "killed", "ticketing", retry, "v1").erase(staged(plan))
    assert statuses("killed") == statuses("mem")
    assert result.statuses == expected.statuses
    resent = [i for t, _, ids in retry.calls for i in ids if t == "support_ticket"]
    assert resent == [str(i) for i in range(8, 21)] + ["22"], "sent again what the killed attempt had erased"

    # A backlog first, in a staged plan out of erase order (read whole, ordered by the engine).
    pseudo = dict(zip(plan["record_id"], plan["record_key"]))
    ledger.open_run("night-0", "d", dt.datetime.now(dt.UTC), "v1", "l", False)
    ledger.write_ahead("night-0", "v1", "ticketing", [
        {"record_type": "support_ticket", "record_key": pseudo[i], "rule_id": "support-ticket", "action": "erase", "hold": None}
        for i in ("17", "4")
    ])
    ledger.complete("night-0", "ticketing", "support_ticket", {pseudo[i]: "carried_over" for i in ("17", "4")})
    backlog = MemorySystem(records)
    with pytest.raises(AssertionError, match="read whole"):
        ErasureEngine(ledger, "night-1", "ticketing", backlog, "v1").erase(staged(plan, in_order=False))
    assert backlog.calls == [] and entries(ledger, "night-1") == {}, "nothing written before the plan was found out of order"
    unordered = staging.rows("ticketing", "plan")
    result = ErasureEngine(ledger, "night-1", "ticketing", backlog, "v1").erase(unordered)
    assert "not in erase order" in caplog.text
    assert result.statuses == expected.statuses
    assert sent_ids(backlog)[:5] == ["4", "17", "1", "2", "3"]


def test_a_plan_that_changes_under_the_engine_stops_it_before_a_batch_goes(ledger):
    """The engine finds where each record type and action is in the plan once, then reads the
    rows when their batch goes: rows that are no longer what it found there (a hold where an
    erasure was, a staged plan rewritten meanwhile) stop the step, and none of them is erased."""
    from retention.runs.plan_rows import FramePlan

    class Rewritten(FramePlan):
        """The plan the layout saw, then every row a hold."""

        reads = 0

        def chunks(self, columns, start=0, stop=None, rows=50_000, categories=()):
            self.reads += 1
            for chunk in super().chunks(columns, start, stop, rows, categories):
                yield chunk.assign(action="hold") if self.reads > 1 and "action" in chunk else chunk

    system = MemorySystem(TICKETS)
    plan = Rewritten(plan_of([("support_ticket", i, "erase") for i in ("1", "2", "3")]), MemorySystem.record_types)
    with pytest.raises(RuntimeError, match="no longer all erase: the plan changed while it was erased"):
        ErasureEngine(ledger, "run-17", "ticketing", system, "v1").erase(plan)
    assert system.calls == [] and system.records == TICKETS
