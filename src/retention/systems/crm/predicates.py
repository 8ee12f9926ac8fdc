"""The domain's candidate conditions (``retention.domain.candidates``) as SQL over a frame's columns.

The domain says which records a plan could touch; this module only translates, and where the
CRM's stored value could be read otherwise by :mod:`~retention.systems.crm.values` than SQL
would compare it, it includes the row (a superset is safe, a missing row is not):

* ``Unreadable``: a value in a form this module is not sure the strict reading accepts. On
  SQLite, judged per value by its storage class (``typeof``): a flag other than the integers 0
  and 1, an id that is no integer, a clock that is not exactly ``YYYY-MM-DD``,
  ``YYYY-MM-DD HH:MM:SS`` or ``YYYY-MM-DD HH:MM:SS.ffffff`` (a valid date and time, as SQLite's
  own ``date``/``datetime`` write it back) between 1902 and 2199, bytes that are no text. On
  PostgreSQL, by the column's declared type: booleans, integers and text are read as they are;
  a date or timestamp outside 1902 to 2199 (placeholders, ``infinity``) is included; a column
  of any other type (a flag kept as text, say) is not narrowed at all.
* ``AtMost``/``After``: widened by ``SLACK`` (two days), so that a date's start or end of day in
  Europe/Stockholm and a timestamp kept without time zone (read as UTC; PostgreSQL compares it
  in the session's zone) are inside the comparison whatever the offset.
* ``In``/``Missing``: exact, two-valued (a flag's NULL reads False; NULL is in no set).
* ``DuplicateKey``: nothing when the tables the frame is keyed on have their id as primary key;
  otherwise the keys the frame's rows share, by one grouped subquery.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import pandas as pd
import sqlalchemy as sa

from retention.domain import candidates as c

SLACK = pd.Timedelta(days=2)
# Clocks outside these years are included whatever the condition (the reading's range is 1901 to 2200).
_YEARS = (1902, 2199)  # compared as "YYYY-01-01" text on SQLite: "1902" alone would be a number to a DATE column
_DIGITS6 = "[0-9][0-9][0-9][0-9][0-9][0-9]"


@dataclass(frozen=True)
class Column:
    """A frame column in SQL: its expression, how the frame reads it (``id``, ``flag``, ``text``,
    ``clock``) and how it is stored: ``computed`` (an expression of the connector's own that
    always gives 0 or 1), else the stored column's SQL type (None: unknown)."""

    expr: sa.ColumnElement
    kind: str
    computed: bool = False
    sql_type: object = None


