"""The rule engine: record frames in, an erasure plan out. Pure, vectorised, no I/O.

For every record the engine finds the rules whose ``when`` matches, computes each rule's
deadline (clock, aligned if the rule says so, plus the period, or the opted-out period when
the person asked not to be contacted) by calendar arithmetic in local wall-clock time, turns
it back into a UTC instant and plans the record under the earliest deadline that has passed
at ``as_of``. Deadlines and as-of are compared as instants, never as wall-clock values: in
the repeated October hour 02:10 CET comes after 02:30 CEST, and validation checks the same
instants the engine compared. A record that lacks the rule's own clock is judged by the
rule's fallback clock when the policy gives one (the organisation's decision; the plan row
says so in ``fallback_clock``). Protected records (active relationships)
are never planned. A due record whose schema says so is planned ``minimise`` (a contact that
still has invoices: the person goes, the invoice fields bookkeeping law needs stay). Records
under a manual hold in force are planned ``hold`` (``retention.domain.holds``), which erases
nothing.

Because deadlines only pass as time goes on, a plan as of an earlier time is always a subset
of the plan as of a later time over the same records: a backfill never erases what a run
today would not.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pandas as pd

from retention.domain.durations import add_elapsed, local_naive_to_utc, shift_within_range, to_local_naive
from retention.domain.holds import Holds, in_force
from retention.domain.policy import Policy, Rule
from retention.domain.records import RECORD_TYPES
from retention.domain.statuses import Action

# ``blocks``: the id of the record that may only be erased once this one is gone (the schema's
# ``blocks``: a ticket's requester); <NA> for record types that block nothing.
# ``fallback_clock``: the period ran from the rule's fallback clock, its own being missing.
PLAN_COLUMNS = ["system", "record_type", "record_id", "rule_id", "clock", "deadline", "hold", "action", "blocks", "fallback_clock"]


def empty_plan() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "system": pd.Series(dtype="string"),
            "record_type": pd.Series(dtype="string"),
            "record_id": pd.Series(dtype="string"),
            "rule_id": pd.Series(dtype="string"),
            "clock": pd.Series(dtype="datetime64[us, UTC]"),
            "deadline": pd.Series(dtype="datetime64[us, UTC]"),
            "hold": pd.Series(dtype="string"),
            "action": pd.Series(dtype="string"),
            "blocks": pd.Series(dtype="string"),
            "fallback_clock": pd.Series(dtype="bool"),
        }
    )


def _isin(series: pd.Series, values: list) -> np.ndarray:
    # Booleans and integers arrive from YAML as Python values; compare on the same footing.
    return series.isin(values).fillna(False).to_numpy(dtype=bool)


def protected_mask(frame: pd.DataFrame, record_type: str, policy: Policy) -> np.ndarray:
    """Records that an active relationship protects: code floor plus the policy's own list."""
    rt = RECORD_TYPES[record_type]
    mask = np.zeros(len(frame), dtype=bool)
    for column, values in rt.protected.items():
        if column in frame:
            mask |= _isin(frame[column], list(values)) & ~_any_of(frame, rt.unprotected_when)
    for prot in policy.protections:
        if prot.records == record_type and prot.column in frame:
            mask |= _isin(frame[prot.column], prot.in_) & ~_any_of(frame, prot.unless)
    return mask


def _any_of(frame: pd.DataFrame, conditions: Mapping[str, object]) -> np.ndarray:
    """Records matching any of ``conditions`` (column -> values): an exception to a protection.
    A column the frame lacks matches nothing (the protection holds)."""
    mask = np.zeros(len(frame), dtype=bool)
    for column, values in conditions.items():
        if column in frame:
            mask |= _isin(frame[column], list(values))
    return mask


def when_mask(frame: pd.DataFrame, rule: Rule) -> np.ndarray:
    mask = np.ones(len(frame), dtype=bool)
    for column, values in rule.when.items():
        mask &= _isin(frame[column], values)
    return mask


def _own_clock(frame: pd.DataFrame, rule: Rule) -> pd.Series:
    """The rule's own clock in UTC; with several clock columns, the latest one present."""
    cols = rule.clocks
    if len(cols) == 1:
        return pd.to_datetime(frame[cols[0]], utc=True)
    return pd.concat([pd.to_datetime(frame[c], utc=True) for c in cols], axis=1).max(axis=1)


def clock_of(frame: pd.DataFrame, rule: Rule) -> tuple[pd.Series, np.ndarray]:
    """The clock each record's period runs from, and where it is the rule's fallback: only a
    record without the rule's own clock takes the first fallback clock it has."""
    clock = _own_clock(frame, rule)
    fallback = np.zeros(len(frame), dtype=bool)
    missing = clock.isna().to_numpy().copy()
    for col in rule.fallback_clocks:
        if not missing.any():
            break
        if col not in frame:
            continue
        value = pd.to_datetime(frame[col], utc=True)
        fill = missing & value.notna().to_numpy()
        if fill.any():
            clock = clock.where(~fill, value)
            fallback |= fill
            missing &= ~fill
    return clock, fallback


