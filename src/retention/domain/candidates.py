"""Which records of a record type a plan could touch, as a condition a system can compile.

A system that can filter (the CRM's SQL) need not deliver every record for the plan to be made
from: only the records a rule could plan, those quarantine would set aside, and those nothing
can be judged without. This module says which, from the policy, as a small condition tree over
the record schema's columns; the system compiles it (``systems/crm/predicates.py``) and the
planning itself is unchanged. The decision stays here: the compiler only translates.

The condition is a *superset* of what planning needs, never less (a missing record is an
erasure wrongly not made, and a quarantine not reported):

* every record with no key, a shared key, a value its system may not hold readably
  (``Unreadable``: the compiler says which stored values it cannot be sure of), a missing
  required value, an unset required flag, a past clock in the future, or no clock for a rule
  that applies: quarantine judges them;
* every record a rule applies to that is not protected and whose clock (its own, else its
  fallback) is at or before the latest clock that rule could have passed at ``as_of``; the
  opted-out period counts for records that opted out;
* record types judged together with others (derived columns, records that block others) are not
  narrowed at all (``None``: every record).

Semantics the compiler must keep: ``In``, ``Missing`` and the ``AllOf``/``AnyOf``/``Not`` built
from them are exact on readable values (``Not`` wraps nothing else; a flag's NULL reads False,
a NULL matches no value otherwise); ``AtMost`` and ``After`` may be widened (they are never
negated); ``Unreadable`` may be true of more values than the system's reading refuses.

Because deadlines only pass as time goes on, the condition as of a later time covers the one as
of an earlier time: an extract narrowed as of its own ``now`` serves any run as of a time
before it.

:func:`surely_due` is the other direction, for the check right before an erasure: a *subset*
of the records the recheck (``retention.domain.recheck.leave_alone``) would let go, never more
(a record in it and not let go would be erased wrongly). The system compiles it with
``AtMost``/``After`` narrowed instead of widened and ``Unreadable`` as wide as ever, so that
``Not(Unreadable)`` is true only of values it surely reads as they are; what it leaves out is
read and judged as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pandas as pd

from retention.domain.engine import _deadline
from retention.domain.policy import Policy, Rule
from retention.domain.quarantine import FUTURE_TOLERANCE
from retention.domain.records import CLOCK_RANGE, RECORD_TYPES, blocked_by


@dataclass(frozen=True)
class In:
    """The value read is one of ``values`` (a flag's NULL reads False; a NULL matches nothing else)."""

    column: str
    values: tuple


@dataclass(frozen=True)
class Missing:
    """The stored value is NULL."""

    column: str


@dataclass(frozen=True)
class AtMost:
    """The clock read (an instant) is at or before ``instant``; may be widened."""

    column: str
    instant: pd.Timestamp


@dataclass(frozen=True)
class After:
    """The clock read is after ``instant``; may be widened."""

    column: str
    instant: pd.Timestamp


@dataclass(frozen=True)
class Unreadable:
    """The stored value may not read as a value of its kind (the system's strict reading)."""

    column: str


@dataclass(frozen=True)
class DuplicateKey:
    """Another record has the same key."""


@dataclass(frozen=True)
class AllOf:
    parts: tuple  # empty: true


@dataclass(frozen=True)
class AnyOf:
    parts: tuple  # empty: false


@dataclass(frozen=True)
class Not:
    part: object  # In, Missing, or AllOf/AnyOf/Not of them


Condition = In | Missing | AtMost | After | Unreadable | DuplicateKey | AllOf | AnyOf | Not
NEVER = AnyOf(())
ALWAYS = AllOf(())


def narrowable(record_type: str) -> bool:
    """Whether a record of this type is judged on its own row (no derived columns, blocks no
    one and is blocked by no one)."""
    rt = RECORD_TYPES[record_type]
    return not (rt.derived or rt.blocks or blocked_by(record_type))


def candidates(record_type: str, policy: Policy, as_of: datetime, now: datetime) -> Condition | None:
    """The records of ``record_type`` a plan as of ``as_of`` from an extract made at ``now``
    could touch, or None when every record is needed."""
    if not narrowable(record_type):
        return None
    rt = RECORD_TYPES[record_type]
    as_of_ts, now_ts = _utc(as_of), _utc(now)
    parts: list = [Missing("record_id"), DuplicateKey()]
    parts += [Unreadable(c) for c in ("record_id", *rt.extracted_columns)]
    # An enumerated value the system does not use: matches no rule, but it may be a value read
    # wrongly (bytes that are no text); the few such records are cheap to include.
    parts += [Not(In(c, tuple(v))) for c, v in rt.values.items()]
    parts += [Missing(c) for c in rt.required]
    parts += [Not(In(c, (True,))) for c in rt.must_be_true]
    parts += [After(c, now_ts + pd.Timedelta(FUTURE_TOLERANCE)) for c in rt.past_only]
    protected = _protected(record_type, policy)
    for rule in policy.rules_for(record_type):
        when = AllOf(tuple(In(c, tuple(v)) for c, v in rule.when.items()))
        no_clock = AllOf(tuple(Missing(c) for c in (*rule.clocks, *rule.fallback_clocks)))
        parts.append(AllOf((when, AnyOf((no_clock, AllOf((Not(protected), _may_be_due(rule, as_of_ts, policy.timezone))))))))
    return AnyOf(tuple(parts))


def surely_due(record_type: str, policy: Policy, as_of: datetime) -> Condition | None:
    """The records of ``record_type`` the recheck as of ``as_of`` surely lets go (no value it
    cannot read, not protected, and due under a rule), to be compiled *narrowing* ``AtMost``
    and ``After``; None when the type is judged with others (its records then always go through
    the recheck). Holds are not in it: the system's own hold list and the manual holds are
    checked apart, as before."""
    if not narrowable(record_type):
        return None
    rules = policy.rules_for(record_type)
    if not rules:
        return None
    rt = RECORD_TYPES[record_type]
    as_of_ts = _utc(as_of)
    readable = tuple(Not(Unreadable(c)) for c in ("record_id", *rt.extracted_columns))
    due = tuple(
        AllOf((AllOf(tuple(In(c, tuple(v)) for c, v in rule.when.items())), _may_be_due(rule, as_of_ts, policy.timezone)))
        for rule in rules
    )
    return AllOf((*readable, Not(_protected(record_type, policy)), AnyOf(due)))


def _utc(t) -> pd.Timestamp:
    t = pd.Timestamp(t)
    return t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")


def _protected(record_type: str, policy: Policy) -> Condition:
    """The engine's ``protected_mask`` as a condition: code floor and the policy's own list."""
    rt = RECORD_TYPES[record_type]
    parts = []
    for column, values in rt.protected.items():
        unless = AnyOf(tuple(In(c, tuple(v)) for c, v in rt.unprotected_when.items()))
        parts.append(AllOf((In(column, tuple(values)), Not(unless))))
    for prot in policy.protections:
        if prot.records == record_type:
            unless = AnyOf(tuple(In(c, tuple(v)) for c, v in prot.unless.items() if c in rt.columns))
            parts.append(AllOf((In(prot.column, tuple(prot.in_)), Not(unless))))
    return AnyOf(tuple(parts))


def _may_be_due(rule: Rule, as_of: pd.Timestamp, tz: str) -> Condition:
    """The clock the rule counts from is at or before the latest one it could have passed."""
    due = _clock_at_most(rule, latest_due_clock(rule, as_of, tz, opted_out=False))
    if rule.opted_out_duration is not None:
        opted = _clock_at_most(rule, latest_due_clock(rule, as_of, tz, opted_out=True))
        due = AnyOf((due, AllOf((In("opted_out", (True,)), opted))))
    return due


def _clock_at_most(rule: Rule, cutoff: pd.Timestamp | None) -> Condition:
    """The engine's ``clock_of`` at or before ``cutoff``: the latest of the rule's own clocks
    present, else the first fallback clock present."""
    if cutoff is None:
        return NEVER
    own = rule.clocks
    some_own = AnyOf(tuple(Not(Missing(c)) for c in own))
    every_own = AllOf(tuple(AnyOf((Missing(c), AtMost(c, cutoff))) for c in own))
    parts = [AllOf((some_own, every_own))]
    for i, col in enumerate(rule.fallback_clocks):
        before = tuple(Missing(c) for c in (*own, *rule.fallback_clocks[:i]))
        parts.append(AllOf((*before, AtMost(col, cutoff))))
    return AnyOf(tuple(parts))


def latest_due_clock(rule: Rule, as_of: datetime, tz: str, *, opted_out: bool) -> pd.Timestamp | None:
    """The latest clock from which the rule's deadline (the engine's own arithmetic) is at or
    before ``as_of``, or None when no clock in ``CLOCK_RANGE`` is due. The deadline never
    falls as the clock rises (calendar addition, alignment and time-zone gaps and folds all keep
    the order), so a narrowing search finds it."""
    as_of_ts = _utc(as_of)
    lo = pd.Timestamp(CLOCK_RANGE[0]).as_unit("us").value
    hi = min(as_of_ts.as_unit("us").value, pd.Timestamp(CLOCK_RANGE[1]).as_unit("us").value - 1)
    frame = None

    def due(points: np.ndarray) -> np.ndarray:
        nonlocal frame
        clock = pd.Series(pd.to_datetime(points, unit="us", utc=True)).astype("datetime64[us, UTC]")
        frame = pd.DataFrame({"opted_out": np.full(len(points), opted_out)})
        deadline = _deadline(clock, frame, rule, tz)
        return (deadline.notna() & (deadline <= as_of_ts)).to_numpy(dtype=bool)

    if not due(np.array([lo]))[0]:
        return None
    # Any clock after as_of is not due (a deadline never comes before its clock): search [lo, hi].
    if due(np.array([hi]))[0]:
        return pd.Timestamp(hi, unit="us", tz="UTC")
    while hi - lo > 1:  # lo due, hi not
        points = np.unique(np.linspace(lo, hi, num=1025, dtype=np.int64))
        ok = due(points)
        last = int(np.flatnonzero(ok)[-1])
        lo, hi = int(points[last]), int(points[min(last + 1, len(points) - 1)])
        if lo == hi:
            break
    return pd.Timestamp(lo, unit="us", tz="UTC")
