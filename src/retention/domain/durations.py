"""ISO 8601 calendar durations and their vectorised addition in local wall-clock time.

Periods are calendar periods evaluated in Europe/Stockholm: ``P1Y`` from 29 February is
28 February, ``P1D`` across a DST change is the same wall-clock time the next day. Clocks are
converted to naive local wall time once, then shifted with numpy-backed month and day
arithmetic, which keeps a million rows well under a second.

The periods themselves (parsing, the hundred-year bound) are ``retention.domain.periods``, which
DAG files may read at parse time without pandas. Any clock a frame can hold plans without error
under any period allowed:
beyond Python's datetime range (years 1 to 9999), where the time zone rules cannot be read, a
zone keeps the UTC offset it has at the edge, and a deadline past the end of the frame's time
range stays at that end (never due).
"""

from __future__ import annotations

from functools import cache

import numpy as np
import pandas as pd

from retention.domain.periods import MAX_SECONDS, MAX_YEARS, Duration  # noqa: F401 - the policy's periods


def add_period(local_naive: pd.Series, period: Duration) -> pd.Series:
    """Add ``period`` to naive local wall-clock timestamps (NaT stays NaT).

    Nanosecond timestamps (whose range ends in 2262) are shifted as microseconds; a
    timestamp too close to the end of its range to take the period ends at that end."""
    if not (period.months or period.days or period.seconds):
        return local_naive
    out = local_naive
    if np.datetime_data(out.dtype)[0] == "ns":
        out = out.astype("datetime64[us]")
    unit = np.datetime_data(out.dtype)[0]
    beyond = out.to_numpy().view("i8") > _last_shiftable(unit)  # NaT is the smallest int64: never beyond
    if beyond.any():
        out = out.where(~beyond)
    if period.months:
        out = out + pd.DateOffset(months=period.months)
    if period.days or period.seconds:
        out = out + pd.Timedelta(days=period.days, seconds=period.seconds)
    if beyond.any():
        values = out.to_numpy().copy()
        values[beyond] = np.datetime64(np.iinfo(np.int64).max, unit)
        out = pd.Series(values, index=out.index, name=out.name)
    return out


@cache
def _last_shiftable(unit: str) -> int:
    """The largest timestamp of ``unit`` that every allowed period (plus a day) can be added to."""
    margin = pd.Timedelta(seconds=MAX_SECONDS + 2 * 86400) // pd.Timedelta(1, unit)
    return int(np.iinfo(np.int64).max - margin)


# Time zone rules are read within Python's datetime range, with a day to spare at each end for
# the offset; outside it a zone keeps the offset it has at the edge.
_FIRST = np.datetime64("0001-01-02T00:00:00")
_LAST = np.datetime64("9999-12-30T00:00:00")


@cache
def _edge_offsets(tz: str) -> tuple[pd.Timedelta, pd.Timedelta]:
    first, last = (pd.Timestamp(t).tz_localize("UTC").tz_convert(tz) for t in (_FIRST, _LAST))
    return pd.Timedelta(first.utcoffset()), pd.Timedelta(last.utcoffset())


def shift_within_range(naive: pd.Series, delta: pd.Timedelta) -> pd.Series:
    """``naive + delta``, staying within the range of the series' unit (NaT stays NaT)."""
    unit = np.datetime_data(naive.dtype)[0]
    step = delta // pd.Timedelta(1, unit)
    i8 = naive.to_numpy().view("i8")
    nat = i8 == np.iinfo(np.int64).min
    lowest, highest = np.iinfo(np.int64).min + 1, np.iinfo(np.int64).max
    shifted = np.clip(i8, lowest - min(step, 0), highest - max(step, 0)) + step
    shifted[nat] = np.iinfo(np.int64).min
    return pd.Series(shifted.view(f"datetime64[{unit}]"), index=naive.index, name=naive.name)


def _outside(naive: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Rows before and after the range in which time zone rules are read (NaT: neither)."""
    values = naive.to_numpy()
    return values < _FIRST, values > _LAST


def to_local_naive(values: pd.Series, tz: str) -> pd.Series:
    """UTC (or any tz-aware) timestamps as naive wall-clock time in ``tz``."""
    s = pd.to_datetime(values, utc=True)
    naive = s.dt.tz_localize(None)
    early, late = _outside(naive)
    if not (early.any() or late.any()):
        return s.dt.tz_convert(tz).dt.tz_localize(None)
    local = s.where(~(early | late)).dt.tz_convert(tz).dt.tz_localize(None)
    first, last = _edge_offsets(tz)
    local = local.where(~early, shift_within_range(naive, first))
    return local.where(~late, shift_within_range(naive, last))


def local_naive_to_utc(values: pd.Series, tz: str) -> pd.Series:
    """Naive wall-clock time in ``tz`` back to UTC. Gaps and overlaps resolve forward/earlier."""
    early, late = _outside(values)
    if not (early.any() or late.any()):
        return values.dt.tz_localize(tz, nonexistent="shift_forward", ambiguous=False).dt.tz_convert("UTC")
    inside = values.where(~(early | late))
    utc = inside.dt.tz_localize(tz, nonexistent="shift_forward", ambiguous=False).dt.tz_convert("UTC").dt.tz_localize(None)
    first, last = _edge_offsets(tz)
    utc = utc.where(~early, shift_within_range(values, -first))
    return utc.where(~late, shift_within_range(values, -last)).dt.tz_localize("UTC")


def timestamp_local_naive(ts, tz: str) -> pd.Timestamp:
    t = pd.Timestamp(ts)
    if t.tzinfo is None:
        t = t.tz_localize("UTC")
    return to_local_naive(pd.Series([t]), tz).iloc[0]


def add_elapsed(utc: pd.Series, seconds: int) -> pd.Series:
    """UTC instants plus elapsed seconds (no wall clock involved), staying within the range of
    the series' unit: an instant too late to take them stays at that end (never due)."""
    if not seconds:
        return utc
    naive = utc.dt.tz_localize(None)
    return shift_within_range(naive, pd.Timedelta(seconds=seconds)).dt.tz_localize("UTC")


def day_instants(days: pd.Series, tz: str, *, end_of_day: bool) -> pd.Series:
    """Calendar dates (naive, at midnight; NaT stays NaT) as UTC instants: the start of each
    local day in ``tz``, or with ``end_of_day`` its end, i.e. 00:00 of the next local day. A
    date that names the last day of something (a membership ending 2025-03-31) lasts that
    whole day, so a period counted from it starts when the day is over. The one definition
    connectors use for the record schema's ``end_of_day`` clocks."""
    days = days.astype("datetime64[us]").dt.normalize()
    start = shift_within_range(days, pd.Timedelta(days=1)) if end_of_day else days
    return local_naive_to_utc(start, tz)