class Compiler:
    """A condition as a WHERE clause. By default a superset (the extract's candidates: clocks
    widened by ``SLACK``, a clock SQL cannot compare is true); with ``narrow`` a subset (the
    domain's ``surely_due``: clocks narrowed by ``SLACK``, a clock SQL cannot compare is false,
    and ``Not`` may wrap ``Unreadable``, which stays a superset, so its negation is a subset)."""

    def __init__(self, dialect: str, columns: dict[str, Column], duplicate: sa.ColumnElement | None, *, narrow: bool = False):
        self.dialect = dialect
        self.columns = columns
        self.duplicate = duplicate  # the rows whose key another row shares; None when keys are unique
        self.narrow = narrow

    def __call__(self, cond) -> sa.ColumnElement:
        if isinstance(cond, c.AllOf):
            return sa.and_(sa.true(), *(self(p) for p in cond.parts))
        if isinstance(cond, c.AnyOf):
            return sa.or_(sa.false(), *(self(p) for p in cond.parts))
        if isinstance(cond, c.Not):
            if self.narrow and isinstance(cond.part, c.Unreadable):
                return sa.not_(self(cond.part))
            if not _exact(cond.part):
                raise ValueError(f"only exact conditions can be negated, not {type(cond.part).__name__}")
            return sa.not_(self(cond.part))
        if isinstance(cond, c.Missing):
            return self.columns[cond.column].expr.is_(None)
        if isinstance(cond, c.In):
            return self._in(self.columns[cond.column], cond.values)
        if isinstance(cond, c.AtMost):
            slack = -SLACK if self.narrow else SLACK
            return self._compare(self.columns[cond.column], cond.instant + slack, at_most=True)
        if isinstance(cond, c.After):
            slack = SLACK if self.narrow else -SLACK
            return self._compare(self.columns[cond.column], cond.instant + slack, at_most=False)
        if isinstance(cond, c.Unreadable):
            return self._unreadable(self.columns[cond.column])
        if isinstance(cond, c.DuplicateKey):
            if self.narrow:
                raise ValueError("a duplicate key is no part of a narrowed condition")
            return sa.false() if self.duplicate is None else self.duplicate
        raise TypeError(f"unknown condition {cond!r}")

    # ---------------------------------------------------------------- exact parts
    def _in(self, col: Column, values: tuple) -> sa.ColumnElement:
        if col.kind == "flag":
            wanted = {bool(v) for v in values if isinstance(v, bool)}
            if not wanted:
                return sa.false()
            if self._native_bool(col):
                flag = sa.func.coalesce(col.expr, sa.false())
                return flag.in_([sa.true() if v else sa.false() for v in sorted(wanted)])
            return sa.func.coalesce(col.expr, 0).in_(sorted(int(v) for v in wanted))
        if col.kind == "clock":
            raise ValueError("a clock is compared with AtMost/After, not In")
        return sa.and_(col.expr.is_not(None), col.expr.in_(list(values)))

    def _native_bool(self, col: Column) -> bool:
        return not col.computed and self.dialect != "sqlite" and isinstance(col.sql_type, sa.Boolean)

    # ---------------------------------------------------------------- clocks
    def _clock_storage(self, col: Column) -> str | None:
        """``text`` (SQLite), ``date``, ``timestamp``, or None (not comparable in SQL)."""
        if self.dialect == "sqlite":
            return "text"
        if isinstance(col.sql_type, sa.DateTime):
            return "timestamp"
        if isinstance(col.sql_type, sa.Date):
            return "date"
        return None

    def _compare(self, col: Column, instant: pd.Timestamp, *, at_most: bool) -> sa.ColumnElement:
        storage = self._clock_storage(col)
        if storage is None:  # not comparable in SQL: anything may be, nothing is sure
            return sa.false() if self.narrow else sa.true()
        instant = pd.Timestamp(instant).tz_convert("UTC")
        # A bound the comparison cannot miss: an instant beyond the reading's range compares
        # with the range's edge (every readable clock is inside it).
        instant = min(max(instant, pd.Timestamp(dt.datetime(1900, 1, 1, tzinfo=dt.UTC))), pd.Timestamp(dt.datetime(2201, 1, 1, tzinfo=dt.UTC)))
        if storage == "text":
            bound = sa.literal(instant.strftime("%Y-%m-%d %H:%M:%S.%f"), sa.String)
        elif storage == "date":
            bound = sa.literal(instant.date(), sa.Date)
        else:
            bound = sa.literal(instant.to_pydatetime(), sa.DateTime(timezone=True))
        return col.expr <= bound if at_most else col.expr > bound

    # ---------------------------------------------------------------- unreadable
    def _unreadable(self, col: Column) -> sa.ColumnElement:
        if col.computed:
            return sa.false()
        e = col.expr
        if self.dialect == "sqlite":
            kind = sa.func.typeof(e)
            if col.kind == "id":
                return kind.not_in(["integer", "null"])
            if col.kind == "flag":
                return sa.not_(sa.or_(kind == "null", sa.and_(kind == "integer", e.in_([0, 1]))))
            if col.kind == "text":
                return kind.not_in(["text", "null"])
            return sa.not_(sa.or_(kind == "null", sa.and_(kind == "text", _sqlite_canonical_clock(e))))
        t = col.sql_type
        if col.kind == "id":
            return sa.false() if isinstance(t, sa.Integer) else sa.true()
        if col.kind == "flag":
            return sa.false() if isinstance(t, sa.Boolean) else sa.true()
        if col.kind == "text":
            return sa.false() if isinstance(t, sa.String) else sa.true()
        storage = self._clock_storage(col)
        if storage is None:
            return sa.true()
        lo, hi = (dt.date(y, 1, 1) for y in _YEARS)
        if storage == "date":
            inside = sa.and_(e >= sa.literal(lo, sa.Date), e < sa.literal(hi, sa.Date))
        else:
            lo_ts, hi_ts = (dt.datetime(d.year, 1, 1, tzinfo=dt.UTC) for d in (lo, hi))
            ts = sa.DateTime(timezone=True)
            inside = sa.and_(e >= sa.literal(lo_ts, ts), e < sa.literal(hi_ts, ts))
        return sa.and_(e.is_not(None), sa.not_(inside))


def _sqlite_canonical_clock(e: sa.ColumnElement) -> sa.ColumnElement:
    """Text SQLite's ``date``/``datetime`` of its day number write back unchanged (so a valid
    date and time: ``date`` alone would keep 30 February, the day number makes it 1 March) in
    one of the three forms the reading takes as they are, within the years it surely reads."""
    n = sa.func.length(e)
    head = sa.func.substr(e, 1, 19)
    return sa.and_(
        e >= sa.literal(f"{_YEARS[0]}-01-01", sa.String),
        e < sa.literal(f"{_YEARS[1]}-01-01", sa.String),
        sa.or_(
            sa.and_(n == 10, sa.func.date(sa.func.julianday(e)) == e),
            sa.and_(n == 19, sa.func.datetime(sa.func.julianday(e)) == e),
            sa.and_(
                n == 26,
                sa.func.datetime(sa.func.julianday(head)) == head,
                sa.func.substr(e, 20, 1) == ".",
                sa.func.substr(e, 21, 6).op("GLOB")(_DIGITS6),
            ),
        ),
    )


def _exact(cond) -> bool:
    if isinstance(cond, (c.In, c.Missing)):
        return True
    if isinstance(cond, (c.AllOf, c.AnyOf)):
        return all(_exact(p) for p in cond.parts)
    if isinstance(cond, c.Not):
        return _exact(cond.part)
    return False
