"""ISO 8601 calendar durations as a policy gives them: parsed and bounded, nothing more.

A period is at most a hundred years (``MAX_YEARS``): no retention period of a notice or a law
is longer, and a typo such as ``P99999999Y`` is refused when the policy is read instead of
crashing every plan. Light on purpose (no pandas): DAG files read their time limits with it at
parse time. Adding a period to timestamps is ``retention.domain.durations``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ISO = re.compile(
    r"^P(?!$)(?:(?P<y>\d+)Y)?(?:(?P<mo>\d+)M)?(?:(?P<w>\d+)W)?(?:(?P<d>\d+)D)?"
    r"(?:T(?=\d)(?:(?P<h>\d+)H)?(?:(?P<mi>\d+)M)?(?:(?P<s>\d+)S)?)?$"
)


# The longest period a policy may give. Lengths are compared in seconds, a year counting as
# 365.25 days and a month as a twelfth of that, so P100Y = P1200M = P36525D = PT3155760000S.
MAX_YEARS = 100
_YEAR_SECONDS = 31_557_600
_MONTH_SECONDS = _YEAR_SECONDS // 12
MAX_SECONDS = MAX_YEARS * _YEAR_SECONDS
_MAX_DIGITS = 12  # more digits than any period within the bound can need
_TOO_LONG = (
    "is longer than {years} years, the longest period a policy may give (P{years}Y, P{months}M, P{days}D; "
    "a month counts as 1/12 year, a day as 1/365.25)"
)


def _too_long(text: str) -> ValueError:
    shown = text if len(text) <= 24 else text[:20] + "..." + text[-1]
    return ValueError(
        f"{shown!r} " + _TOO_LONG.format(years=MAX_YEARS, months=12 * MAX_YEARS, days=MAX_SECONDS // 86400)
    )


@dataclass(frozen=True, order=True)
class Duration:
    months: int = 0
    days: int = 0
    seconds: int = 0
    text: str = "P0D"

    def __post_init__(self) -> None:
        if min(self.months, self.days, self.seconds) < 0:
            raise ValueError(f"{self.text!r}: a period cannot be negative")
        if self.length_seconds > MAX_SECONDS:
            raise _too_long(self.text)

    @property
    def length_seconds(self) -> int:
        """The period's length for the bound: months at 1/12 of 365.25 days."""
        return self.months * _MONTH_SECONDS + self.days * 86400 + self.seconds

    @classmethod
    def parse(cls, text: str) -> Duration:
        if not isinstance(text, str):
            raise ValueError(f"{text!r} is not an ISO 8601 duration (expected a string such as 'P1Y' or 'P90D')")
        m = _ISO.match(text.strip())
        if not m:
            raise ValueError(f"{text!r} is not an ISO 8601 duration (expected e.g. 'P1Y', 'P90D', 'P1Y6M')")
        if any(v and len(v.lstrip("0")) > _MAX_DIGITS for v in m.groupdict().values()):
            raise _too_long(text.strip())
        g = {k: int(v) if v else 0 for k, v in m.groupdict().items()}
        return cls(
            months=12 * g["y"] + g["mo"],
            days=7 * g["w"] + g["d"],
            seconds=3600 * g["h"] + 60 * g["mi"] + g["s"],
            text=text.strip(),
        )

    def add_to(self, local_naive):
        """Add this duration to naive local wall-clock timestamps (``durations.add_period``)."""
        from retention.domain.durations import add_period

        return add_period(local_naive, self)

    def __str__(self) -> str:
        return self.text
