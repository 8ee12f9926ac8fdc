"""The validate step's suites over one record type, a partition of its rows at a time.

The suites (``checks.validation``) run over a frame in memory. Run over a record type's whole
clean extract and its whole plan, the step's memory grew with the system: 441 MB at 250,000
CRM contacts and 607 MB at a million. A record type with more rows than ``PART_ROWS`` (in its
clean extract or in the plan) is therefore checked in partitions of about that many rows: its
rows are read from staging once, a slice at a time, each slice's rows staged to their
partition's frame, and the partitions read back one at a time. The rows are split by a hash of
their ids (``domain.keys.partitions``), the extract's and the plan's alike, so that

* rows with the same id are in one partition: a partition's uniqueness checks count what the
  whole's would, and
* a plan row and its record in the extract are in one partition: the plan's check finds the
  record's protecting values (``plan_check_frame``) as it would over the whole.

Each partition runs the whole-frame suites; ``checks.validation.combine`` makes one outcome of
each suite's partitions. A record type within ``PART_ROWS`` is one partition: the suites run
over it whole, as before.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pandas as pd
import pyarrow as pa

from retention.checks.validation import ValidationOutcome, combine, plan_check_frame, validate_extract, validate_plan
from retention.domain.holds import Holds
from retention.domain.keys import fingerprints, partitions
from retention.domain.policy import Policy
from retention.domain.records import RECORD_TYPES
from retention.domain.statuses import DESTRUCTIVE
from retention.runs.context import Stopwatch
from retention.runs.plan_rows import Layout, PlanRows
from retention.store.staging import RunStaging

# Rows of a record type (its clean extract's or its plan's) checked at a time, at most about.
PART_ROWS = 250_000
# Rows read from staging at a time while a partition is gathered; the plan step writes the
# clean extract in row groups of as many (a read takes whole row groups).
READ_ROWS = 50_000

# The plan columns the suites and the hold check read (and the record type, to pick a type's rows).
VALIDATED_PLAN_COLUMNS = ("record_type", "record_id", "record_key", "action", "rule_id", "deadline")


def validated_columns(record_type: str) -> list[str]:
    """The columns of a record type's clean extract its suite and the plan's check read."""
    rt = RECORD_TYPES[record_type]
    return list(dict.fromkeys((
        "record_id", *rt.required, *rt.past_only, *rt.must_be_true, *rt.protected, *rt.unprotected_when,
    )))


def _chunks(
    rows: PlanRows, columns: Sequence[str], ranges: Sequence[tuple[int, int]], record_type: str | None,
    categories: Sequence[str],
) -> Iterator[pd.DataFrame]:
    """``columns`` of rows ``ranges``, a slice at a time; of ``record_type`` only when given."""
    wanted = list(dict.fromkeys((*columns, *(("record_type",) if record_type else ()))))
    for start, stop in ranges:
        for chunk in rows.chunks(wanted, start, stop, rows=READ_ROWS, categories=categories):
            if record_type is not None:
                mine = (chunk["record_type"].astype(str) == record_type).to_numpy(dtype=bool)
                if not mine.all():
                    chunk = chunk[mine]
            yield chunk


def _empty(rows: PlanRows, columns: Sequence[str], categories: Sequence[str]) -> pd.DataFrame:
    """No rows, with the columns and dtypes a read of ``rows`` gives."""
    first = next(iter(rows.chunks(list(columns), 0, 1, categories=categories)), None)
    return first.iloc[:0] if first is not None else rows.whole(list(columns), categories)


def partitioned(
    rows: PlanRows, columns: Sequence[str], ranges: Sequence[tuple[int, int]], parts: int,
    record_type: str | None = None, categories: Sequence[str] = (), scratch: Scratch | None = None,
) -> Iterator[pd.DataFrame]:
    """The rows of ``ranges`` (of ``record_type`` when given) in ``parts`` partitions by their
    ``record_id`` (:func:`domain.keys.partitions`), one frame each, in partition order; the
    partitions are never all held at once: the rows are read once and each partition staged
    apart (``scratch``) before this returns, then read back and removed, one at a time. Close
    the iterator when done: what is left staged is removed."""
    columns = list(dict.fromkeys((*columns, *(("record_type",) if record_type else ()))))
    if parts <= 1:
        return _whole(rows, columns, ranges, record_type, categories)
    if scratch is None:
        raise ValueError("rows in partitions need a scratch place in staging")
    return _spill(rows, columns, ranges, parts, record_type, categories, scratch)


def _whole(
    rows: PlanRows, columns: list[str], ranges: Sequence[tuple[int, int]], record_type: str | None, categories: Sequence[str],
) -> Iterator[pd.DataFrame]:
    frames = list(_chunks(rows, columns, ranges, record_type, categories))
    yield pd.concat(frames, ignore_index=True) if frames else _empty(rows, columns, categories)


@dataclass(frozen=True)
class Scratch:
    """Where a record type's partitions are staged while it is checked: ``name``_<n> frames of
    ``system`` in the run's staging."""

    staging: RunStaging
    system: str
    name: str


