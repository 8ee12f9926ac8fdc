"""The CRM connector's value parser: flags, clocks and ids are read strictly, never guessed
(issue 10, item 5). Pure: rows in, a frame out, as the connector gets them from a driver."""

from __future__ import annotations

import datetime as dt

import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from retention.domain.records import CLOCK_RANGE, FLAG_SPELLINGS, UNREADABLE
from retention.systems.crm.values import TS, to_frame

COLUMNS = {"record_id": "int64", "opted_out": "bool", "membership_end": TS}


def frame(*rows) -> pd.DataFrame:
    return to_frame(list(rows), COLUMNS)


def unreadable(f: pd.DataFrame) -> list:
    return [None if pd.isna(v) else v for v in f[UNREADABLE]] if UNREADABLE in f else [None] * len(f)


def test_a_mixed_column_never_reads_no_as_true():
    # SQLite keeps 1 as an integer and 'no' as text in one column: the first value is no guide.
    f = frame((1, 1, None), (2, "no", None), (3, "false", None), (4, "0", None), (5, 0, None), (6, "f", None))
    assert f["opted_out"].tolist() == [True, False, False, False, False, False]
    assert unreadable(f) == [None] * 6


def test_unknown_spellings_are_unreadable_not_false():
    f = frame((1, "", None), (2, "maybe", None), (3, 2, None), (4, "yes", None), (5, " TRUE ", None), (6, None, None))
    assert unreadable(f) == ["opted_out", "opted_out", "opted_out", None, None, None]
    assert f["opted_out"].tolist()[3:] == [True, True, False]


def test_placeholder_and_unparsable_dates_are_unreadable():
    f = frame(
        (1, 0, dt.date(1, 1, 1)), (2, 0, "0001-01-01"), (3, 0, "9999-12-31"), (4, 0, "1900-01-01"),
        (5, 0, "soon"), (6, 0, "2025-02-30"), (7, 0, dt.datetime(9999, 12, 31, tzinfo=dt.UTC)),
        (8, 0, "2025-03-31"), (9, 0, dt.date(2025, 3, 31)), (10, 0, "2025-03-31T10:00:00Z"), (11, 0, None),
    )
    assert unreadable(f) == ["membership_end"] * 7 + [None] * 4
    assert f["membership_end"].iloc[:7].isna().all()
    local_midnight = pd.Timestamp("2025-03-30T22:00:00Z")  # 2025-03-31 starts at 22:00 UTC (CEST)
    assert f["membership_end"].iloc[7] == local_midnight and f["membership_end"].iloc[8] == local_midnight
    assert f["membership_end"].iloc[9] == pd.Timestamp("2025-03-31T10:00:00Z")


def test_ids_non_numeric_or_null_do_not_fail_the_frame():
    f = frame((7, 0, None), ("42", 0, None), ("LEGACY-7", 0, None), (None, 0, None), (b"\xff", 0, None), (1.5, 0, None))
    assert f["record_id"].tolist()[:2] == [7, 42]
    assert f["record_id"].iloc[2:].isna().all()
    assert unreadable(f) == [None, None, "record_id", None, "record_id", "record_id"]


def test_text_that_is_not_utf8_is_unreadable():
    f = to_frame([(1, b"lead"), (2, b"lea\xe9"), (3, "member")], {"record_id": "int64", "kind": "str"})
    assert f["kind"].iloc[0] == "lead" and f["kind"].iloc[2] == "member"
    assert unreadable(f) == [None, "kind", None]


TRUE_SPELLINGS = FLAG_SPELLINGS[True]


@settings(max_examples=400, deadline=None)
@given(st.one_of(
    st.text(max_size=8),
    st.sampled_from(sorted(FLAG_SPELLINGS[False] | {"", "maybe", "nej", "ja", "2", "-1", "yes please"})),
    st.integers(min_value=-5, max_value=5).filter(lambda i: i != 1),
    st.binary(max_size=6),
))
def test_property_nothing_outside_the_true_spellings_reads_true(value):
    f = frame((1, value, None))
    accepted = isinstance(value, str) and value.strip().lower() in TRUE_SPELLINGS
    if not accepted and isinstance(value, bytes):
        try:
            accepted = value.decode("utf-8").strip().lower() in TRUE_SPELLINGS
        except UnicodeDecodeError:
            pass
    if not accepted:
        assert not f["opted_out"].iloc[0], repr(value)


