"""The Zendesk stand-in's limits and injected faults: rolling-window rate limits (general and per
endpoint family), the rate-limit headers, the job-slot limit and the faults set through
``POST /_standin/faults`` (``throttle_next`` with ``retry_after`` (seconds, default 1),
``error_next``/``error_status``, ``slow_ms`` (before the request is handled), ``slow_after_ms``
(after it is handled, before the answer: a client that times out then does not know whether
its request took effect), ``fail_job_next``/``fail_job_after``, ``match``)."""

from __future__ import annotations

import argparse
import math
import time
from collections import deque

from retention_dev.standins.zendesk_common import ApiError
from retention_dev.standins.zendesk_state import State


class RollingWindow:
    """At most ``limit`` events in any rolling ``window`` seconds."""

    def __init__(self, limit: int, window: float):
        self.limit = limit
        self.window = window
        self.events: deque[float] = deque()

    def _trim(self, now: float) -> None:
        while self.events and self.events[0] <= now - self.window:
            self.events.popleft()

    def acquire(self, now: float) -> tuple[bool, int, int]:
        """(allowed, remaining after this request, seconds until a slot frees)."""
        self._trim(now)
        if len(self.events) >= self.limit:
            wait = self.events[0] + self.window - now
            return False, 0, max(1, math.ceil(wait))
        self.events.append(now)
        reset = math.ceil(self.events[0] + self.window - now) if self.events else 0
        return True, self.limit - len(self.events), reset


def endpoint_family(method: str, path: str) -> str:
    """The endpoint family of a request (no identifiers), for counters and limits."""
    seg = [s for s in path.split("/") if s][2:]
    if not seg:
        return f"{method} other"
    if seg[0] == "incremental":
        return "incremental." + (seg[1] if len(seg) > 1 else "")
    if seg[0] == "deleted_tickets":
        if len(seg) == 1:
            return "deleted_tickets.list" if method == "GET" else "deleted_tickets.other"
        return "deleted_tickets.destroy_many" if seg[1] == "destroy_many" else "deleted_tickets.destroy"
    if seg[0] == "deleted_users":
        if len(seg) == 1:
            return "deleted_users.list"
        if seg[1:] == ["count"]:
            return "deleted_users.count"
        return "deleted_users.destroy" if method == "DELETE" else "deleted_users.show"
    if seg[0] == "users" and seg[2:] == ["tickets", "requested"]:
        return "users.tickets_requested"
    if seg[0] == "job_statuses":
        return "job_statuses.show_many" if seg[1:] == ["show_many"] else "job_statuses"
    if seg[0] in ("tickets", "users"):
        if len(seg) > 1 and not seg[1].isdigit():
            return f"{seg[0]}.{seg[1]}"
        return f"{seg[0]}.{method.lower()}"
    return seg[0]


def rate_headers(limit: int, remaining: int, reset: int, *, retry: int | None = None) -> dict:
    headers = {
        "X-Rate-Limit": str(limit),
        "X-Rate-Limit-Remaining": str(remaining),
        "ratelimit-limit": str(limit),
        "ratelimit-remaining": str(remaining),
        "ratelimit-reset": str(reset),
    }
    if retry is not None:
        headers["Retry-After"] = str(retry)
    return headers


class Limits:
    """The limits and faults every API request of one :class:`State` passes."""

    def __init__(self, state: State, args: argparse.Namespace):
        self.state = state
        minute = float(args.window_seconds)
        self.general = RollingWindow(args.requests_per_minute, minute)
        self.incremental = RollingWindow(args.incremental_per_minute, minute)
        self.deleted_list = RollingWindow(args.deleted_list_per_minute, minute)
        self.user_deletes = RollingWindow(args.user_deletes_per_10min, 10 * minute)
        self.max_jobs = args.max_jobs

    def _fault_matches(self, path: str) -> bool:
        match = self.state.faults.get("match")
        return not match or match in path

    def enter(self, family: str, path: str) -> tuple[dict, bool]:
        """Count the request in and apply a ``slow_ms`` delay: the faults in force, and whether
        they apply to this request."""
        st = self.state
        with st.lock:
            st.counters["requests"] += 1
            st.counters[f"req:{family}"] += 1
            faults = st.faults
            matches = bool(faults) and self._fault_matches(path)
            slow = faults.get("slow_ms", 0) if matches else 0
        if slow:
            time.sleep(float(slow) / 1000.0)
        return faults, matches

    def admit(self, family: str, faults: dict, matches: bool) -> dict:
        """The injected 429/5xx and the rate limits (with the lock held): raises ApiError, or
        returns the rate-limit headers of the answer."""
        st = self.state
        if matches and faults.get("throttle_next", 0) > 0:
            faults["throttle_next"] -= 1
            st.counters["throttled"] += 1
            st.counters["errors_injected"] += 1
            retry = str(faults.get("retry_after", 1))
            raise ApiError(429, "APIRateLimitExceeded", "Rate limit exceeded (injected)", {"Retry-After": retry})
        if matches and faults.get("error_next", 0) > 0:
            faults["error_next"] -= 1
            st.counters["errors_injected"] += 1
            status = int(faults.get("error_status", 503))
            raise ApiError(status, "ServiceUnavailable" if status == 503 else "InternalError", "Injected error")
        now = time.time()
        ok, remaining, reset = self.general.acquire(now)
        limit = self.general.limit
        if not ok:
            st.counters["throttled"] += 1
            raise ApiError(429, "APIRateLimitExceeded", "Rate limit exceeded", rate_headers(limit, 0, reset, retry=reset))
        extra = None
        if family.startswith("incremental"):
            extra = self.incremental
        elif family == "deleted_tickets.list":
            extra = self.deleted_list
        elif family == "deleted_users.destroy":
            extra = self.user_deletes
        if extra is not None:
            ok2, _, reset2 = extra.acquire(now)
            if not ok2:
                st.counters["throttled"] += 1
                raise ApiError(
                    429, "APIRateLimitExceeded", "Endpoint rate limit exceeded",
                    rate_headers(limit, remaining, reset, retry=reset2),
                )
        return rate_headers(limit, remaining, reset)

    def job_slot(self, fault_match: bool) -> int | None:
        """Room for one more job (else 429 TooManyJobs); the ``fail_after`` of an injected job
        failure, or None (with the lock held)."""
        st = self.state
        if st.active_jobs() >= self.max_jobs:
            wait = max(1, math.ceil(st.job_heap[0][0] - time.time())) if st.job_heap else 1
            st.counters["throttled"] += 1
            raise ApiError(429, "TooManyJobs", "Too many jobs queued or running", {"Retry-After": str(wait)})
        fail_after = None
        faults = st.faults
        if fault_match and faults.get("fail_job_next", 0) > 0:
            faults["fail_job_next"] -= 1
            st.counters["errors_injected"] += 1
            fail_after = int(faults.get("fail_job_after", 0))
        return fail_after
