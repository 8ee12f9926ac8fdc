"""A small retrying HTTP client shared by the Mailchimp and Zendesk connectors.

Both providers throttle with HTTP 429 (Zendesk says how long to wait in ``Retry-After``,
Mailchimp does not) and both fail transiently with 5xx or dropped connections. Nearly every call
the connectors make is idempotent (GETs, permanent deletes where "already gone" is success), so a
retry is safe; a call that creates something (a Zendesk ``destroy_many`` job) is made with
``resend=False`` and is not sent again once it may have reached the server (:class:`MaybeSent`):
its caller looks at what it did first. A ``Retry-After`` longer than ``max_retry_after`` is not
waited out (:class:`RetryAfterTooLong`). The retrying is tenacity's (``tenacity.Retrying`` around each call): a
``Retry-After`` on 429 or 503 (seconds or an HTTP date) is waited out, anything else retryable
waits a full-jitter exponential backoff. Retries happen above the ``requests`` transport, so an
adapter mounted on the session (the Zendesk pacer, :mod:`retention.systems.ratelimit`) sees, paces
and counts every attempt.

Logs name the method, the endpoint family and the status only: paths can carry subscriber
hashes, which are derived from e-mail addresses (so never tenacity's own ``before_sleep_log``,
whose exception text would name the URL).
"""

from __future__ import annotations

import email.utils
import logging
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import requests
import tenacity
from requests.adapters import HTTPAdapter

from retention.config import ConnectionFailed

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
#: Statuses whose ``Retry-After`` is obeyed (by the retries, and by the pacers).
RETRY_AFTER_STATUSES = frozenset({429, 503})
TRANSIENT_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
)
#: The longest ``Retry-After`` a task waits out (seconds) unless ``RETENTION_MAX_RETRY_AFTER`` or
#: the connection says otherwise: a server asking for more (86400, say) would hold a worker
#: slot for a day, so the request fails instead, and the records stay for a later attempt.
DEFAULT_MAX_RETRY_AFTER = 300.0
MAX_RETRY_AFTER_ENV = "RETENTION_MAX_RETRY_AFTER"


def max_retry_after_setting(value: float | str | None = None) -> float:
    """The cap on ``Retry-After``: ``value`` (a connection's), else ``RETENTION_MAX_RETRY_AFTER``,
    else 300 seconds. A ``ValueError`` naming where the value came from when it is not a number of
    seconds >= 0."""
    where = "max_retry_after"
    if value is None or value == "":
        value = os.environ.get(MAX_RETRY_AFTER_ENV) or None
        where = MAX_RETRY_AFTER_ENV
    if value is None:
        return DEFAULT_MAX_RETRY_AFTER
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a number of seconds, got {str(value)[:40]!r}") from None
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{where} must be a number of seconds >= 0, got {str(value)[:40]!r}")
    return seconds


class HTTPError(RuntimeError):
    """A request that failed for good (not retryable, or out of retries)."""

    def __init__(self, method: str, endpoint: str, status: int | None, detail: str):
        super().__init__(f"{method} {endpoint} failed with status {status}: {detail}")
        self.method = method
        self.endpoint = endpoint
        self.status = status
        self.detail = detail


class Unreachable(HTTPError, ConnectionFailed):
    """A request that could not reach the host, or whose credentials the host refused, out of
    retries: a user error naming where the host is set (``RetryingSession.where``, the
    Connection and its role), never the URL. Still an :class:`HTTPError` for the callers that
    book a failed batch and go on."""

    def __init__(self, method: str, endpoint: str, status: int | None, where: str, why: str, *, transient: bool):
        RuntimeError.__init__(self, f"{where}: {why} ({method} {endpoint})")
        self.method, self.endpoint, self.status, self.detail = method, endpoint, status, why
        self.transient = transient


# What ``requests`` says when it cannot connect -> why, in words that name no host.
_UNREACHABLE = (
    ("nameresolutionerror", "cannot connect: its host name does not resolve"),
    ("name or service not known", "cannot connect: its host name does not resolve"),
    ("failed to resolve", "cannot connect: its host name does not resolve"),
    ("connection refused", "cannot connect: nothing listens at its host and port (connection refused)"),
    ("ssl", "cannot connect: the TLS handshake failed"),
    ("timed out", "cannot connect: the connection timed out"),
)


def _unreachable_why(exc: BaseException) -> str:
    text = f"{type(exc).__name__} {exc}".lower()
    for needle, why in _UNREACHABLE:
        if needle in text:
            return why
    return f"the connection failed ({type(exc).__name__})"


