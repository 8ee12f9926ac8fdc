"""The one erasure engine: every flow (nightly, erasure request, replay) hands its plan here.

What it guarantees, in this order, for one system of one run:

1. **Write-ahead.** Every plan row gets a ledger entry before the system is touched: ``planned``
   for an erasure or minimisation, ``held`` for a hold, ``deferred`` for a deferral. A row the
   ledger already has for this run (an earlier attempt of the task) is not written again.
2. **Resume.** Entries already finished (``erased``, ``already_gone``, ``held``) are skipped; the
   rest (``planned``, ``submitted``, ``failed``, ``deferred`` by the system) are tried again. A
   record already gone counts as success, so a retried task never fails on what it did before it
   died; and one its killed attempt had handed to the system (``submitted``) is booked ``erased``
   by this run, not ``already_gone``: the killed attempt erased it.
3. **The last checks, right before each destructive batch** (``_before_batch``, the one place for
   them): a record whose blocking records (a requester's tickets) are not all gone is deferred;
   a record put on a manual hold since the plan was made is held. And, given the run's policy
   (``StateCheck``), the adapter reads the records' current state right before each destructive
   call (for the CRM inside its erasing transaction) and the domain (``domain.recheck``) leaves
   alone, deferred, whatever is protected now or no longer due as planned.
4. **Erase in batches, outcomes booked as they arrive.** The adapter yields each record's
   outcome as the system reports it; the engine completes the ledger entries at least every
   second and at the end of every batch, so a task killed mid-batch loses at most the last
   second of outcomes. Each batch is marked ``submitted`` in one statement, committed before
   it goes to the system, so the retry knows which records its own killed attempt sent. The
   outcomes are written by one booking thread, in order, while the next batch goes on (the
   ledger's statements and the system's run side by side); every erase call waits for them
   before it returns or raises, and a failed booking stops the run at the next batch.
5. **Verify.** Every record the ledger marks gone is looked up in the system again.

Dry run: the same plan is counted, no ledger entry is written, nothing is touched.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pandas as pd

from retention.domain.holds import Holds
from retention.domain.policy import Policy
from retention.domain.recheck import leave_alone
from retention.domain.records import blocked_by
from retention.domain.statuses import DESTRUCTIVE, DONE, GONE, STATUS_BEFORE, WOULD, Action, Status
from retention.progress import Progress
from retention.store.ledger import Ledger
from retention.store.record_index import RecordIndex
from retention.systems.base import Recheck, SourceSystem, batch_size

log = logging.getLogger("retention")

# Ledger column widths.
_RULE_WIDTH, _HOLD_WIDTH, _DETAIL_WIDTH = 60, 200, 200


@dataclass
class ErasureResult:
    """What one erase call came to: per record type, the status of every plan row (this run's
    earlier attempts included), or, in a dry run, what would be done."""

    dry_run: bool
    statuses: dict[str, Counter] = field(default_factory=dict)
    would_by_rule: dict[str, int] = field(default_factory=dict)  # "rule/action" -> n (dry run)
    would_by_type: dict[str, dict[str, int]] = field(default_factory=dict)  # record type -> would_* -> n
    seconds: float = 0.0

    def totals(self) -> Counter:
        out: Counter = Counter()
        for c in self.statuses.values():
            out.update(c)
        return out

    @property
    def failed(self) -> int:
        return self.totals().get(Status.FAILED, 0)


@dataclass(frozen=True)
class StateCheck:
    """What the current state of a record is judged against right before its erasure: the run's
    policy as of the run's as-of time, for a plan made from an extract read at ``extracted_at``."""

    policy: Policy
    as_of: datetime
    extracted_at: datetime


def _text(value, width: int) -> str | None:
    return value[:width] if isinstance(value, str) and value else None


