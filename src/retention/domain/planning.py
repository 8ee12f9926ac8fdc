"""Plan one system from its extracted frames: quarantine, derive, rules, pseudonyms, holds.

This is the whole of a run's plan step without the I/O, so that the nightly pipeline (which
reads the frames from its staging area) and the policy-change preview (which plans the same
in-memory extract under two policies) cannot drift apart. Pure: frames and policy in, plan out;
nothing is read from or written to any system, staging area or ledger.

Record types are planned in the system's order (``records.record_types_of``): ticket
requesters are judged after their tickets, because ``derive.derive_frame`` completes a
requester frame from the tickets planned before it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from retention.domain.derive import derive_frame
from retention.domain.engine import empty_plan, plan_record_type
from retention.domain.holds import Holds
from retention.domain.policy import Policy
from retention.domain.pseudonyms import Pseudonymizer
from retention.domain.quarantine import split_quarantine
from retention.domain.records import SOURCE_HOLDS, record_types_of
from retention.domain.statuses import DESTRUCTIVE, Action

_SO_FAR = ["record_type", "record_id", "action", "deadline"]


# The order the erasure engine takes a record type's actions in; what erases nothing comes after.
ERASE_ACTIONS = (Action.MINIMISE, Action.ERASE)


def erase_order(plan: pd.DataFrame, record_types: Sequence[str]) -> np.ndarray:
    """The positions of ``plan``'s rows in the order the erasure engine takes them: by record
    type (``record_types``' order; any other after, in the order they first appear), then action
    (``ERASE_ACTIONS``, then the rest), then record id, shorter ids first and then as text (which
    is numeric order for whole numbers: a batch holds neighbouring records, which a database
    keeps on neighbouring pages). Stable: rows alike keep their order.

    A plan staged in this order is read by the erase step a slice at a time, each record type
    and action one run of rows, instead of whole (``runs.erasing``)."""
    if len(plan) < 2:
        return np.arange(len(plan))

    def rank(column: str, order: Sequence[str]) -> np.ndarray:
        codes, values = pd.factorize(plan[column], sort=False)
        at = {str(v): i for i, v in enumerate(order)}
        ranks = [at.get(str(v), len(at) + i) for i, v in enumerate(values)]
        return np.asarray([*ranks, len(at) + len(ranks)], dtype=np.int64)[codes]  # a missing value (-1) last

    ids = pc.cast(pa.array(plan["record_id"], from_pandas=True), pa.string())
    keys = pa.table({
        "type": rank("record_type", record_types),
        "action": rank("action", [str(a) for a in ERASE_ACTIONS]),
        "length": pc.utf8_length(ids),
        "id": ids,
    })
    return pc.sort_indices(keys, sort_keys=[(c, "ascending") for c in keys.column_names]).to_numpy()


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
        if self.plan.empty:
            return {}
        by = self.plan.groupby(["rule_id", "action"]).size()
        return {f"{rule}/{action}": int(n) for (rule, action), n in by.items()}

    def fallback_counts(self) -> dict[str, int]:
        """``{rule: n}`` of the records planned by a rule's fallback clock (their own missing)."""
        if self.plan.empty or "fallback_clock" not in self.plan:
            return {}
        by = self.plan.loc[self.plan["fallback_clock"].fillna(False).to_numpy(dtype=bool)].groupby("rule_id").size()
        return {str(rule): int(n) for rule, n in by.items()}

    def summary(self) -> dict:
        return {
            "planned": self.planned_counts(), "fallback_clock": self.fallback_counts(),
            "quarantined": self.quarantine_counts, "clean": self.clean_counts,
        }


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
) -> SystemPlan:
    """Plan ``system`` from its extracted ``frames`` (record type -> frame, as the adapter wrote them).

    ``now`` is when the extract was made (records dated after it are quarantined).
    ``source_holds``: the system's own hold list by record id (default: ``frames["legal_hold"]``,
    the CRM's table). ``ledger_holds``: manual holds by pseudonym (``Ledger.holds()``); they
    need ``pseudonymizer``. The holds in force at ``as_of`` are applied per record type before
    later types are derived, so a held ticket still counts as remaining when its requester is
    judged.
    """
    as_of_ts = pd.Timestamp(as_of)
    as_of_ts = as_of_ts.tz_localize("UTC") if as_of_ts.tzinfo is None else as_of_ts.tz_convert("UTC")
    now_ts = pd.Timestamp(now)
    if source_holds is None:
        source_holds = frames.get(SOURCE_HOLDS)
    holds = Holds.at(as_of_ts, source=source_holds, ledger=ledger_holds)
    if holds.by_key and pseudonymizer is None:
        raise ValueError("holds by pseudonym need a pseudonymizer")

    plans: list[pd.DataFrame] = []
    quarantined: list[pd.DataFrame] = []
    result = SystemPlan(plan=empty_plan())
    plan_so_far = pd.DataFrame(columns=_SO_FAR)
    derived: dict[str, pd.DataFrame] = {}
    for record_type in record_types_of(system):
        frame = frames.get(record_type)
        if frame is None:
            continue
        started = time.perf_counter()
        frame = derive_frame(record_type, frame, plan_so_far, derived)
        derived[record_type] = frame
        clean, bad, counts = split_quarantine(frame, record_type, policy, now_ts)
        result.clean[record_type] = clean
        result.clean_counts[record_type] = len(clean)
        quarantined_at = time.perf_counter()
        p = plan_record_type(clean, record_type, policy, as_of_ts)
        ruled_at = time.perf_counter()
        if pseudonymizer is not None:
            p["record_key"] = pseudonymizer.column(p["record_type"], p["record_id"])
        p = holds.apply(p)
        for phase, took in (
            ("quarantine", quarantined_at - started),
            ("rules", ruled_at - quarantined_at),
            ("pseudonyms_and_holds", time.perf_counter() - ruled_at),
        ):
            result.seconds[phase] = round(result.seconds.get(phase, 0.0) + took, 3)
        plans.append(p)
        if len(p):
            plan_so_far = p[_SO_FAR] if plan_so_far.empty else pd.concat([plan_so_far, p[_SO_FAR]], ignore_index=True)
        if len(bad):
            quarantined.append(bad.assign(record_type=record_type))
            result.quarantine_counts[record_type] = counts

    plan = pd.concat(plans, ignore_index=True) if plans else empty_plan()
    if pseudonymizer is not None and "record_key" not in plan:
        plan["record_key"] = pd.Series(dtype="string")
    result.plan = plan
    if quarantined:
        q = pd.concat(quarantined, ignore_index=True)
        if pseudonymizer is not None:
            q["record_key"] = pseudonymizer.column(q["record_type"], q["record_id"])
        result.quarantined = q
    else:
        cols = ["record_id", "reason", "record_type"] + (["record_key"] if pseudonymizer is not None else [])
        result.quarantined = pd.DataFrame({c: pd.Series(dtype="string") for c in cols})
    return result