class MaybeSent(HTTPError):
    """A request that must not be sent twice (``resend=False``: it creates something, such as a
    background job) lost its answer after it may have reached the server (a read timeout, a
    connection dropped mid-answer). Whether it took effect is unknown: the caller looks before
    sending it again."""


class RetryAfterTooLong(HTTPError):
    """The server asked to wait longer than the client may (``max_retry_after``): the request
    fails at once, and so does every request of the session until that time has passed, without
    being sent. Retryable later: nothing was done, the records stay planned or failed."""

    def __init__(self, method: str, endpoint: str, status: int | None, seconds: float, cap: float):
        super().__init__(method, endpoint, status, f"Retry-After {seconds:.0f}s exceeds the maximum wait of {cap:g}s")
        self.seconds = seconds


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


def retry_after(response: requests.Response) -> float | None:
    """Seconds the server asked to wait before the next attempt: the ``Retry-After`` of a 429 or
    503, else None."""
    if response.status_code not in RETRY_AFTER_STATUSES:
        return None
    return retry_after_seconds(response.headers.get("Retry-After"))


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


class BoundedAdapter(HTTPAdapter):
    """A transport with at most ``max_connections`` connections (the pool blocks rather than
    opening more) and no retries of its own (:class:`RetryingSession` retries)."""

    def __init__(self, max_connections: int):
        super().__init__(pool_connections=1, pool_maxsize=max_connections, pool_block=True, max_retries=0)


