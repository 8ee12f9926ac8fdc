"""The one erasure engine: every flow (nightly, erasure request, replay) hands its plan here.

What it guarantees, in this order, for one system of one run:

1. **Write-ahead.** Every plan row gets a ledger entry before its record is touched: ``held``
   for a hold and ``deferred`` for a deferral first, then ``planned`` for an erasure or
   minimisation, in the order the batches go, by a thread of its own while the first batches
   already go (a batch goes once its own entries are committed; a step that stops on the way
   still leaves every row in the ledger). A row the ledger already has for this run (an earlier
   attempt of the task) is not written again.
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
   second of outcomes. Each batch is recorded as handed over (one row of its keys, committed
   before it goes to the system; its entries read ``submitted`` until their outcomes are
   booked), so the retry knows which records its own killed attempt sent. The
   outcomes are written by one booking thread, in order, while the next batch goes on (the
   ledger's statements and the system's run side by side); every erase call waits for them
   before it returns or raises, and a failed booking stops the run at the next batch.
5. **Verify.** Every record the ledger marks gone is looked up in the system again.

The plan is read a slice of rows at a time (:mod:`.plan_rows`), each record type and action one
run of rows in erase order: the nightly step's staged plan, which the plan step wrote in that
order, is never held whole, so the step holds a batch and a slice whatever the plan's size.

Dry run: the same plan is counted, no ledger entry is written, nothing is touched.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import repeat

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from retention.domain.candidates import Condition, surely_due
from retention.domain.holds import Holds
from retention.domain.planning import ERASE_ACTIONS
from retention.domain.policy import Policy
from retention.domain.recheck import leave_alone
from retention.domain.records import blocked_by
from retention.domain.statuses import DESTRUCTIVE, DONE, GONE, STATUS_BEFORE, WOULD, Action, Status
from retention.progress import Progress
from retention.runs.plan_rows import FramePlan, Layout, PlanRows, layout
from retention.store.ledger import Ledger
from retention.store.record_index import RecordIndex
from retention.systems.base import ChangeFeed, Recheck, SourceSystem, batch_size

log = logging.getLogger("retention")

# Plan rows read or turned into Python values at a time (bounded memory for a plan of a million rows).
_ROWS = 50_000
# The fewest plan rows the erase loop and the write-ahead read at a time (see ``_slice_rows``).
_MIN_SLICE_ROWS = 20_000
# The plan columns a batch's checks and the adapter read (``_before_batch``, ``_recheck``,
# ``_erase_batch``, ``_carry_over``), and those a ledger entry is made of (``_entry_table``).
_BATCH_COLUMNS = ("record_id", "record_key", "action", "clock")
_ENTRY_SOURCE = ("record_type", "record_key", "rule_id", "action", "hold", "policy_version")
# Every plan column the engine reads: a staged plan out of erase order, read whole, is read with
# only these, the few-valued texts as categoricals (``_plan_rows``); the rest of a nightly plan
# (system, deadline, fallback clock) and a text per row of the others took half its memory.
PLAN_COLUMNS = tuple(dict.fromkeys((*_BATCH_COLUMNS, *_ENTRY_SOURCE, "blocks", "detail")))
PLAN_CATEGORIES = ("record_type", "rule_id", "action")
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
    # Of ``seconds``, how long the erase loop waited, and on what: the write-ahead of a batch's
    # entries, the booking of the previous batch's outcomes (what sets a step's pace besides
    # the system itself).
    waited: dict[str, float] = field(default_factory=dict)

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


class _Statuses:
    """(record type, key) -> status, kept as one dict per record type: a million plan rows
    without a tuple and a record-type string each, as one dict keyed by both would hold.

    A key whose status is final for the erase call and that nothing looks up again by key (a
    batch's outcome, of a record type no other waits for; of one others wait for, a record gone)
    is counted instead and let go (:meth:`let_go`): the dicts hold a batch or so and what did not
    go, not every plan row (a million keys held to the end cost the CRM's erase step 110 MB at a
    million contacts, and 200,000 tickets' the ticketing step 40 MB)."""

    def __init__(self, pairs: dict[tuple[str, str], str] | None = None):
        self.by_type: dict[str, dict[str, str]] = {}
        self.let_go_counts: dict[str, Counter] = {}  # record type -> statuses of the keys let go
        for (t, k), s in (pairs or {}).items():
            self.by_type.setdefault(t, {})[k] = Status(s)

    def let_go(self, record_type: str, statuses: dict[str, Status]) -> None:
        """Count ``statuses`` (final for this call) and forget their keys."""
        mine = self.by_type.get(record_type)
        if mine:
            deque(map(mine.pop, statuses, repeat(None)), maxlen=0)  # in C
        self.let_go_counts.setdefault(record_type, Counter()).update(statuses.values())

    def count(self, record_type: str, rows: int, keys: Callable[[], Iterable[pd.Series]]) -> Counter:
        """The statuses of a record type's ``rows`` plan rows (``keys()``: their keys, each once,
        a slice at a time, read only when some are held by key): those held by key, those let
        go, and the rest planned (never reached; only a step that raised leaves one)."""
        counted: Counter = Counter()
        mine = self.by_type.get(record_type)
        if mine:
            status_of = mine.get
            for chunk in keys():
                for start in range(0, len(chunk), _ROWS):  # a slice of keys at a time, counted in C
                    counted.update(map(status_of, chunk.iloc[start : start + _ROWS].tolist()))
            counted.pop(None, None)
        let_go = self.let_go_counts.get(record_type, Counter())
        planned = rows - sum(counted.values()) - sum(let_go.values())
        counted.update(let_go)
        if planned:
            counted[Status.PLANNED] += planned
        return counted

    def items(self) -> Iterator[tuple[tuple[str, str], str]]:
        for t, statuses in self.by_type.items():
            for k, s in statuses.items():
                yield (t, k), s

    def update_type(self, record_type: str, statuses: dict[str, str]) -> None:
        self.by_type.setdefault(record_type, {}).update(statuses)

    def __bool__(self) -> bool:
        return any(self.by_type.values())


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
        # Record type -> what the state check surely lets go (domain.candidates.surely_due), made once.
        self._surely_due: dict[str, Condition | None] = {}
        self._sent_before: set[tuple[str, str]] = set()
        self._still_blocking: dict[str, frozenset[str]] = {}
        self._waited_for: set[str] = set()  # record types others wait for (set by ``erase``)
        self._booker: ThreadPoolExecutor | None = None
        self._bookings: list[Future] = []  # not yet waited for, in the order they were made
        self._previous_batch_bookings = 0  # how many of them were made before the last batch began

    # -- dry run ------------------------------------------------------------------------------
    def _plan_rows(self, plan: pd.DataFrame | PlanRows) -> tuple[PlanRows, Layout]:
        """The plan as the engine reads it, and where each record type and action is in it. A
        plan that names an action nobody knows how to carry out stops the run before anything
        is written (not skipped)."""
        rows = FramePlan(plan, self.adapter.record_types) if isinstance(plan, pd.DataFrame) else plan
        shape = layout(rows, chunk_rows=_ROWS)
        if shape is None:  # staged out of erase order (by an older version): read whole, ordered here
            log.warning("%s: the staged plan is not in erase order; it is read whole", self.system)
            rows = FramePlan(rows.whole(PLAN_COLUMNS, PLAN_CATEGORIES), self.adapter.record_types)
            shape = layout(rows, chunk_rows=_ROWS)
        unknown = shape.actions - {str(a) for a in Action}
        if unknown:
            raise ValueError(f"plan has unknown action(s) {sorted(unknown)}; known: {', '.join(map(str, Action))}")
        return rows, shape

    def count(self, plan: pd.DataFrame | PlanRows) -> ErasureResult:
        """What :meth:`erase` would do with ``plan``, touching nothing."""
        rows, shape = self._plan_rows(plan)
        result = ErasureResult(dry_run=True)
        by_rule: Counter = Counter()
        for chunk in rows.chunks(["rule_id", "action"], categories=("rule_id", "action")):
            by_rule.update({(str(r), str(a)): int(n) for (r, a), n in chunk.groupby(["rule_id", "action"], observed=True).size().items()})
        result.would_by_rule = {f"{rule}/{action}": n for (rule, action), n in sorted(by_rule.items()) if n}
        for run in sorted(shape.runs, key=lambda r: (r.record_type, r.action)):
            mine = result.would_by_type.setdefault(run.record_type, {})
            mine[WOULD[Action(run.action)]] = mine.get(WOULD[Action(run.action)], 0) + len(run)
        return result

    # -- erase --------------------------------------------------------------------------------
    def erase(self, plan: pd.DataFrame | PlanRows, budget_seconds: float | None = None) -> ErasureResult:
        """Write ahead, erase batch by batch, complete the ledger. Resumable and idempotent.

        ``plan``: a frame, or a staged plan read a slice at a time (:mod:`.plan_rows`; the
        nightly step's, staged in erase order: the step then holds a batch, not the plan).

        ``budget_seconds``: no batch starts after the budget is spent, and batches are cut so
        that none runs far past it; every record not reached is booked ``carried_over``
        (nothing was sent for it) and the next run, which plans it again, takes it before
        anything new (:meth:`Ledger.carried_over`)."""
        rows, shape = self._plan_rows(plan)
        self._shape = shape
        self._pace: dict[str, tuple[int, float]] = {}  # record type -> (records, seconds) sent so far
        deadline = None if budget_seconds is None else self.clock() + budget_seconds
        self._status = _Statuses(self.ledger.statuses(self.run_id, self.system))
        # The entries an earlier attempt of this run wrote (not written again), and those of them
        # it finished (not taken again).
        known = {t: frozenset(keys) for t, keys in self._status.by_type.items() if keys}
        finished = {t: frozenset(k for k, s in keys.items() if s in DONE) for t, keys in self._status.by_type.items()}
        # The record types others wait for (``blocks``): what of them did not go is kept by key.
        self._waited_for = self._blocker_types()
        # What an earlier, killed attempt of this run handed to the system without hearing back.
        self._sent_before = {tk for tk, s in self._status.items() if s == Status.SUBMITTED}
        self._still_blocking = {}
        self._write_ahead(rows, shape, known)
        groups = self._groups(rows, shape, finished)
        progress = Progress(log, f"{self.system}: erasing", total=shape.rows(actions=[str(a) for a in DESTRUCTIVE]))
        for group in groups:
            progress.add(group.finished)
        # The destructive rows' entries are written in the order the loop below takes them, by a
        # thread of their own, while the loop erases what is written already (a batch goes only
        # once its entries are committed): the write-ahead of a large plan no longer holds up
        # the first batch for as long as it takes to write the whole plan.
        ahead = _WriteAhead(self, rows, groups, known)
        self._booker = ThreadPoolExecutor(1, thread_name_prefix="ledger-booking")
        self._bookings, self._previous_batch_bookings = [], 0
        self._waited = {"write_ahead": 0.0, "bookings": 0.0}
        out_of_time = False
        try:
            for number, group in enumerate(groups):
                record_type, size = group.record_type, batch_size(self.adapter, group.record_type)
                # A batch's rows are read when it goes, the columns the checks and the adapter read.
                todo = _Taker(self._todo(rows, group, _BATCH_COLUMNS, self._slice_rows(record_type)))
                taken = 0
                while True:
                    if not out_of_time and deadline is not None and self.clock() >= deadline:
                        out_of_time = True
                        log.warning("%s: the erase budget is spent; what is left is carried over to the next run", self.system)
                    if out_of_time:
                        ahead.wait(number)
                        for rest in todo.rest():
                            self._carry_over(record_type, rest)
                        break
                    n = size if deadline is None else self._slice(record_type, size, deadline)
                    began = self.clock()
                    batch_rows = todo.take(n)
                    if batch_rows is None:
                        break
                    taken += len(batch_rows)
                    waiting = time.perf_counter()
                    ahead.wait(number, upto=taken)
                    self._waited["write_ahead"] += time.perf_counter() - waiting
                    batch = self._before_batch(record_type, rows, batch_rows)
                    self._erase_batch(record_type, group.action, batch)
                    done, took = self._pace.get(record_type, (0, 0.0))
                    self._pace[record_type] = (done + len(batch), took + self.clock() - began)
                    progress.add(len(batch_rows))
        finally:
            # Whatever stops the run, the whole plan is written ahead and the outcomes heard are
            # in the ledger before it returns.
            ahead.close()
            booker, self._booker = self._booker, None
            booker.shutdown(wait=True)
            self._wait_bookings(len(self._bookings))
        ahead.wait_all()  # a write-ahead that failed after the last batch is the run's error too
        # Every batch handed over has its outcomes booked (what was not heard of, failed), an
        # earlier attempt's too: the record of what was handed over has served. A step stopped on
        # the way keeps it for its retry.
        self.ledger.forget_submissions(self.run_id, self.system)
        result = ErasureResult(dry_run=False, seconds=round(progress.finish(), 2))
        result.waited = {what: round(s, 2) for what, s in self._waited.items()}
        log.info(
            "%s: erase loop waited %.1fs for the write-ahead of its batches, %.1fs for the previous batch's bookings",
            self.system, result.waited["write_ahead"], result.waited["bookings"],
        )
        for record_type in shape.types:
            counted = self._status.count(record_type, shape.rows(record_type), lambda t=record_type: self._keys(rows, t))
            result.statuses[record_type] = Counter({str(s): n for s, n in counted.items()})
        return result

    def _keys(self, rows: PlanRows, record_type: str) -> Iterator[pd.Series]:
        """A record type's plan keys, a slice at a time."""
        for run in self._shape.of(record_type):
            for chunk in rows.chunks(["record_key"], run.start, run.stop, rows=_ROWS):
                yield chunk["record_key"]

    def _write_ahead(self, rows: PlanRows, shape: Layout, known: dict[str, frozenset[str]]) -> None:
        """A ledger entry, now, for every plan row that erases nothing (held, deferred) the ledger
        does not have yet (``known``), a slice at a time; :class:`_WriteAhead` writes the
        destructive rows' before their batches. A destructive row's status here is set when its
        batch is handed over (or it is settled or carried over before): not for every row up
        front, which cost half a second for a million rows before the first batch, and until
        then it reads as planned (:meth:`erase`'s count)."""
        destructive = {str(a) for a in DESTRUCTIVE}
        for run in shape.runs:
            if run.action in destructive:
                continue
            for chunk in rows.chunks([*_ENTRY_SOURCE, "detail"], run.start, run.stop, rows=_ROWS):
                if known.get(run.record_type):
                    chunk = chunk[~chunk["record_key"].isin(known[run.record_type]).to_numpy(dtype=bool)]
                if len(chunk):
                    self._settle(chunk)

    def _settle(self, settled: pd.DataFrame) -> None:
        """Write held and deferred plan rows ahead as what they are (a deferral with its detail)."""
        before_of = {str(a): str(s) for a, s in STATUS_BEFORE.items()}
        versions = settled["policy_version"] if "policy_version" in settled else pd.Series(self.policy_version, index=settled.index)
        before = settled["action"].astype(str).map(before_of)
        for (record_type, status), keys in settled.groupby([settled["record_type"].astype(str), before.astype(str)], sort=False)["record_key"]:
            self._status.update_type(record_type, dict.fromkeys(keys.astype(str).tolist(), Status(status)))
        for (version, status), part in settled.groupby([versions.astype(str), before.astype(str)], sort=False):
            self.ledger.write_ahead(self.run_id, version, self.system, _entry_table(_arrow(part)), status=status)
        deferred = settled[(before == Status.DEFERRED).to_numpy()]
        for record_type, part in deferred.groupby(deferred["record_type"].astype(str)):
            keys = part["record_key"].tolist()
            why = part["detail"].tolist() if "detail" in part else [None] * len(part)
            details = {k: d[:_DETAIL_WIDTH] for k, d in zip(keys, why) if isinstance(d, str) and d}
            self.ledger.complete(self.run_id, self.system, record_type, dict.fromkeys(keys, Status.DEFERRED), details)

    def _groups(self, rows: PlanRows, shape: Layout, finished: dict[str, frozenset[str]]) -> list[_Group]:
        """What the erase loop takes, in its order: per record type (the adapter's order) and
        action (minimise, then erase), its rows, what earlier attempts finished of them
        (``finished``, keys: skipped) and what earlier runs carried over (taken first)."""
        groups = []
        for record_type in self.adapter.record_types:
            done = finished.get(record_type, frozenset())
            for action in ERASE_ACTIONS:
                for run in shape.of(record_type, str(action)):  # one run: the layout is in erase order
                    n_done = 0
                    if done:  # only a retry has finished rows: a first attempt reads no keys here
                        n_done = sum(
                            int(chunk["record_key"].isin(done).sum())
                            for chunk in rows.chunks(["record_key"], run.start, run.stop, rows=_ROWS)
                        )
                    carried = frozenset()
                    if n_done < len(run):
                        carried = frozenset(self.ledger.carried_over(self.system, record_type, exclude_run=self.run_id))
                    groups.append(_Group(record_type, action, run.start, run.stop, done, carried, n_done))
        return groups

    def _slice_rows(self, record_type: str) -> int:
        """Plan rows of a group the erase loop and the write-ahead each read at a time, side by
        side: a batch's (so that a batch is one slice, not slices put together), at least
        ``_MIN_SLICE_ROWS`` and at most ``_ROWS``. Slices of 50,000 for the newsletter, whose
        batches are a thousand, took its step 30 MB higher at a million members than at 250,000,
        whose whole plan (25,000 rows) is less than a slice."""
        return min(_ROWS, max(_MIN_SLICE_ROWS, batch_size(self.adapter, record_type)))

    @staticmethod
    def _todo(rows: PlanRows, group: _Group, columns: Sequence[str], slice_rows: int) -> Iterator[pd.DataFrame]:
        """A group's rows left to do, in the order the loop takes them (the erase loop's and the
        write-ahead's alike): what earlier runs carried over first (a backlog is cleared oldest
        first, whatever new work each night brings), then the rest, each part in the plan's (id)
        order; rows an earlier attempt finished left out."""
        wanted = list(dict.fromkeys((*columns, "record_key", "action")))
        for first in (True, False) if group.carried else (None,):
            for chunk in rows.chunks(wanted, group.start, group.stop, rows=slice_rows):
                if not (chunk["action"].astype(str) == str(group.action)).all():
                    # The rows are not those the layout found (the staged plan changed since):
                    # a hold among them would be erased. Stop before any of them goes.
                    raise RuntimeError(f"the plan's rows {group.start} to {group.stop} are no longer all {group.action}: the plan changed while it was erased")
                keys = chunk["record_key"]
                keep = np.ones(len(chunk), dtype=bool)
                if group.done:
                    keep &= ~keys.isin(group.done).to_numpy(dtype=bool)
                if first is not None:
                    carried = keys.isin(group.carried).to_numpy(dtype=bool)
                    keep &= carried if first else ~carried
                if keep.all():
                    yield chunk
                elif keep.any():
                    yield chunk[keep]

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

    def _carry_over(self, record_type: str, rest: pd.DataFrame) -> None:
        """Book what the budget left untouched: nothing was sent for these records."""
        if rest.empty:
            return
        self._complete(record_type, dict.fromkeys(rest["record_key"].tolist(), Status.CARRIED_OVER))

    def _blocker_types(self) -> set[str]:
        """The record types others wait for, each erased before the types that wait for it (the
        adapter's order): :meth:`_blocking` relies on every blocker row having been through the
        loop before a row that waits for it goes."""
        order = list(self.adapter.record_types)
        blockers = set()
        for waiting in order:
            for blocker, _ in blocked_by(waiting):
                if blocker in order and order.index(blocker) > order.index(waiting):
                    raise ValueError(
                        f"{self.system}: {waiting} waits for {blocker}, which the adapter erases after it "
                        f"(record types in order: {', '.join(order)})"
                    )
                blockers.add(blocker)
        return blockers

    def _blocking(self, rows: PlanRows, blocker: str) -> frozenset[str]:
        """The ids named in ``blocks`` (one id, or several separated by spaces) by a ``blocker``
        row of the plan that is not gone: the records that must wait. Worked out once per erase
        call, at the first batch that waits for ``blocker``: every blocker row has been through
        the loop by then (:meth:`_blocker_types`), and a row whose status is no longer held by key
        was let go as gone (:meth:`_complete`). Only the ids of what did not go are held, not an
        index of every blocker row (a plan of 200,000 tickets and batches of users)."""
        cached = self._still_blocking.get(blocker)
        if cached is not None:
            return cached
        status_of = self._status.by_type.get(blocker, {}).get
        gone = set(GONE)
        ids: set[str] = set()
        for run in self._shape.of(blocker):
            for chunk in rows.chunks(["blocks", "record_key"], run.start, run.stop, rows=_ROWS):
                mine = chunk["blocks"].notna().to_numpy(dtype=bool)
                if not mine.any():
                    continue
                keys, blocks = chunk["record_key"][mine].tolist(), chunk["blocks"][mine].astype(str).tolist()
                for key, named in zip(keys, blocks):
                    status = status_of(key)
                    if status is not None and status not in gone:
                        ids.update(named.split())
        self._still_blocking[blocker] = frozenset(ids)
        return self._still_blocking[blocker]

    def _before_batch(self, record_type: str, rows: PlanRows, batch: pd.DataFrame) -> pd.DataFrame:
        """The checks right before a destructive batch: what may not be erased now is settled in
        the ledger here (deferred or held) and left out of the batch."""
        settled: dict[str, Status] = {}
        detail: dict[str, str] = {}
        keys = batch["record_key"].tolist()
        ids = batch["record_id"].astype(str).tolist()

        # Dependencies: a requester (a CC, a follower) goes only once every ticket of theirs in
        # this plan is gone. ``blocks`` names one record, or several separated by spaces.
        for blocker, column in blocked_by(record_type):
            if "blocks" not in rows.columns:
                break
            blocking = self._blocking(rows, blocker)
            open_ = {i for i in ids if i in blocking}
            for i, k in zip(ids, keys):
                if i in open_:
                    settled[k] = Status.DEFERRED
                    detail[k] = f"a {blocker} it goes after (by {column}) is not erased yet"

        # Manual holds put on since the plan was made (``retention hold add``): read now.
        holds = Holds.at(datetime.now(UTC), ledger=self.ledger.holds())
        held = holds.keys(record_type)  # a set: no Python step per key of a batch without holds
        for k in [k for k in keys if k in held] if held else ():
            if k not in settled:
                settled[k] = Status.HELD
                detail[k] = _text(f"under {holds.reason(record_type, record_key=k)}, added after the plan", _DETAIL_WIDTH)

        if not settled:
            return batch
        self.ledger.complete(self.run_id, self.system, record_type, settled, detail)
        self._status.update_type(record_type, settled)
        log.info("%s: %s before erasure: %s", self.system, record_type, dict(Counter(map(str, settled.values()))))
        return batch[[k not in settled for k in keys]]

    def _recheck(self, record_type: str, batch: pd.DataFrame) -> Recheck | None:
        """The adapter's check of the batch's current state, judged by the domain."""
        check = self.state_check
        if check is None:
            return None
        planned = batch[["record_id", "action", "clock"]] if "clock" in batch else batch[["record_id", "action"]].assign(clock=pd.NaT)
        planned = planned.assign(record_id=planned["record_id"].astype(str))

        def judge(current: pd.DataFrame) -> dict[str, str]:
            # The plan rows of the records read now only: a system re-reads a hundred at a time
            # in a batch of up to 100,000, and the whole batch's rows copied for every hundred
            # cost time and, in the client's threads, hundreds of MB.
            mine = planned[planned["record_id"].isin(current["record_id"].astype(str)).to_numpy(dtype=bool)]
            reasons = leave_alone(record_type, current, mine, check.policy, check.as_of)
            self._left_alone.update({(record_type, rid): why for rid, why in reasons.items()})
            return reasons

        # Once per record type (a search over the rules' deadlines), not per batch.
        if record_type not in self._surely_due:
            self._surely_due[record_type] = surely_due(record_type, check.policy, check.as_of)
        return Recheck(since=check.extracted_at, leave_alone=judge, surely_due=self._surely_due[record_type])

    def _erase_batch(self, record_type: str, action: Action, batch: pd.DataFrame) -> None:
        if batch.empty:
            return
        # At most one batch's outcomes are still being booked while this one goes: the previous
        # batch's. A ledger that fails or falls behind stops or slows the run a batch later.
        waiting = time.perf_counter()
        self._wait_bookings(self._previous_batch_bookings)
        self._waited["bookings"] += time.perf_counter() - waiting
        self._previous_batch_bookings = len(self._bookings)
        key_of = dict(zip(batch["record_id"].astype(str).tolist(), batch["record_key"].tolist()))
        heard: set[str] = set()
        pending: dict[str, Status] = {}
        last = time.monotonic()
        recheck = self._recheck(record_type, batch)
        booked_from = len(self._bookings)  # this batch's bookings are the ones made from here on
        submission = self._submitted(record_type, key_of.values())
        # The adapter is given a check only when the flow judges current state (the nightly run).
        args = (record_type, str(action), list(key_of), *((recheck,) if recheck else ()))
        # A step per outcome, with what it calls bound once (a million outcomes a night).
        key_for, hear, clock, flush = key_of.get, heard.add, time.monotonic, self.flush_seconds
        try:
            for record_id, status in self.adapter.erase(*args):
                key = key_for(str(record_id))
                if key is None or key in heard:
                    continue
                hear(key)
                pending[key] = status
                if clock() - last >= flush:
                    self._complete(record_type, pending, key_of)
                    pending, last = {}, clock()
        finally:
            # The outcomes heard so far are true whatever stops the batch: book them.
            self._complete(record_type, pending, key_of)
        if len(heard) < len(key_of):  # the system said nothing of these: not erased as far as anyone knows
            self._complete(record_type, {k: Status.FAILED for k in key_of.values() if k not in heard})
        self._forget_when_booked(submission, self._bookings[booked_from:])

    def _complete(self, record_type: str, outcomes: dict[str, Status], key_of: dict[str, str] | None = None) -> None:
        """Book outcomes (record_key -> status); ``key_of`` (the batch's record id -> key) names
        the records the state checks may have left alone, for the detail of a deferral."""
        if not outcomes:
            return
        detail = {}
        if self._sent_before:
            for key, status in outcomes.items():
                if status == Status.ALREADY_GONE and (record_type, key) in self._sent_before:
                    outcomes[key] = Status.ERASED
                    detail[key] = "erased by an earlier attempt of this run, killed before it heard back"
        if self._left_alone and key_of:
            id_of = {k: i for i, k in key_of.items()}  # made only when a check left something alone
            for key, status in outcomes.items():
                why = self._left_alone.get((record_type, id_of.get(key, "")))
                if why and status == Status.DEFERRED and key not in detail:
                    detail[key] = why
        if record_type in self._waited_for:
            # Others look up by key only what did not go (:meth:`_blocking`): the rest is counted.
            gone = {k: s for k, s in outcomes.items() if s in GONE}
            self._status.let_go(record_type, gone)
            if len(gone) < len(outcomes):
                self._status.update_type(record_type, {k: s for k, s in outcomes.items() if s not in GONE})
        else:  # final for this call, and nothing looks these keys up again
            self._status.let_go(record_type, outcomes)
        if self._booker is None:
            self.ledger.complete(self.run_id, self.system, record_type, outcomes, detail or None)
            return
        self._raise_failed_booking()
        self._bookings.append(
            self._booker.submit(self.ledger.complete, self.run_id, self.system, record_type, dict(outcomes), detail or None)
        )

    def _submitted(self, record_type: str, keys: Iterable[str]) -> int:
        """Record the batch as handed to the system (its entries read ``submitted``), committed
        before the batch goes: one row for the batch, not an update of each entry. Returns the
        row's id."""
        keys = list(keys)
        submission = self.ledger.submit(self.run_id, self.system, record_type, keys)
        self._status.update_type(record_type, dict.fromkeys(keys, Status.SUBMITTED))
        return submission

    def _forget_when_booked(self, submission: int, bookings: list[Future]) -> None:
        """Drop a batch's record of being handed over once its outcomes are booked, in the
        booking thread after them (so the ledger keeps only the batches in flight); kept when
        one of those bookings failed, for the retry."""

        def forget() -> None:
            if all(booking.exception() is None for booking in bookings):  # done: booked before this, in order
                self.ledger.forget_submission(submission)

        self._bookings.append(self._booker.submit(forget))

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
    # Plan rows looked up at a time, in the ledger and in the system: what verify holds at once.
    # Each lookup of a chunk's statuses reads the run's outcomes of a record type once (they have
    # no index on the key), so fewer chunks are faster. But the step's memory crept up chunk
    # after chunk (allocators keeping what a chunk's keys, ids, statuses and result rows took) to
    # a level set by the chunk's size: for the benchmark's CRM at a million contacts (835,000
    # erasures; the step alone, no Airflow) 549 MB at 200,000 rows a chunk and 11.4 s, 397 MB at
    # 50,000 and 12.6 s, 354 MB at 25,000 and 14.9 s. With 25,000-row chunks, the plan staged in
    # row groups and read in one thread (``RunStaging``), the verify step peaks at 314 MB at a
    # million contacts and 299 MB at 250,000 (``scripts/bench.sh memory``).
    verify_chunk = 25_000

    @property
    def verify_rows(self) -> int:
        """Plan rows verified at a time: the adapter's ``verify_batch`` where it has one (a system
        checked by one pass over all its records wants few, large chunks), else ``verify_chunk``."""
        return int(getattr(self.adapter, "verify_batch", None) or self.verify_chunk)

    def verify(self, plan: pd.DataFrame | Iterable[pd.DataFrame | pa.RecordBatch]) -> tuple[int, int]:
        """Of the plan's records the ledger marks gone: how many, and how many are still there.

        ``plan``: a frame, or the plan in chunks (frames or Arrow record batches with
        record_type, record_id, record_key and action: confirmed erasures leave the record
        index). A chunk at a time is looked up in the ledger
        (its entries only) and then in the system, so that verifying a million erasures holds
        a chunk's keys and statuses, not the whole run's."""
        checked = 0
        present: Counter = Counter()
        # Only a system read through a change feed keeps a record index (the CRM has none).
        index = RecordIndex(self.ledger.engine, self.system) if isinstance(self.adapter, ChangeFeed) else None
        erase = str(Action.ERASE)
        # The ids the ledger marks gone, by record type, waiting for the system: held as Arrow
        # texts (with whether each was erased, not kept), up to the adapter's ``verify_batch``.
        # A system checked in one pass over all its records (the newsletter) gets a large batch
        # at once, but the plan is read and the ledger asked a ``verify_chunk`` at a time: the
        # newsletter's verify step held a 200,000-row chunk of the plan and its gone ids as
        # Python texts, and grew from 259 MB at 250,000 members to 295 MB at a million.
        gone: dict[str, tuple[list[pa.Array], list[np.ndarray]]] = {}
        waiting = 0

        def check_in_system() -> None:
            """Ask the system about the gone ids waiting, at most ``verify_rows`` in a call."""
            nonlocal checked
            for record_type in self.adapter.record_types:
                arrays, flags = gone.pop(record_type, ([], []))
                if not arrays:
                    continue
                waiting_ids, waiting_erased = pa.concat_arrays(arrays), np.concatenate(flags)
                del arrays, flags
                for start in range(0, len(waiting_ids), self.verify_rows):
                    ids = TextIds(waiting_ids.slice(start, self.verify_rows))
                    erased = waiting_erased[start : start + self.verify_rows]
                    checked += len(ids)
                    still = set(self.adapter.still_present(record_type, ids))
                    present[record_type] += len(still)
                    # Erased for good, as the system now confirms: out of the record index, which a
                    # change feed would never tell (a record deleted for good leaves Zendesk's
                    # exports silently).
                    if index is not None:
                        if still:
                            erased = erased & ~np.asarray(
                                pc.is_in(ids.array, value_set=pa.array(sorted(still), pa.string())).to_numpy(zero_copy_only=False), dtype=bool
                            )
                        forgotten = ids.array.filter(pa.array(erased))
                        index.forget(record_type, TextIds(forgotten.take(pc.sort_indices(forgotten))))
                    del ids, erased, still

        for chunk in _chunks_of(plan, self.verify_chunk):
            for at in range(0, _rows_in(chunk), self.verify_chunk):
                # Arrow columns: only the keys become Python texts (the ledger is asked by them).
                types, ids, keys, actions = _plan_arrays(_rows_of(chunk, at, self.verify_chunk))
                for record_type in self.adapter.record_types:
                    mine = pc.fill_null(pc.equal(types, record_type), False)
                    if not pc.any(mine).as_py():
                        continue
                    its_keys = keys.filter(mine).to_pylist()
                    statuses = self.ledger.statuses_of(self.run_id, self.system, record_type, its_keys)
                    found = np.fromiter((statuses.get(k) in GONE for k in its_keys), dtype=bool, count=len(its_keys))
                    del statuses, its_keys
                    if found.any():
                        arrays, flags = gone.setdefault(record_type, ([], []))
                        arrays.append(ids.filter(mine).filter(pa.array(found)))
                        erased = pc.fill_null(pc.equal(actions.filter(mine), erase), False)
                        flags.append(np.asarray(erased.to_numpy(zero_copy_only=False), dtype=bool)[found])
                        waiting += int(found.sum())
                    del found
                del types, ids, keys, actions
                if waiting >= self.verify_rows:
                    check_in_system()
                    waiting = 0
        check_in_system()
        for record_type, n in present.items():
            if n:
                log.error("%s: %d %s records the ledger marks gone are still present", self.system, n, record_type)
        return checked, sum(present.values())


class TextIds(Sequence[str]):
    """Record ids held as one Arrow text array, a few bytes each rather than a Python string
    each: what the engine hands ``still_present`` (a newsletter batch is up to 200,000 ids).
    Read as a sequence of texts; a slice comes out as a list."""

    def __init__(self, array: pa.Array):
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, at):  # noqa: ANN001 - an index or a slice, as a sequence takes
        if isinstance(at, slice):
            return self.array[at].to_pylist()
        return self.array[at].as_py()

    def __iter__(self) -> Iterator[str]:
        for start in range(0, len(self.array), 10_000):
            yield from self.array.slice(start, 10_000).to_pylist()


@dataclass(frozen=True)
class _Group:
    """One record type and action of the plan, as the erase loop takes it: rows ``start`` to
    ``stop``, less those earlier attempts finished (``done``, keys), those earlier runs carried
    over (``carried``) first."""

    record_type: str
    action: Action
    start: int
    stop: int
    done: frozenset[str]
    carried: frozenset[str]
    finished: int  # how many of the rows are in ``done``


class _Taker:
    """A group's rows to do, handed out a batch at a time from the slices they are read in."""

    def __init__(self, chunks: Iterator[pd.DataFrame]):
        self._chunks = chunks
        self._left: pd.DataFrame | None = None

    def take(self, n: int) -> pd.DataFrame | None:
        """The next ``n`` rows (fewer at the end); ``None`` when none are left."""
        parts, have = [], 0
        while have < n:
            if self._left is None or not len(self._left):
                self._left = next(self._chunks, None)
                if self._left is None:
                    break
                continue
            part, self._left = self._left.iloc[: n - have], self._left.iloc[n - have :]
            parts.append(part)
            have += len(part)
        if not parts:
            return None
        return parts[0] if len(parts) == 1 else pd.concat(parts, ignore_index=True)

    def rest(self) -> Iterator[pd.DataFrame]:
        if self._left is not None and len(self._left):
            yield self._left
        self._left = None
        yield from self._chunks


class _WriteAhead:
    """The destructive plan rows' write-ahead, in the order the erase loop takes them: per group
    (record type and action) chunk by chunk, each chunk one transaction, in a thread of its own
    that reads the plan a slice at a time as the loop does. A group's first chunk is its first
    batch (when smaller than a chunk), so that the first batch of a system that erases a
    hundred at a time waits for its hundred entries, not for fifty thousand. ``wait`` holds a
    batch until its rows' entries are committed; ``close`` waits for the whole plan, so that a
    step that stops on the way still leaves every plan row in the ledger."""

    chunk = 50_000

    def __init__(self, engine: ErasureEngine, rows: PlanRows, groups: list[_Group], known: dict[str, frozenset[str]]):
        """``known``: per record type, the keys the ledger has already (not written again)."""
        self._engine, self._rows, self._groups, self._known = engine, rows, groups, known
        self._changed = threading.Condition()
        self._covered = [0] * len(groups)  # per group: rows in the loop's order whose entries are in
        self._complete = [False] * len(groups)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ledger-write-ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            written = sum(self._write_group(number, group) for number, group in enumerate(self._groups))
            if written >= 10_000:
                self._engine.ledger.analyze()
        except BaseException as error:  # handed to the loop's next wait
            with self._changed:
                self._error = error
        finally:
            with self._changed:
                self._changed.notify_all()

    def _write_group(self, number: int, group: _Group) -> int:
        engine = self._engine
        slice_rows = engine._slice_rows(group.record_type)
        chunk_rows = min(self.chunk, slice_rows)  # a chunk is built while the loop holds its own slice
        limit = max(1, min(chunk_rows, batch_size(engine.adapter, group.record_type)))
        known = self._known.get(group.record_type)
        pending: list[pd.DataFrame] = []
        waiting = seen = written = 0
        for chunk in engine._todo(self._rows, group, _ENTRY_SOURCE, slice_rows):
            new = np.flatnonzero(~chunk["record_key"].isin(known).to_numpy(dtype=bool)) if known else np.arange(len(chunk))
            while len(new):
                take, new = new[: limit - waiting], new[limit - waiting :]
                pending.append(chunk.iloc[take])
                waiting += len(take)
                if waiting == limit:
                    self._write(pending)
                    written += waiting
                    self._publish(number, seen + int(take[-1]) + 1)
                    pending, waiting, limit = [], 0, chunk_rows
            seen += len(chunk)
            if not waiting:
                self._publish(number, seen)
        if pending:
            self._write(pending)
            written += waiting
        self._publish(number, seen, complete=True)
        return written

    def _publish(self, number: int, covered: int, complete: bool = False) -> None:
        with self._changed:
            self._covered[number] = covered
            self._complete[number] = self._complete[number] or complete
            self._changed.notify_all()

    def _write(self, pending: list[pd.DataFrame]) -> None:
        # Shaped and split in Arrow: the same through pandas cost four times the CPU, in the
        # thread that writes beside the erase loop and the system's deletions on the same cores.
        engine = self._engine
        expected = sum(len(p) for p in pending)
        part = pa.concat_tables([_texts(_arrow(p)) for p in pending])
        if "policy_version" not in part.column_names:
            versions = [(engine.policy_version, part)]
        else:
            # A row without a version is the run's (as for the held and deferred rows), never left out.
            column = pc.fill_null(part.column("policy_version"), engine.policy_version)
            versions = [(str(v), part.filter(pc.equal(column, v))) for v in pc.unique(column).to_pylist()]
        if sum(rows.num_rows for _, rows in versions) != expected:
            # A row left out here would be erased without an entry: stop the step instead.
            raise RuntimeError(f"{engine.system}: the write-ahead of a chunk of {expected} plan rows lost some of them")
        for version, rows in versions:
            engine.ledger.write_ahead(engine.run_id, version, engine.system, _entry_table(rows), status=str(Status.PLANNED), analyze=False)

    def wait(self, group: int, upto: int | None = None) -> None:
        """Until the entries of the group's first ``upto`` rows in the loop's order (all when
        ``None``) are committed; raises the write-ahead's error when they never will be."""
        with self._changed:
            while not (self._complete[group] or (upto is not None and self._covered[group] >= upto)):
                if self._error is not None:
                    raise self._error
                self._changed.wait()

    def wait_all(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        self._thread.join()


def _chunks_of(plan: pd.DataFrame | Iterable[pd.DataFrame | pa.RecordBatch], size: int) -> Iterator:
    """A frame in slices of ``size`` rows; chunks as given."""
    if isinstance(plan, pd.DataFrame):
        for start in range(0, len(plan), size):
            yield plan.iloc[start : start + size]
        return
    yield from plan


def _rows_in(chunk: pd.DataFrame | pa.RecordBatch) -> int:
    return len(chunk) if isinstance(chunk, pd.DataFrame) else chunk.num_rows


def _rows_of(chunk: pd.DataFrame | pa.RecordBatch, start: int, size: int) -> pd.DataFrame | pa.RecordBatch:
    """Rows ``start`` to ``start + size`` of a chunk (an Arrow slice: no copy)."""
    return chunk.iloc[start : start + size] if isinstance(chunk, pd.DataFrame) else chunk.slice(start, size)


def _plan_columns(chunk: pd.DataFrame | pa.RecordBatch) -> tuple[list[str], ...]:
    """A plan chunk's record types, ids (as text, the ledger's and the adapters' form), keys and
    actions."""
    if isinstance(chunk, pd.DataFrame):
        columns = [chunk[c].astype(str).tolist() for c in ("record_type", "record_id")] + [chunk["record_key"].tolist()]
        return (*columns, chunk["action"].astype(str).tolist())
    return tuple(pc.cast(chunk.column(c), pa.string()).to_pylist() for c in ("record_type", "record_id", "record_key", "action"))


def _plan_arrays(chunk: pd.DataFrame | pa.RecordBatch) -> tuple[pa.Array, ...]:
    """A plan chunk's record types, ids, keys and actions as Arrow texts (``_plan_columns`` as
    Arrow arrays: a verify of a million erasures makes no Python text of an id)."""
    if isinstance(chunk, pd.DataFrame):
        return tuple(pa.array(column, pa.string()) for column in _plan_columns(chunk))
    return tuple(pc.cast(chunk.column(c), pa.string()) for c in ("record_type", "record_id", "record_key", "action"))


def _arrow(plan: pd.DataFrame) -> pa.Table:
    """A plan's entry columns (those it has) as an Arrow table, for :func:`_entry_table`."""
    return pa.Table.from_pandas(plan[[c for c in _ENTRY_SOURCE if c in plan]], preserve_index=False)


def _texts(table: pa.Table) -> pa.Table:
    """Every column as text: slices of a plan read apart (each its own categories, a column of
    nothing but nulls) made alike, to be joined."""
    return pa.table({name: pc.cast(table.column(name), pa.string()) for name in table.column_names})


def _entry_table(part: pa.Table) -> pa.Table:
    """Ledger entries for plan rows given as an Arrow table, column by column: the rule id cut
    to its column's width, a missing or empty hold null and a given one cut to its width, a
    deferral recorded as the erasure it puts off. In Arrow, not pandas: through pandas the same
    cost four times the CPU, in the thread that writes ahead beside the erase loop."""

    def text(name: str) -> pa.Array:
        return pc.cast(part.column(name), pa.string())

    action = text("action")
    if "hold" in part.column_names:
        hold = text("hold")  # a missing or empty hold is null
        hold = pc.if_else(pc.equal(hold, ""), pa.scalar(None, pa.string()), pc.utf8_slice_codeunits(hold, 0, _HOLD_WIDTH))
    else:
        hold = pa.nulls(len(part), pa.string())
    return pa.table({
        "record_type": text("record_type"),
        "record_key": text("record_key"),
        "rule_id": pc.utf8_slice_codeunits(text("rule_id"), 0, _RULE_WIDTH),
        "action": pc.if_else(pc.equal(action, str(Action.DEFER)), str(Action.ERASE), action),
        "hold": hold,
    })


__all__ = ["PLAN_CATEGORIES", "PLAN_COLUMNS", "ErasureEngine", "ErasureResult", "StateCheck"]
