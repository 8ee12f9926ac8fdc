"""Plan one system from its extracted frames: quarantine, derive, rules, pseudonyms, holds.

This is the whole of a run's plan step without the I/O, so that the nightly pipeline (which
reads the frames from its staging area) and the policy-change preview (which plans the same
in-memory extract under two policies) cannot drift apart. Pure: frames and policy in, plan out;
nothing is read from or written to any system, staging area or ledger.

Record types are planned in the system's order (``records.record_types_of``), a part at a time
(``plan_parts``): ticket requesters are judged after their tickets, because
``derive.TicketParties`` completes a requester frame from every ticket and its plan.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from retention.domain.derive import LISTED_AGAIN, TICKETS, USERS, TicketParties, kept_rows, with_parties
from retention.domain.engine import empty_plan, plan_record_type
from retention.domain.holds import Holds
from retention.domain.keys import duplicated, duplicated_in_parts, last_listed_in_parts
from retention.domain.policy import Policy
from retention.domain.pseudonyms import Pseudonymizer
from retention.domain.quarantine import split_quarantine
from retention.domain.records import SOURCE_HOLDS, record_types_of
from retention.domain.statuses import DESTRUCTIVE, Action

# The order the erasure engine takes a record type's actions in; what erases nothing comes after.
ERASE_ACTIONS = (Action.MINIMISE, Action.ERASE)


def erase_order(plan: pd.DataFrame | pa.Table, record_types: Sequence[str]) -> np.ndarray:
    """The positions of ``plan``'s rows in the order the erasure engine takes them: by record
    type (``record_types``' order; any other after, in the order they first appear), then action
    (``ERASE_ACTIONS``, then the rest), then record id, shorter ids first and then as text (which
    is numeric order for whole numbers: a batch holds neighbouring records, which a database
    keeps on neighbouring pages). Stable: rows alike keep their order.

    A plan staged in this order is read by the erase step a slice at a time, each record type
    and action one run of rows, instead of whole (``runs.erasing``). ``plan``: a frame, or the
    same columns in Arrow (the plan step sorts a record type's plan that way)."""
    if len(plan) < 2:
        return np.arange(len(plan))

    def column(name: str) -> pa.ChunkedArray:
        if isinstance(plan, pa.Table):
            return plan.column(name)
        return pa.chunked_array([pa.array(plan[name], from_pandas=True)])

    def rank(name: str, order: Sequence[str]) -> np.ndarray:
        values = column(name).combine_chunks()
        encoded = values if pa.types.is_dictionary(values.type) else pc.dictionary_encode(values)
        at = {str(v): i for i, v in enumerate(order)}
        ranks = [at.get(str(v), len(at) + i) for i, v in enumerate(encoded.dictionary.to_pylist())]
        codes = pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False)
        return np.asarray([*ranks, len(at) + len(ranks)], dtype=np.int64)[codes]  # a missing value (-1) last

    ids = pc.cast(column("record_id"), pa.string())
    keys = pa.table({
        "type": rank("record_type", record_types),
        "action": rank("action", [str(a) for a in ERASE_ACTIONS]),
        "length": pc.utf8_length(ids),
        "id": ids,
    })
    return pc.sort_indices(keys, sort_keys=[(c, "ascending") for c in keys.column_names]).to_numpy()


def planned_counts(plan: pd.DataFrame) -> Counter:
    """How many rows of ``plan`` each (rule, action) has."""
    if plan.empty:
        return Counter()
    by = plan.groupby(["rule_id", "action"], observed=True).size()
    return Counter({(str(rule), str(action)): int(n) for (rule, action), n in by.items() if n})


def fallback_counts(plan: pd.DataFrame) -> dict[str, int]:
    """``{rule: n}`` of the rows of ``plan`` planned by a rule's fallback clock (their own missing)."""
    if plan.empty or "fallback_clock" not in plan:
        return {}
    by = plan.loc[plan["fallback_clock"].fillna(False).to_numpy(dtype=bool)].groupby("rule_id", observed=True).size()
    return {str(rule): int(n) for rule, n in by.items() if n}


def _shown(planned: Counter) -> dict[str, int]:
    return {f"{rule}/{action}": n for (rule, action), n in sorted(planned.items())}


@dataclass
class SystemPlan:
    """A system's plan and what it was made from (every frame keyed by record type)."""

    plan: pd.DataFrame  # engine.PLAN_COLUMNS, plus record_key when a pseudonymizer was given
    clean: dict[str, pd.DataFrame] = field(default_factory=dict)  # the frames the engine judged
    quarantined: pd.DataFrame = field(default_factory=pd.DataFrame)  # record_type, record_id, reason[, record_key]
    quarantine_counts: dict[str, dict[str, int]] = field(default_factory=dict)  # record type -> reason -> n
    clean_counts: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # time per phase, summed over record types

    @property
    def destructive(self) -> pd.DataFrame:
        return self.plan[self.plan["action"].isin(DESTRUCTIVE).to_numpy()]

    def planned_counts(self) -> dict[str, int]:
        """``{"rule/action": n}``, the shape the run's plan summary and report use."""
        return _shown(planned_counts(self.plan))

    def fallback_counts(self) -> dict[str, int]:
        """``{rule: n}`` of the records planned by a rule's fallback clock (their own missing)."""
        return fallback_counts(self.plan)

    def add(self, part: PlanPart) -> None:
        """Count a part of the plan in (not its frames: ``plan_system`` gathers those)."""
        rt = part.record_type
        self.clean_counts[rt] = self.clean_counts.get(rt, 0) + len(part.clean)
        if part.quarantine_counts:
            counts = self.quarantine_counts.setdefault(rt, {})
            for reason, n in part.quarantine_counts.items():
                counts[reason] = counts.get(reason, 0) + n
        for phase, took in part.seconds.items():
            self.seconds[phase] = round(self.seconds.get(phase, 0.0) + took, 3)

    def summary(self) -> dict:
        return {
            "planned": self.planned_counts(), "fallback_clock": self.fallback_counts(),
            "quarantined": self.quarantine_counts, "clean": self.clean_counts,
        }


class PlanTally:
    """A plan's summary (``SystemPlan.summary``'s), summed a part at a time: the plan step's,
    which never holds the whole plan."""

    def __init__(self) -> None:
        self._counts = SystemPlan(plan=empty_plan())
        self._planned: Counter = Counter()
        self._fallback: Counter = Counter()

    def add(self, part: PlanPart) -> None:
        self._counts.add(part)
        self._planned.update(planned_counts(part.plan))
        self._fallback.update(fallback_counts(part.plan))

    @property
    def seconds(self) -> dict[str, float]:
        """Time per phase, summed over the parts."""
        return self._counts.seconds

    def summary(self) -> dict:
        return {**self._counts.summary(), "planned": _shown(self._planned), "fallback_clock": dict(sorted(self._fallback.items()))}


class ExtractParts(Protocol):
    """A system's extract, a record type at a time: its ids, and its rows, a part at a time."""

    def has(self, record_type: str) -> bool: ...

    def ids(self, record_type: str) -> Iterator[pd.Series]: ...

    def parts(self, record_type: str) -> Iterator[pd.DataFrame]: ...

    def whole(self, record_type: str) -> pd.DataFrame | None: ...


class InMemoryExtract:
    """Frames in memory as ``ExtractParts``; ``part_rows`` cuts each into parts of that many rows
    (None: each whole, one part)."""

    def __init__(self, frames: Mapping[str, pd.DataFrame], part_rows: int | None = None):
        self.frames, self.part_rows = frames, part_rows

    def has(self, record_type: str) -> bool:
        return self.frames.get(record_type) is not None

    def ids(self, record_type: str) -> Iterator[pd.Series]:
        for part in self.parts(record_type):
            yield part["record_id"]

    def parts(self, record_type: str) -> Iterator[pd.DataFrame]:
        frame = self.frames[record_type]
        step = self.part_rows or max(len(frame), 1)
        for start in range(0, max(len(frame), 1), step):
            yield frame.iloc[start : start + step]

    def whole(self, record_type: str) -> pd.DataFrame | None:
        return self.frames.get(record_type)


@dataclass
class PlanPart:
    """What planning made of a part of a record type's extract."""

    record_type: str
    clean: pd.DataFrame  # the rows the engine judged
    plan: pd.DataFrame
    quarantined: pd.DataFrame  # record_id, reason, record_type[, record_key]
    quarantine_counts: dict[str, int]
    seconds: dict[str, float]


def plan_parts(
    system: str,
    extract: ExtractParts,
    policy: Policy,
    as_of: datetime,
    *,
    now: datetime,
    source_holds: pd.DataFrame | None = None,
    ledger_holds: pd.DataFrame | list | None = None,
    pseudonymizer: Pseudonymizer | None = None,
) -> Iterator[PlanPart]:
    """Plan ``system`` a part of a record type's extract at a time, in the system's record type
    order, each part as the extract gives it. Whatever the parts, the rows are judged as if
    each record type were planned whole: what needs every row is found first over the ids alone
    (which listing of a record is judged, which ids are duplicates), and a ticket requester is
    judged from every ticket's parties and plan (``derive.TicketParties``). Every other step is
    a row's own: quarantine, the rules (a record's rules pick its earliest deadline among its
    own rows), pseudonyms and holds.

    ``now`` is when the extract was made (records dated after it are quarantined).
    ``source_holds``: the system's own hold list by record id (default: the extract's
    ``legal_hold``, the CRM's table). ``ledger_holds``: manual holds by pseudonym
    (``Ledger.holds()``); they need ``pseudonymizer``. The holds in force at ``as_of`` are
    applied per record type before later types are derived, so a held ticket still counts as
    remaining when its requester is judged.
    """
    as_of_ts = pd.Timestamp(as_of)
    as_of_ts = as_of_ts.tz_localize("UTC") if as_of_ts.tzinfo is None else as_of_ts.tz_convert("UTC")
    now_ts = pd.Timestamp(now)
    if source_holds is None:
        source_holds = extract.whole(SOURCE_HOLDS)
    holds = Holds.at(as_of_ts, source=source_holds, ledger=ledger_holds)
    if holds.by_key and pseudonymizer is None:
        raise ValueError("holds by pseudonym need a pseudonymizer")
    parties = TicketParties()
    for record_type in record_types_of(system):
        if not extract.has(record_type):
            continue
        # Duplicate keys over the whole record type (the rows judged), not within a part.
        started = time.perf_counter()
        if record_type in LISTED_AGAIN:  # which listing is judged: the last of each id
            keep = last_listed_in_parts(lambda record_type=record_type: extract.ids(record_type))
            if keep is not None:  # a fingerprint an id: one listing of each kept, so none twice
                duplicates = np.zeros(int(keep.sum()), dtype=bool)
            else:  # an id without a fingerprint (missing, not ASCII): the ids whole
                ids = pd.concat(list(extract.ids(record_type)), ignore_index=True)
                keep = kept_rows(record_type, ids)
                duplicates = duplicated(ids[keep].reset_index(drop=True) if keep is not None else ids)
                del ids
        else:  # a fingerprint a key, the ids read a part at a time
            keep = None
            duplicates = duplicated_in_parts(lambda record_type=record_type: extract.ids(record_type))
        if record_type == TICKETS:
            parties.unique_tickets = keep is not None
        before = time.perf_counter() - started  # counted with the type's first part
        read = judged = 0
        for part in extract.parts(record_type):
            started = time.perf_counter() - before
            before = 0.0
            rows = len(part)
            if keep is not None:
                part = part.loc[keep[read : read + rows]]
            read += rows
            if record_type == TICKETS:
                part = with_parties(part)
                parties.add_tickets(part)
            elif record_type == USERS:
                part = parties.derive_users(part)
            if judged + len(part) > len(duplicates):
                raise RuntimeError(f"{record_type}: the extract's parts hold more rows than its ids")
            clean, bad, counts = split_quarantine(part, record_type, policy, now_ts, duplicates=duplicates[judged : judged + len(part)])
            judged += len(part)
            quarantined_at = time.perf_counter()
            p = plan_record_type(clean, record_type, policy, as_of_ts)
            ruled_at = time.perf_counter()
            if pseudonymizer is not None:
                p["record_key"] = pseudonymizer.column(p["record_type"], p["record_id"])
            p = holds.apply(p)
            if record_type == TICKETS:
                parties.add_plan(p)
            bad = bad.assign(record_type=record_type)
            if pseudonymizer is not None:
                bad["record_key"] = pseudonymizer.column(bad["record_type"], bad["record_id"])
            seconds = {
                "quarantine": quarantined_at - started,
                "rules": ruled_at - quarantined_at,
                "pseudonyms_and_holds": time.perf_counter() - ruled_at,
            }
            yield PlanPart(record_type, clean, p, bad, counts, seconds)
        # The duplicates were found over the ids read apart from the rows: they must be the
        # same rows, or a duplicate key could go unquarantined.
        if judged != len(duplicates):
            raise RuntimeError(f"{record_type}: the extract's parts hold {judged} rows, its ids {len(duplicates)}")


def plan_system(
    system: str,
    frames: Mapping[str, pd.DataFrame],
    policy: Policy,
    as_of: datetime,
    *,
    now: datetime,
    source_holds: pd.DataFrame | None = None,
    ledger_holds: pd.DataFrame | list | None = None,
    pseudonymizer: Pseudonymizer | None = None,
    part_rows: int | None = None,
) -> SystemPlan:
    """Plan ``system`` from its extracted ``frames`` (record type -> frame, as the adapter wrote
    them), in memory: ``plan_parts`` over them, each record type one part (or parts of
    ``part_rows``), gathered into one ``SystemPlan``."""
    result = SystemPlan(plan=empty_plan())
    plans: list[pd.DataFrame] = []
    clean: dict[str, list[pd.DataFrame]] = {}
    quarantined: list[pd.DataFrame] = []
    for part in plan_parts(
        system, InMemoryExtract(frames, part_rows), policy, as_of, now=now,
        source_holds=source_holds, ledger_holds=ledger_holds, pseudonymizer=pseudonymizer,
    ):
        result.add(part)
        clean.setdefault(part.record_type, []).append(part.clean)
        if len(part.plan):  # an empty part's columns have dtypes of their own: leave them out
            plans.append(part.plan)
        if len(part.quarantined):
            quarantined.append(part.quarantined)
    result.clean = {rt: f[0] if len(f) == 1 else pd.concat(f) for rt, f in clean.items()}
    plan = pd.concat(plans, ignore_index=True) if plans else empty_plan()
    if pseudonymizer is not None and "record_key" not in plan:
        plan["record_key"] = pd.Series(dtype="string")
    result.plan = plan
    if quarantined:
        result.quarantined = pd.concat(quarantined, ignore_index=True)
    else:
        cols = ["record_id", "reason", "record_type"] + (["record_key"] if pseudonymizer is not None else [])
        result.quarantined = pd.DataFrame({c: pd.Series(dtype="string") for c in cols})
    return result
