"""Value conversion of the CRM connector: database rows into typed frames, read strictly.

A stored value is read only when it means one thing; a foreign CRM may keep a flag, a date or an
id in a text column, or mix storage types in one SQLite column, and a guess there erases a
person a year early. What is read:

* flags: the database's booleans, the integers 0 and 1, and the text spellings of
  ``retention.domain.records.FLAG_SPELLINGS`` (true, t, yes, y, 1, on / false, f, no, n, 0, off;
  case and surrounding blanks aside). NULL reads as False (the reference schema's default).
* clocks (``datetime64[us, UTC]``): the database's date and timestamp types, and ISO 8601 text:
  ``YYYY-MM-DD``, or ``YYYY-MM-DD[T ]HH:MM[:SS[.fraction]]`` with an optional ``Z`` or
  ``±HH[:MM]`` (without one, UTC). A calendar date is the start of that day in Europe/Stockholm,
  or, for the clocks the record schema marks ``end_of_day`` (a membership's end date, an
  event's day), its end (00:00 of the next day), by the domain's one definition
  (``durations.day_instants``); so a period counted from it ends at local midnight, when the
  nightly run looks. A clock
  outside ``CLOCK_RANGE`` (1901 to 2200) is a placeholder, not a time. NULL is NaT.
* ids: integers, integral numbers, and text of decimal digits, within 64 bits. NULL is <NA>.
* text: text, and bytes that are valid UTF-8.

Anything else is never guessed: the value becomes NULL and the row's ``UNREADABLE`` column names
the column, so planning quarantines the record ("unreadable opted_out") and it is never erased.
The column is added only when some row needs it. Values themselves are never logged.
"""

from __future__ import annotations

import datetime as dt
import decimal
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from retention.domain.durations import day_instants
from retention.domain.records import CLOCK_RANGE, FLAG_SPELLINGS, UNREADABLE

TS = "datetime64[us, UTC]"
LOCAL_TZ = "Europe/Stockholm"
_SPELLING = {word: value for value, words in FLAG_SPELLINGS.items() for word in words}
_INT64 = (-(2**63), 2**63 - 1)
_DAY_RE = r"\d{4}-\d{2}-\d{2}"
_INSTANT_RE = r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?(?:Z|[+-]\d{2}(?::?\d{2})?)?"
_FIRST_YEAR, _END_YEAR = CLOCK_RANGE[0].year, CLOCK_RANGE[1].year
_LOW, _HIGH = (pd.Timestamp(b).as_unit("us") for b in CLOCK_RANGE)


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
    """Rows into a frame of exactly ``columns`` (name -> dtype: ``TS``, "bool", "int64", "Int64"
    or "str"), plus ``UNREADABLE`` when a value could not be read. An "int64" column with a NULL
    or unreadable id comes through as "Int64". A calendar date in a clock named in
    ``end_of_day`` is the end of that day (the record schema's ``end_of_day``), in any other the
    start."""
    ends = frozenset(end_of_day)
    names = list(columns)
    data = list(zip(*rows, strict=True)) if rows else [() for _ in names]
    out = {}
    bad: dict[str, np.ndarray] = {}
    for name, values, dtype in zip(names, data, columns.values(), strict=True):
        raw = np.empty(len(values), dtype=object)
        raw[:] = values
        if dtype == TS:
            out[name], unreadable = _clocks(raw, end_of_day=name in ends)
        elif dtype == "bool":
            out[name], unreadable = _flags(raw)
        elif dtype in ("int64", "Int64"):
            out[name], unreadable = _ids(raw, nullable=dtype == "Int64")
        else:
            out[name], unreadable = _text(raw)
        if unreadable.any():
            bad[name] = unreadable
    frame = pd.DataFrame(out, columns=names)
    if bad:
        which = [",".join(n for n, mask in bad.items() if mask[i]) or None for i in range(len(frame))]
        frame[UNREADABLE] = pd.array(which, dtype="string")
    return frame


def utf8(value: bytes | memoryview) -> str | None:
    """Bytes as text when they are UTF-8, else None."""
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        return None


def _null(v: Any) -> bool:
    return v is None or v is pd.NaT or v is pd.NA or (isinstance(v, float) and math.isnan(v))


def _as_text(v: Any) -> Any:
    """Text as text, bytes decoded (None when they are not UTF-8), anything else as it is."""
    return utf8(v) if isinstance(v, (bytes, bytearray, memoryview)) else v


def _text(raw: np.ndarray) -> tuple[pd.Series, np.ndarray]:
    bad = np.zeros(len(raw), dtype=bool)
    if not _kinds(raw) <= _TEXT_TYPES:
        for i, v in enumerate(raw):
            if isinstance(v, (bytes, bytearray, memoryview)):
                raw[i] = utf8(v)
                bad[i] = raw[i] is None
    return pd.Series(raw, dtype=object).astype("str"), bad


