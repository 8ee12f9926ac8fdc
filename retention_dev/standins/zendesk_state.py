"""The Zendesk stand-in's account data: tickets and users as numpy columns, their export
indexes, persistence to a state file (``.npz``), the records' JSON shapes and the stats.

One :class:`State` per server, guarded by its ``lock``; the background jobs are its
:class:`~retention_dev.standins.zendesk_jobs.JobQueue` part.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import numpy as np
from sortedcontainers import SortedList

from retention_dev.standins import zendesk_data as zd
from retention_dev.standins.zendesk_common import ACTIVE, DELETED, GONE, SHIFT, SOFT_DELETED, USER_GONE, iso, iso_many
from retention_dev.standins.zendesk_jobs import JobQueue

STATE_VERSION = 1
# Users' addresses are derived from their ids (see user_json); the search matches these.
_PLACEHOLDER_EMAIL = re.compile(r"user(\d+)@example\.org")


class State(JobQueue):
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
        self.t_index = SortedList(((self.t_updated[live_t] << SHIFT) | (live_t + 1)).tolist())
        live_u = np.flatnonzero(self.u_state != USER_GONE)
        self.u_index = SortedList(((self.u_updated[live_u] << SHIFT) | (live_u + 1)).tolist())
        self.soft_tickets = SortedList((np.flatnonzero(self.t_status == DELETED) + 1).tolist())
        self.soft_users = SortedList((np.flatnonzero(self.u_state == SOFT_DELETED) + 1).tolist())
        # GET /api/v2/deleted_users lists soft and permanently deleted users alike, as Zendesk does.
        self.deleted_users = SortedList((np.flatnonzero(np.isin(self.u_state, (SOFT_DELETED, USER_GONE))) + 1).tolist())
        # Tickets per requester (requesters never change here): CSR over user rows.
        req_row = self.t_requester - zd.USER_ID_BASE - 1
        self.by_req_order = np.argsort(req_row, kind="stable")
        self.by_req_start = np.searchsorted(req_row[self.by_req_order], np.arange(n_u + 1))
        self.n_tickets, self.n_users = n_t, n_u
        self._init_people()
        self._init_jobs(meta)
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
            meta["cc_set"] = {str(k): v for k, v in self.cc_set.items()}
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
        self.t_index.discard((int(self.t_updated[row]) << SHIFT) | (row + 1))
        self.t_updated[row] = now
        if self.t_status[row] != GONE:
            self.t_index.add((now << SHIFT) | (row + 1))

    def touch_user(self, row: int, now: int) -> None:
        self.u_index.discard((int(self.u_updated[row]) << SHIFT) | (row + 1))
        self.u_updated[row] = now
        if self.u_state[row] != USER_GONE:
            self.u_index.add((now << SHIFT) | (row + 1))

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

    # --- CCs and followers ------------------------------------------------------------
    def _init_people(self) -> None:
        """Who is CC'd on or follows which ticket: derived from the data, not stored. Every
        11th ticket (from row 6 on: rows 0..5 are the edge cases) CCs an end user, taken in turn
        from the requesters (not the two edge-case users) and the users without tickets; every
        13th is followed by an agent. As in Zendesk, ``collaborator_ids`` lists both."""
        edge = self.meta.get("edge_cases") or {}
        skip = {edge.get("user_due_and_open"), edge.get("user_all_due")}
        requesters = [int(u) for u in np.unique(self.t_requester) if int(u) not in skip]
        idle = [int(u) for u in edge.get("users_without_tickets") or []]
        self.cc_pool = requesters[::2] + idle[: max(1, len(idle) // 2)]
        self.agent_pool = [zd.USER_ID_BASE + 1 + int(r) for r in np.flatnonzero(self.u_role == zd.ROLE_CODE["agent"])]
        # CCs set through the API (PUT /tickets/{id} with email_cc_ids): ticket row -> user ids.
        self.cc_set: dict[int, list[int]] = {int(k): v for k, v in (self.meta.get("cc_set") or {}).items()}
        # The generated CCs and followers by user: user id -> ticket rows (for users/{id}/related).
        self.cc_rows: dict[int, list[int]] = {}
        for row in sorted(set(range(3, self.n_tickets, 11)) | set(range(5, self.n_tickets, 13))):
            for uid in self._generated_people(row):
                self.cc_rows.setdefault(uid, []).append(row)

    def _generated_people(self, row: int) -> list[int]:
        cc = [self.cc_pool[(row // 11) % len(self.cc_pool)]] if row >= 6 and row % 11 == 3 and self.cc_pool else []
        follow = [self.agent_pool[(row // 13) % len(self.agent_pool)]] if row >= 6 and row % 13 == 5 and self.agent_pool else []
        return [u for u in cc if u != int(self.t_requester[row])] + follow

    def people(self, row: int) -> dict:
        """``collaborator_ids``, ``email_cc_ids`` and ``follower_ids`` of the ticket in ``row``."""
        if row in self.cc_set:
            cc = list(self.cc_set[row])
        else:
            cc = [self.cc_pool[(row // 11) % len(self.cc_pool)]] if row >= 6 and row % 11 == 3 and self.cc_pool else []
        cc = [u for u in cc if u != int(self.t_requester[row])]
        follow = [self.agent_pool[(row // 13) % len(self.agent_pool)]] if row >= 6 and row % 13 == 5 and self.agent_pool else []
        return {"collaborator_ids": cc + follow, "email_cc_ids": cc, "follower_ids": follow}

    def related(self, user_row: int) -> dict:
        """``GET /users/{id}/related``: counts of the live tickets the user requested and is
        CC'd on (or follows), as Zendesk's ``user_related``."""
        uid = zd.USER_ID_BASE + user_row + 1
        rows = self.by_req_order[self.by_req_start[user_row] : self.by_req_start[user_row + 1]]
        requested = int((self.t_status[rows] < DELETED).sum())
        ccd = 0
        candidates = set(self.cc_set) | set(self.cc_rows.get(uid, ()))
        for row in candidates:
            if self.t_status[row] < DELETED:
                people = self.people(row)
                ccd += uid in people["collaborator_ids"]
        return {"user_related": {"requested_tickets": requested, "ccd_tickets": ccd, "assigned_tickets": 0,
                                 "organization_subscriptions": 0}}

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
            **self.people(row),
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
                **self.people(tid - 1),
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
