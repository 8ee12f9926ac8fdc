"""Manual legal holds: one definition of which holds are in force, and what they do to a plan.

Holds come from two lists: the system's own (the CRM's ``legal_hold`` table, by record id) and
the ledger's (``retention hold add``, by pseudonymous key). A hold is in force at a moment when
it has no expiry or expires after that moment (a lifted hold is not in the ledger's list at
all). A record under a hold in force is planned ``hold``: nothing of it is erased, and a
reference to the hold is recorded, never its reason: a reason is free text and may name a person,
so it stays in the hold's own row (``retention hold list``, ``explain``) and out of the erasure
ledger, the staging and the reports. Planning, validation, ``explain``, the erasure request, the replay
and the erasure engine's last check before each batch all ask this module.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

import pandas as pd

from retention.domain.statuses import Action


def _frame(columns: Iterable[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="string") for c in columns})


def in_force(holds: pd.DataFrame | None, at: datetime) -> pd.DataFrame:
    """The rows of ``holds`` (with an ``expires_at`` column, or none) in force at ``at``."""
    if holds is None or holds.empty:
        return holds.iloc[0:0] if holds is not None else _frame(("record_type", "record_id", "reason"))
    if "expires_at" not in holds:
        return holds
    expires = pd.to_datetime(holds["expires_at"], utc=True)
    at_ts = pd.Timestamp(at)
    at_ts = at_ts.tz_localize("UTC") if at_ts.tzinfo is None else at_ts
    live = expires.isna() | (expires > at_ts)
    return holds.loc[live.to_numpy()]


# How the ledger and the reports name a hold: the ledger's own holds by their id (``retention
# hold list`` shows it), the system's by the list they are in (its rows are found by record).
LEDGER_HOLD_REF = "manual hold #{id}"
SOURCE_HOLD_REF = "the system's legal_hold list"


def _refs(holds: pd.DataFrame, key: str, ref) -> tuple[dict[tuple[str, str], str], dict[str, str]]:
    """((record_type, id or key) -> reference, reference -> reason); the first hold of a record names it."""
    refs: dict[tuple[str, str], str] = {}
    reasons: dict[str, str] = {}
    if holds.empty:
        return refs, reasons
    hold_ids = holds["id"].tolist() if "id" in holds else [None] * len(holds)
    reason = holds["reason"].astype(str) if "reason" in holds else pd.Series([""] * len(holds))
    for t, k, r, i in zip(holds["record_type"].astype(str), holds[key].astype(str), reason, hold_ids):
        name = ref(i)
        if (t, k) not in refs:
            refs[(t, k)] = name
            reasons.setdefault(name, r)
    return refs, reasons


def _ledger_ref(hold_id) -> str:
    return LEDGER_HOLD_REF.format(id=hold_id) if hold_id is not None and pd.notna(hold_id) else "manual hold"


@dataclass(frozen=True)
class Holds:
    """The holds in force at one moment, by record id (the system's) and by key (the ledger's),
    each mapped to the hold's reference; ``reasons`` maps a reference to its free-text reason,
    for the operator's own views only."""

    by_id: dict[tuple[str, str], str] = field(default_factory=dict)
    by_key: dict[tuple[str, str], str] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)

    @classmethod
    def at(cls, when: datetime, *, source: pd.DataFrame | None = None, ledger: pd.DataFrame | list | None = None) -> Holds:
        """``source``: the system's holds (record_type, record_id, reason, expires_at); ``ledger``:
        the ledger's (record_type, record_key, reason, expires_at), a frame or ``Ledger.holds()``."""
        if isinstance(ledger, list):
            ledger = pd.DataFrame(ledger) if ledger else None
        by_id, by_key, reasons = {}, {}, {}
        if source is not None and len(source):
            by_id, from_source = _refs(in_force(source, when), "record_id", lambda _i: SOURCE_HOLD_REF)
            reasons.update(from_source)
        if ledger is not None and len(ledger):
            by_key, from_ledger = _refs(in_force(ledger, when), "record_key", _ledger_ref)
            reasons.update(from_ledger)
        return cls(by_id, by_key, reasons)

    def __bool__(self) -> bool:
        return bool(self.by_id or self.by_key)

    def reason(self, record_type: str, record_id: str | None = None, record_key: str | None = None) -> str | None:
        """The reference of the hold a record is under, or None. A hold by key wins over one by
        id. (The reference, not the reason: this is what the ledger and the reports record.)"""
        if record_key is not None and (record_type, record_key) in self.by_key:
            return self.by_key[(record_type, record_key)]
        if record_id is not None:
            return self.by_id.get((record_type, str(record_id)))
        return None

    def ids(self, record_type: str) -> set[str]:
        return {i for t, i in self.by_id if t == record_type}

    def keys(self, record_type: str) -> set[str]:
        return {k for t, k in self.by_key if t == record_type}

    def apply(self, plan: pd.DataFrame) -> pd.DataFrame:
        """Plan rows of held records become action ``hold`` with the hold's reference. ``plan`` has
        record_type and record_id, and record_key where holds by key are to be matched."""
        if plan.empty or not self:
            return plan
        types = plan["record_type"].astype(str).tolist()
        ids = plan["record_id"].astype(str).tolist()
        keys = plan["record_key"].astype(str).tolist() if "record_key" in plan else [None] * len(plan)
        reasons = [self.reason(t, i, k) for t, i, k in zip(types, ids, keys)]
        held = pd.notna(pd.Series(reasons, dtype="object")).to_numpy()
        if not held.any():
            return plan
        plan = plan.copy()
        plan.loc[held, "action"] = str(Action.HOLD)
        plan.loc[held, "hold"] = [r for r in reasons if r is not None]
        plan["hold"] = plan["hold"].astype("string")
        return plan