def _clock(frame: pd.DataFrame, rule: Rule) -> pd.Series:
    return clock_of(frame, rule)[0]


def _utc(as_of: datetime) -> pd.Timestamp:
    t = pd.Timestamp(as_of)
    return t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")


def _deadline(clock_utc: pd.Series, frame: pd.DataFrame, rule: Rule, tz: str) -> pd.Series:
    """The rule's deadline as a UTC instant. A calendar period (years, months, days) moves the
    local wall clock, then turns back into an instant: a wall-clock time that happens twice is
    its later instant, one that never happens the first instant after the gap (the record is
    kept the longer). A period without calendar part (P0D, PT12H) is elapsed time from the
    clock's own instant: P0D from 02:40 CEST in the repeated hour is 02:40 CEST, not CET."""
    clock_utc = clock_utc.astype("datetime64[us, UTC]")
    local = to_local_naive(clock_utc, tz)
    aligned = rule.clock_align == "next_calendar_year"
    if aligned:
        # 1 January after the calendar year the clock's last moment is in: a financial year
        # ending with 31 December 2025 (its end of day, 1 January 2026 00:00) ended in 2025.
        years = shift_within_range(local, -pd.Timedelta(microseconds=1)).dt.year + 1
        local = pd.to_datetime(
            pd.DataFrame({"year": years, "month": 1, "day": 1}).where(local.notna()), errors="coerce"
        ).astype(local.dtype)

    def after(duration) -> pd.Series:
        if not (aligned or duration.months or duration.days):
            return add_elapsed(clock_utc, duration.seconds)
        return local_naive_to_utc(duration.add_to(local), tz).astype("datetime64[us, UTC]")

    deadline = after(rule.duration)
    if rule.opted_out_duration is not None and "opted_out" in frame:
        opted = frame["opted_out"].fillna(False).to_numpy(dtype=bool)
        if opted.any():
            deadline = deadline.where(~opted, after(rule.opted_out_duration))
    return deadline


@dataclass
class RuleOutcome:
    """Per record and rule: does it apply, when is it due (a UTC instant), is it due as of the
    plan time."""

    applies: np.ndarray
    clock: pd.Series
    deadline: pd.Series
    due: np.ndarray


def evaluate_rule(frame: pd.DataFrame, rule: Rule, as_of: datetime, tz: str) -> RuleOutcome:
    applies = when_mask(frame, rule)
    clock = _clock(frame, rule)
    deadline = _deadline(clock, frame, rule, tz)
    due = applies & deadline.notna().to_numpy() & (deadline <= _utc(as_of)).fillna(False).to_numpy(dtype=bool)
    return RuleOutcome(applies, clock, deadline, due)


