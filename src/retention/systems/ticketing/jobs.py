"""Ticket erasure through Zendesk's background jobs: chunks, job slots, submission, polling.

What it relies on, from the Zendesk Support API reference:

* ``DELETE /api/v2/tickets/destroy_many?ids=`` (<= 100 ids) soft-deletes as a background job;
  ``DELETE /api/v2/deleted_tickets/destroy_many?ids=`` (<= 100) deletes soft-deleted tickets for
  good, also as a job; ``GET /api/v2/job_statuses/{id}`` reports queued/working/completed/failed,
  ``GET /api/v2/job_statuses/show_many?ids=`` (comma-separated job ids) reports many at once.
* At most 30 jobs may be queued or running per account (the "job limit"; beyond it, 429).
* A ``destroy_many`` whose answer is lost after it may have reached Zendesk (a read timeout)
  may have made its job: it is never sent again blindly. The ids are looked at instead
  (``tickets/show_many`` lists live tickets, ``deleted_tickets`` the soft-deleted ones), again
  while a job of that age could still be running, and only the ids the job has not dealt with
  are sent again ("29 duplicate jobs seen", issue 10).

The job limit is kept by ``max_jobs_in_flight`` (<= 30) job slots, each held from a job's
submission until a poll saw it end. One watcher thread polls every job being waited for with
one ``job_statuses/show_many`` call; while requests queue for the budget, polls take at most
``POLL_BUDGET_SHARE`` of it, and go ahead of the queue (see :meth:`TicketJobs.poll_spacing`).
Log lines name endpoint families and counts only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import TYPE_CHECKING

from retention.systems.http import HTTPError, MaybeSent

if TYPE_CHECKING:
    from retention.systems.ticketing.client import ZendeskClient

# The client's logger, whichever module of it logs (benchmarks quiet the per-batch lines by it).
log = logging.getLogger("retention.systems.ticketing.client")

MAX_IDS = 100
MAX_JOBS = 30  # Zendesk's job limit: queued or running background jobs per account
POLL_BUDGET_SHARE = 0.04  # job-status polls take at most this share of the request budget
JOB_STATUSES = "/api/v2/job_statuses/show_many.json"
SOFT_DELETE = "/api/v2/tickets/destroy_many.json"
PERMANENT_DELETE = "/api/v2/deleted_tickets/destroy_many.json"

ERASED, ALREADY_GONE, FAILED, NOT_YET = "erased", "already_gone", "failed", "not_yet"


class TicketJobs:
    """The destroy_many jobs of one client: its job slots, its job watcher, and the ticket
    erasure that runs them (:meth:`ZendeskClient.erase_tickets <retention.systems.ticketing.
    client.ZendeskClient.erase_tickets>`). Settings are read from the client as they are:
    ``max_jobs_in_flight``, ``max_job_attempts``, ``job_poll_interval``, ``job_timeout``,
    ``max_connections``."""

    def __init__(self, client: ZendeskClient):
        self.client = client
        self._slots = threading.BoundedSemaphore(client.max_jobs_in_flight)
        self._lock = threading.Lock()
        self.in_flight = 0
        self.in_flight_peak = 0
        self.watcher = JobWatcher(self)

    def close(self) -> None:
        self.watcher.close()

    # --- ticket erasure --------------------------------------------------------------
    def erase_tickets(
        self, ids: Iterable[int], on_result: Callable[[int, str], None] | None, defer_statuses: Iterable[str],
        keep: Callable[[list[dict]], set[int]] | None = None,
    ) -> dict[int, str]:
        order = list(dict.fromkeys(int(i) for i in ids))
        defer = frozenset(defer_statuses)
        outcomes: dict[int, str] = {}
        lock = threading.Lock()

        def report(tid: int, outcome: str) -> None:
            with lock:
                if tid in outcomes:
                    return
                outcomes[tid] = outcome
                if on_result is not None:
                    on_result(tid, outcome)

        chunks = [order[i : i + MAX_IDS] for i in range(0, len(order), MAX_IDS)]
        if chunks:
            # One thread per chunk under way, two per job slot: while the slots' chunks wait
            # for their jobs, the others re-read statuses, so the request budget never idles
            # (job polls and submissions go ahead of status re-reads: see limits.PRIORITY).
            workers = min(2 * self.client.max_jobs_in_flight, len(chunks))
            with ThreadPoolExecutor(workers, thread_name_prefix="zendesk-erase") as pool:
                futures = {pool.submit(self._erase_chunk, chunk, report, defer, keep): chunk for chunk in chunks}
                for fut in as_completed(futures):
                    exc = fut.exception()
                    if exc is None:
                        continue
                    if not isinstance(exc, HTTPError):  # e.g. on_result failed: stop, don't guess
                        for other in futures:
                            other.cancel()
                        raise exc
                    log.warning("ticket erasure: a chunk of %d failed for good (%s)", len(futures[fut]), exc)
                    for tid in futures[fut]:
                        report(tid, FAILED)
        counts = Counter(outcomes.values())
        log.info("ticket erasure: %s", dict(counts))
        return {tid: outcomes[tid] for tid in order}

    def _erase_chunk(
        self, chunk: list[int], report: Callable[[int, str], None], defer: frozenset[str],
        keep: Callable[[list[dict]], set[int]] | None = None,
    ) -> None:
        if defer or keep:
            # The chunk as it is now, read right before its soft deletion (one request): an
            # unsolved ticket, or one the caller's check keeps, is left alone ("not_yet").
            current = self.client.current_tickets(chunk)
            statuses = {int(t["id"]): t.get("status") for t in current}
            left = {tid for tid in chunk if statuses.get(tid) in defer} | (keep(current) if keep else set())
            for tid in chunk:
                if tid in left:
                    report(tid, NOT_YET)
            chunk = [tid for tid in chunk if tid not in left]
        soft_ok, soft_missing, soft_failed = self.run(SOFT_DELETE, chunk, "tickets.destroy_many")
        for tid in soft_failed:
            report(tid, FAILED)
        missing_before = set(soft_missing)
        to_purge = missing_before | set(soft_ok)
        targets = [tid for tid in chunk if tid in to_purge]
        perm_ok, perm_missing, perm_failed = self.run(PERMANENT_DELETE, targets, "deleted_tickets.destroy_many")
        for tid in perm_ok:
            report(tid, ERASED)
        for tid in perm_missing:
            report(tid, ALREADY_GONE if tid in missing_before else ERASED)
        for tid in perm_failed:
            report(tid, FAILED)

    # --- jobs ------------------------------------------------------------------------
    def run(self, path: str, ids: list[int], endpoint: str) -> tuple[list[int], list[int], list[int]]:
        """Run a destroy_many job over ``ids`` to the end: (succeeded, not found, failed).

        A job that fails part-way: the ids it reports are settled, the rest go into a fresh call
        (never resubmitting a processed id), up to ``max_job_attempts`` calls. A request the
        API rejects as a whole (400/404/422) is split in halves to isolate the offending id.
        """
        ok: list[int] = []
        missing: list[int] = []
        failed: list[int] = []
        stack = [list(ids)] if ids else []
        while stack:
            batch = stack.pop()
            attempts = 0
            while batch:
                attempts += 1
                try:
                    resp, job = self._submit(path, batch, endpoint)
                except MaybeSent:
                    # Its job may exist: send again only what it has not dealt with.
                    rest = self._still_to_do(path, batch, endpoint)
                    ok.extend(tid for tid in batch if tid not in rest)
                    if rest and attempts >= self.client.max_job_attempts:
                        log.warning("%s: %d ids unsettled after %d attempts", endpoint, len(rest), attempts)
                        failed.extend(rest)
                        rest = []
                    batch = [tid for tid in batch if tid in rest]
                    continue
                if job is None:
                    if len(batch) == 1:
                        (missing if resp.status_code == 404 else failed).append(batch[0])
                    else:
                        half = len(batch) // 2
                        stack.extend([batch[half:], batch[:half]])
                    break
                try:
                    job = self.wait(job)
                finally:
                    self._release_slot()
                results = job.get("results")
                wanted = set(batch)
                settled: set[int] = set()
                if isinstance(results, list):
                    for item in results:
                        tid = item.get("id") if isinstance(item, dict) else None
                        if tid not in wanted or tid in settled:
                            continue
                        settled.add(tid)
                        kind = classify_result(item)
                        (ok if kind == "ok" else missing if kind == "missing" else failed).append(tid)
                elif job.get("status") == "completed" and (not isinstance(results, dict) or results.get("success", True)):
                    # Permanent ticket deletion reports only {"success": true}: all done.
                    ok.extend(batch)
                    settled = wanted
                rest = [tid for tid in batch if tid not in settled]
                if rest and attempts >= self.client.max_job_attempts:
                    log.warning("%s: %d ids unsettled after %d jobs", endpoint, len(rest), attempts)
                    failed.extend(rest)
                    rest = []
                if rest:
                    log.info("%s: job ended %s, resubmitting %d unprocessed ids", endpoint, job.get("status"), len(rest))
                batch = rest
        return ok, missing, failed

    def _still_to_do(self, path: str, batch: list[int], endpoint: str) -> set[int]:
        """After a ``destroy_many`` over ``batch`` whose answer was lost: the ids its job (if it
        was made) has not dealt with. Soft deletion: the ids still live; permanent deletion: the
        ids still soft-deleted. Looked at at once, then again while a job of that age could
        still be queued or running (``grace``), so that a slow job is not sent a second time."""
        wanted = set(batch)
        grace = self.watcher.job_duration_guess()
        deadline = time.monotonic() + grace
        while True:
            if path == SOFT_DELETE:
                rest = {int(t["id"]) for t in self.client.current_tickets(batch) if t.get("status") != "deleted"}
            else:
                rest = {tid for tid in self.client.iter_deleted_ticket_ids() if tid in wanted}
            left = deadline - time.monotonic()
            if not rest or left <= 0:
                break
            time.sleep(min(left, max(self.client.job_poll_interval, grace / 5)))
        log.info("%s: answer lost; %d of %d ids were done by its job, %d to send again", endpoint,
                 len(wanted) - len(rest), len(wanted), len(rest))
        return rest

    def wait(self, job: dict) -> dict:
        """The job's final status (completed or failed), polled by the watcher together with
        every other job being waited for; ``{"status": "failed", "results": None}`` when it
        cannot be had (no id, expired or unknown, ``job_timeout`` passed)."""
        return self.watcher.wait(job)

    def _submit(self, path: str, batch: list[int], endpoint: str):
        """``DELETE path?ids=batch`` holding a job slot: ``(response, job)``. The slot is kept
        (``job`` not None) while the job is queued or running, and given back otherwise."""
        self._take_slot()
        try:
            # resend=False: a lost answer must not make a second job (see _still_to_do).
            resp = self.client.session.request(
                "DELETE", path, endpoint=endpoint, params={"ids": ",".join(map(str, batch))}, accept=(400, 404, 422),
                resend=False,
            )
            job = None if resp.status_code in (400, 404, 422) else (resp.json().get("job_status") or {})
        except BaseException:
            self._release_slot()
            raise
        if job is None:
            self._release_slot()
        return resp, job

    def _take_slot(self) -> None:
        self._slots.acquire()
        with self._lock:
            self.in_flight += 1
            self.in_flight_peak = max(self.in_flight_peak, self.in_flight)
        if self.slots_short():
            self.watcher.wake()  # a poll may be due sooner now

    def _release_slot(self) -> None:
        with self._lock:
            self.in_flight -= 1
        self._slots.release()

    def slots_short(self) -> bool:
        limit = self.client.max_jobs_in_flight
        return self.in_flight >= limit - max(1, limit // 10)

    def poll_spacing(self) -> float:
        """Seconds from one job-status poll to the next.

        ``job_poll_interval`` while the request budget has room to spare (a poll then delays
        nothing). While requests queue for the budget, each poll takes the place of a useful
        request: polls are then spaced to take at most ``POLL_BUDGET_SHARE`` of the budget while
        job slots run short (a slot is given back only once a poll saw its job end, so a late
        poll holds up submissions), and 2.5 times further apart while slots are to spare.
        """
        budget = self.client.general
        interval = self.client.job_poll_interval
        if not budget.busy():
            return interval
        spacing = max(interval, budget.interval / POLL_BUDGET_SHARE)
        return spacing if self.slots_short() else 2.5 * spacing


class _Waiter:
    __slots__ = ("job_id", "submitted", "next_check", "backoff", "done", "result", "error")

    def __init__(self, job_id: str, now: float, first_delay: float, backoff: float):
        self.job_id = job_id
        self.submitted = now
        self.next_check = now + first_delay
        self.backoff = backoff
        self.done = threading.Event()
        self.result: dict | None = None
        self.error: BaseException | None = None


class JobWatcher:
    """Polls the jobs a client waits for, all of them in one ``job_statuses/show_many`` call.

    A poll goes out once some job is due for a check, never sooner than
    :meth:`TicketJobs.poll_spacing` after the previous poll, and reports on every job waited
    for, the ones not yet due included. A job is first due at 1.1 times the age at which the
    quickest of the last 64 jobs was seen ended (``job_poll_interval`` until one was), then,
    while it runs, again after ``job_poll_interval``, growing by half each time up to five
    times that. The thread starts on the first wait and ends with :meth:`close` (jobs still
    waited for then count as failed).
    """

    def __init__(self, jobs: TicketJobs):
        self.jobs = jobs
        self.client = jobs.client
        self.cond = threading.Condition()
        self.pending: dict[str, _Waiter] = {}
        self.thread: threading.Thread | None = None
        self.closed = False
        self.last_poll = float("-inf")
        self.polls = 0
        self.seen_ending: deque[float] = deque(maxlen=64)  # ages at which recent jobs were seen ended

    def wait(self, job: dict) -> dict:
        if job.get("status") in ("completed", "failed"):
            return job
        job_id = job.get("id")
        if job_id is None:
            log.warning("job status: a job without an id")
            return {"status": "failed", "results": None}
        job_id = str(job_id)
        interval = self.client.job_poll_interval
        with self.cond:
            first = 1.1 * min(self.seen_ending) if self.seen_ending else interval
            waiter = _Waiter(job_id, time.monotonic(), first, interval)
            if self.closed:
                return {"status": "failed", "results": None}
            self.pending[job_id] = waiter
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="zendesk-jobs", daemon=True)
                self.thread.start()
            self.cond.notify_all()
        if not waiter.done.wait(self.client.job_timeout):
            with self.cond:
                self.pending.pop(job_id, None)
            log.warning("job status: gave up waiting")
            return {"status": "failed", "results": None}
        if waiter.error is not None:
            raise waiter.error
        return waiter.result or {"status": "failed", "results": None}

    def job_duration_guess(self) -> float:
        """How long a job may take to end: twice the slowest of the recent jobs seen ending
        (10 s before any was), at most ``job_timeout`` and 120 s."""
        with self.cond:
            slowest = max(self.seen_ending) if self.seen_ending else 5.0
        return min(2 * slowest, self.client.job_timeout, 120.0)

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
            thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self.client.job_timeout)

    def _finish(self, waiter: _Waiter, result: dict | None = None, error: BaseException | None = None) -> None:
        self.pending.pop(waiter.job_id, None)
        waiter.result = result
        waiter.error = error
        waiter.done.set()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.closed:
                    if self.pending:
                        now = time.monotonic()
                        due = min(w.next_check for w in self.pending.values())
                        at = max(due, self.last_poll + self.jobs.poll_spacing())
                        if at <= now:
                            break
                        # Look again soon: the spacing shrinks once the request budget idles.
                        self.cond.wait(min(at - now, 0.05))
                    else:
                        self.cond.wait()
                if self.closed:
                    for waiter in list(self.pending.values()):
                        self._finish(waiter, {"status": "failed", "results": None})
                    return
                waiters = sorted(self.pending.values(), key=lambda w: w.submitted)
                self.last_poll = time.monotonic()
            for i in range(0, len(waiters), MAX_IDS):
                self._poll(waiters[i : i + MAX_IDS])

    def _poll(self, waiters: list[_Waiter]) -> None:
        self.polls += 1
        try:
            body = self.client.session.request(
                "GET", JOB_STATUSES, endpoint="job_statuses.show_many", params={"ids": ",".join(w.job_id for w in waiters)}
            ).json()
        except Exception as exc:  # noqa: BLE001 - handed to each waiting thread, raised there
            with self.cond:
                for waiter in waiters:
                    self._finish(waiter, error=exc)
            return
        found = {str(j.get("id")): j for j in body.get("job_statuses") or [] if isinstance(j, dict)}
        now = time.monotonic()
        with self.cond:
            for waiter in waiters:
                job = found.get(waiter.job_id)
                if job is None:  # expired or unknown: failed without results
                    self._finish(waiter, {"status": "failed", "results": None})
                elif job.get("status") in ("completed", "failed"):
                    self.seen_ending.append(now - waiter.submitted)
                    self._finish(waiter, job)
                elif waiter.next_check <= now:  # due and still running: look again later
                    waiter.next_check = now + waiter.backoff
                    waiter.backoff = min(waiter.backoff * 1.5, self.client.job_poll_interval * 5)


def classify_result(item: dict) -> str:
    """One entry of a job's ``results``: "ok", "missing" (record not found) or "failed"."""
    if item.get("success") is True or (item.get("success") is None and not item.get("error") and not item.get("errors")):
        return "ok"
    text = " ".join(str(item.get(k) or "") for k in ("error", "errors", "details", "status")).lower()
    compact = text.replace("_", "").replace(" ", "")
    if "notfound" in compact:
        return "missing"
    return "failed"
