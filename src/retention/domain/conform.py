"""Frames in the domain's record schema: every extracted frame passes through :func:`conform`
before it is staged or planned, so every path sees the same columns and types."""

from __future__ import annotations

import pandas as pd

from retention.domain.records import DTYPES, FLAG, KEY, RECORD_TYPES, SOURCE_HOLD_COLUMNS, SOURCE_HOLDS, TEXT, TIME, UNREADABLE


def conform(record_type: str, frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with ``record_id`` and the record type's extracted columns, in the schema's
    order and types, and ``UNREADABLE`` when the frame has it (the columns a row's system held
    unreadable values in). Columns already of their type are not copied. A missing column is a
    programming error in an adapter, not data to quarantine: it raises."""
    if record_type == SOURCE_HOLDS:
        columns = SOURCE_HOLD_COLUMNS
    else:
        columns = {"record_id": KEY, **RECORD_TYPES[record_type].extracted_columns}
    if UNREADABLE in frame:
        columns = {**columns, UNREADABLE: TEXT}
    missing = [c for c in columns if c not in frame]
    if missing:
        raise ValueError(f"{record_type} frame lacks column(s) {', '.join(missing)}")
    out = {}
    for column, kind in columns.items():
        s = frame[column]
        if str(s.dtype) != DTYPES[kind]:
            s = _as(s, kind)
        out[column] = s
    return pd.DataFrame(out, index=frame.index, copy=False)


def from_rows(record_type: str, rows: list[dict], id_field: str = "id") -> pd.DataFrame:
    """A frame of ``record_type`` from API objects (dicts) whose fields carry the schema's
    column names, the id in ``id_field``. Absent fields are empty; unparsable times are NaT."""
    columns = list(RECORD_TYPES[record_type].extracted_columns)
    raw = pd.DataFrame.from_records(rows, columns=[id_field, *columns]).rename(columns={id_field: "record_id"})
    return conform(record_type, raw)


def _as(s: pd.Series, kind: str) -> pd.Series:
    dtype = DTYPES[kind]
    if kind == TIME:
        # An empty or malformed value becomes NaT: planning quarantines the record, never guesses.
        if s.dtype == object:
            s = s.replace("", None)
        return pd.to_datetime(s, utc=True, errors="coerce", format="ISO8601").astype(dtype)
    if kind == FLAG:
        return s.astype("boolean").fillna(False).astype(dtype)
    if kind == KEY and s.dtype.kind == "f":  # an integer id column with NULLs, read as float
        return s.astype("Int64").astype(dtype)
    return s.astype(dtype)