def plan_record_type(
    frame: pd.DataFrame,
    record_type: str,
    policy: Policy,
    as_of: datetime,
    holds: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Plan one record type. ``frame`` must already be free of quarantined rows. ``holds``: the
    system's own hold list by record id (planning applies every hold list through ``Holds``)."""
    rules = policy.rules_for(record_type)
    if frame.empty or not rules:
        return empty_plan()
    tz = policy.timezone
    as_of_utc = _utc(as_of)
    eligible = ~protected_mask(frame, record_type, policy)
    rt = RECORD_TYPES[record_type]
    blocks = rt.blocks[0] if rt.blocks and rt.blocks[0] in frame else None
    pieces = []
    for rule in rules:
        # Judge only the records the rule applies to: cheaper, and the clock of a record a rule
        # does not cover (an unconfirmed signup of a subscriber, say) never matters. Only the
        # columns the clock needs are taken row by row; record ids only for the records due.
        rows = np.flatnonzero(when_mask(frame, rule) & eligible)
        if not len(rows):
            continue
        needed = [c for c in dict.fromkeys((*rule.clocks, *rule.fallback_clocks, "opted_out")) if c in frame]
        candidates = frame[needed].iloc[rows]
        clock, fallback = clock_of(candidates, rule)
        deadline = _deadline(clock, candidates, rule, tz)
        due = (deadline.notna() & (deadline <= as_of_utc)).fillna(False).to_numpy(dtype=bool)
        if not due.any():
            continue
        piece = {
            "record_id": frame["record_id"].iloc[rows[due]].reset_index(drop=True),
            "rule_id": rule.id,
            "clock": clock[due].reset_index(drop=True),
            "deadline": deadline[due].reset_index(drop=True),
            "fallback_clock": fallback[due],
        }
        if blocks:
            piece["blocks"] = frame[blocks].iloc[rows[due]].astype("string").reset_index(drop=True)
        pieces.append(pd.DataFrame(piece))
    if not pieces:
        return empty_plan()
    plan = pd.concat(pieces, ignore_index=True)
    if len(pieces) > 1:
        # A record due under several rules is planned once, under its earliest deadline.
        plan = plan.sort_values(["deadline", "rule_id"], kind="stable").drop_duplicates("record_id", keep="first")
    plan["record_id"] = plan["record_id"].astype("string")
    plan["system"] = RECORD_TYPES[record_type].system
    plan["record_type"] = record_type
    plan["clock"] = pd.to_datetime(plan["clock"], utc=True)
    plan["deadline"] = pd.to_datetime(plan["deadline"], utc=True)
    plan["fallback_clock"] = plan["fallback_clock"].astype(bool)
    plan["action"] = str(Action.ERASE)
    plan["hold"] = pd.Series(pd.NA, index=plan.index, dtype="string")
    if not blocks:
        plan["blocks"] = pd.Series(pd.NA, index=plan.index, dtype="string")
    if rt.minimise_when is not None and rt.minimise_when[0] in frame:
        flag, hold = rt.minimise_when
        flagged = frame.loc[frame[flag].fillna(False).to_numpy(dtype=bool), "record_id"].astype("string")
        minimise = plan["record_id"].isin(flagged).to_numpy()
        plan.loc[minimise, "action"] = str(Action.MINIMISE)
        plan.loc[minimise, "hold"] = hold
    if holds is not None:
        plan = Holds.at(as_of, source=holds).apply(plan)
    plan["hold"] = plan["hold"].astype("string")
    return plan[PLAN_COLUMNS].reset_index(drop=True)


def plan_records(
    frames: Mapping[str, pd.DataFrame],
    policy: Policy,
    as_of: datetime,
    holds: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Plan every record type given. The result has one row per planned record."""
    parts = [plan_record_type(f, rt, policy, as_of, holds) for rt, f in frames.items()]
    parts = [p for p in parts if not p.empty]
    return pd.concat(parts, ignore_index=True) if parts else empty_plan()


def explain_record(
    frame: pd.DataFrame,
    record_type: str,
    record_id: str,
    policy: Policy,
    as_of: datetime,
    holds: pd.DataFrame | None = None,
) -> dict:
    """Why one record is or is not planned: every rule's verdict, protections, holds."""
    row = frame[frame["record_id"].astype("string") == str(record_id)]
    result: dict = {
        "record_type": record_type,
        "record_id": str(record_id),
        "as_of": pd.Timestamp(as_of).isoformat(),
        "policy_version": policy.version,
        "found": not row.empty,
    }
    if row.empty:
        result["decision"] = "not found in the extract (already gone, or never there)"
        return result
    row = row.iloc[[0]].reset_index(drop=True)
    tz = policy.timezone
    result["protected"] = bool(protected_mask(row, record_type, policy)[0])
    verdicts = []
    for rule in policy.rules_for(record_type):
        out = evaluate_rule(row, rule, as_of, tz)
        deadline = out.deadline.iloc[0]
        used = _clock_used(row, rule)
        verdicts.append(
            {
                "rule": rule.id,
                "clause": rule.clause,
                "applies": bool(out.applies[0]),
                "clock": None if pd.isna(out.clock.iloc[0]) else out.clock.iloc[0].isoformat(),
                "clock_used": used,
                "fallback_clock": used in rule.fallback_clocks,
                "period": rule.period,
                "opted_out": bool(row["opted_out"].iloc[0]) if "opted_out" in row else None,
                "deadline": None if pd.isna(deadline) else deadline.isoformat(),
                "due": bool(out.due[0]),
            }
        )
    result["rules"] = verdicts
    plan = plan_record_type(row, record_type, policy, as_of, holds)
    live = in_force(holds, as_of)
    result["holds"] = (
        live[(live["record_type"] == record_type) & (live["record_id"].astype("string") == str(record_id))]["reason"].tolist()
        if holds is not None
        else []
    )
    if plan.empty:
        result["decision"] = "protected: active relationship" if result["protected"] else "not planned: no rule is due"
    else:
        p = plan.iloc[0]
        result["decision"] = f"planned: {p['action']} under rule {p['rule_id']}" + (
            f" (hold: {p['hold']})" if pd.notna(p["hold"]) else ""
        ) + fallback_note(row, policy.rule(p["rule_id"]) if bool(p["fallback_clock"]) else None)
    return result


def _clock_used(row: pd.DataFrame, rule: Rule) -> str | None:
    """Which column the one record's period runs from: the rule's own clock(s), else the first
    fallback clock the record has, else None."""
    own = [c for c in rule.clocks if c in row and pd.notna(row[c].iloc[0])]
    if own:
        return "/".join(rule.clocks)
    return next((c for c in rule.fallback_clocks if c in row and pd.notna(row[c].iloc[0])), None)


def fallback_note(row: pd.DataFrame, rule: Rule | None) -> str:
    """`` (fallback clock X: the organisation's decision)`` for a record planned by one, else ``""``."""
    if rule is None:
        return ""
    return f" (fallback clock {_clock_used(row, rule)}: the organisation's decision)"
