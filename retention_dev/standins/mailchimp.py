"""A local stand-in for the Mailchimp Marketing API v3, with synthetic data and fault injection.

Run it with ``python -m retention_dev.standins.mailchimp --port 0 --state-file PATH``; it prints
``LISTENING <port>`` once it accepts connections, and on SIGTERM saves its state atomically and
exits 0. See ``--help`` for the options.

What it speaks (under ``/3.0``, Basic auth with any user name and the ``--api-key``; errors
are Mailchimp problem documents ``{"type", "title", "status", "detail", "instance"}``):

* ``GET /3.0/ping``, ``GET /3.0/lists/{list_id}``
* ``GET /3.0/lists/{list_id}/members``: ``count`` (default 10, at most 1000), ``offset``,
  ``status``, ``since_last_changed``, ``fields`` / ``exclude_fields`` (dotted paths such as
  ``members.id``); members come in insertion order; paging is O(page) at any offset.
* ``GET /3.0/lists/{list_id}/members/{subscriber_hash}`` (404 when unknown or erased; the
  path segment may also be the address itself, as Mailchimp allows)
* ``DELETE /3.0/lists/{list_id}/members/{subscriber_hash}``: *archives* (status ``archived``,
  data kept), 204.
* ``POST /3.0/lists/{list_id}/members/{subscriber_hash}/actions/delete-permanent``: erases the
  member for good (its data is blanked at once, only the hash is remembered), 204; 404 when
  absent.
* More than ``--max-connections`` requests in flight for one API key get 429 (no
  ``Retry-After``, like the real service).

Admin endpoints (no auth, not under ``/3.0``):

* ``GET /_standin/health``
* ``GET /_standin/stats``: member counts (``total``, one key per status and ``statuses``),
  ``deleted_hashes_count`` (members erased since the audience was generated), and counters
  since start or the last reset: ``requests``, ``requests_by_kind``, ``permanent_deletes``,
  ``archives``, ``throttled`` (all 429s), ``throttled_injected``, ``errors_injected``,
  ``drops``, ``max_in_flight``, ``in_flight``.
* ``POST /_standin/faults`` with JSON, all keys optional: ``throttle_next``, ``error_next``,
  ``error_status`` (default 503), ``drop_next``, ``slow_ms``, ``match`` (a substring of
  ``"METHOD /path?query"``; default: every API request). The next N matching API requests get a 429,
  a 5xx or a dropped connection (in that order of precedence); a drop happens *after* the
  request took effect and before the response is written (a delete-permanent is applied, then
  the connection is cut). ``slow_ms`` delays every matching response until cleared. ``{}``
  clears all faults.
* ``POST /_standin/reset-stats``, ``POST /_standin/save``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
from sortedcontainers import SortedList

from retention_dev.standins.mailchimp_data import (
    STATUS_CODE,
    STATUSES,
    MemberColumns,
    default_now,
    generate_columns,
    iso,
    iso_column,
)

log = logging.getLogger("retention_dev.standins.mailchimp")

ERROR_DOC = "https://mailchimp.com/developer/marketing/docs/errors/"
MAX_COUNT = 1000
MEMBER_FIELDS = (
    "id",
    "email_address",
    "unique_email_id",
    "contact_id",
    "full_name",
    "merge_fields",
    "status",
    "timestamp_signup",
    "timestamp_opt",
    "last_changed",
    "list_id",
)
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
ARCHIVED = STATUS_CODE["archived"]
_STATUS_BYTES = [name.encode() for name in STATUSES]
_BYTE_COLUMNS = {
    "id": "ids",
    "email_address": "emails",
    "unique_email_id": "unique_email_ids",
    "contact_id": "contact_ids",
}
_TEXT_COLUMNS = ("ids", "emails", "unique_email_ids", "contact_ids", "first_names", "last_names")


def check_json_safe(cols: MemberColumns) -> None:
    """Refuse text that would need JSON escaping (quotes, backslashes, control characters)."""
    for name in _TEXT_COLUMNS:
        raw = getattr(cols, name).view(np.uint8)
        if ((raw == 34) | (raw == 92) | ((raw < 32) & (raw != 0))).any():
            raise ValueError(f"column {name} holds characters that need JSON escaping")


class ApiError(Exception):
    def __init__(self, status: int, title: str, detail: str):
        super().__init__(title)
        self.status = status
        self.title = title
        self.detail = detail


def problem(status: int, title: str, detail: str) -> dict:
    return {"type": ERROR_DOC, "title": title, "status": status, "detail": detail, "instance": str(uuid.uuid4())}


# --------------------------------------------------------------------------------------------
# fields / exclude_fields


def _field_tree(spec: str | None) -> dict | None:
    """``"members.id,total_items"`` -> ``{"members": {"id": {}}, "total_items": {}}``.

    An empty dict means "the whole value"; a shorter path wins over a longer one under it.
    """
    if not spec:
        return None
    paths = sorted((p.strip() for p in spec.split(",") if p.strip()), key=lambda p: p.count("."))
    tree: dict = {}
    for path in paths:
        node: dict | None = tree
        parts = path.split(".")
        for part in parts[:-1]:
            if part in node and node[part] is None:
                node = None  # already whole
                break
            node = node.setdefault(part, {})
        if node is not None:
            node[parts[-1]] = None

    def finish(t: dict) -> dict:
        return {k: ({} if v is None else finish(v)) for k, v in t.items()}

    return finish(tree)


def _include(value: Any, tree: dict) -> Any:
    if not tree:
        return value
    if isinstance(value, list):
        return [_include(v, tree) for v in value]
    if isinstance(value, dict):
        return {k: _include(value[k], sub) for k, sub in tree.items() if k in value}
    return value


def _exclude(value: Any, tree: dict) -> Any:
    if isinstance(value, list):
        return [_exclude(v, tree) for v in value]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            sub = tree.get(k)
            if sub is None:
                out[k] = v
            elif sub:
                out[k] = _exclude(v, sub)
        return out
    return value


def project(value: Any, fields: dict | None, exclude: dict | None) -> Any:
    if fields:
        value = _include(value, fields)
    if exclude:
        value = _exclude(value, exclude)
    return value


# --------------------------------------------------------------------------------------------
# the audience


class Audience:
    """One list's members, thread-safe. Rows keep insertion order; erased rows are blanked."""

    def __init__(self, cols: MemberColumns, list_id: str, deleted: set[bytes] | None = None):
        check_json_safe(cols)
        self.lock = threading.Lock()
        self.cols = cols
        self.list_id = list_id
        n = len(cols)
        self.alive = np.ones(n, dtype=bool)
        self.all = SortedList(range(n))
        self.by_status = {
            code: SortedList(np.flatnonzero(cols.status == code).tolist()) for code in range(len(STATUSES))
        }
        order = np.argsort(cols.ids, kind="stable")
        self.hash_order = order
        self.sorted_ids = cols.ids[order]
        self.deleted: set[bytes] = set(deleted or ())
        self.version = 0
        self._since_cache: dict[tuple, tuple[int, np.ndarray]] = {}

    # -- lookups -----------------------------------------------------------------------------
    def row_of(self, subscriber_hash: str) -> int | None:
        """The live row of a member, or None (unknown or erased). Caller holds the lock."""
        key = subscriber_hash.strip().lower()
        if "@" in key:
            key = hashlib.md5(key.encode()).hexdigest()
        try:
            needle = key.encode("ascii")
        except UnicodeEncodeError:
            return None
        if len(needle) != 32:
            return None
        i = int(np.searchsorted(self.sorted_ids, needle))
        if i >= len(self.sorted_ids) or self.sorted_ids[i] != needle:
            return None
        row = int(self.hash_order[i])
        return row if self.alive[row] else None

    def page(self, status: int | None, since: int | None, offset: int, count: int) -> tuple[list[int], int]:
        with self.lock:
            if since is None:
                rows = self.all if status is None else self.by_status[status]
                return rows[offset : offset + count], len(rows)
            key = (status, since)
            cached = self._since_cache.get(key)
            if cached is None or cached[0] != self.version:
                mask = self.alive & (self.cols.last_changed > since)
                if status is not None:
                    mask &= self.cols.status == status
                if len(self._since_cache) > 16:
                    self._since_cache.clear()
                cached = (self.version, np.flatnonzero(mask))
                self._since_cache[key] = cached
            positions = cached[1]
            return positions[offset : offset + count].tolist(), len(positions)

    def _values(self, rows: list[int], wanted: tuple[str, ...]) -> dict[str, list[bytes]]:
        """The raw (ASCII / UTF-8, JSON-safe) values of ``wanted`` fields for ``rows``."""
        c = self.cols
        taken: dict[str, np.ndarray] = {}
        with self.lock:
            for f in wanted:
                if f in ("full_name", "merge_fields"):
                    taken["first"] = c.first_names[rows]
                    taken["last"] = c.last_names[rows]
                elif f in _BYTE_COLUMNS:
                    taken[f] = getattr(c, _BYTE_COLUMNS[f])[rows]
                elif f in ("status", "timestamp_signup", "timestamp_opt", "last_changed"):
                    taken[f] = getattr(c, f)[rows]
        values: dict[str, list[bytes]] = {}
        for f, arr in taken.items():
            if f == "status":
                values[f] = [_STATUS_BYTES[code] for code in arr.tolist()]
            elif f in ("timestamp_signup", "timestamp_opt", "last_changed"):
                values[f] = iso_column(arr).tolist()
            else:
                values[f] = arr.tolist()
        return values

    def render(self, rows: list[int], wanted: tuple[str, ...]) -> list[dict]:
        """Members ``rows`` as dicts with only the top-level ``wanted`` fields, in that order."""
        if not rows:
            return []
        values = {f: [b.decode() for b in v] for f, v in self._values(rows, wanted).items()}
        columns: list[list] = []
        for f in wanted:
            if f == "full_name":
                columns.append([f"{a} {b}" for a, b in zip(values["first"], values["last"])])
            elif f == "merge_fields":
                columns.append([{"FNAME": a, "LNAME": b} for a, b in zip(values["first"], values["last"])])
            elif f == "list_id":
                columns.append([self.list_id] * len(rows))
            else:
                columns.append(values[f])
        return [dict(zip(wanted, vals)) for vals in zip(*columns)]

    def render_json(self, rows: list[int], wanted: tuple[str, ...]) -> bytes:
        """Members ``rows`` as comma-separated JSON objects, built straight from the columns.

        The columns hold JSON-safe text (checked when the audience is built), so values are
        placed between quotes without escaping: several times faster than ``json.dumps``.
        """
        if not rows:
            return b""
        values = self._values(rows, wanted)
        parts: list[bytes] = []
        args: list[list[bytes]] = []
        for f in wanted:
            if f == "full_name":
                parts.append(b'"full_name":"%s %s"')
                args += [values["first"], values["last"]]
            elif f == "merge_fields":
                parts.append(b'"merge_fields":{"FNAME":"%s","LNAME":"%s"}')
                args += [values["first"], values["last"]]
            elif f == "list_id":
                parts.append(b'"list_id":' + json.dumps(self.list_id).encode().replace(b"%", b"%%"))
            else:
                parts.append(b'"' + f.encode() + b'":"%s"')
                args.append(values[f])
        template = b"{" + b",".join(parts) + b"}"
        if not args:
            return b",".join([template.replace(b"%%", b"%")] * len(rows))
        return b",".join([template % vals for vals in zip(*args)])

    def member(self, subscriber_hash: str) -> dict | None:
        with self.lock:
            row = self.row_of(subscriber_hash)
        if row is None:
            return None
        return self.render([row], MEMBER_FIELDS)[0]

    # -- mutations ---------------------------------------------------------------------------
    def archive(self, subscriber_hash: str, now: int) -> bool:
        with self.lock:
            row = self.row_of(subscriber_hash)
            if row is None:
                return False
            old = int(self.cols.status[row])
            if old != ARCHIVED:
                self.by_status[old].remove(row)
                self.by_status[ARCHIVED].add(row)
                self.cols.status[row] = ARCHIVED
                self.cols.last_changed[row] = now
                self.version += 1
            return True

    def delete_permanent(self, subscriber_hash: str) -> bool:
        with self.lock:
            row = self.row_of(subscriber_hash)
            if row is None:
                return False
            c = self.cols
            self.alive[row] = False
            self.all.remove(row)
            self.by_status[int(c.status[row])].remove(row)
            self.deleted.add(bytes(c.ids[row]))
            # Gone for good: blank the personal data now, keep only the hash (re-import block).
            c.emails[row] = b""
            c.first_names[row] = b""
            c.last_names[row] = b""
            c.unique_email_ids[row] = b""
            c.contact_ids[row] = b""
            self.version += 1
            return True

    # -- summaries and persistence -----------------------------------------------------------
    def counts(self) -> dict[str, int]:
        with self.lock:
            return {STATUSES[code]: len(rows) for code, rows in self.by_status.items()}

    def snapshot(self) -> dict[str, np.ndarray]:
        with self.lock:
            keep = self.alive
            arrays = {name: arr[keep].copy() for name, arr in self.cols.as_dict().items()}
            arrays["deleted"] = np.array(sorted(self.deleted), dtype="S32")
        return arrays

    def save(self, path: Path) -> int:
        arrays = self.snapshot()
        arrays["meta"] = np.array(json.dumps({"list_id": self.list_id, "format": 1}).encode())
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return len(arrays["ids"])

    @classmethod
    def load(cls, path: Path, list_id: str) -> Audience:
        with np.load(path, allow_pickle=False) as data:
            fields = {name: data[name].copy() for name in MemberColumns.__dataclass_fields__}
            deleted = set(data["deleted"].tolist())
        return cls(MemberColumns(**fields), list_id, deleted)


