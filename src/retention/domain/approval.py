"""Approving a plan over the plan-size guard: what an approval is bound to, and what it allows.

A plan that would erase more than the guard allows is erased only when a person approved
exactly that plan (its content hash) under exactly that policy version; the newest decision on
that pair counts, so a later rejection withdraws an approval. Nothing here knows Airflow: the
DAG asks with its human-in-the-loop operator, the ledger keeps the decisions.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from enum import StrEnum

import numpy as np
import pandas as pd

from retention.domain.statuses import DESTRUCTIVE


class Decision(StrEnum):
    """How a request for approval ended."""

    APPROVED = "approved"
    REJECTED = "rejected"
    # Nobody answered within RETENTION_APPROVAL_TIMEOUT: as a rejection, nothing is erased.
    TIMED_OUT = "timed_out"


def decision_of(chosen: Iterable[str], *, approve: str, timed_out: bool) -> Decision:
    """The decision an answer means: only an explicit approval, in time, approves."""
    if timed_out:
        return Decision.TIMED_OUT
    return Decision.APPROVED if list(chosen) == [approve] else Decision.REJECTED


def plan_hash(plan: pd.DataFrame) -> str:
    """The plan's content hash (SHA-256, hex): every column and row, in any order. Two plans
    with the same rows hash the same; a row more, less or changed hashes otherwise."""
    columns = sorted(plan.columns)
    frame = plan[columns].reset_index(drop=True)
    # One 64-bit hash per row (a categorical hashes as its values), sorted so the rows' order
    # does not count, then SHA-256 over them and the column names.
    rows = pd.util.hash_pandas_object(frame, index=False, categorize=True).to_numpy(dtype=np.uint64)
    digest = hashlib.sha256()
    digest.update("\x1f".join(columns).encode())
    digest.update(len(rows).to_bytes(8, "big"))
    digest.update(np.sort(rows).tobytes())
    return digest.hexdigest()


def approved(decisions: Iterable[Mapping]) -> Mapping | None:
    """The approval that allows erasing, from the decisions on one plan hash and policy version
    (each with ``decision`` and ``decided_at``): the newest one, when it is an approval."""
    ordered = sorted(decisions, key=lambda d: (d["decided_at"], d.get("id") or 0))
    if ordered and ordered[-1]["decision"] == Decision.APPROVED:
        return ordered[-1]
    return None


def destructive_by_rule(plan: pd.DataFrame) -> dict[str, int]:
    """Rows that touch the system, per rule: what the approver is asked to allow."""
    rows = plan[plan["action"].isin(DESTRUCTIVE).to_numpy()]
    return {str(rule): int(n) for rule, n in rows.groupby(rows["rule_id"].astype(str), observed=True).size().sort_index().items()}


def key_preview(plan: pd.DataFrame, per_rule: int = 5) -> dict[str, list[str]]:
    """A few pseudonymous keys per rule of the destructive rows (never an id or a value)."""
    rows = plan[plan["action"].isin(DESTRUCTIVE).to_numpy()]
    out: dict[str, list[str]] = {}
    for rule, group in rows.groupby(rows["rule_id"].astype(str), observed=True):
        out[str(rule)] = sorted(group["record_key"].astype(str))[:per_rule]
    return dict(sorted(out.items()))
