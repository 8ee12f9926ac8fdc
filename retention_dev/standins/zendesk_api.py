"""The Zendesk stand-in's request handling: a request's entry (path, query, authentication),
the admin endpoints under ``/_standin/``, the limits and faults every API request passes, the
routing to the endpoint families (the incremental exports here, tickets in
:mod:`~retention_dev.standins.zendesk_tickets`, users in :mod:`~retention_dev.standins.zendesk_users`)
and the job thread."""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from retention_dev.standins.zendesk_common import ApiError
from retention_dev.standins.zendesk_limits import Limits, endpoint_family
from retention_dev.standins.zendesk_paging import export
from retention_dev.standins.zendesk_state import State
from retention_dev.standins.zendesk_tickets import TicketRoutes
from retention_dev.standins.zendesk_users import UserRoutes


class App(TicketRoutes, UserRoutes):
    """Routing, limits and faults around a :class:`State`."""

    def __init__(self, state: State, args: argparse.Namespace):
        self.state = state
        self.args = args
        self.limits = Limits(state, args)
        self.token = args.token
        self.stop_event = threading.Event()

    # --- job thread ------------------------------------------------------------------
    def job_loop(self) -> None:
        st = self.state
        with st.job_cond:
            while not self.stop_event.is_set():
                now = time.time()
                st.run_due_jobs(now)
                wait = (st.job_heap[0][0] - now) if st.job_heap else 0.5
                st.job_cond.wait(timeout=min(max(wait, 0.005), 0.5))

    # --- entry point -----------------------------------------------------------------
    def handle(self, method: str, raw_path: str, headers, body: bytes) -> tuple[int, dict, dict | None]:
        parts = urlsplit(raw_path)
        path = parts.path.rstrip("/")
        path = path.removesuffix(".json")
        query = parse_qs(parts.query, keep_blank_values=True)
        base = f"http://{headers.get('Host', '127.0.0.1')}"
        if path.startswith("/_standin/"):
            return self.admin(method, path, body)
        try:
            if not self.authorised(headers.get("Authorization")):
                raise ApiError(401, "Couldn't authenticate you")
            return self.api(method, path, query, base, body)
        except ApiError as exc:
            return exc.status, exc.headers, exc.body

    def authorised(self, header: str | None) -> bool:
        if not self.token:
            return True
        if not header:
            return False
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer":
            return value.strip() == self.token
        if scheme.lower() == "basic":
            try:
                user, _, password = base64.b64decode(value.strip()).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return False
            return user.endswith("/token") and password == self.token
        return False

    def admin(self, method: str, path: str, body: bytes) -> tuple[int, dict, dict | None]:
        st = self.state
        if method == "GET" and path == "/_standin/health":
            return 200, {}, {"ok": True}
        if method == "GET" and path == "/_standin/stats":
            with st.lock:
                return 200, {}, st.stats()
        if method == "POST" and path == "/_standin/save":
            if self.args.state_file:
                st.save(Path(self.args.state_file))
            return 200, {}, {"saved": bool(self.args.state_file)}
        if method == "POST" and path == "/_standin/faults":
            try:
                faults = json.loads(body or b"{}")
            except ValueError:
                return 400, {}, {"error": "InvalidJSON"}
            if not isinstance(faults, dict):
                return 400, {}, {"error": "InvalidJSON"}
            with st.lock:
                st.faults = {k: v for k, v in faults.items() if v is not None}
            return 200, {}, {"faults": st.faults}
        return 404, {}, {"error": "InvalidEndpoint"}

    def api(self, method: str, path: str, query: dict, base: str, body: bytes) -> tuple[int, dict, dict | None]:
        st = self.state
        family = endpoint_family(method, path)
        faults, matches = self.limits.enter(family, path)
        with st.lock:
            headers = self.limits.admit(family, faults, matches)
            status, payload = self.route(method, path, query, base, matches, body)
        slow_after = faults.get("slow_after_ms", 0) if matches else 0
        if slow_after:  # done, but the answer is late: the client may time out first
            time.sleep(float(slow_after) / 1000.0)
        return status, headers, payload

    # --- API routes (called with the lock held) ----------------------------------------
    def route(self, method: str, path: str, query: dict, base: str, fault_match: bool, body: bytes) -> tuple[int, dict]:
        seg = path.split("/")[1:]  # ["api", "v2", ...]
        if seg[:2] != ["api", "v2"] or len(seg) < 3:
            raise ApiError(404, "InvalidEndpoint", "Not found")
        seg = seg[2:]
        head = seg[0]
        answer = None
        if head == "incremental":
            if len(seg) == 3 and seg[2] == "cursor" and method == "GET" and seg[1] in ("tickets", "users"):
                answer = 200, export(self.state, query, base, tickets=seg[1] == "tickets",
                                     lag_seconds=self.args.export_lag_seconds)
        elif head in ("tickets", "deleted_tickets", "job_statuses"):
            answer = self.route_tickets(method, seg, query, base, fault_match, body)
        elif head in ("users", "deleted_users"):
            answer = self.route_users(method, seg, query, base, body)
        if answer is None:
            raise ApiError(404, "InvalidEndpoint", "Not found")
        return answer