class RetryingSession:
    """``requests`` with a bounded connection pool, backoff and ``Retry-After``.

    ``max_connections`` caps simultaneous connections (the pool blocks rather than opening
    more), which is how Mailchimp's limit of 10 simultaneous connections per user is honoured.
    A request is tried at most ``1 + max_retries`` times; the wait before the n-th retry is the
    server's ``Retry-After`` on 429/503, else random within ``[0, min(max_backoff, backoff *
    2**(n-1))]`` (full jitter: spreads the retries of threads that were throttled together).
    The options are read on every retry, so they may be changed on a live session. ``adapter``
    replaces the default transport (a :class:`BoundedAdapter`) and should keep to
    ``max_connections`` too. ``stats`` counts ``retries``, ``throttled`` (429s retried),
    ``server_errors`` (5xx retried) and ``connection_errors`` (every dropped connection or
    timeout, the last one included).
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
        adapter: HTTPAdapter | None = None,
        max_retry_after: float | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.max_retry_after = max_retry_after_setting(max_retry_after)
        # Until when (time.monotonic) the server told us to stay away for longer than we wait.
        self._closed_until = float("-inf")
        self.max_connections = max_connections
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.timeout = timeout
        self.sleep = sleep
        self.stats = RetryStats()
        #: Where the host is set, for errors a user can fix ("connection 'retention_zendesk' (the
        #: Zendesk API)"); set by the hook. Without it failures are plain :class:`HTTPError`\s.
        self.where: str | None = None
        self.session = requests.Session()
        adapter = adapter if adapter is not None else BoundedAdapter(max_connections)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        if auth is not None:
            self.session.auth = auth
        if headers:
            self.session.headers.update(headers)
        self._retrying = tenacity.Retrying(
            retry=self._should_retry,
            stop=self._should_stop,
            wait=self._wait,
            sleep=lambda seconds: self.sleep(seconds),
            before_sleep=self._before_sleep,
            retry_error_callback=_last_outcome,
        )

    def close(self) -> None:
        self.session.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        endpoint: str | None = None,
        ok: tuple[int, ...] = (200, 201, 202, 204),
        accept: tuple[int, ...] = (),
        resend: bool = True,
        **kwargs: Any,
    ) -> requests.Response:
        """Send a request, retrying 429, 5xx and dropped connections.

        ``ok`` statuses are returned; ``accept`` statuses are returned too without counting as
        success (a 404 on a permanent delete means "already gone"). Anything else raises
        :class:`HTTPError`. ``endpoint`` is the loggable name of the call (no identifiers).
        ``resend=False``: the request is not sent again once it may have reached the server
        without its answer reaching us (only a connect timeout, a 429 or a 5xx is retried);
        then :class:`MaybeSent` is raised.
        """
        url = path if path.startswith("http") else f"{self.base_url}{path}"
        kwargs.setdefault("timeout", self.timeout)
        call = _Call(method, url, endpoint or method, ok, accept, kwargs, resend)
        self._refuse_while_closed(call)
        try:
            # A copy per call: the controller keeps per-thread state, which a request made
            # from within a request (an auth hook, say) would otherwise overwrite.
            response = self._retrying.copy()(self._attempt, call)
        except TRANSIENT_ERRORS as exc:
            if not resend and not _never_sent(exc):
                raise MaybeSent(method, call.endpoint, None, type(exc).__name__) from None
            if self.where:
                raise Unreachable(method, call.endpoint, None, self.where, _unreachable_why(exc), transient=True) from None
            raise HTTPError(method, call.endpoint, None, type(exc).__name__) from None
        status = response.status_code
        if status in ok or status in accept:
            return response
        if self.where and status in (401, 403):
            why = f"the API refused the credentials (HTTP {status}): check the Connection's password or token"
            raise Unreachable(method, call.endpoint, status, self.where, why, transient=False)
        waited = retry_after(response)
        if waited is not None and waited > self.max_retry_after:
            self._closed_until = max(self._closed_until, time.monotonic() + waited)
            log.warning("%s %s: HTTP %s asks to wait %.0fs, more than %gs: failing", method, call.endpoint, status,
                        waited, self.max_retry_after)
            raise RetryAfterTooLong(method, call.endpoint, status, waited, self.max_retry_after)
        raise HTTPError(method, call.endpoint, status, _short_detail(response))

    def _refuse_while_closed(self, call: _Call) -> None:
        left = self._closed_until - time.monotonic()
        if left > 0:
            raise RetryAfterTooLong(call.method, call.endpoint, None, left, self.max_retry_after)

    # -- the parts of the tenacity controller -------------------------------------------------
    def _attempt(self, call: _Call) -> requests.Response:
        try:
            return self.session.request(call.method, call.url, **call.kwargs)
        except TRANSIENT_ERRORS:
            self.stats.add("connection_errors")
            raise

    def _should_retry(self, retry_state: tenacity.RetryCallState) -> bool:
        outcome = retry_state.outcome
        assert outcome is not None
        call: _Call = retry_state.args[0]
        if outcome.failed:
            exc = outcome.exception()
            return isinstance(exc, TRANSIENT_ERRORS) and (call.resend or _never_sent(exc))
        response = outcome.result()
        status = response.status_code
        if status not in RETRY_STATUSES or status in call.ok or status in call.accept:
            return False
        waited = retry_after(response)
        # A wait longer than the cap is not waited out: the request fails (see request()).
        return waited is None or waited <= self.max_retry_after

    def _should_stop(self, retry_state: tenacity.RetryCallState) -> bool:
        return tenacity.stop_after_attempt(self.max_retries + 1)(retry_state)

    def _wait(self, retry_state: tenacity.RetryCallState) -> float:
        """The server's ``Retry-After`` when it sent one, else full-jitter exponential backoff."""
        outcome = retry_state.outcome
        if outcome is not None and not outcome.failed:
            waited = retry_after(outcome.result())
            if waited is not None:
                return waited
        return tenacity.wait_random_exponential(multiplier=self.backoff, max=self.max_backoff)(retry_state)

    def _before_sleep(self, retry_state: tenacity.RetryCallState) -> None:
        """Count and log (redacted: method, endpoint family, status) the attempt to be retried."""
        outcome = retry_state.outcome
        assert outcome is not None
        call: _Call = retry_state.args[0]
        if outcome.failed:
            what = type(outcome.exception()).__name__
        else:
            response = outcome.result()
            self.stats.add("throttled" if response.status_code == 429 else "server_errors")
            response.close()
            what = f"HTTP {response.status_code}"
        log.debug("%s %s: %s, retrying in %.2fs", call.method, call.endpoint, what, retry_state.upcoming_sleep)
        self.stats.add("retries")


@dataclass(frozen=True, slots=True)
class _Call:
    """One request through the retries: what tenacity hands to the attempt and the callbacks."""

    method: str
    url: str
    endpoint: str
    ok: tuple[int, ...]
    accept: tuple[int, ...]
    kwargs: dict[str, Any]
    resend: bool = True


def _never_sent(exc: BaseException) -> bool:
    """Whether a transport error certainly came before the request reached the server (the
    connection was never made). Anything else, a read timeout above all, may have come after."""
    return isinstance(exc, requests.ConnectTimeout)


def _last_outcome(retry_state: tenacity.RetryCallState) -> requests.Response:
    """Out of retries: the last response (the caller turns it into an :class:`HTTPError`), or the
    last exception, raised as it is."""
    assert retry_state.outcome is not None
    return retry_state.outcome.result()


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
