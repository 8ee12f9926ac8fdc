"""The Zendesk stand-in's background jobs (``destroy_many`` soft and permanent ticket deletions).

:class:`JobQueue` is a part of :class:`~retention_dev.standins.zendesk_state.State`: a job goes
``queued`` -> ``working`` -> ``completed``/``failed`` over ``job_seconds``; the server's job
thread runs the due ones (:meth:`JobQueue.run_due_jobs`). A job keeps its ids, how many it
processed and which of those were not found; the per-id ``results`` are rendered on request.
Finished jobs are kept for a day (as Zendesk does), at most ``MAX_FINISHED_JOBS`` of them.
"""

from __future__ import annotations

import heapq
import threading
import time
import uuid
from collections import Counter

from retention_dev.standins.zendesk_common import DELETED, GONE, SHIFT, iso

JOB_RETENTION_SECONDS = 86_400  # Zendesk keeps job statuses for a day
MAX_FINISHED_JOBS = 20_000


class JobQueue:
    """The jobs of a :class:`State` (which provides ``lock``, ``job_seconds``, the ticket
    columns and ``counters``); called with ``lock`` held."""

    def _init_jobs(self, meta: dict) -> None:
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
                    self.t_index.discard((int(self.t_updated[row]) << SHIFT) | tid)
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
