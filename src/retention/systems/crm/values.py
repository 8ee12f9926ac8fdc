"""Value conversion of the CRM connector: database rows into typed frames, and ids and times in.

Every clock column of a frame is ``datetime64[us, UTC]``; a calendar date comes through as
the start of that day in Europe/Stockholm, or, for the clocks the record schema marks
``end_of_day`` (a membership's end date, an event's day), as its end (00:00 of the next day),
by the domain's one definition (``durations.day_instants``); NULL, impossible or unparsable stored values come
through as ``NaT`` (the pipeline quarantines them) instead of failing the extract. NULL
booleans read as False.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from retention.domain.durations import day_instants

TS = "datetime64[us, UTC]"
LOCAL_TZ = "Europe/Stockholm"
_TRUE_STRINGS = frozenset({"t", "true", "1", "y", "yes", "on"})


def distinct_ids(ids: Iterable[Any]) -> list[int]:
    """The ids as ints, each once, in their first order; booleans and None are refused."""
    seen: dict[int, None] = {}
    for i in ids:
        if isinstance(i, (bool, np.bool_)) or i is None:
            raise TypeError("record ids must be integers")
        seen[int(i)] = None
    return list(seen)


def as_utc(value: dt.datetime) -> dt.datetime:
    """An aware UTC datetime (a naive one is taken as UTC)."""
    if isinstance(value, pd.Timestamp):
        value = value.to_pydatetime()
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)


def to_frame(rows: Sequence[Any], columns: dict[str, str], end_of_day: Iterable[str] = ()) -> pd.DataFrame:
    """Rows into a frame of exactly ``columns`` (name -> dtype: ``TS``, "bool", "int64", "Int64" or "str").
    A calendar date in a clock named in ``end_of_day`` is the end of that day (the record schema's
    ``end_of_day``), in any other the start."""
    ends = frozenset(end_of_day)
    names = list(columns)
    data = list(zip(*rows, strict=True)) if rows else [() for _ in names]
    out = {}
    for name, values, dtype in zip(names, data, columns.values(), strict=True):
        raw = np.empty(len(values), dtype=object)
        raw[:] = values
        s = pd.Series(raw, dtype=object)
        if dtype == TS:
            out[name] = _to_utc(s, end_of_day=name in ends)
        elif dtype == "bool":
            out[name] = _to_bool(s)
        elif dtype == "int64":
            out[name] = pd.to_numeric(s, errors="raise").astype("int64")
        elif dtype == "Int64":
            try:  # exact for any 64-bit id (no detour through float)
                out[name] = pd.Series(pd.array(raw, dtype="Int64"))
            except (TypeError, ValueError):  # text or junk in an id column of a foreign CRM
                out[name] = pd.to_numeric(s, errors="coerce").astype("Int64")
        else:
            out[name] = s.astype("str")
    return pd.DataFrame(out, columns=names)


def _to_utc(s: pd.Series, *, end_of_day: bool = False) -> pd.Series:
    """Any stored clock value (date, datetime, text, NULL) → ``datetime64[us, UTC]``; NaT when
    NULL, impossible or unparsable. Naive datetimes are taken as UTC. A calendar date (a date
    object, or text ``YYYY-MM-DD``) is the start of that day in Europe/Stockholm, or its end
    with ``end_of_day``, so a period counted from it ends at local midnight, when the nightly
    run looks."""
    if isinstance(s.dtype, pd.DatetimeTZDtype) or s.dtype.kind == "M":
        conv = s if getattr(s.dt, "tz", None) is not None else s.dt.tz_localize("UTC")
        return conv.dt.tz_convert("UTC").dt.as_unit("us")
    values = s.astype(object)
    try:
        conv = pd.to_datetime(values, errors="coerce", utc=True, format="ISO8601")
    except (ValueError, TypeError, OverflowError):
        conv = pd.Series([_one_ts(v) for v in values], index=s.index, dtype=TS)
    conv = conv.astype(TS)
    is_date = np.fromiter(
        ((isinstance(v, dt.date) and not isinstance(v, dt.datetime)) or (isinstance(v, str) and len(v) == 10) for v in values),
        dtype=bool,
        count=len(values),
    )
    if is_date.any():
        days = pd.to_datetime(values[is_date].astype(str), errors="coerce", format="%Y-%m-%d")
        conv[is_date] = day_instants(pd.Series(days, index=conv.index[is_date]), LOCAL_TZ, end_of_day=end_of_day).astype(TS)
    return conv


def _one_ts(v: Any) -> pd.Timestamp:
    try:
        ts = pd.to_datetime(v, errors="coerce", utc=True, format="ISO8601")
    except (ValueError, TypeError, OverflowError):
        return pd.NaT
    return ts if isinstance(ts, pd.Timestamp) else pd.NaT


def _to_bool(s: pd.Series) -> pd.Series:
    """NULL → False; numbers: non-zero; text: t/true/1/y/yes/on (case-insensitive)."""
    if s.dtype == bool:
        return s
    if s.dtype.kind in "iuf":
        return s.fillna(0).astype(bool)
    values = s.to_numpy(dtype=object)
    null = pd.isna(values)
    present = values[~null]
    if len(present) and isinstance(present[0], str):  # a database column has one type
        out = np.array([_text_bool(v) for v in np.where(null, False, values)], dtype=bool)
    else:
        out = np.zeros(len(values), dtype=bool)
        out[~null] = present.astype(bool)
    return pd.Series(out, index=s.index, dtype=bool)


def _text_bool(v: Any) -> bool:
    return v.strip().lower() in _TRUE_STRINGS if isinstance(v, str) else bool(v)
