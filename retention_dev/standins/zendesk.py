"""A local stand-in for the parts of the Zendesk Support API the retention project uses.

Run ``python -m retention_dev.standins.zendesk --host 127.0.0.1 --port 0 --state-file PATH
--tickets 1000 --seed 1``. It prints ``LISTENING <port>`` once it accepts connections, saves its
state atomically on SIGTERM (and on ``POST /_standin/save``) and exits 0. With an existing state
file the data comes from the file and ``--tickets/--seed/--due-share/--now`` are ignored.

What it mirrors of real Zendesk (see the Zendesk Support API reference):

* ``GET /api/v2/incremental/tickets/cursor.json?start_time=|cursor=`` (and ``users``): ordered
  by ``updated_at``, up to 1000 per page (``per_page``), ``after_cursor``/``after_url``,
  ``end_of_stream``; ``include=metric_sets`` sideloads ``metric_sets`` (with ``solved_at``);
  soft-deleted tickets appear with status ``"deleted"``, soft-deleted users with
  ``active: false``. Limited to ``--incremental-per-minute`` (10) requests per rolling minute.
* ``GET /api/v2/tickets/show_many?ids=`` (<= 100, live tickets only), ``GET|PUT
  /api/v2/tickets/{id}`` (PUT changes ``status``; used to close a ticket), ``DELETE
  /api/v2/tickets/{id}`` (single soft delete, 204).
* ``DELETE /api/v2/tickets/destroy_many?ids=`` (<= 100, else 400): soft delete as a job.
  ``GET /api/v2/deleted_tickets`` lists soft-deleted tickets (cursor ``page[size]``/``page[after]``
  or offset ``page``/``per_page``; <= 100 a page; ``--deleted-list-per-minute`` (10) requests a
  minute) until ``DELETE /api/v2/deleted_tickets/destroy_many?ids=`` (<= 100) removes them for
  good, again as a job. ``GET /api/v2/job_statuses/{id}`` (and ``/job_statuses/show_many?ids=``,
  comma-separated job ids, <= 100; unknown ids are left out): ``queued`` -> ``working`` ->
  ``completed``/``failed`` over ``--job-seconds``; ``results`` lists one entry per id
  (``{"id", "action", "success", "status"}``, or ``"error": "RecordNotFound"``). At most
  ``--max-jobs`` (30) jobs queued or working at once, beyond that 429.
  (Real Zendesk reports only ``{"success": true}`` for a permanent-deletion job; the stand-in is
  more detailed, the client copes with both.)
* ``DELETE /api/v2/users/{id}`` soft-deletes; refused with 422 while the user is requester of a
  ticket that is not closed (new/open/pending/hold/solved; soft-deleted tickets do not count).
  ``DELETE /api/v2/deleted_users/{id}`` deletes a soft-deleted user for good, at most
  ``--user-deletes-per-10min`` (700) per rolling 10 minutes (429 with ``Retry-After``).
  ``GET /api/v2/users/{id}``, ``/users/show_many``, ``/deleted_users/{id}``, ``/deleted_users``.
* ``GET /api/v2/users/search?query=email:{address}`` (``query`` may also be the bare address):
  the active users with that address (case-insensitive); users' addresses are the placeholders
  ``user{id}@example.org``. Other search syntax is refused with 400 (not modelled).
  ``GET /api/v2/users/{id}/tickets/requested``: the user's live (not soft-deleted) tickets,
  by id, cursor (``page[size]``/``page[after]``) or offset (``page``/``per_page``) pagination,
  <= 100 a page; 404 for an unknown or deleted user.
* All API requests: ``--requests-per-minute`` per rolling minute (``--window-seconds``, 60, sets
  the length of that "minute" so that tests need not wait for real minutes), 429 + ``Retry-After`` beyond,
  ``X-Rate-Limit``/``X-Rate-Limit-Remaining``/``ratelimit-*`` headers; 404 for unknown records.
  Optional ``--token``: Basic ``{email}/token:{token}`` or ``Bearer {token}``, else 401.

Admin (never throttled, faulted or counted): ``GET /_standin/health``, ``GET /_standin/stats``,
``POST /_standin/save``, ``POST /_standin/faults`` with JSON ``{"throttle_next": N,
"error_next": N, "error_status": 503, "slow_ms": M, "fail_job_next": N, "fail_job_after": K,
"match": "destroy_many"}`` (``match``: substring of the path the faults apply to; ``{}`` clears).

Nothing is printed after ``LISTENING``; nothing personal is logged.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import heapq
import itertools
import json
import logging
import math
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
from collections import Counter, deque
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
from sortedcontainers import SortedList

from retention_dev.standins import zendesk_data as zd

log = logging.getLogger("retention_dev.standins.zendesk")

DELETED = zd.STATUS_CODE["deleted"]  # soft-deleted
GONE = DELETED + 1  # permanently deleted
CLOSED = zd.STATUS_CODE["closed"]
ACTIVE, SOFT_DELETED, USER_GONE = 0, 1, 2
MAX_IDS = 100
MAX_EXPORT_PAGE = 1000
JOB_RETENTION_SECONDS = 86_400  # Zendesk keeps job statuses for a day
MAX_FINISHED_JOBS = 20_000
_SHIFT = 32
_LOW = (1 << _SHIFT) - 1
STATE_VERSION = 1
# Users' addresses are derived from their ids (see user_json); the search matches these.
_PLACEHOLDER_EMAIL = re.compile(r"user(\d+)@example\.org")


def iso(ts: int) -> str | None:
    if ts is None or ts < 0:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(ts)))


def iso_many(ts: np.ndarray) -> list[str | None]:
    """:func:`iso` for a whole column at once (an export page)."""
    ts = np.asarray(ts, dtype=np.int64)
    text = np.datetime_as_string(np.maximum(ts, 0).astype("datetime64[s]"), unit="s").tolist()
    return [None if t < 0 else f"{x}Z" for t, x in zip(ts.tolist(), text, strict=True)]


def _encode_cursor(key: int) -> str:
    return base64.urlsafe_b64encode(str(key).encode()).decode().rstrip("=")


def _decode_cursor(value: str) -> int:
    padded = value + "=" * (-len(value) % 4)
    return int(base64.urlsafe_b64decode(padded.encode()).decode())


class ApiError(Exception):
    def __init__(self, status: int, error: str, description: str = "", headers: dict | None = None, details=None):
        super().__init__(error)
        self.status = status
        self.body = {"error": error, "description": description or error}
        if details is not None:
            self.body["details"] = details
        self.headers = headers or {}


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


class State:
    """All data of one stand-in account, guarded by ``lock``."""

    def __init__(self, arrays: dict[str, np.ndarray], meta: dict, *, job_seconds: float):
        self.lock = threading.RLock()
        self.job_seconds = job_seconds
        self.meta = meta
        self.t_status = arrays["t_status"].astype(np.int8, copy=True)
        self.t_prev = arrays["t_prev"].astype(np.int8, copy=True)
        self.t_requester = arrays["t_requester"].astype(np.int64, copy=True)
        self.t_created = arrays["t_created"].astype(np.int64, copy=True)
        self.t_updated = arrays["t_updated"].astype(np.int64, copy=True)
        self.t_solved = arrays["t_solved"].astype(np.int64, copy=True)
        self.t_deleted_at = arrays["t_deleted_at"].astype(np.int64, copy=True)
        self.u_role = arrays["u_role"].astype(np.int8, copy=True)
        self.u_state = arrays["u_state"].astype(np.int8, copy=True)
        self.u_created = arrays["u_created"].astype(np.int64, copy=True)
        self.u_updated = arrays["u_updated"].astype(np.int64, copy=True)
        self.u_deleted_at = arrays["u_deleted_at"].astype(np.int64, copy=True)
        self.counters: Counter = Counter(meta.get("counters", {}))
        self.last_clock = int(meta.get("last_clock", 0))
        n_t, n_u = len(self.t_status), len(self.u_role)
        # Export order: (updated_at, id) packed into one int.
        live_t = np.flatnonzero(self.t_status != GONE)
        self.t_index = SortedList(((self.t_updated[live_t] << _SHIFT) | (live_t + 1)).tolist())
        live_u = np.flatnonzero(self.u_state != USER_GONE)
        self.u_index = SortedList(((self.u_updated[live_u] << _SHIFT) | (live_u + 1)).tolist())
        self.soft_tickets = SortedList((np.flatnonzero(self.t_status == DELETED) + 1).tolist())
        self.soft_users = SortedList((np.flatnonzero(self.u_state == SOFT_DELETED) + 1).tolist())
        # Tickets per requester (requesters never change here): CSR over user rows.
        req_row = self.t_requester - zd.USER_ID_BASE - 1
        self.by_req_order = np.argsort(req_row, kind="stable")
        self.by_req_start = np.searchsorted(req_row[self.by_req_order], np.arange(n_u + 1))
        self.n_tickets, self.n_users = n_t, n_u
        # Jobs.
        self.jobs: dict[str, dict] = {}  # insertion (= start) order
        self.active: set[str] = set()
        self.finished: Counter = Counter()
        self.job_heap: list[tuple[float, str]] = []
        self.job_cond = threading.Condition(self.lock)
        now = time.time()
        for job in meta.get("jobs", []):
            if job["state"] in ("queued", "working"):  # interrupted by a restart: run again
                job["state"] = "queued"
                job["started"] = now
                job["due"] = now + self.job_seconds
                heapq.heappush(self.job_heap, (job["due"], job["id"]))
            self._track(job)
        self.faults: dict = {}

    # --- construction / persistence --------------------------------------------------
    @classmethod
    def generate(cls, n_tickets: int, seed: int, due_share: float, now: datetime, **kw) -> State:
        tickets, users = zd.generate(n_tickets, seed=seed, now=now, due_share=due_share)
        if not np.array_equal(tickets.ids, np.arange(1, len(tickets) + 1)):
            raise ValueError("ticket ids must be 1..N")
        arrays = {
            "t_status": tickets.status,
            "t_prev": tickets.status.copy(),
            "t_requester": tickets.requester_id,
            "t_created": tickets.created_at,
            "t_updated": tickets.updated_at,
            "t_solved": tickets.solved_at,
            "t_deleted_at": np.full(len(tickets), zd.NO_TIME, dtype=np.int64),
            "u_role": users.role,
            "u_state": np.zeros(len(users), dtype=np.int8),
            "u_created": users.created_at,
            "u_updated": users.updated_at,
            "u_deleted_at": np.full(len(users), zd.NO_TIME, dtype=np.int64),
        }
        meta = {
            "version": STATE_VERSION,
            "generated": {"tickets": n_tickets, "seed": seed, "due_share": due_share, "now": now.isoformat()},
            "edge_cases": tickets.edge_cases,
        }
        return cls(arrays, meta, **kw)

    @classmethod
    def load(cls, path: Path, **kw) -> State:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files if name != "meta"}
            meta = json.loads(bytes(data["meta"]).decode())
        return cls(arrays, meta, **kw)

    def save(self, path: Path) -> None:
        with self.lock:
            meta = dict(self.meta)
            meta["counters"] = dict(self.counters)
            meta["last_clock"] = self.last_clock
            meta["jobs"] = [job for job in self.jobs.values()]
            arrays = {
                "t_status": self.t_status.copy(),
                "t_prev": self.t_prev.copy(),
                "t_requester": self.t_requester,
                "t_created": self.t_created,
                "t_updated": self.t_updated.copy(),
                "t_solved": self.t_solved.copy(),
                "t_deleted_at": self.t_deleted_at.copy(),
                "u_role": self.u_role,
                "u_state": self.u_state.copy(),
                "u_created": self.u_created,
                "u_updated": self.u_updated.copy(),
                "u_deleted_at": self.u_deleted_at.copy(),
            }
            blob = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as fh:
            np.savez(fh, meta=blob, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    # --- helpers ---------------------------------------------------------------------
    def clock(self) -> int:
        """Whole seconds, never going backwards (export order relies on it)."""
        self.last_clock = max(self.last_clock, int(time.time()))
        return self.last_clock

    def ticket_row(self, ticket_id: int) -> int | None:
        row = ticket_id - 1
        if 0 <= row < self.n_tickets and self.t_status[row] != GONE:
            return row
        return None

    def user_row(self, user_id: int) -> int | None:
        row = user_id - zd.USER_ID_BASE - 1
        if 0 <= row < self.n_users and self.u_state[row] != USER_GONE:
            return row
        return None

    def touch_ticket(self, row: int, now: int) -> None:
        self.t_index.discard((int(self.t_updated[row]) << _SHIFT) | (row + 1))
        self.t_updated[row] = now
        if self.t_status[row] != GONE:
            self.t_index.add((now << _SHIFT) | (row + 1))

    def touch_user(self, row: int, now: int) -> None:
        self.u_index.discard((int(self.u_updated[row]) << _SHIFT) | (row + 1))
        self.u_updated[row] = now
        if self.u_state[row] != USER_GONE:
            self.u_index.add((now << _SHIFT) | (row + 1))

    def requested_ticket_ids(self, user_row: int) -> list[int]:
        """Ids of the user's live (not soft-deleted) tickets, ascending."""
        rows = self.by_req_order[self.by_req_start[user_row] : self.by_req_start[user_row + 1]]
        rows = np.sort(rows[self.t_status[rows] < DELETED])
        return (rows + 1).tolist()

    def user_rows_with_email(self, address: str) -> list[int]:
        """Rows of the active users whose placeholder address is ``address`` (any case)."""
        m = _PLACEHOLDER_EMAIL.fullmatch(address.strip().lower())
        if not m:
            return []
        row = self.user_row(int(m.group(1)))
        return [row] if row is not None and self.u_state[row] == ACTIVE else []

    def open_tickets_of(self, user_row: int) -> int:
        rows = self.by_req_order[self.by_req_start[user_row] : self.by_req_start[user_row + 1]]
        return int(np.isin(self.t_status[rows], (0, 1, 2, 3, 4)).sum())

    # --- JSON shapes -----------------------------------------------------------------
    def ticket_json(self, row: int, base: str) -> dict:
        tid = row + 1
        st = int(self.t_status[row])
        return {
            "id": tid,
            "url": f"{base}/api/v2/tickets/{tid}.json",
            "status": zd.TICKET_STATUSES[st] if st <= DELETED else "deleted",
            "requester_id": int(self.t_requester[row]),
            "submitter_id": int(self.t_requester[row]),
            "subject": f"Synthetic ticket {tid}",
            "created_at": iso(self.t_created[row]),
            "updated_at": iso(self.t_updated[row]),
            "tags": [],
        }

    def tickets_page(self, rows: np.ndarray, base: str) -> list[dict]:
        statuses = [zd.TICKET_STATUSES[min(int(c), DELETED)] for c in self.t_status[rows]]
        requesters = self.t_requester[rows].tolist()
        return [
            {
                "id": tid,
                "url": f"{base}/api/v2/tickets/{tid}.json",
                "status": status,
                "requester_id": req,
                "submitter_id": req,
                "subject": f"Synthetic ticket {tid}",
                "created_at": created,
                "updated_at": updated,
                "tags": [],
            }
            for tid, status, req, created, updated in zip(
                (rows + 1).tolist(), statuses, requesters, iso_many(self.t_created[rows]),
                iso_many(self.t_updated[rows]), strict=True,
            )
        ]

    def metric_sets_page(self, rows: np.ndarray) -> list[dict]:
        return [
            {"id": 500_000_000 + tid, "ticket_id": tid, "created_at": created, "updated_at": updated,
             "solved_at": solved, "reopens": 0, "replies": 1}
            for tid, created, updated, solved in zip(
                (rows + 1).tolist(), iso_many(self.t_created[rows]), iso_many(self.t_updated[rows]),
                iso_many(self.t_solved[rows]), strict=True,
            )
        ]

    def users_page(self, rows: np.ndarray, base: str) -> list[dict]:
        roles = [zd.ROLES[int(c)] for c in self.u_role[rows]]
        active = (self.u_state[rows] == ACTIVE).tolist()
        return [
            {
                "id": uid,
                "url": f"{base}/api/v2/users/{uid}.json",
                "name": f"Example User {uid}",
                "email": f"user{uid}@example.org",
                "role": role,
                "active": act,
                "created_at": created,
                "updated_at": updated,
            }
            for uid, role, act, created, updated in zip(
                (rows + 1 + zd.USER_ID_BASE).tolist(), roles, active, iso_many(self.u_created[rows]),
                iso_many(self.u_updated[rows]), strict=True,
            )
        ]

    def user_json(self, row: int, base: str) -> dict:
        uid = zd.USER_ID_BASE + row + 1
        return {
            "id": uid,
            "url": f"{base}/api/v2/users/{uid}.json",
            "name": f"Example User {uid}",
            "email": f"user{uid}@example.org",
            "role": zd.ROLES[int(self.u_role[row])],
            "active": bool(self.u_state[row] == ACTIVE),
            "created_at": iso(self.u_created[row]),
            "updated_at": iso(self.u_updated[row]),
        }

    # --- jobs ------------------------------------------------------------------------
    # A job keeps its ids, how many it processed and which of those were not found; the
    # per-id ``results`` are rendered on request. Finished jobs are kept for a day (as Zendesk
    # does), at most MAX_FINISHED_JOBS of them.
    def active_jobs(self) -> int:
        return len(self.active)

    def _track(self, job: dict) -> None:
        self.jobs[job["id"]] = job
        if job["state"] in ("queued", "working"):
            self.active.add(job["id"])
        else:
            self.finished[job["state"]] += 1

    def prune_jobs(self, now: float) -> None:
        while self.jobs:
            job_id, job = next(iter(self.jobs.items()))
            if job_id in self.active:
                break
            too_many = len(self.jobs) - len(self.active) > MAX_FINISHED_JOBS
            if not too_many and now - job["started"] < JOB_RETENTION_SECONDS:
                break
            del self.jobs[job_id]
            self.finished[job["state"]] -= 1

    def new_job(self, job_type: str, ids: list[int], base: str, fail_after: int | None) -> dict:
        now = time.time()
        job = {
            "id": uuid.uuid4().hex,
            "job_type": job_type,
            "ids": ids,
            "state": "queued",
            "started": now,
            "due": now + self.job_seconds,
            "fail_after": fail_after,
            "progress": 0,
            "missing": [],
            "message": None,
            "base": base,
        }
        self._track(job)
        heapq.heappush(self.job_heap, (job["due"], job["id"]))
        self.counters[f"jobs_created_{job_type}"] += 1
        self.job_cond.notify_all()
        self.prune_jobs(now)
        return job

    def job_state(self, job: dict) -> str:
        state = job["state"]
        if state == "queued" and time.time() >= job["started"] + 0.2 * self.job_seconds:
            return "working"
        return state

    def job_json(self, job: dict) -> dict:
        state = self.job_state(job)
        done = state in ("completed", "failed")
        results = None
        if done:
            missing = set(job["missing"])
            results = []
            for tid in job["ids"][: job["progress"]]:
                if tid in missing:
                    results.append({"id": tid, "action": "delete", "success": False, "status": "Failed",
                                    "error": "RecordNotFound", "details": "Ticket not found"})
                else:
                    results.append({"id": tid, "action": "delete", "success": True, "status": "Deleted"})
        return {
            "id": job["id"],
            "url": f"{job['base']}/api/v2/job_statuses/{job['id']}.json",
            "job_type": job["job_type"],
            "status": state,
            "total": len(job["ids"]) if state != "queued" else None,
            "progress": job["progress"] if state != "queued" else None,
            "message": job["message"],
            "results": results,
        }

    def run_due_jobs(self, now: float) -> None:
        while self.job_heap and self.job_heap[0][0] <= now:
            _, job_id = heapq.heappop(self.job_heap)
            job = self.jobs.get(job_id)
            if job is not None and job["state"] in ("queued", "working"):
                self.execute(job)

    def execute(self, job: dict) -> None:
        ids = job["ids"]
        limit = job["fail_after"]
        todo = ids if limit is None else ids[: max(0, limit)]
        now = self.clock()
        missing = []
        for tid in todo:
            row = self.ticket_row(tid)
            if job["job_type"] == "ticket_deletion":
                ok = row is not None and self.t_status[row] < DELETED
                if ok:
                    self.t_prev[row] = self.t_status[row]
                    self.t_status[row] = DELETED
                    self.t_deleted_at[row] = now
                    self.touch_ticket(row, now)
                    self.soft_tickets.add(tid)
                    self.counters["soft_ticket_deletions"] += 1
            else:  # permanent_ticket_deletion
                ok = row is not None and self.t_status[row] == DELETED
                if ok:
                    self.t_index.discard((int(self.t_updated[row]) << _SHIFT) | tid)
                    self.t_status[row] = GONE
                    self.soft_tickets.discard(tid)
                    self.counters["permanent_ticket_deletions"] += 1
            if not ok:
                missing.append(tid)
        job["missing"] = missing
        job["progress"] = len(todo)
        if limit is not None:
            job["state"] = "failed"
            job["message"] = "Job failed part-way (injected fault)"
        else:
            job["state"] = "completed"
            job["message"] = f"Completed at {iso(now)}"
        self.active.discard(job["id"])
        self.finished[job["state"]] += 1
        self.counters[f"jobs_{job['state']}"] += 1

    def jobs_by_status(self) -> dict[str, int]:
        out = Counter({state: n for state, n in self.finished.items() if n})
        for job_id in self.active:
            out[self.job_state(self.jobs[job_id])] += 1
        return dict(out)

    # --- stats -----------------------------------------------------------------------
    def stats(self) -> dict:
        counts = np.bincount(self.t_status, minlength=GONE + 1)
        roles = np.bincount(self.u_role[self.u_state == ACTIVE], minlength=len(zd.ROLES))
        return {
            "tickets": {name: int(counts[code]) for code, name in enumerate(zd.TICKET_STATUSES[:DELETED])},
            "tickets_live": int(counts[:DELETED].sum()),
            "tickets_soft_deleted": int(counts[DELETED]),
            "tickets_permanently_deleted": int(counts[GONE]),
            "users": {name: int(roles[code]) for code, name in enumerate(zd.ROLES)},
            "users_soft_deleted": int((self.u_state == SOFT_DELETED).sum()),
            "users_permanently_deleted": int((self.u_state == USER_GONE).sum()),
            "requests": self.counters["requests"],
            "throttled": self.counters["throttled"],
            "errors_injected": self.counters["errors_injected"],
            "jobs": self.jobs_by_status(),
            "soft_ticket_deletions": self.counters["soft_ticket_deletions"],
            "permanent_ticket_deletions": self.counters["permanent_ticket_deletions"],
            "soft_user_deletions": self.counters["soft_user_deletions"],
            "permanent_user_deletions": self.counters["permanent_user_deletions"],
            "requests_by_endpoint": {k[4:]: v for k, v in sorted(self.counters.items()) if k.startswith("req:")},
            "generated": self.meta.get("generated"),
            "edge_cases": self.meta.get("edge_cases"),
        }


