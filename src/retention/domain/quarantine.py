"""Row-level checks before planning: malformed records are quarantined, counted, never erased.

A record is quarantined when its system held a value that could not be read (a flag that is no
known spelling, a clock that is no date or a placeholder date, an id that is no integer, bytes
that are not UTF-8: the frame's ``UNREADABLE`` column names the columns), has no key, shares its
key with another record, lacks a column its record type needs, has no usable clock (nor fallback
clock) for a rule that applies to it, records a past event at a time after the extract, or lacks
a flag its record type needs set (a newsletter member without an e-mail address). Quarantine is
the safe side: a record that cannot be judged is left alone and reported; one left there night
after night raises the stuck-quarantine alarm (``reason_category`` is what the ledger keeps of
its reason).
"""

from __future__ import annotations

from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from retention.domain.engine import when_mask
from retention.domain.keys import duplicated
from retention.domain.policy import Policy
from retention.domain.records import RECORD_TYPES, UNREADABLE

# Clock skew between the source system and this machine that is not yet "in the future".
FUTURE_TOLERANCE = timedelta(days=1)


def _blank(key: pd.Series) -> np.ndarray:
    """Missing, empty or only whitespace."""
    try:
        text = pa.chunked_array(pa.array(key, type=pa.large_string()))
    except (pa.ArrowTypeError, pa.ArrowInvalid):  # not text: judge it as text
        key = key.astype("string")
        return key.isna().to_numpy() | (key.str.strip() == "").fillna(True).to_numpy()
    # Arrow's checks make no stripped copy of every key, as str.strip() would.
    blank = pc.or_kleene(pc.equal(pc.binary_length(text), 0), pc.utf8_is_space(text))
    return pc.fill_null(blank, True).to_numpy()


def unreadable_reason(columns: str) -> str:
    """The reason for a record whose ``columns`` (comma-separated) could not be read."""
    return "unreadable " + ", ".join(c.strip() for c in columns.split(","))


def quarantine_reasons(
    frame: pd.DataFrame, record_type: str, policy: Policy, now: datetime, duplicates: np.ndarray | None = None
) -> pd.Series:
    """One reason per row (the first that applies), or <NA> for a clean row. ``duplicates``:
    which rows share their key with another, found over the whole record type when ``frame`` is
    a part of it (default: within ``frame``)."""
    rt = RECORD_TYPES[record_type]
    reason = pd.Series(pd.NA, index=frame.index, dtype="string")

    def mark(mask, text: str) -> None:
        mask = np.asarray(mask, dtype=bool) & reason.isna().to_numpy()
        if mask.any():
            reason[mask] = text

    if UNREADABLE in frame:
        # First: a record read on a guess must not be judged at all, whatever else applies.
        cols = frame[UNREADABLE].astype("string")
        for which in cols.dropna().unique():
            mark((cols == which).fillna(False).to_numpy(dtype=bool), unreadable_reason(which))
    key = frame["record_id"]
    mark(_blank(key), "missing key")
    mark(duplicated(key) if duplicates is None else duplicates, "duplicate key")
    for col in rt.required:
        mark(frame[col].isna().to_numpy(), f"missing or invalid {col}")
    for col, why in rt.must_be_true.items():
        if col in frame:
            mark(~frame[col].fillna(False).to_numpy(dtype=bool), why)
    limit = pd.Timestamp(now) + FUTURE_TOLERANCE
    for col in rt.past_only:
        if col in frame:
            mark((pd.to_datetime(frame[col], utc=True) > limit).fillna(False).to_numpy(dtype=bool), f"{col} in the future")
    # A record no applicable rule can judge (every such rule lacks its clock) is malformed.
    applies_any = np.zeros(len(frame), dtype=bool)
    judged = np.zeros(len(frame), dtype=bool)
    rules = policy.rules_for(record_type)
    for rule in rules:
        applies = when_mask(frame, rule)
        has_clock = np.zeros(len(frame), dtype=bool)
        for col in (*rule.clocks, *rule.fallback_clocks):  # a fallback clock judges it too
            if col in frame:
                has_clock |= frame[col].notna().to_numpy()
        applies_any |= applies
        judged |= applies & has_clock
    if rules:
        clocks = sorted({c for r in rules for c in (*r.clocks, *r.fallback_clocks)})
        mark(applies_any & ~judged, f"no clock for the rule that applies ({', '.join(clocks)})")
    return reason


def split_quarantine(frame: pd.DataFrame, record_type: str, policy: Policy, now: datetime, duplicates: np.ndarray | None = None):
    """(clean frame, quarantined record ids with reasons, counts per reason)."""
    reason = quarantine_reasons(frame, record_type, policy, now, duplicates)
    bad = reason.notna().to_numpy()
    quarantined = pd.DataFrame({"record_id": frame["record_id"][bad].astype("string"), "reason": reason[bad]})
    counts = quarantined["reason"].value_counts().to_dict()
    clean = frame.loc[~bad] if bad.any() else frame  # nothing quarantined: no copy of every row
    return clean, quarantined.reset_index(drop=True), {str(k): int(v) for k, v in counts.items()}


def reason_category(reason: str) -> str:
    """What of a quarantine reason may be kept beside a pseudonym: its category, the text
    before any parenthesis or colon (which may name columns, tables or keys), at most 100
    characters."""
    for mark in (" (", ":"):
        reason = reason.split(mark, 1)[0]
    return reason.strip()[:100]