def _valid_in_range(text: str) -> bool:
    """An independent judge: ISO day or instant that Python parses, inside CLOCK_RANGE."""
    t = text.strip()
    try:
        if len(t) == 10:
            d = dt.date.fromisoformat(t)
            instant = dt.datetime(d.year, d.month, d.day, tzinfo=dt.UTC)
        else:
            instant = dt.datetime.fromisoformat(t.replace("Z", "+00:00"))
            instant = instant if instant.tzinfo else instant.replace(tzinfo=dt.UTC)
    except ValueError:
        return False
    low, high = CLOCK_RANGE
    return low - dt.timedelta(days=1) <= instant <= high + dt.timedelta(days=1)


@settings(max_examples=400, deadline=None)
@given(st.one_of(
    st.text(max_size=25),
    st.builds(
        lambda y, m, d, rest: f"{y:04d}-{m:02d}-{d:02d}{rest}",
        st.integers(0, 9999), st.integers(0, 13), st.integers(0, 32),
        st.sampled_from(["", "T10:00:00Z", " 10:00", "T25:00", "x", "T10:00:00+02:00", " "]),
    ),
))
def test_property_no_unparsable_date_yields_a_clock(text):
    clock = frame((1, 0, text))["membership_end"].iloc[0]
    if not _valid_in_range(text):
        assert pd.isna(clock), repr(text)
    if not pd.isna(clock):
        assert CLOCK_RANGE[0] <= clock.to_pydatetime() < CLOCK_RANGE[1]


# A column of the database's own types is converted as one array; the value-by-value reading is
# the reference it must agree with, value for value and in what it calls unreadable.
_OFFSETS = st.sampled_from([dt.UTC, dt.timezone(dt.timedelta(hours=2)), dt.timezone(dt.timedelta(hours=-11, minutes=-30))])
_INSTANTS = st.one_of(
    st.none(),
    st.datetimes(min_value=dt.datetime(1, 1, 2), max_value=dt.datetime(9999, 12, 30), timezones=st.one_of(st.none(), _OFFSETS)),
    st.datetimes(min_value=dt.datetime(1899, 12, 30), max_value=dt.datetime(2201, 1, 2), timezones=_OFFSETS),
)
_DAYS = st.one_of(st.none(), st.dates(), st.dates(min_value=dt.date(1899, 12, 30), max_value=dt.date(2201, 1, 2)))
_FLAGS = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.integers(2**62, 2**64))
_IDS = st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1), st.integers(2**63, 2**64))


def _same(fast: tuple[pd.Series, object], each: tuple[pd.Series, object]) -> None:
    pd.testing.assert_series_equal(fast[0], each[0])
    assert list(fast[1]) == list(each[1])


def _array(values: list) -> object:
    import numpy as np

    raw = np.empty(len(values), dtype=object)
    raw[:] = values
    return raw


@settings(max_examples=300, deadline=None)
@given(st.lists(_INSTANTS, max_size=12), st.lists(_DAYS, max_size=12), st.booleans())
def test_property_a_column_of_timestamps_or_dates_reads_as_value_by_value(instants, days, end_of_day):
    from retention.systems.crm import values

    for column in (instants, days):
        _same(values._clocks(_array(column), end_of_day=end_of_day), values._clocks_each(_array(column), end_of_day=end_of_day))


@settings(max_examples=300, deadline=None)
@given(st.lists(_FLAGS, max_size=12), st.lists(_IDS, max_size=12), st.booleans())
def test_property_a_column_of_flags_or_ids_reads_as_value_by_value(flags, ids, nullable):
    from retention.systems.crm import values

    _same(values._flags(_array(flags)), values._flags_each(_array(flags)))
    _same(values._ids(_array(ids), nullable=nullable), values._ids_each(_array(ids), nullable=nullable))