def _spill(
    rows: PlanRows, columns: list[str], ranges: Sequence[tuple[int, int]], parts: int,
    record_type: str | None, categories: Sequence[str], scratch: Scratch,
) -> _Spilled:
    """:func:`partitioned` in one read of the rows: each slice's rows go to their partition's
    staged frame. Reading the rows once per partition instead doubled the validate step's time
    at a million CRM contacts."""
    names = [f"{scratch.name}_{part}" for part in range(parts)]
    writers = [scratch.staging.frame_writer(scratch.system, name) for name in names]
    try:
        for chunk in _chunks(rows, columns, ranges, record_type, categories):
            code = partitions(chunk["record_id"], parts)
            for part in np.unique(code).tolist():
                writers[part].write(chunk[code == part])
        for writer in writers:
            writer.close()
    except BaseException:
        for writer in writers:
            writer.abandon()
        raise
    return _Spilled(scratch, names, [writer.rows for writer in writers], lambda: _empty(rows, columns, categories), columns, categories)


class _Spilled(Iterator[pd.DataFrame]):
    """Staged partitions, each read back whole and its file removed as it is taken; ``close``
    removes those not taken (a step that stops on the way leaves no partition behind)."""

    def __init__(self, scratch: Scratch, names: list[str], sizes: list[int], empty, columns: list[str], categories: Sequence[str]):
        self._scratch, self._names, self._sizes, self._empty = scratch, names, sizes, empty
        self._columns, self._categories = columns, categories
        self._next = 0

    def __next__(self) -> pd.DataFrame:
        if self._next >= len(self._names):
            raise StopIteration
        name, size = self._names[self._next], self._sizes[self._next]
        self._next += 1
        frame = self._scratch.staging.read_frame(self._scratch.system, name, self._columns, self._categories) if size else self._empty()
        _remove(self._scratch, name)
        return frame

    def close(self) -> None:
        for name in self._names:
            _remove(self._scratch, name)


def _remove(scratch: Scratch, name: str) -> None:
    path = scratch.staging.system_dir(scratch.system) / f"{name}.parquet"
    if path.exists():
        path.unlink()