# --------------------------------------------------------------------------------------------
# faults and counters


class Control:
    """Fault settings, the in-flight limit and the request counters."""

    COUNTERS = (
        "requests",
        "permanent_deletes",
        "archives",
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


# --------------------------------------------------------------------------------------------
# HTTP


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
        self._api(method, path, url.query)

    def _api(self, method: str, path: str, query: str) -> None:
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
                    status, body = srv.api(method, parts, query)
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
        return "list_members"
    if len(parts) == 4 and parts[2] == "members":
        return {"GET": "get_member", "DELETE": "archive"}.get(method, f"{method.lower()}_member")
    if len(parts) == 6 and parts[4] == "actions" and parts[5] == "delete-permanent":
        return "delete_permanent"
    return "other"


class StandInServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256
    allow_reuse_address = True

    def __init__(self, address, audience: Audience, *, api_key: str, max_connections: int, state_file: Path | None):
        super().__init__(address, Handler)
        self.audience = audience
        self.api_key = api_key
        self.control = Control(max_connections)
        self.state_file = state_file
        self.save_lock = threading.Lock()
        self.started = time.time()

    def save(self) -> int | None:
        if self.state_file is None:
            return None
        with self.save_lock:
            return self.audience.save(self.state_file)

    # -- admin -------------------------------------------------------------------------------
    def admin(self, method: str, path: str, body: bytes) -> tuple[int, Any]:
        name = path[len("/_standin/") :].strip("/")
        if method == "GET" and name == "health":
            return 200, {"status": "ok", "list_id": self.audience.list_id}
        if method == "GET" and name == "stats":
            return 200, self.stats()
        if method == "POST" and name == "faults":
            try:
                spec = json.loads(body or b"{}")
            except ValueError:
                raise ApiError(400, "Invalid Resource", "faults body must be JSON") from None
            if not isinstance(spec, dict):
                raise ApiError(400, "Invalid Resource", "faults body must be a JSON object")
            return 200, {"faults": self.control.set_faults(spec)}
        if method == "POST" and name == "reset-stats":
            self.control.reset()
            return 200, {"reset": True}
        if method == "POST" and name == "save":
            saved = self.save()
            return 200, {"saved": saved is not None, "members": saved}
        raise ApiError(404, "Resource Not Found", "Unknown stand-in admin endpoint.")

    def stats(self) -> dict:
        counts = self.audience.counts()
        out = self.control.stats()
        out.update(counts)
        out["statuses"] = counts
        out["total"] = sum(counts.values())
        out["deleted_hashes_count"] = len(self.audience.deleted)
        out["list_id"] = self.audience.list_id
        out["max_connections"] = self.control.max_connections
        return out

    # -- API ---------------------------------------------------------------------------------
    def api(self, method: str, parts: list[str], query: str) -> tuple[int, Any]:
        params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        fields = _field_tree(params.get("fields"))
        exclude = _field_tree(params.get("exclude_fields"))
        aud = self.audience
        if parts == ["ping"]:
            if method != "GET":
                raise _not_allowed()
            return 200, project({"health_status": "Everything's Chimpy!"}, fields, exclude)
        if len(parts) < 2 or parts[0] != "lists":
            raise ApiError(404, "Resource Not Found", "The requested resource could not be found.")
        if parts[1] != aud.list_id:
            raise ApiError(404, "Resource Not Found", "The requested resource could not be found.")
        rest = parts[2:]
        if not rest:
            if method != "GET":
                raise _not_allowed()
            counts = aud.counts()
            info = {
                "id": aud.list_id,
                "name": "Stand-in audience",
                "stats": {
                    "member_count": counts["subscribed"],
                    "unsubscribe_count": counts["unsubscribed"],
                    "cleaned_count": counts["cleaned"],
                    "total_contacts": sum(counts.values()),
                },
            }
            return 200, project(info, fields, exclude)
        if rest[0] != "members":
            raise ApiError(404, "Resource Not Found", "The requested resource could not be found.")
        if len(rest) == 1:
            if method != "GET":
                raise _not_allowed()
            return 200, self.list_members(params, fields, exclude)
        subscriber_hash = rest[1]
        if len(rest) == 2:
            if method == "GET":
                member = aud.member(subscriber_hash)
                if member is None:
                    raise _member_not_found()
                return 200, project(member, fields, exclude)
            if method == "DELETE":
                if not aud.archive(subscriber_hash, int(time.time())):
                    raise _member_not_found()
                self.control.add("archives")
                return 204, None
            raise _not_allowed()
        if rest[2:] == ["actions", "delete-permanent"]:
            if method != "POST":
                raise _not_allowed()
            if not aud.delete_permanent(subscriber_hash):
                raise _member_not_found()
            self.control.add("permanent_deletes")
            return 204, None
        raise ApiError(404, "Resource Not Found", "The requested resource could not be found.")

    def list_members(self, params: dict[str, str], fields: dict | None, exclude: dict | None) -> dict | bytes:
        """The list-members response: a dict, or already-encoded JSON on the fast path."""
        count = _int_param(params, "count", 10)
        offset = _int_param(params, "offset", 0)
        if count < 0 or count > MAX_COUNT:
            raise ApiError(400, "Invalid Resource", f"The count parameter must be between 0 and {MAX_COUNT}.")
        if offset < 0:
            raise ApiError(400, "Invalid Resource", "The offset parameter must be 0 or greater.")
        status = params.get("status") or None
        status_code = None
        if status is not None:
            if status not in STATUS_CODE:
                raise ApiError(400, "Invalid Resource", "Unknown status filter.")
            status_code = STATUS_CODE[status]
        since = params.get("since_last_changed") or None
        since_ts = None
        if since is not None:
            try:
                when = datetime.fromisoformat(since.replace(" ", "+"))
            except ValueError:
                raise ApiError(400, "Invalid Resource", "since_last_changed must be an ISO 8601 time.") from None
            if when.tzinfo is None:
                raise ApiError(400, "Invalid Resource", "since_last_changed needs a UTC offset.")
            since_ts = int(when.timestamp())

        wanted = MEMBER_FIELDS
        members_tree: dict | None = None
        if fields is not None:
            if "members" in fields:
                members_tree = fields["members"]
                if members_tree:
                    wanted = tuple(f for f in MEMBER_FIELDS if f in members_tree)
            else:
                wanted = ()
        if exclude is not None and "members" in exclude and not exclude["members"]:
            wanted = ()
        rows, total = self.audience.page(status_code, since_ts, offset, count)
        # Sub-fields (members.merge_fields.FNAME) and member exclusions take the general path.
        general = (members_tree and any(members_tree[f] for f in wanted)) or (
            exclude is not None and "members" in exclude
        )

        def include(key: str) -> bool:
            return (fields is None or key in fields) and (exclude is None or key not in exclude or bool(exclude[key]))

        if not general:
            parts = []
            if include("members"):
                members_json = self.audience.render_json(rows, wanted) if wanted else b""
                parts.append(b'"members":[' + members_json + b"]")
            if include("list_id"):
                parts.append(b'"list_id":' + json.dumps(self.audience.list_id).encode())
            if include("total_items"):
                parts.append(b'"total_items":%d' % total)
            return b"{" + b",".join(parts) + b"}"
        members = self.audience.render(rows, wanted) if wanted else []
        members = project(members, members_tree or None, exclude.get("members") if exclude else None)
        response: dict[str, Any] = {"members": members, "list_id": self.audience.list_id, "total_items": total}
        return {k: v for k, v in response.items() if include(k)}


def _int_param(params: dict[str, str], name: str, default: int) -> int:
    value = params.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise ApiError(400, "Invalid Resource", f"The {name} parameter must be an integer.") from None


def _not_allowed() -> ApiError:
    return ApiError(405, "Method Not Allowed", "The requested method and resource are not compatible.")


def _member_not_found() -> ApiError:
    return ApiError(404, "Resource Not Found", "The requested resource could not be found.")


# --------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m retention_dev.standins.mailchimp", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--state-file", type=Path, default=None, help="load from / save to this file")
    p.add_argument("--list-id", default="demo-list")
    p.add_argument("--api-key", default="standin-key-us0")
    p.add_argument("--members", type=int, default=1000, help="members to generate when there is no state file")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--erase-share", type=float, default=0.10)
    p.add_argument("--now", default=None, help="reference time for generation (ISO 8601); default: now")
    p.add_argument("--max-connections", type=int, default=10)
    return p.parse_args(argv)


def build_audience(args: argparse.Namespace) -> Audience:
    if args.state_file is not None and args.state_file.exists():
        return Audience.load(args.state_file, args.list_id)
    now = datetime.fromisoformat(args.now) if args.now else default_now()
    cols = generate_columns(args.members, seed=args.seed, now=now, erase_share=args.erase_share)
    return Audience(cols, args.list_id)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
    args = parse_args(argv)
    audience = build_audience(args)
    server = StandInServer(
        (args.host, args.port),
        audience,
        api_key=args.api_key,
        max_connections=args.max_connections,
        state_file=args.state_file,
    )
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    print(f"LISTENING {server.server_address[1]}", flush=True)
    while not stop.wait(0.5):
        pass
    server.shutdown()
    server.save()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["Audience", "Control", "StandInServer", "iso", "main", "problem", "project"]
