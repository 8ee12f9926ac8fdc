"""A small retrying HTTP client shared by the Mailchimp and Zendesk connectors.

Both providers throttle with HTTP 429 (Zendesk says how long to wait in ``Retry-After``,
Mailchimp does not) and both fail transiently with 5xx or dropped connections. Every call the
connectors make is idempotent (GETs, permanent deletes where "already gone" is success), so a
retry is always safe. Logs name the method, the endpoint family and the status only: paths
can carry subscriber hashes, which are derived from e-mail addresses.
"""

from __future__ import annotations

import email.utils
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import requests
from requests.adapters import HTTPAdapter

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
TRANSIENT_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
)


class HTTPError(RuntimeError):
    """A request that failed for good (not retryable, or out of retries)."""

    def __init__(self, method: str, endpoint: str, status: int | None, detail: str):
        super().__init__(f"{method} {endpoint} failed with status {status}: {detail}")
        self.method = method
        self.endpoint = endpoint
        self.status = status
        self.detail = detail


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Parse a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (now if now is not None else time.time()))


@dataclass
class RetryStats:
    """Thread-safe counters of what the client had to absorb."""

    counts: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counts[name] += n

    def as_dict(self) -> dict[str, int]:
        with self.lock:
            return dict(self.counts)


class RetryingSession:
    """``requests`` with a bounded connection pool, backoff and ``Retry-After``.

    ``max_connections`` caps simultaneous connections (the pool blocks rather than opening
    more), which is how Mailchimp's limit of 10 simultaneous connections per user is honoured.
    """

    def __init__(
        self,
        base_url: str,
        *,
        auth: Any = None,
        headers: dict[str, str] | None = None,
        max_connections: int = 10,
        max_retries: int = 10,
        backoff: float = 0.25,
        max_backoff: float = 30.0,
        timeout: float = 60.0,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.base_url = base_url.rstrip("/")
        self.max_connections = max_connections
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.timeout = timeout
        self.sleep = sleep
        self.stats = RetryStats()
        self.session = requests.Session()
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=max_connections, pool_block=True, max_retries=0)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        if auth is not None:
            self.session.auth = auth
        if headers:
            self.session.headers.update(headers)

    def close(self) -> None:
        self.session.close()

    def _delay(self, attempt: int) -> float:
        # Full jitter: spreads the retries of ten threads that were throttled together.
        return random.uniform(0, min(self.max_backoff, self.backoff * (2**attempt)))

    def request(
        self,
        method: str,
        path: str,
        *,
        endpoint: str | None = None,
        ok: tuple[int, ...] = (200, 201, 202, 204),
        accept: tuple[int, ...] = (),
        **kwargs: Any,
    ) -> requests.Response:
        """Send a request, retrying 429, 5xx and dropped connections.

        ``ok`` statuses are returned; ``accept`` statuses are returned too without counting as
        success (a 404 on a permanent delete means "already gone"). Anything else raises
        :class:`HTTPError`. ``endpoint`` is the loggable name of the call (no identifiers).
        """
        url = path if path.startswith("http") else f"{self.base_url}{path}"
        endpoint = endpoint or method
        kwargs.setdefault("timeout", self.timeout)
        attempt = 0
        while True:
            try:
                response = self.session.request(method, url, **kwargs)
            except TRANSIENT_ERRORS as exc:
                self.stats.add("connection_errors")
                if attempt >= self.max_retries:
                    raise HTTPError(method, endpoint, None, type(exc).__name__) from None
                delay = self._delay(attempt)
                log.debug("%s %s: %s, retrying in %.2fs", method, endpoint, type(exc).__name__, delay)
            else:
                status = response.status_code
                if status in ok or status in accept:
                    return response
                if status not in RETRY_STATUSES or attempt >= self.max_retries:
                    raise HTTPError(method, endpoint, status, _short_detail(response))
                if status == 429:
                    self.stats.add("throttled")
                    waited = retry_after_seconds(response.headers.get("Retry-After"))
                    delay = waited if waited is not None else self._delay(attempt)
                else:
                    self.stats.add("server_errors")
                    delay = self._delay(attempt)
                response.close()
                log.debug("%s %s: HTTP %s, retrying in %.2fs", method, endpoint, status, delay)
            self.stats.add("retries")
            attempt += 1
            self.sleep(delay)


def _short_detail(response: requests.Response) -> str:
    """The provider's error title, never the body (it may echo personal data back)."""
    try:
        body = response.json()
    except ValueError:
        return response.reason or ""
    if isinstance(body, dict):
        for key in ("title", "error", "type"):
            value = body.get(key)
            if isinstance(value, str):
                return value[:200]
    return response.reason or ""
