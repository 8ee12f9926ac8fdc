"""Manual legal holds: one definition of which holds are in force, and what they do to a plan.

Holds come from two lists: the system's own (the CRM's ``legal_hold`` table, by record id) and
the ledger's (``retention hold add``, by pseudonymous key). A hold is in force at a moment when
it has no expiry or expires after that moment (a lifted hold is not in the ledger's list at
all). A record under a hold in force is planned ``hold``: nothing of it is erased, and the
hold's reason is recorded. Planning, validation, ``explain``, the erasure request, the replay
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


def _reasons(holds: pd.DataFrame, key: str) -> dict[tuple[str, str], str]:
    """(record_type, id or key) -> reason; the first hold of a record names it."""
    out: dict[tuple[str, str], str] = {}
    if holds.empty:
        return out
    for t, k, r in zip(holds["record_type"].astype(str), holds[key].astype(str), holds["reason"].astype(str)):
        out.setdefault((t, k), r)
    return out


@dataclass(frozen=True)
class Holds:
    """The holds in force at one moment, by record id (the system's) and by key (the ledger's)."""

    by_id: dict[tuple[str, str], str] = field(default_factory=dict)
    by_key: dict[tuple[str, str], str] = field(default_factory=dict)

    @classmethod
    def at(cls, when: datetime, *, source: pd.DataFrame | None = None, ledger: pd.DataFrame | list | None = None) -> Holds:
        """``source``: the system's holds (record_type, record_id, reason, expires_at); ``ledger``:
        the ledger's (record_type, record_key, reason, expires_at), a frame or ``Ledger.holds()``."""
        if isinstance(ledger, list):
            ledger = pd.DataFrame(ledger) if ledger else None
        by_id = _reasons(in_force(source, when), "record_id") if source is not None and len(source) else {}
        by_key = _reasons(in_force(ledger, when), "record_key") if ledger is not None and len(ledger) else {}
        return cls(by_id, by_key)

    def __bool__(self) -> bool:
        return bool(self.by_id or self.by_key)

    def reason(self, record_type: str, record_id: str | None = None, record_key: str | None = None) -> str | None:
        """The reason a record is held, or None. A hold by key wins over one by id."""
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
        """Plan rows of held records become action ``hold`` with the hold's reason. ``plan`` has
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
