"""Client-side rate limits, kept beside the retrying transport (:mod:`retention.systems.http`).

A :class:`Pacer` spaces calls so that a rolling window never sees more than its limit; a
:class:`PacedAdapter` is the ``requests`` transport that makes every request actually sent
(retries included, since the retries run above the transport) wait for the pacers of its
:class:`Route`, counts it, and pushes the route's first pacer back by the server's
``Retry-After``. Which route a request takes, with which pacers and priority, is the client's
business (the Zendesk client's: :mod:`retention.systems.ticketing.limits`).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

from retention.systems.http import BoundedAdapter, retry_after


class Pacer:
    """Spaces calls so that no rolling ``window`` of seconds sees more than ``limit`` of them.

    A slot scheduler (GCRA with a burst of one): slots are one interval apart, each call takes
    the next free one and waits for it. The interval leaves a margin of ``1 - safety`` of the
    window, and at least ``min_slack`` seconds per window, for the jitter between taking a slot
    and the request reaching the server. Calls waiting for a slot get it by ``priority``
    (higher first, then in arrival order): who is served next changes, the slots do not.
    Thread safe.
    """

    def __init__(
        self,
        limit: float,
        window: float = 60.0,
        *,
        safety: float = 0.98,
        min_slack: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if limit <= 0:
            raise ValueError("limit must be positive")
        self.interval = max(window / (limit * safety), (window + min_slack) / limit)
        self.clock = clock
        self.sleep = sleep
        self._next = 0.0
        self._cond = threading.Condition()
        self._queue: list[tuple[int, int]] = []  # (-priority, arrival) of the calls waiting
        self._arrivals = itertools.count()
        self.waited = 0.0

    def acquire(self, priority: int = 0) -> None:
        """Wait for a slot; calls of higher ``priority`` waiting at the same time go first."""
        with self._cond:
            start = self.clock()
            if not self._queue and self._next <= start:
                self._next = start + self.interval
                return
            me = (-priority, next(self._arrivals))
            heapq.heappush(self._queue, me)
            try:
                while True:
                    if self._queue[0] != me:
                        self._cond.wait()
                        continue
                    now = self.clock()
                    if self._next <= now:
                        heapq.heappop(self._queue)
                        self._next = now + self.interval
                        self.waited += now - start
                        return
                    delay = self._next - now
                    # First in line: wait for the slot without the lock; a call of higher
                    # priority arriving meanwhile becomes first in line and takes it instead.
                    self._cond.release()
                    try:
                        self.sleep(delay)
                    finally:
                        self._cond.acquire()
            finally:
                if me in self._queue:
                    self._queue.remove(me)
                    heapq.heapify(self._queue)
                self._cond.notify_all()

    def busy(self) -> bool:
        """Whether calls are waiting for a slot, or the next one is in the future."""
        with self._cond:
            return bool(self._queue) or self._next > self.clock()

    def defer(self, seconds: float) -> None:
        """No slot before ``seconds`` from now (the server said so with ``Retry-After``)."""
        with self._cond:
            self._next = max(self._next, self.clock() + seconds)
            self._cond.notify_all()


class Route(NamedTuple):
    """How one request is paced: its loggable family (no identifiers), the pacers of the limits
    it counts against (the most specific first: a ``Retry-After`` defers that one) and its
    priority while it waits for them."""

    family: str
    pacers: tuple[Pacer, ...]
    priority: int = 0


class PacedAdapter(BoundedAdapter):
    """Paces and counts every request actually sent, retries included.

    ``route(method, path_url)`` names the :class:`Route` of a request; ``on_send(family)`` is
    called once per request sent. A 429 or 503 with ``Retry-After`` defers the route's first
    pacer by that much, so that the other threads wait too instead of meeting the same answer;
    a ``Retry-After`` longer than ``max_retry_after`` (the session's cap, set by the client) does
    not: that request fails, and the session refuses the others itself, without a day's wait here.
    """

    max_retry_after = float("inf")

    def __init__(
        self,
        route: Callable[[str, str], Route],
        *,
        max_connections: int,
        on_send: Callable[[str], None] | None = None,
    ):
        self._route = route
        self._on_send = on_send
        super().__init__(max_connections)

    def send(self, request, **kwargs):
        route = self._route(request.method, request.path_url)
        for pacer in route.pacers:
            pacer.acquire(route.priority)
        if self._on_send is not None:
            self._on_send(route.family)
        response = super().send(request, **kwargs)
        wait_s = retry_after(response)
        if wait_s and route.pacers and wait_s <= self.max_retry_after:
            route.pacers[0].defer(wait_s)
        return response


__all__ = ["PacedAdapter", "Pacer", "Route"]
