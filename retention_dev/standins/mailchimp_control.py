"""The Mailchimp stand-in's faults and limits: the simultaneous-connection limit per API key,
the faults set through ``POST /_standin/faults`` (``throttle_next``, ``error_next``/
``error_status``, ``drop_next``, ``slow_ms``, ``match``) and the request counters."""

from __future__ import annotations

import threading
from typing import Any

from retention_dev.standins.mailchimp_errors import ApiError


class Control:
    """Fault settings, the in-flight limit and the request counters."""

    COUNTERS = (
        "requests",
        "permanent_deletes",
        "archives",
        "updates",
        "adds",
        "throttled",
        "throttled_injected",
        "errors_injected",
        "drops",
        "max_in_flight",
        "internal_errors",
    )

    def __init__(self, max_connections: int):
        self.lock = threading.Lock()
        self.max_connections = max_connections
        self.in_flight: dict[str, int] = {}
        self.faults: dict[str, Any] = {}
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.counters = dict.fromkeys(self.COUNTERS, 0)
            self.by_kind: dict[str, int] = {}

    def add(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counters[name] += n

    def enter(self, key: str, kind: str) -> bool:
        """Count a request in; False when it exceeds the simultaneous-connection limit."""
        with self.lock:
            self.counters["requests"] += 1
            self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
            n = self.in_flight.get(key, 0) + 1
            self.in_flight[key] = n
            self.counters["max_in_flight"] = max(self.counters["max_in_flight"], n)
            if n > self.max_connections:
                self.in_flight[key] = n - 1
                self.counters["throttled"] += 1
                return False
            return True

    def leave(self, key: str) -> None:
        with self.lock:
            self.in_flight[key] -= 1

    def set_faults(self, spec: dict) -> dict:
        faults: dict[str, Any] = {}
        for name in ("throttle_next", "error_next", "drop_next", "slow_ms"):
            value = int(spec.get(name) or 0)
            if value < 0:
                raise ApiError(400, "Invalid Resource", f"{name} must be >= 0")
            if value:
                faults[name] = value
        status = int(spec.get("error_status") or 503)
        if not 500 <= status <= 599:
            raise ApiError(400, "Invalid Resource", "error_status must be a 5xx status")
        faults["error_status"] = status
        match = spec.get("match")
        if match is not None and not isinstance(match, str):
            raise ApiError(400, "Invalid Resource", "match must be a string")
        faults["match"] = match or ""
        if not any(faults.get(name) for name in ("throttle_next", "error_next", "drop_next", "slow_ms")):
            faults = {}  # nothing to inject: cleared
        with self.lock:
            self.faults = faults
        return dict(faults)

    def take_fault(self, target: str) -> tuple[str | None, float, int]:
        """Which fault (``throttle`` | ``error`` | ``drop`` | None) hits this request, the delay
        in seconds and the status of an injected error."""
        with self.lock:
            f = self.faults
            if not f or f["match"] not in target:
                return None, 0.0, 0
            delay = f.get("slow_ms", 0) / 1000.0
            for name, kind in (("throttle_next", "throttle"), ("error_next", "error"), ("drop_next", "drop")):
                if f.get(name, 0) > 0:
                    f[name] -= 1
                    return kind, delay, f["error_status"]
            return None, delay, f["error_status"]

    def stats(self) -> dict:
        with self.lock:
            out = dict(self.counters)
            out["requests_by_kind"] = dict(self.by_kind)
            out["in_flight"] = sum(self.in_flight.values())
            out["faults"] = dict(self.faults)
            return out
