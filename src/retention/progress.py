"""Progress lines for long work: counts, rate and ETA, at most every few seconds."""

from __future__ import annotations

import logging
import time


class Progress:
    def __init__(self, log: logging.Logger, label: str, total: int | None = None, every: float = 5.0):
        self.log = log
        self.label = label
        self.total = total
        self.every = every
        self.done = 0
        self.started = time.monotonic()
        self.last = self.started

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.log.info("%s", self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        if self.total:
            pct = 100.0 * self.done / self.total
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            return f"{self.label}: {self.done:,}/{self.total:,} ({pct:.0f}%), {rate:,.0f}/s, ETA {eta:,.0f}s"
        return f"{self.label}: {self.done:,} so far, {rate:,.0f}/s"

    def finish(self) -> float:
        elapsed = time.monotonic() - self.started
        self.log.info("%s: done, %s in %.1fs", self.label, f"{self.done:,}", elapsed)
        return elapsed
