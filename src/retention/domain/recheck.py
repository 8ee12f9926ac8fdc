"""Right before a destructive call: may these records still be erased as planned?

A plan is made from an extract; the erasure may come minutes or days later (a retry, a task
cleared after a guard override). Meanwhile a member may have subscribed again, an organisation
renewed its membership, a ticket been reopened or a user made an agent. The erasure engine
hands each system's current state of a batch (read right before the destructive call; for the
CRM inside the erasing transaction) to :func:`leave_alone`, which judges it with the same
protections and rules as planning did, as of the run's as-of time: a record protected now, or
no longer due, is left alone (deferred) with the reason.

Pure: frames in, reasons out.
"""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from retention.domain.engine import plan_record_type, protected_mask
from retention.domain.policy import Policy
from retention.domain.quarantine import unreadable_reason
from retention.domain.records import RECORD_TYPES, UNREADABLE
from retention.domain.statuses import DESTRUCTIVE


def _with_derived(record_type: str, current: pd.DataFrame, planned: pd.DataFrame) -> pd.DataFrame:
    """A record type judged from records planned before it (a ticket requester) cannot be
    derived again from its own current state: keep what planning derived, moved on by the
    record's own changes since. A requester planned had no ticket left (the engine erases them
    only after those tickets are gone); their clock is the later of the planned one and their
    own last update."""
    rt = RECORD_TYPES[record_type]
    if not rt.derived:
        return current
    clock = planned.set_index("record_id")["clock"] if len(planned) else pd.Series(dtype="datetime64[us, UTC]")
    out = current.copy()
    if "tickets_remaining" in rt.derived and "tickets_remaining" not in current:
        # Not read again by the system: the engine erases a user only once the tickets of
        # theirs in the plan are gone. Where the system did count the live tickets naming the
        # user now (a ticket filed or a CC added since the plan), that count is judged.
        out["tickets_remaining"] = 0
    if "had_ticket" in rt.derived:
        # Judged as one whose tickets went: due once untouched since its planned clock, which
        # holds for a user planned for having no ticket at all too (its account's creation
        # was judged at the plan and does not change). The recheck only ever leaves alone.
        out["had_ticket"] = True
    if "last_ticket_gone_at" in rt.derived:
        planned_clock = pd.to_datetime(out["record_id"].astype(str).map(clock), utc=True)
        own = pd.to_datetime(out["updated_at"], utc=True) if "updated_at" in out else planned_clock
        out["last_ticket_gone_at"] = pd.concat([planned_clock, own], axis=1).max(axis=1)
    return out


def leave_alone(
    record_type: str, current: pd.DataFrame, planned: pd.DataFrame, policy: Policy, as_of: datetime
) -> dict[str, str]:
    """Of the records in ``current`` (record_id and the schema's columns, as the system holds
    them now), those that may no longer be erased as ``planned`` (plan rows: record_id, action,
    clock), with why."""
    if current.empty:
        return {}
    planned = planned.assign(record_id=planned["record_id"].astype(str))
    current = current[_among(current["record_id"], planned["record_id"])]
    if current.empty:
        return {}
    current = _with_derived(record_type, current.reset_index(drop=True), planned)
    ids = current["record_id"].astype("string").to_numpy(dtype=object)
    # Each record's first reason counts: unreadable now, then protected now, then no longer due.
    why = np.full(len(current), None, dtype=object)
    if UNREADABLE in current:
        # A value that cannot be read now is not judged on a guess: the record waits.
        columns = current[UNREADABLE].astype("string")
        for pos in np.flatnonzero(columns.notna().to_numpy()):
            why[pos] = f"{unreadable_reason(columns.iloc[pos])} now"
    why[pd.isna(why) & protected_mask(current, record_type, policy)] = "protected now (an active relationship since the plan)"
    again = plan_record_type(current, record_type, policy, as_of)
    # Still due is what counts, not the same action: a contact planned "minimise" whose invoices
    # this very run has just erased is planned "erase" now, and minimising it erases it anyway
    # (the system keeps what a legal hold needs, whichever of the two it is asked for).
    still = again.loc[again["action"].isin(DESTRUCTIVE).to_numpy(), "record_id"]
    why[pd.isna(why) & ~_among(current["record_id"], still)] = "changed since the plan: no longer due"
    left = np.flatnonzero(pd.notna(why))
    return dict(zip(ids[left].tolist(), why[left].tolist(), strict=True))


def _among(ids: pd.Series, of: pd.Series) -> np.ndarray:
    """Which of ``ids`` are in ``of``, compared as text, by hashing (Arrow's ``is_in``): pandas'
    ``isin`` on Arrow-backed text walks its value set one Python object at a time, and a batch
    holds tens of thousands."""
    text = pa.array(ids.astype("string"), type=pa.large_string())
    value_set = pa.array(of.astype("string"), type=pa.large_string())
    return pc.is_in(text, value_set=value_set).to_numpy(zero_copy_only=False)