class App:
    """Routing, limits and faults around a :class:`State`."""

    def __init__(self, state: State, args: argparse.Namespace):
        self.state = state
        self.args = args
        minute = float(args.window_seconds)
        self.general = RollingWindow(args.requests_per_minute, minute)
        self.incremental = RollingWindow(args.incremental_per_minute, minute)
        self.deleted_list = RollingWindow(args.deleted_list_per_minute, minute)
        self.user_deletes = RollingWindow(args.user_deletes_per_10min, 10 * minute)
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

    def _fault_matches(self, path: str) -> bool:
        match = self.state.faults.get("match")
        return not match or match in path

    def api(self, method: str, path: str, query: dict, base: str, body: bytes) -> tuple[int, dict, dict | None]:
        st = self.state
        family = _family(method, path)
        with st.lock:
            st.counters["requests"] += 1
            st.counters[f"req:{family}"] += 1
            faults = st.faults
            matches = bool(faults) and self._fault_matches(path)
            slow = faults.get("slow_ms", 0) if matches else 0
        if slow:
            time.sleep(float(slow) / 1000.0)
        with st.lock:
            if matches and faults.get("throttle_next", 0) > 0:
                faults["throttle_next"] -= 1
                st.counters["throttled"] += 1
                st.counters["errors_injected"] += 1
                raise ApiError(429, "APIRateLimitExceeded", "Rate limit exceeded (injected)", {"Retry-After": "1"})
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
                raise ApiError(429, "APIRateLimitExceeded", "Rate limit exceeded", _rate_headers(limit, 0, reset, retry=reset))
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
                        _rate_headers(limit, remaining, reset, retry=reset2),
                    )
            headers = _rate_headers(limit, remaining, reset)
            status, payload = self.route(method, path, query, base, matches, body)
            return status, headers, payload

    # --- API routes (called with the lock held) ----------------------------------------
    def route(self, method: str, path: str, query: dict, base: str, fault_match: bool, body: bytes) -> tuple[int, dict]:
        st = self.state
        seg = path.split("/")[1:]  # ["api", "v2", ...]
        if seg[:2] != ["api", "v2"] or len(seg) < 3:
            raise ApiError(404, "InvalidEndpoint", "Not found")
        seg = seg[2:]
        head = seg[0]
        if head == "incremental" and len(seg) == 3 and seg[2] == "cursor" and method == "GET":
            if seg[1] == "tickets":
                return 200, self.export(query, base, tickets=True)
            if seg[1] == "users":
                return 200, self.export(query, base, tickets=False)
        if head == "users" and seg[1:] == ["me"] and method == "GET":
            admin_row = int(np.flatnonzero(st.u_role == zd.ROLE_CODE["admin"])[0])
            return 200, {"user": st.user_json(admin_row, base)}
        if head == "tickets":
            if seg[1:] == ["show_many"] and method == "GET":
                ids = _ids(query)
                rows = [st.ticket_row(i) for i in ids]
                return 200, {"tickets": [st.ticket_json(r, base) for r in rows if r is not None and st.t_status[r] < DELETED]}
            if seg[1:] == ["destroy_many"] and method == "DELETE":
                return 200, {"job_status": st.job_json(self.submit_job("ticket_deletion", _ids(query), base, fault_match))}
            if len(seg) == 2 and seg[1].isdigit():
                row = st.ticket_row(int(seg[1]))
                if row is None or st.t_status[row] >= DELETED:
                    raise ApiError(404, "RecordNotFound", "Not found")
                if method == "GET":
                    return 200, {"ticket": st.ticket_json(row, base)}
                if method == "PUT":
                    return 200, {"ticket": self.update_ticket(row, base, body)}
                if method == "DELETE":  # single soft delete: synchronous, 204
                    st.execute(st.new_job("ticket_deletion", [row + 1], base, None))
                    return 204, None
        if head == "deleted_tickets":
            if len(seg) == 1 and method == "GET":
                return 200, self.list_soft(st.soft_tickets, "deleted_tickets", query, base, self.deleted_ticket_json)
            if seg[1:] == ["destroy_many"] and method == "DELETE":
                job = self.submit_job("permanent_ticket_deletion", _ids(query), base, fault_match)
                return 200, {"job_status": st.job_json(job)}
            if len(seg) == 2 and seg[1].isdigit() and method == "DELETE":
                job = self.submit_job("permanent_ticket_deletion", [int(seg[1])], base, fault_match)
                return 200, {"job_status": st.job_json(job)}
        if head == "job_statuses" and seg[1:] == ["show_many"] and method == "GET":
            wanted = _job_ids(query)
            return 200, {"job_statuses": [st.job_json(st.jobs[j]) for j in wanted if j in st.jobs]}
        if head == "job_statuses" and len(seg) == 2 and method == "GET":
            job = st.jobs.get(seg[1])
            if job is None:
                raise ApiError(404, "RecordNotFound", "Not found")
            return 200, {"job_status": st.job_json(job)}
        if head == "users":
            if seg[1:] == ["search"] and method == "GET":
                return 200, self.search_users(query, base)
            if len(seg) == 4 and seg[1].isdigit() and seg[2:] == ["tickets", "requested"] and method == "GET":
                row = st.user_row(int(seg[1]))
                if row is None or st.u_state[row] != ACTIVE:
                    raise ApiError(404, "RecordNotFound", "Not found")
                ids = SortedList(st.requested_ticket_ids(row))
                return 200, self.list_soft(
                    ids, "tickets", query, base, lambda tid, b: st.ticket_json(tid - 1, b),
                    path=f"users/{seg[1]}/tickets/requested",
                )
            if seg[1:] == ["show_many"] and method == "GET":
                rows = [st.user_row(i) for i in _ids(query)]
                return 200, {"users": [st.user_json(r, base) for r in rows if r is not None and st.u_state[r] == ACTIVE]}
            if len(seg) == 2 and seg[1].isdigit():
                row = st.user_row(int(seg[1]))
                if row is None or st.u_state[row] != ACTIVE:
                    raise ApiError(404, "RecordNotFound", "Not found")
                if method == "GET":
                    return 200, {"user": st.user_json(row, base)}
                if method == "DELETE":
                    return 200, {"user": self.soft_delete_user(row, base)}
        if head == "deleted_users":
            if len(seg) == 1 and method == "GET":
                return 200, self.list_soft(st.soft_users, "deleted_users", query, base, self.deleted_user_json)
            if len(seg) == 2 and seg[1].isdigit():
                row = st.user_row(int(seg[1]))
                if row is None or st.u_state[row] != SOFT_DELETED:
                    raise ApiError(404, "RecordNotFound", "Not found")
                if method == "GET":
                    return 200, {"deleted_user": self.deleted_user_json(row + 1, base)}
                if method == "DELETE":
                    return 200, {"deleted_user": self.permanently_delete_user(row, base)}
        raise ApiError(404, "InvalidEndpoint", "Not found")

    def submit_job(self, job_type: str, ids: list[int], base: str, fault_match: bool) -> dict:
        st = self.state
        if st.active_jobs() >= self.args.max_jobs:
            wait = max(1, math.ceil(st.job_heap[0][0] - time.time())) if st.job_heap else 1
            st.counters["throttled"] += 1
            raise ApiError(429, "TooManyJobs", "Too many jobs queued or running", {"Retry-After": str(wait)})
        fail_after = None
        faults = st.faults
        if fault_match and faults.get("fail_job_next", 0) > 0:
            faults["fail_job_next"] -= 1
            st.counters["errors_injected"] += 1
            fail_after = int(faults.get("fail_job_after", 0))
        return st.new_job(job_type, ids, base, fail_after)

    def update_ticket(self, row: int, base: str, body: bytes) -> dict:
        """``PUT /api/v2/tickets/{id}`` with ``{"ticket": {"status": ...}}`` (status only)."""
        st = self.state
        try:
            new_status = json.loads(body or b"{}")["ticket"]["status"]
        except (ValueError, KeyError, TypeError):
            new_status = None
        if new_status not in zd.TICKET_STATUSES[:DELETED]:
            raise ApiError(422, "RecordInvalid", "status must be one of new/open/pending/hold/solved/closed")
        now = st.clock()
        code = zd.STATUS_CODE[new_status]
        if code in (zd.STATUS_CODE["solved"], CLOSED) and st.t_solved[row] < 0:
            st.t_solved[row] = now
        if code in zd.OPEN_CODES:
            st.t_solved[row] = zd.NO_TIME
        st.t_status[row] = code
        st.touch_ticket(row, now)
        return st.ticket_json(row, base)

    def soft_delete_user(self, row: int, base: str) -> dict:
        st = self.state
        if st.u_role[row] == zd.ROLE_CODE["admin"]:
            raise ApiError(403, "Forbidden", "The account owner cannot be deleted")
        if st.open_tickets_of(row):
            raise ApiError(
                422, "RecordInvalid", "Record validation errors",
                details={"base": [{"error": "UserIsRequesterOfUnclosedTickets",
                                   "description": "The user is requester of tickets that are not closed"}]},
            )
        now = st.clock()
        st.u_state[row] = SOFT_DELETED
        st.u_deleted_at[row] = now
        st.touch_user(row, now)
        st.soft_users.add(row + 1)
        st.counters["soft_user_deletions"] += 1
        return st.user_json(row, base)

    def permanently_delete_user(self, row: int, base: str) -> dict:
        st = self.state
        out = self.deleted_user_json(row + 1, base)
        st.u_index.discard((int(st.u_updated[row]) << _SHIFT) | (row + 1))
        st.u_state[row] = USER_GONE
        st.soft_users.discard(row + 1)
        st.counters["permanent_user_deletions"] += 1
        out.update({"name": "Permanently Deleted User", "email": None})
        return out

    def deleted_ticket_json(self, tid: int, base: str) -> dict:
        st = self.state
        row = tid - 1
        return {
            "id": tid,
            "subject": f"Synthetic ticket {tid}",
            "actor": {"id": zd.USER_ID_BASE + st.n_users, "name": "Example Admin"},
            "deleted_at": iso(st.t_deleted_at[row]),
            "previous_state": zd.TICKET_STATUSES[int(st.t_prev[row])],
        }

    def deleted_user_json(self, row1: int, base: str) -> dict:
        st = self.state
        out = st.user_json(row1 - 1, base)
        out["id"] = zd.USER_ID_BASE + row1
        out["url"] = f"{base}/api/v2/deleted_users/{out['id']}.json"
        out["active"] = False
        return out

    def list_soft(self, ids: SortedList, key: str, query: dict, base: str, render, *, path: str | None = None) -> dict:
        """Cursor (``page[size]``/``page[after]``) or offset (``page``/``per_page``) listing;
        ``path`` (under ``/api/v2/``, default ``key``) is where the page links point."""
        path = path or key
        if "page[size]" in query or "page[after]" in query:
            size = _int(query.get("page[size]", ["100"])[0], "page[size]")
            if not 1 <= size <= 100:
                raise ApiError(400, "InvalidPaginationParameter", "page[size] must be within 1..100")
            after = query.get("page[after]", [""])[0]
            start = 0
            if after:
                try:
                    start = ids.bisect_right(_decode_cursor(after))
                except (ValueError, binascii.Error):
                    raise ApiError(400, "InvalidPaginationParameter", "bad cursor") from None
            page = list(ids[start : start + size])
            has_more = start + size < len(ids)
            after_cursor = _encode_cursor(page[-1]) if page else None
            return {
                key: [render(r, base) for r in page],
                "meta": {"has_more": has_more, "after_cursor": after_cursor,
                         "before_cursor": _encode_cursor(page[0]) if page else None},
                "links": {"next": f"{base}/api/v2/{path}.json?page[size]={size}&page[after]={after_cursor}"
                          if has_more else None, "prev": None},
            }
        page_no = _int(query.get("page", ["1"])[0], "page")
        per_page = min(100, _int(query.get("per_page", ["100"])[0], "per_page"))
        start = (max(1, page_no) - 1) * per_page
        page = list(ids[start : start + per_page])
        more = start + per_page < len(ids)
        return {
            key: [render(r, base) for r in page],
            "next_page": f"{base}/api/v2/{path}.json?page={page_no + 1}&per_page={per_page}" if more else None,
            "previous_page": f"{base}/api/v2/{path}.json?page={page_no - 1}&per_page={per_page}" if page_no > 1 else None,
            "count": len(ids),
        }

    def search_users(self, query: dict, base: str) -> dict:
        """``GET /api/v2/users/search``: only ``email:{address}`` (or a bare address) is modelled."""
        st = self.state
        text = query.get("query", [""])[0].strip()
        address = text[len("email:"):] if text.lower().startswith("email:") else text
        address = address.strip().strip('"')
        if "@" not in address or any(c.isspace() for c in address):
            raise ApiError(400, "InvalidValue", "the stand-in models only email:{address} user searches")
        rows = st.user_rows_with_email(address)
        return {"users": [st.user_json(r, base) for r in rows], "next_page": None, "previous_page": None,
                "count": len(rows)}

    def export(self, query: dict, base: str, *, tickets: bool) -> dict:
        st = self.state
        index = st.t_index if tickets else st.u_index
        per_page = _int(query.get("per_page", [str(MAX_EXPORT_PAGE)])[0], "per_page")
        per_page = max(1, min(per_page, MAX_EXPORT_PAGE))
        if query.get("cursor", [""])[0]:
            try:
                lower = _decode_cursor(query["cursor"][0])
            except (ValueError, binascii.Error):
                raise ApiError(422, "InvalidPaginationParameter", "Invalid cursor") from None
        elif "start_time" in query:
            start = _int(query["start_time"][0], "start_time")
            if start > time.time():
                raise ApiError(422, "InvalidPaginationParameter", "start_time is in the future")
            lower = (max(start, 0) << _SHIFT) - 1
        else:
            raise ApiError(422, "InvalidPaginationParameter", "start_time or cursor required")
        upper = ((int(time.time()) - self.args.export_lag_seconds) << _SHIFT) | _LOW
        keys = list(itertools.islice(index.irange(lower, upper, inclusive=(False, True)), per_page + 1))
        more = len(keys) > per_page
        keys = keys[:per_page]
        rows = np.array([(k & _LOW) - 1 for k in keys], dtype=np.int64)
        after = keys[-1] if keys else lower
        name = "tickets" if tickets else "users"
        body = {
            name: st.tickets_page(rows, base) if tickets else st.users_page(rows, base),
            "after_cursor": _encode_cursor(after),
            "after_url": f"{base}/api/v2/incremental/{name}/cursor.json?cursor={_encode_cursor(after)}",
            "before_cursor": None,
            "before_url": None,
            "end_of_stream": not more,
        }
        includes = ",".join(query.get("include", [])).split(",")
        if tickets and "metric_sets" in includes:
            body["metric_sets"] = st.metric_sets_page(rows)
        return body