def validate_record_type(
    clean_rows: PlanRows, plan_rows: PlanRows, plan_ranges: Sequence[tuple[int, int]], plan_count: int,
    record_type: str, now: datetime, policy: Policy, as_of: datetime, holds: Holds, clock: Stopwatch,
    staging: tuple[RunStaging, str] | None = None,
) -> tuple[ValidationOutcome, ValidationOutcome]:
    """The extract's and the plan's suites of ``record_type``: its clean extract (``clean_rows``)
    and its rows of the plan (within ``plan_ranges``, ``plan_count`` of them at most), a
    partition at a time. ``clock``'s laps: ``read`` for staging, ``checks`` for the suites.
    ``staging``: the run's staging and system, where the partitions are staged while checked."""
    parts = max(1, math.ceil(max(clean_rows.num_rows, plan_count) / PART_ROWS))
    clean_scratch = plan_scratch = None
    if staging is not None:
        clean_scratch = Scratch(*staging, f"validating_clean_{record_type}")
        plan_scratch = Scratch(*staging, f"validating_plan_{record_type}")
    hold_ids, held_keys = holds.ids(record_type), holds.keys(record_type)
    # Both are staged in partitions before the first is read back: the plan's spill ran beside
    # the extract's first partition, about 12 MB more at a million newsletter members (a stack
    # sampler's figure).
    cleans = partitioned(clean_rows, validated_columns(record_type), [(0, clean_rows.num_rows)], parts, scratch=clean_scratch)
    try:
        plans = partitioned(
            plan_rows, VALIDATED_PLAN_COLUMNS, plan_ranges, parts, record_type, categories=("record_type",), scratch=plan_scratch,
        )
    except BaseException:
        cleans.close()
        raise
    extract_outcomes, plan_outcomes = [], []
    # The plan's suite runs over the checked rows of several partitions at once, up to
    # ``PART_ROWS`` of them: a plan is often much smaller than its extract (a tenth of the
    # newsletter's members), and each run of a suite has a fixed cost (tens of milliseconds).
    # Whole partitions are put together, so an id twice in the plan is still in one run.
    checked: list[pd.DataFrame] = []

    def run_plan_suite() -> None:
        if checked:
            plan_outcomes.append(validate_plan(pd.concat(checked, ignore_index=True), record_type, policy, as_of))
            checked.clear()

    try:
        for _ in range(parts):
            clean, plan = next(cleans), next(plans)
            clock.lap("read")
            # The ids' fingerprints serve the extract's uniqueness check and the plan's lookup.
            prints = fingerprints(clean["record_id"]) if len(clean) else None
            extract_outcomes.append(validate_extract(clean, record_type, now, prints))
            check = plan_check_frame(plan, clean, record_type, hold_ids, prints)
            if held_keys:
                destructive = check["action"].isin(DESTRUCTIVE).to_numpy()
                check["erases_held_record"] |= destructive & check["record_key"].isin(held_keys).to_numpy()
            check = check.drop(columns="record_key", errors="ignore")  # the suite does not read it
            if checked and sum(map(len, checked)) + len(check) > PART_ROWS:
                run_plan_suite()
            checked.append(check)
            clock.lap("checks")
            # A partition's frames go before the next is read, Arrow's freed buffers with them.
            del clean, plan, check, prints
            pa.default_memory_pool().release_unused()
        run_plan_suite()
        clock.lap("checks")
    finally:  # whatever stops the checks, no partition is left staged
        cleans.close()
        plans.close()
    return combine(f"extract_{record_type}", extract_outcomes), combine(f"plan_{record_type}", plan_outcomes)


def destructive_rows(plan_rows: PlanRows, shape: Layout | None = None) -> tuple[int, dict[str, int]]:
    """How many of the plan's rows erase or minimise, and how many per record type: from the
    plan's layout where it has one (found already, no read), else a slice at a time."""
    by_type: dict[str, int] = {}
    destructive = [str(a) for a in DESTRUCTIVE]
    if shape is not None:
        for record_type in shape.types:
            n = shape.rows(record_type, actions=destructive)
            if n:
                by_type[record_type] = n
        return sum(by_type.values()), by_type
    for chunk in plan_rows.chunks(["record_type", "action"], rows=200_000, categories=("record_type", "action")):
        mine = chunk["action"].astype(str).isin(destructive).to_numpy(dtype=bool)
        for record_type, n in chunk["record_type"][mine].astype(str).value_counts().items():
            by_type[str(record_type)] = by_type.get(str(record_type), 0) + int(n)
    return sum(by_type.values()), by_type


def carried_over_rows(plan_rows: PlanRows, carried: dict[str, set[str]]) -> int:
    """How many of the plan's destructive rows are among ``carried`` (record type -> keys an
    earlier run carried over): read only when some record type has a backlog."""
    carried = {t: keys for t, keys in carried.items() if keys}
    if not carried:
        return 0
    destructive = [str(a) for a in DESTRUCTIVE]
    n = 0
    for chunk in plan_rows.chunks(["record_type", "action", "record_key"], rows=READ_ROWS, categories=("record_type", "action")):
        is_destructive = chunk["action"].astype(str).isin(destructive).to_numpy(dtype=bool)
        types = chunk["record_type"].astype(str)
        for record_type, keys in carried.items():
            mine = is_destructive & (types == record_type).to_numpy(dtype=bool)
            if mine.any():
                n += int(chunk["record_key"][mine].isin(keys).sum())
    return n