def _ids(raw: np.ndarray, *, nullable: bool) -> tuple[pd.Series, np.ndarray]:
    """Integers; NULL is <NA>, anything else unreadable (<NA> and flagged)."""
    if _kinds(raw) <= _INT_TYPES:  # the usual case, without a detour per value
        fast = _as_int64(raw)
        if fast is not None:
            values, null = fast
            clean = np.zeros(len(raw), dtype=bool)
            if not null.any():
                return pd.Series(values, dtype="Int64" if nullable else "int64"), clean
            return pd.Series(pd.arrays.IntegerArray(values, null)), clean
    return _ids_each(raw, nullable=nullable)


def _ids_each(raw: np.ndarray, *, nullable: bool) -> tuple[pd.Series, np.ndarray]:
    """``_ids`` value by value: the reference, and the way for anything but ints and NULLs."""
    ids = [_one_id(v) for v in raw]
    bad = np.fromiter((i is _UNREADABLE for i in ids), dtype=bool, count=len(ids))
    s = pd.Series(pd.array([None if i is _UNREADABLE else i for i in ids], dtype="Int64"))
    if not nullable and not s.isna().any():
        s = s.astype("int64")
    return s, bad


_UNREADABLE = object()
# The Python types a column's values come in where a whole column converts at once.
_INT_TYPES = frozenset({int, np.int64, type(None)})
_BOOL_TYPES = frozenset({bool, np.bool_, type(None)})
_TEXT_TYPES = frozenset({str, type(None)})


def _kinds(raw: np.ndarray) -> set[type]:
    return set(map(type, raw))