def _family(method: str, path: str) -> str:
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


def _int(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ApiError(400, "InvalidValue", f"{name} must be an integer") from None


def _ids(query: dict) -> list[int]:
    raw = ",".join(query.get("ids", []))
    parts = [p for p in raw.split(",") if p.strip()]
    if not parts:
        raise ApiError(400, "InvalidValue", "ids is required")
    if len(parts) > MAX_IDS:
        raise ApiError(400, "TooManyValues", f"at most {MAX_IDS} ids per request")
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise ApiError(400, "InvalidValue", "ids must be integers") from None


def _job_ids(query: dict) -> list[str]:
    raw = ",".join(query.get("ids", []))
    parts = [p.strip() for p in raw.split(",") if p.strip()]
    if not parts:
        raise ApiError(400, "InvalidValue", "ids is required")
    if len(parts) > MAX_IDS:
        raise ApiError(400, "TooManyValues", f"at most {MAX_IDS} ids per request")
    return list(dict.fromkeys(parts))


def _rate_headers(limit: int, remaining: int, reset: int, *, retry: int | None = None) -> dict:
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


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ZendeskStandIn/1"
    app: App  # set on the subclass made in serve()

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes: without this, Nagle's algorithm and the
        # client's delayed ACK add ~40 ms to every keep-alive response.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format, *args):
        pass

    def _dispatch(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        try:
            status, headers, payload = self.app.handle(method, self.path, self.headers, body)
        except Exception:  # a bug in the stand-in: answer 500, keep serving
            log.exception("stand-in error on %s", method)
            status, headers, payload = 500, {}, {"error": "InternalError"}
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        if payload is not None:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if data:
            self.wfile.write(data)

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def do_PUT(self):
        self._dispatch("PUT")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m retention_dev.standins.zendesk", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = any free port")
    p.add_argument("--state-file", default=None)
    p.add_argument("--tickets", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--due-share", type=float, default=0.2)
    p.add_argument("--now", default=None, help="ISO time the synthetic data is generated against (default: now)")
    p.add_argument("--requests-per-minute", type=int, default=700)
    p.add_argument("--incremental-per-minute", type=int, default=10)
    p.add_argument("--deleted-list-per-minute", type=int, default=10)
    p.add_argument("--user-deletes-per-10min", type=int, default=700)
    p.add_argument("--max-jobs", type=int, default=30)
    p.add_argument("--job-seconds", type=float, default=0.5)
    p.add_argument(
        "--window-seconds",
        type=float,
        default=60.0,
        help="length of a rate-limit 'minute' (the user-delete window is 10 of them); tests shorten it",
    )
    p.add_argument("--export-lag-seconds", type=int, default=0,
                   help="hide changes younger than this from incremental exports (real Zendesk: 60)")
    p.add_argument("--token", default=None, help="require this API token (Basic email/token or Bearer)")
    return p.parse_args(argv)


def build_state(args: argparse.Namespace) -> State:
    path = Path(args.state_file) if args.state_file else None
    if path is not None and path.exists():
        return State.load(path, job_seconds=args.job_seconds)
    now = datetime.fromisoformat(args.now) if args.now else zd.default_now()
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    return State.generate(args.tickets, args.seed, args.due_share, now, job_seconds=args.job_seconds)


def serve(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
    state = build_state(args)
    app = App(state, args)
    handler = type("BoundHandler", (Handler,), {"app": app})
    server = ThreadingHTTPServer((args.host, args.port), handler)
    server.daemon_threads = True
    stop = threading.Event()

    def on_signal(signum, frame):
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    jobs = threading.Thread(target=app.job_loop, name="jobs", daemon=True)
    jobs.start()
    web = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="http", daemon=True)
    web.start()
    print(f"LISTENING {server.server_address[1]}", flush=True)
    while not stop.wait(0.5):
        pass
    server.shutdown()
    app.stop_event.set()
    with state.job_cond:
        state.job_cond.notify_all()
    jobs.join(timeout=5)
    if args.state_file:
        state.save(Path(args.state_file))
    server.server_close()
    return 0


def main(argv: list[str] | None = None) -> int:
    return serve(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
