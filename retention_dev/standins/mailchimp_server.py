"""The Mailchimp stand-in's HTTP server: the request handler (authentication, the in-flight
limit, injected throttles/errors/drops, writing the answer), the admin endpoints under
``/_standin/`` and the saving of the state file. The API itself is
:class:`~retention_dev.standins.mailchimp_routes.MemberRoutes`."""

from __future__ import annotations

import base64
import json
import logging
import socket
import threading
import time
from datetime import datetime
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from retention_dev.standins.mailchimp_audience import Audience, list_state_file
from retention_dev.standins.mailchimp_control import Control
from retention_dev.standins.mailchimp_errors import ApiError, json_object, problem
from retention_dev.standins.mailchimp_routes import MemberRoutes

log = logging.getLogger("retention_dev.standins.mailchimp")

REASONS = {
    200: "OK",
    204: "No Content",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}

class DropConnection(Exception):
    """Cut the connection without a response (after the request took effect)."""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "MailchimpStandIn/1.0"
    disable_nagle_algorithm = True
    timeout = 300

    server: StandInServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    # -- plumbing ----------------------------------------------------------------------------
    def _send(self, status: int, body: Any = None) -> None:
        if status == 204 or body is None:
            payload = b""
            head = f"HTTP/1.1 {status} {REASONS.get(status, '')}\r\n"
            if status != 204:
                head += "Content-Length: 0\r\n"
        else:
            payload = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
            ctype = "application/problem+json" if status >= 400 else "application/json; charset=utf-8"
            head = (
                f"HTTP/1.1 {status} {REASONS.get(status, '')}\r\n"
                f"Content-Type: {ctype}\r\nContent-Length: {len(payload)}\r\n"
            )
        # Like the real API, every answer says the server's time (the change feed's cursor reads it).
        head += f"Date: {formatdate(self.server.now(), usegmt=True)}\r\n"
        if self.close_connection:
            head += "Connection: close\r\n"
        self.wfile.write(head.encode() + b"\r\n" + payload)

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _api_key(self) -> str | None:
        auth = self.headers.get("Authorization") or ""
        scheme, _, value = auth.partition(" ")
        scheme = scheme.lower()
        if scheme == "basic":
            try:
                decoded = base64.b64decode(value.strip(), validate=True).decode()
            except (ValueError, UnicodeDecodeError):
                return None
            return decoded.partition(":")[2]
        if scheme in ("bearer", "apikey"):
            return value.strip()
        return None

    def _handle(self, method: str) -> None:
        body = self._read_body()
        url = urlsplit(self.path)
        path = url.path
        try:
            if path.startswith("/_standin/"):
                self._send(*self.server.admin(method, path, body))
                return
            if path != "/3.0" and not path.startswith("/3.0/"):
                raise ApiError(404, "Resource Not Found", "The requested resource could not be found.")
        except ApiError as exc:
            self._send(exc.status, problem(exc.status, exc.title, exc.detail))
            return
        self._api(method, path, url.query, body)

    def _api(self, method: str, path: str, query: str, body_in: bytes = b"") -> None:
        srv = self.server
        key = self._api_key()
        if key != srv.api_key:
            self._send(
                401,
                problem(
                    401,
                    "API Key Invalid",
                    "Your API key may be invalid, or you've attempted to access the wrong datacenter.",
                ),
            )
            return
        parts = [unquote(p) for p in path.split("/")[2:] if p]
        kind = _kind(method, parts)
        control = srv.control
        if not control.enter(key, kind):
            self._send(
                429,
                problem(
                    429,
                    "Too Many Requests",
                    f"You have exceeded the limit of {control.max_connections} simultaneous connections.",
                ),
            )
            return
        left = False
        try:
            fault, delay, error_status = control.take_fault(f"{method} {self.path}")
            if delay:
                time.sleep(delay)
            if fault == "throttle":
                control.add("throttled")
                control.add("throttled_injected")
                status, body = 429, problem(429, "Too Many Requests", "Too many requests (injected).")
            elif fault == "error":
                control.add("errors_injected")
                status = error_status
                body = problem(status, REASONS.get(status, "Server Error"), "Injected failure.")
            else:
                try:
                    status, body = srv.api(method, parts, query, body_in)
                except ApiError as exc:
                    status, body = exc.status, problem(exc.status, exc.title, exc.detail)
                except Exception:
                    log.exception("internal error")
                    control.add("internal_errors")
                    status, body = 500, problem(500, "Internal Server Error", "Stand-in failure.")
                if fault == "drop":
                    control.add("drops")
                    raise DropConnection
            # Out of flight before the response is written, so a client that got its answer
            # and sends the next request never meets its own previous one still counted.
            control.leave(key)
            left = True
            self._send(status, body)
        except DropConnection:
            control.leave(key)
            left = True
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        finally:
            if not left:
                control.leave(key)