class ErasureEngine:
    """Erases one system's plan for one run. ``plan`` columns: record_type, record_id,
    record_key, rule_id, action, hold; optionally policy_version (default: the run's), detail
    (why a row is deferred) and blocks (the id of the record this one must go before)."""

    # Outcomes are booked in the ledger at least this often while a batch runs.
    flush_seconds = 1.0
    # The time a budget is measured in (a test gives its own).
    clock = staticmethod(time.monotonic)

    def __init__(
        self, ledger: Ledger, run_id: str, system: str, adapter: SourceSystem, policy_version: str,
        state_check: StateCheck | None = None,
    ):
        self.ledger = ledger
        self.run_id = run_id
        self.system = system
        self.adapter = adapter
        self.policy_version = policy_version
        self.state_check = state_check
        self._left_alone: dict[tuple[str, str], str] = {}  # (record type, id) -> why, from the state checks
        self._sent_before: set[tuple[str, str]] = set()
        self._blocking_index: dict[str, dict[str, list[str]]] = {}
        self._booker: ThreadPoolExecutor | None = None
        self._bookings: list[Future] = []  # not yet waited for, in the order they were made
        self._previous_batch_bookings = 0  # how many of them were made before the last batch began

    # -- dry run ------------------------------------------------------------------------------
    @staticmethod
    def _check(plan: pd.DataFrame) -> None:
        unknown = set(plan["action"].astype(str)) - {str(a) for a in Action}
        if unknown:  # a row nobody knows how to carry out must stop the run, not be skipped
            raise ValueError(f"plan has unknown action(s) {sorted(unknown)}; known: {', '.join(map(str, Action))}")

    def count(self, plan: pd.DataFrame) -> ErasureResult:
        """What :meth:`erase` would do with ``plan``, touching nothing."""
        self._check(plan)
        result = ErasureResult(dry_run=True)
        if plan.empty:
            return result
        for (rule, action), n in plan.groupby(["rule_id", "action"]).size().items():
            result.would_by_rule[f"{rule}/{action}"] = int(n)
        for (record_type, action), n in plan.groupby(["record_type", "action"]).size().items():
            mine = result.would_by_type.setdefault(record_type, {})
            mine[WOULD[Action(action)]] = mine.get(WOULD[Action(action)], 0) + int(n)
        return result

    # -- erase --------------------------------------------------------------------------------
    def erase(self, plan: pd.DataFrame, budget_seconds: float | None = None) -> ErasureResult:
        """Write ahead, erase batch by batch, complete the ledger. Resumable and idempotent.

        ``budget_seconds``: no batch starts after the budget is spent, and batches are cut so
        that none runs far past it; every record not reached is booked ``carried_over``
        (nothing was sent for it) and the next run, which plans it again, takes it before
        anything new (:meth:`Ledger.carried_over`)."""
        self._check(plan)
        self._pace: dict[str, tuple[int, float]] = {}  # record type -> (records, seconds) sent so far
        deadline = None if budget_seconds is None else self.clock() + budget_seconds
        self._status = {(t, k): Status(s) for (t, k), s in self.ledger.statuses(self.run_id, self.system).items()}
        # What an earlier, killed attempt of this run handed to the system without hearing back.
        self._sent_before = {tk for tk, s in self._status.items() if s == Status.SUBMITTED}
        self._blocking_index: dict[str, dict[str, list[str]]] = {}
        self._ids: dict[str, dict[str, str]] = {}
        for t, i, k in zip(plan["record_type"].tolist(), plan["record_id"].astype(str).tolist(), plan["record_key"].tolist()):
            self._ids.setdefault(t, {})[k] = i
        self._write_ahead(plan)
        destructive = plan[plan["action"].isin(DESTRUCTIVE).to_numpy()]
        progress = Progress(log, f"{self.system}: erasing", total=len(destructive))
        self._booker = ThreadPoolExecutor(1, thread_name_prefix="ledger-booking")
        self._bookings, self._previous_batch_bookings = [], 0
        out_of_time = False
        try:
            for record_type in self.adapter.record_types:
                mine = destructive[(destructive["record_type"] == record_type).to_numpy()]
                for action in (Action.MINIMISE, Action.ERASE):
                    rows = mine[(mine["action"] == action).to_numpy()]
                    if rows.empty:
                        continue
                    keys = rows["record_key"].tolist()
                    finished = [self._status.get((record_type, k)) in DONE for k in keys]
                    progress.add(sum(finished))
                    todo = self._carried_first(record_type, rows[[not f for f in finished]])
                    size = batch_size(self.adapter, record_type)
                    start = 0
                    while start < len(todo):
                        if not out_of_time and deadline is not None and self.clock() >= deadline:
                            out_of_time = True
                            log.warning("%s: the erase budget is spent; what is left is carried over to the next run", self.system)
                        if out_of_time:
                            self._carry_over(record_type, todo.iloc[start:])
                            break
                        n = size if deadline is None else self._slice(record_type, size, deadline)
                        began = self.clock()
                        batch = self._before_batch(record_type, plan, todo.iloc[start : start + n])
                        self._erase_batch(record_type, action, batch)
                        done, took = self._pace.get(record_type, (0, 0.0))
                        self._pace[record_type] = (done + len(batch), took + self.clock() - began)
                        progress.add(len(todo.iloc[start : start + n]))
                        start += n
        finally:
            # Whatever stops the run, the outcomes heard are in the ledger before it returns.
            booker, self._booker = self._booker, None
            booker.shutdown(wait=True)
            self._wait_bookings(len(self._bookings))
        result = ErasureResult(dry_run=False, seconds=round(progress.finish(), 2))
        for (record_type, key) in zip(plan["record_type"].tolist(), plan["record_key"].tolist()):
            result.statuses.setdefault(record_type, Counter())[str(self._status[(record_type, key)])] += 1
        return result

    def _write_ahead(self, plan: pd.DataFrame) -> None:
        """A ledger entry for every plan row the ledger does not have yet, before anything is touched."""
        if plan.empty:
            return
        new = plan[[(t, k) not in self._status for t, k in zip(plan["record_type"].tolist(), plan["record_key"].tolist())]]
        if new.empty:
            return
        versions = new["policy_version"] if "policy_version" in new else pd.Series(self.policy_version, index=new.index)
        before = new["action"].astype(str).map({str(a): str(s) for a, s in STATUS_BEFORE.items()})
        for (version, status), part in new.groupby([versions.astype(str), before.astype(str)], sort=False):
            self.ledger.write_ahead(self.run_id, version, self.system, _entries(part), status=status)
        for t, k, s in zip(new["record_type"].tolist(), new["record_key"].tolist(), before.tolist()):
            self._status[(t, k)] = s
        deferred = new[(before == Status.DEFERRED).to_numpy()]
        for record_type, part in deferred.groupby("record_type"):
            keys = part["record_key"].tolist()
            why = part["detail"].tolist() if "detail" in part else [None] * len(part)
            details = {k: d[:_DETAIL_WIDTH] for k, d in zip(keys, why) if isinstance(d, str) and d}
            self.ledger.complete(self.run_id, self.system, record_type, dict.fromkeys(keys, Status.DEFERRED), details)

    def _slice(self, record_type: str, size: int, deadline: float) -> int:
        """Under a budget, a batch is cut to what this record type's pace so far says still fits
        in the budget's remainder, so the step ends close to it rather than a whole batch after
        (a thousand Zendesk users take fourteen minutes under Zendesk's limit). The type's first
        batch, before any pace is known, is a full one: a budget shorter than one batch is
        overrun by that batch."""
        sent, seconds = self._pace.get(record_type, (0, 0.0))
        if not sent:
            return size
        left = max(deadline - self.clock(), 0.0)
        return max(1, min(size, int(sent / max(seconds, 1e-3) * left)))

    def _carried_first(self, record_type: str, todo: pd.DataFrame) -> pd.DataFrame:
        """``todo`` with what earlier runs carried over first: a backlog is cleared oldest first,
        whatever new work each night brings."""
        if todo.empty:
            return todo
        carried = self.ledger.carried_over(self.system, record_type, exclude_run=self.run_id)
        if not carried:
            return todo
        first = todo["record_key"].isin(carried).to_numpy()
        return pd.concat([todo[first], todo[~first]])

    def _carry_over(self, record_type: str, rest: pd.DataFrame) -> None:
        """Book what the budget left untouched: nothing was sent for these records."""
        if rest.empty:
            return
        self._complete(record_type, dict.fromkeys(rest["record_key"].tolist(), Status.CARRIED_OVER))

    def _blocking(self, plan: pd.DataFrame, blocker: str) -> dict[str, list[str]]:
        """Record id -> the keys of the ``blocker`` records of the plan that name it in ``blocks``
        (one id, or several separated by spaces). Made once per erase call, not per batch: a plan
        of a million tickets and a thousand batches of users."""
        cached = self._blocking_index.get(blocker)
        if cached is not None:
            return cached
        mine = plan[(plan["record_type"] == blocker).to_numpy() & plan["blocks"].notna().to_numpy()]
        pairs = mine[["blocks", "record_key"]].assign(blocks=mine["blocks"].astype(str).str.split()).explode("blocks")
        index: dict[str, list[str]] = {}
        for i, k in zip(pairs["blocks"].astype(str).tolist(), pairs["record_key"].tolist()):
            index.setdefault(i, []).append(k)
        self._blocking_index[blocker] = index
        return index

    def _before_batch(self, record_type: str, plan: pd.DataFrame, batch: pd.DataFrame) -> pd.DataFrame:
        """The checks right before a destructive batch: what may not be erased now is settled in
        the ledger here (deferred or held) and left out of the batch."""
        settled: dict[str, Status] = {}
        detail: dict[str, str] = {}
        keys = batch["record_key"].tolist()
        ids = batch["record_id"].astype(str).tolist()

        # Dependencies: a requester (a CC, a follower) goes only once every ticket of theirs in
        # this plan is gone. ``blocks`` names one record, or several separated by spaces.
        for blocker, column in blocked_by(record_type):
            if "blocks" not in plan:
                break
            blocking = self._blocking(plan, blocker)
            open_ = {i for i in ids if any(self._status.get((blocker, k)) not in GONE for k in blocking.get(i, ()))}
            for i, k in zip(ids, keys):
                if i in open_:
                    settled[k] = Status.DEFERRED
                    detail[k] = f"a {blocker} it goes after (by {column}) is not erased yet"

        # Manual holds put on since the plan was made (``retention hold add``): read now.
        holds = Holds.at(datetime.now(UTC), ledger=self.ledger.holds())
        for k in keys:
            ref = holds.reason(record_type, record_key=k)
            if ref and k not in settled:
                settled[k] = Status.HELD
                detail[k] = _text(f"under {ref}, added after the plan", _DETAIL_WIDTH)

        if not settled:
            return batch
        self.ledger.complete(self.run_id, self.system, record_type, settled, detail)
        self._status.update({(record_type, k): s for k, s in settled.items()})
        log.info("%s: %s before erasure: %s", self.system, record_type, dict(Counter(map(str, settled.values()))))
        return batch[[k not in settled for k in keys]]

    def _recheck(self, record_type: str, batch: pd.DataFrame) -> Recheck | None:
        """The adapter's check of the batch's current state, judged by the domain."""
        check = self.state_check
        if check is None:
            return None
        planned = batch[["record_id", "action", "clock"]] if "clock" in batch else batch[["record_id", "action"]].assign(clock=pd.NaT)

        def judge(current: pd.DataFrame) -> dict[str, str]:
            reasons = leave_alone(record_type, current, planned, check.policy, check.as_of)
            self._left_alone.update({(record_type, rid): why for rid, why in reasons.items()})
            return reasons

        return Recheck(since=check.extracted_at, leave_alone=judge)

    def _erase_batch(self, record_type: str, action: Action, batch: pd.DataFrame) -> None:
        if batch.empty:
            return
        # At most one batch's outcomes are still being booked while this one goes: the previous
        # batch's. A ledger that fails or falls behind stops or slows the run a batch later.
        self._wait_bookings(self._previous_batch_bookings)
        self._previous_batch_bookings = len(self._bookings)
        key_of = dict(zip(batch["record_id"].astype(str).tolist(), batch["record_key"].tolist()))
        heard: set[str] = set()
        pending: dict[str, Status] = {}
        last = time.monotonic()
        recheck = self._recheck(record_type, batch)
        self._submitted(record_type, key_of.values())
        # The adapter is given a check only when the flow judges current state (the nightly run).
        args = (record_type, str(action), list(key_of), *((recheck,) if recheck else ()))
        try:
            for record_id, status in self.adapter.erase(*args):
                key = key_of.get(str(record_id))
                if key is None or key in heard:
                    continue
                heard.add(key)
                pending[key] = status
                if time.monotonic() - last >= self.flush_seconds:
                    self._complete(record_type, pending)
                    pending, last = {}, time.monotonic()
        finally:
            # The outcomes heard so far are true whatever stops the batch: book them.
            self._complete(record_type, pending)
        # The system said nothing of these: not erased as far as anyone knows.
        self._complete(record_type, {k: Status.FAILED for k in key_of.values() if k not in heard})

    def _complete(self, record_type: str, outcomes: dict[str, Status]) -> None:
        if not outcomes:
            return
        detail = {}
        if self._sent_before:
            for key, status in outcomes.items():
                if status == Status.ALREADY_GONE and (record_type, key) in self._sent_before:
                    outcomes[key] = Status.ERASED
                    detail[key] = "erased by an earlier attempt of this run, killed before it heard back"
        if self._left_alone:
            id_of = self._ids.get(record_type, {})
            for key, status in outcomes.items():
                why = self._left_alone.get((record_type, id_of.get(key, "")))
                if why and status == Status.DEFERRED and key not in detail:
                    detail[key] = why
        self._status.update({(record_type, k): s for k, s in outcomes.items()})
        if self._booker is None:
            self.ledger.complete(self.run_id, self.system, record_type, outcomes, detail or None)
            return
        self._raise_failed_booking()
        self._bookings.append(
            self._booker.submit(self.ledger.complete, self.run_id, self.system, record_type, dict(outcomes), detail or None)
        )

    def _submitted(self, record_type: str, keys: Iterable[str]) -> None:
        """Mark a batch ``submitted``, committed before the batch goes to the system."""
        outcomes = dict.fromkeys(keys, Status.SUBMITTED)
        self.ledger.complete(self.run_id, self.system, record_type, outcomes)
        self._status.update({(record_type, k): s for k, s in outcomes.items()})

    def _raise_failed_booking(self) -> None:
        """Raise the error of a booking that failed, of those done."""
        for booking in self._bookings:
            if booking.done():
                booking.result()  # raises the booking's error

    def _wait_bookings(self, upto: int) -> None:
        """Wait for the first ``upto`` bookings (raising a failed one's error); done ones are let go."""
        for booking in self._bookings[:upto]:
            booking.result()
        self._bookings = self._bookings[upto:]

    # -- verify -------------------------------------------------------------------------------
    def verify(self, plan: pd.DataFrame) -> tuple[int, int]:
        """Of the plan's records the ledger marks gone: how many, and how many are still there."""
        statuses = self.ledger.statuses(self.run_id, self.system)
        checked = still = 0
        for record_type in self.adapter.record_types:
            mine = plan[(plan["record_type"] == record_type).to_numpy()]
            gone = [i for i, k in zip(mine["record_id"].astype(str).tolist(), mine["record_key"].tolist())
                    if statuses.get((record_type, k)) in GONE]
            if not gone:
                continue
            present = self.adapter.still_present(record_type, gone)
            checked += len(gone)
            still += len(present)
            if present:
                log.error("%s: %d %s records the ledger marks gone are still present", self.system, len(present), record_type)
            # Erased for good, as the system now confirms: out of the record index, which a change
            # feed would never tell (a record deleted for good leaves Zendesk's exports silently).
            erased = set(mine["record_id"].astype(str)[(mine["action"] == Action.ERASE).to_numpy()].tolist())
            RecordIndex(self.ledger.engine, self.system).forget(record_type, sorted((set(gone) & erased) - set(present)))
        return checked, still


def _entries(frame: pd.DataFrame) -> Iterator[dict]:
    """Ledger entries for plan rows, made as the ledger takes them (a generator). A deferral is
    recorded as the erasure it puts off."""
    hold = frame["hold"].astype(object).where(frame["hold"].notna(), None).tolist() if "hold" in frame else [None] * len(frame)
    columns = [frame[c].tolist() for c in ("record_type", "record_key", "rule_id", "action")]
    for t, k, r, a, h in zip(*columns, hold):
        action = Action.ERASE if a == Action.DEFER else a
        yield {"record_type": t, "record_key": k, "rule_id": str(r)[:_RULE_WIDTH], "action": str(action), "hold": _text(h, _HOLD_WIDTH)}


__all__ = ["ErasureEngine", "ErasureResult", "StateCheck"]