def _as_int64(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Ints, booleans and NULLs as int64 values (0 where NULL) and the NULL mask; None when an
    int does not fit in 64 bits."""
    null = np.fromiter((v is None for v in raw), dtype=bool, count=len(raw))
    try:
        values = np.where(null, 0, raw).astype(np.int64) if null.any() else np.asarray(raw, dtype=np.int64)
    except OverflowError:
        return None
    return values, null


def _one_id(v: Any) -> int | None | object:
    if _null(v):
        return None
    if isinstance(v, (bool, np.bool_)):
        return _UNREADABLE
    if isinstance(v, (int, np.integer)):
        i = int(v)
    elif isinstance(v, (float, decimal.Decimal, np.floating)):
        if not math.isfinite(v) or v != int(v):
            return _UNREADABLE
        i = int(v)
    else:
        text = _as_text(v)
        if not isinstance(text, str) or not text.strip().isascii() or not text.strip().isdigit():
            return _UNREADABLE
        i = int(text.strip())
    return i if _INT64[0] <= i <= _INT64[1] else _UNREADABLE


def _flags(raw: np.ndarray) -> tuple[pd.Series, np.ndarray]:
    """Booleans, 0/1, and the accepted spellings; NULL is False; anything else unreadable."""
    if _kinds(raw) <= _INT_TYPES | _BOOL_TYPES:  # the database's booleans, or 0/1 computed in SQL
        fast = _as_int64(raw)
        if fast is not None:
            values, null = fast
            return pd.Series(values == 1, dtype=bool), ~null & (values != 0) & (values != 1)
    return _flags_each(raw)


def _flags_each(raw: np.ndarray) -> tuple[pd.Series, np.ndarray]:
    """``_flags`` value by value: the reference, and the way for text and anything else."""
    out = np.zeros(len(raw), dtype=bool)
    bad = np.zeros(len(raw), dtype=bool)
    for i, v in enumerate(raw):
        value = _one_flag(v)
        if value is None:
            bad[i] = True
        else:
            out[i] = value
    return pd.Series(out, dtype=bool), bad


def _one_flag(v: Any) -> bool | None:
    if _null(v):
        return False
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return {0: False, 1: True}.get(int(v))
    text = _as_text(v)
    if isinstance(text, str):
        return _SPELLING.get(text.strip().lower())
    return None


def _clocks(raw: np.ndarray, *, end_of_day: bool = False) -> tuple[pd.Series, np.ndarray]:
    """Stored clocks as UTC instants within ``CLOCK_RANGE``; NULL is NaT; anything else is NaT
    and unreadable. Calendar dates are their day's start, or its end with ``end_of_day``."""
    kinds = _kinds(raw)
    if kinds <= {dt.datetime, type(None)} or kinds <= {dt.date, type(None)}:
        # A column of the database's own timestamps or dates, converted as one array. A value
        # pandas cannot hold becomes NaT, and, not being NULL, unreadable, as it would be below.
        null = np.fromiter((v is None for v in raw), dtype=bool, count=len(raw))
        if dt.datetime in kinds:
            utc = pd.Series(pd.to_datetime(raw, utc=True, errors="coerce")).astype(TS)
        else:
            days = np.asarray(raw, dtype="datetime64[D]")  # None is NaT
            years = days.astype("datetime64[Y]").astype(np.int64) + 1970
            days[(years < _FIRST_YEAR - 1) | (years > _END_YEAR)] = np.datetime64("NaT")
            utc = _days(pd.Series(days.astype("datetime64[us]")), end_of_day=end_of_day)
        return _within_range(utc, null)
    return _clocks_each(raw, end_of_day=end_of_day)


def _within_range(utc: pd.Series, null: np.ndarray) -> tuple[pd.Series, np.ndarray]:
    """Out of range is unreadable too: a placeholder must not start a clock."""
    out = utc.reset_index(drop=True).astype(TS)
    outside = (out < _LOW) | (out >= _HIGH)
    out[outside.to_numpy()] = pd.NaT
    return out, ~null & out.isna().to_numpy()


def _clocks_each(raw: np.ndarray, *, end_of_day: bool = False) -> tuple[pd.Series, np.ndarray]:
    """``_clocks`` value by value: the reference, and the way for text and mixed columns."""
    n = len(raw)
    utc = np.full(n, np.datetime64("NaT"), dtype="datetime64[us]")  # naive UTC while filled
    null = np.fromiter((_null(v) for v in raw), dtype=bool, count=n)
    kind = np.fromiter((_clock_kind(v) for v in raw), dtype=np.int8, count=n)
    if (kind == _TEXT).any():
        where = np.flatnonzero(kind == _TEXT)
        utc[where] = _naive(_text_clocks([_as_text(v) for v in raw[where]], end_of_day=end_of_day))
    if (kind == _INSTANT).any():
        where = np.flatnonzero(kind == _INSTANT)
        utc[where] = _naive(_instants(raw[where]))
    if (kind == _DAY).any():
        where = np.flatnonzero(kind == _DAY)
        days = pd.Series([v.isoformat() if _in_years(v) else None for v in raw[where]], dtype=object)
        utc[where] = _naive(_days(days, end_of_day=end_of_day))
    return _within_range(pd.Series(utc).dt.tz_localize("UTC"), null)


_NULL, _TEXT, _DAY, _INSTANT, _OTHER = range(5)


def _naive(s: pd.Series) -> np.ndarray:
    return s.astype(TS).dt.tz_localize(None).to_numpy(dtype="datetime64[us]")


def _clock_kind(v: Any) -> int:
    if _null(v):
        return _NULL
    if isinstance(v, (str, bytes, bytearray, memoryview)):
        return _TEXT
    if isinstance(v, dt.datetime):
        return _INSTANT
    if isinstance(v, dt.date):
        return _DAY
    return _OTHER


def _in_years(v: dt.date) -> bool:
    # Checked before pandas sees the value: year 1 or 9999 does not fit every resolution.
    return _FIRST_YEAR - 1 <= v.year <= _END_YEAR


def _instants(values: np.ndarray) -> pd.Series:
    kept = [as_utc(v) if _in_years(v) else None for v in values]
    return pd.Series(pd.to_datetime(pd.Series(kept, dtype=object), utc=True, errors="coerce"), dtype=TS)


def _days(iso: pd.Series, *, end_of_day: bool = False) -> pd.Series:
    """``YYYY-MM-DD`` text (or None), or naive dates, as the start of that day in
    Europe/Stockholm, or its end."""
    days = iso if iso.dtype.kind == "M" else pd.to_datetime(iso, errors="coerce", format="%Y-%m-%d")
    return day_instants(pd.Series(days, index=iso.index), LOCAL_TZ, end_of_day=end_of_day).astype(TS)


def _text_clocks(values: list[Any], *, end_of_day: bool = False) -> pd.Series:
    """ISO 8601 text only (see the module); None (bytes that are not UTF-8) and anything else is NaT."""
    s = pd.Series([v.strip() if isinstance(v, str) else None for v in values], dtype=object)
    text = s.astype("string")
    year = pd.to_numeric(text.str.slice(0, 4), errors="coerce")
    plausible = ((year >= _FIRST_YEAR - 1) & (year <= _END_YEAR)).fillna(False).to_numpy(dtype=bool)
    day = text.str.fullmatch(_DAY_RE).fillna(False).to_numpy(dtype=bool) & plausible
    instant = text.str.fullmatch(_INSTANT_RE).fillna(False).to_numpy(dtype=bool) & plausible
    out = np.full(len(s), np.datetime64("NaT"), dtype="datetime64[us]")
    if day.any():
        out[day] = _naive(_days(s[day], end_of_day=end_of_day))
    if instant.any():
        out[instant] = _naive(pd.to_datetime(s[instant], errors="coerce", utc=True, format="ISO8601"))
    return pd.Series(out).dt.tz_localize("UTC")