def _kind(method: str, parts: list[str]) -> str:
    """A loggable name of the API call, for ``requests_by_kind``."""
    if parts == ["ping"]:
        return "ping"
    if len(parts) == 2 and parts[0] == "lists":
        return "list"
    if len(parts) == 3 and parts[2] == "members":
        return "add_member" if method == "POST" else "list_members"
    if len(parts) == 4 and parts[2] == "members":
        return {"GET": "get_member", "DELETE": "archive"}.get(method, f"{method.lower()}_member")
    if len(parts) == 6 and parts[4] == "actions" and parts[5] == "delete-permanent":
        return "delete_permanent"
    return "other"


class StandInServer(MemberRoutes, ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256
    allow_reuse_address = True

    def __init__(
        self, address, audience: Audience | dict[str, Audience], *, api_key: str, max_connections: int, state_file: Path | None
    ):
        super().__init__(address, Handler)
        # Every list served, by id; ``audience`` is the first (the admin endpoints' counts are its).
        self.audiences = audience if isinstance(audience, dict) else {audience.list_id: audience}
        self.audience = next(iter(self.audiences.values()))
        self.api_key = api_key
        self.control = Control(max_connections)
        self.state_file = state_file
        self.save_lock = threading.Lock()
        self.started = time.time()
        self.frozen_at: float | None = None  # set through POST /_standin/clock

    def now(self) -> float:
        """The stand-in's clock: the real one, or the instant it was frozen at."""
        frozen = self.frozen_at
        return time.time() if frozen is None else frozen

    def save(self) -> int | None:
        if self.state_file is None:
            return None
        with self.save_lock:
            saved = self.audience.save(self.state_file)
            for list_id, audience in self.audiences.items():
                if audience is not self.audience:
                    audience.save(list_state_file(self.state_file, list_id, self.audience.list_id))
            return saved

    # -- admin -------------------------------------------------------------------------------
    def admin(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        name = path[len("/_standin/") :].strip("/")
        if method == "GET" and name == "health":
            return 200, {"status": "ok", "list_id": self.audience.list_id}
        if method == "GET" and name == "stats":
            return 200, self.stats()
        if method == "POST" and name == "faults":
            return 200, {"faults": self.control.set_faults(json_object(body, "faults body must be a JSON object"))}
        if method == "POST" and name == "clock":
            return 200, self.set_clock(body)
        if method == "POST" and name == "reset-stats":
            self.control.reset()
            return 200, {"reset": True}
        if method == "POST" and name == "save":
            saved = self.save()
            return 200, {"saved": saved is not None, "members": saved}
        raise ApiError(404, "Resource Not Found", "Unknown stand-in admin endpoint.")

    def set_clock(self, body: bytes) -> dict:
        """``{"now": "<ISO 8601 with offset>"}`` freezes the clock there (``last_changed`` of
        every change and the ``Date`` header), ``{"now": null}`` lets it run again."""
        try:
            spec = json.loads(body or b"{}")
            when = spec.get("now")
            frozen = None if when is None else datetime.fromisoformat(when)
        except (ValueError, AttributeError, TypeError):
            raise ApiError(400, "Invalid Resource", "clock body must be {\"now\": ISO 8601 time or null}") from None
        if frozen is not None and frozen.tzinfo is None:
            raise ApiError(400, "Invalid Resource", "clock time needs a UTC offset")
        self.frozen_at = None if frozen is None else frozen.timestamp()
        return {"now": None if frozen is None else frozen.isoformat()}

    def stats(self) -> dict:
        counts = self.audience.counts()
        out = self.control.stats()
        out.update(counts)
        out["statuses"] = counts
        out["total"] = sum(counts.values())
        out["deleted_hashes_count"] = len(self.audience.deleted)
        out["list_id"] = self.audience.list_id
        out["max_connections"] = self.control.max_connections
        out["lists"] = {
            list_id: {"statuses": audience.counts(), "deleted_hashes_count": len(audience.deleted)}
            for list_id, audience in self.audiences.items()
        }
        return out
