"""Zendesk Support API client: incremental export and two-step (soft, then permanent) erasure.

What it relies on, from the Zendesk Support API reference:

* Incremental cursor export ``GET /api/v2/incremental/{tickets,users}/cursor.json`` with
  ``start_time`` first and ``cursor=after_cursor`` until ``end_of_stream``; 10 requests a minute.
  ``include=metric_sets`` sideloads the ticket metrics, which carry ``solved_at``. Soft-deleted
  tickets are exported with status ``"deleted"``.
* ``DELETE /api/v2/tickets/destroy_many?ids=`` (<= 100 ids) soft-deletes as a background job;
  ``DELETE /api/v2/deleted_tickets/destroy_many?ids=`` (<= 100) deletes soft-deleted tickets for
  good, also as a job; ``GET /api/v2/job_statuses/{id}`` reports queued/working/completed/failed,
  ``GET /api/v2/job_statuses/show_many?ids=`` (comma-separated job ids) reports many at once.
  At most 30 jobs may be queued or running per account (the "job limit"; beyond it, 429).
* ``DELETE /api/v2/users/{id}`` soft-deletes a user and is refused (422) while the user is the
  requester of a ticket that is not closed; ``DELETE /api/v2/deleted_users/{id}`` then deletes
  for good, at most 700 users per 10 minutes.
* Account-wide limit of N requests per minute by plan; 429 with ``Retry-After`` beyond it.
* Erasure requests: ``GET /api/v2/users/search?query=email:{address}`` finds a user by e-mail
  (offset pagination, ``next_page``); ``GET /api/v2/users/{id}/tickets/requested`` lists the
  tickets a user requested (cursor pagination ``page[size]``/``page[after]``). Zendesk leaves
  archived tickets (closed for 120 days) out of that list; they stay reachable by id.

Rate limits are kept on the client side by :class:`Pacer` (one per limit), wired into the HTTP
adapter so that retries are paced too and a 429 pushes the pacer back by ``Retry-After``. The job
limit is kept by ``max_jobs_in_flight`` (<= 30) job slots, each held from a job's submission
until a poll saw it end. One watcher thread polls every job being waited for with one
``job_statuses/show_many`` call; while requests queue for the budget, polls take at most
``POLL_BUDGET_SHARE`` of it, and go ahead of the queue (see :meth:`ZendeskClient.job_poll_spacing`).
Nothing personal is logged or kept: exported records are cut down to ids, roles, statuses and
times; log lines name endpoint families and counts only.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Self

from requests.adapters import HTTPAdapter

from retention.systems.http import HTTPError, RetryingSession, retry_after_seconds

log = logging.getLogger(__name__)

MAX_IDS = 100
MAX_JOBS = 30  # Zendesk's job limit: queued or running background jobs per account
POLL_BUDGET_SHARE = 0.04  # job-status polls take at most this share of the request budget
JOB_STATUSES = "/api/v2/job_statuses/show_many.json"
SOFT_DELETE = "/api/v2/tickets/destroy_many.json"
PERMANENT_DELETE = "/api/v2/deleted_tickets/destroy_many.json"
TICKET_FIELDS = ("id", "status", "requester_id", "created_at", "updated_at")
USER_FIELDS = ("id", "role", "active", "created_at", "updated_at")

ERASED, ALREADY_GONE, FAILED, NOT_YET = "erased", "already_gone", "failed", "not_yet"


class Pacer:
    """Spaces calls so that no rolling ``window`` of seconds sees more than ``limit`` of them.

    A slot scheduler (GCRA with a burst of one): slots are one interval apart, each call takes
    the next free one and waits for it. The interval leaves a margin of ``1 - safety`` of the
    window, and at least ``min_slack`` seconds per window, for the jitter between taking a slot
    and the request reaching the server. Calls waiting for a slot get it by ``priority``
    (higher first, then in arrival order): who is served next changes, the slots do not.
    Thread safe.
    """

    def __init__(
        self,
        limit: float,
        window: float = 60.0,
        *,
        safety: float = 0.98,
        min_slack: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if limit <= 0:
            raise ValueError("limit must be positive")
        self.interval = max(window / (limit * safety), (window + min_slack) / limit)
        self.clock = clock
        self.sleep = sleep
        self._next = 0.0
        self._cond = threading.Condition()
        self._queue: list[tuple[int, int]] = []  # (-priority, arrival) of the calls waiting
        self._arrivals = itertools.count()
        self.waited = 0.0

    def acquire(self, priority: int = 0) -> None:
        """Wait for a slot; calls of higher ``priority`` waiting at the same time go first."""
        with self._cond:
            start = self.clock()
            if not self._queue and self._next <= start:
                self._next = start + self.interval
                return
            me = (-priority, next(self._arrivals))
            heapq.heappush(self._queue, me)
            try:
                while True:
                    if self._queue[0] != me:
                        self._cond.wait()
                        continue
                    now = self.clock()
                    if self._next <= now:
                        heapq.heappop(self._queue)
                        self._next = now + self.interval
                        self.waited += now - start
                        return
                    delay = self._next - now
                    # First in line: wait for the slot without the lock; a call of higher
                    # priority arriving meanwhile becomes first in line and takes it instead.
                    self._cond.release()
                    try:
                        self.sleep(delay)
                    finally:
                        self._cond.acquire()
            finally:
                if me in self._queue:
                    self._queue.remove(me)
                    heapq.heapify(self._queue)
                self._cond.notify_all()

    def busy(self) -> bool:
        """Whether calls are waiting for a slot, or the next one is in the future."""
        with self._cond:
            return bool(self._queue) or self._next > self.clock()

    def defer(self, seconds: float) -> None:
        """No slot before ``seconds`` from now (the server said so with ``Retry-After``)."""
        with self._cond:
            self._next = max(self._next, self.clock() + seconds)
            self._cond.notify_all()


# Who goes first when calls wait for the request budget: the job-status poll (every job
# waiting on it holds a job slot), then job submissions (their job slot is taken already;
# permanent before soft, so that begun tickets finish first), then the rest.
_PRIORITY = {
    "job_statuses.show_many": 3,
    "job_statuses.get": 3,
    "deleted_tickets.destroy_many.delete": 2,
    "tickets.destroy_many.delete": 1,
}


class _PacedAdapter(HTTPAdapter):
    """Paces and counts every request actually sent, retries included."""

    def __init__(self, client: ZendeskClient, **kwargs):
        self._client = client
        super().__init__(**kwargs)

    def send(self, request, **kwargs):
        family, pacers = self._client._classify(request.method, request.path_url)
        priority = _PRIORITY.get(family, 0)
        for pacer in pacers:
            pacer.acquire(priority)
        self._client._count(family)
        response = super().send(request, **kwargs)
        if response.status_code == 429:
            wait_s = retry_after_seconds(response.headers.get("Retry-After"))
            if wait_s:
                pacers[0].defer(wait_s)  # the most specific limit that applies
        return response


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


class _JobWatcher:
    """Polls the jobs a client waits for, all of them in one ``job_statuses/show_many`` call.

    A poll goes out once some job is due for a check, never sooner than
    ``client.job_poll_spacing()`` after the previous poll, and reports on every job waited for,
    the ones not yet due included. A job is first due at 1.1 times the age at which the
    quickest of the last 64 jobs was seen ended (``job_poll_interval`` until one was), then,
    while it runs, again after ``job_poll_interval``, growing by half each time up to five
    times that. The thread starts on the first wait and ends with :meth:`close` (jobs still
    waited for then count as failed).
    """

    def __init__(self, client: ZendeskClient):
        self.client = client
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
                        at = max(due, self.last_poll + self.client.job_poll_spacing())
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
            body = self.client._get(
                JOB_STATUSES, endpoint="job_statuses.show_many", params={"ids": ",".join(w.job_id for w in waiters)}
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


class ZendeskClient:
    """Zendesk Support API client; thread safe. See the module docstring for the API facts."""

    def __init__(
        self,
        *,
        subdomain: str | None = None,
        base_url: str | None = None,
        email: str | None = None,
        api_token: str | None = None,
        oauth_token: str | None = None,
        requests_per_minute: int = 700,
        incremental_per_minute: int = 10,
        max_connections: int = 4,
        max_retries: int = 10,
        timeout: float = 60.0,
        job_poll_interval: float = 0.1,
        deleted_list_per_minute: int = 10,
        user_deletes_per_10min: int = 700,
        max_jobs_in_flight: int = MAX_JOBS,
        max_job_attempts: int = 5,
        job_timeout: float = 900.0,
        window_seconds: float = 60.0,
    ):
        """``window_seconds`` scales the rate windows (60 s; 600 s for permanent user
        deletes); only tests change it, against a stand-in with the same scaling.

        ``max_jobs_in_flight`` caps this client's queued or running jobs: Zendesk's job limit
        of 30 per account by default (more is refused); set it lower where other integrations
        of the account run jobs too (their jobs and ours would otherwise meet 429s, which are
        waited out and retried). ``job_poll_interval`` (0.1 s): the spacing of job-status polls
        while the request budget has room to spare, a job's first poll before the client has
        seen how long jobs take, and the step by which polls of a job still running back off
        (growing by half up to five times it)."""
        if base_url:
            url = base_url.rstrip("/")
        elif subdomain:
            url = f"https://{subdomain}.zendesk.com"
        else:
            raise ValueError("ZendeskClient needs a subdomain or a base_url")
        auth = None
        headers = {"Accept": "application/json"}
        if oauth_token:
            headers["Authorization"] = f"Bearer {oauth_token}"
        elif api_token:
            if not email:
                raise ValueError("an API token needs the agent's e-mail address")
            auth = (f"{email}/token", api_token)
        self.base_url = url
        self.job_poll_interval = max(0.01, float(job_poll_interval))
        if max_jobs_in_flight > MAX_JOBS:
            log.warning("max_jobs_in_flight %d is above Zendesk's job limit; using %d", max_jobs_in_flight, MAX_JOBS)
        self.max_jobs_in_flight = min(MAX_JOBS, max(1, max_jobs_in_flight))
        self.max_connections = max(1, max_connections)
        self.max_job_attempts = max(1, max_job_attempts)
        self.job_timeout = job_timeout
        self.general = Pacer(requests_per_minute, window_seconds)
        self.incremental = Pacer(incremental_per_minute, window_seconds)
        self.deleted_list = Pacer(deleted_list_per_minute, window_seconds)
        self.user_deletes = Pacer(user_deletes_per_10min, 10 * window_seconds)
        self.session = RetryingSession(
            url, auth=auth, headers=headers, max_connections=self.max_connections, max_retries=max_retries, timeout=timeout
        )
        adapter = _PacedAdapter(
            self, pool_connections=1, pool_maxsize=self.max_connections, pool_block=True, max_retries=0
        )
        self.session.session.mount("http://", adapter)
        self.session.session.mount("https://", adapter)
        self.request_counts: Counter = Counter()
        self._count_lock = threading.Lock()
        self._job_slots = threading.BoundedSemaphore(self.max_jobs_in_flight)
        self._jobs_lock = threading.Lock()
        self.jobs_in_flight = 0
        self.jobs_in_flight_peak = 0
        self._watcher = _JobWatcher(self)
        self.last_ticket_cursor: str | None = None
        self.last_user_cursor: str | None = None

    # --- plumbing --------------------------------------------------------------------
    def _classify(self, method: str, path_url: str) -> tuple[str, list[Pacer]]:
        path = path_url.split("?", 1)[0].removesuffix(".json").rstrip("/")
        _, found, rest = path.partition("/api/v2/")
        parts = rest.split("/") if found else []
        head = parts[0] if parts else "other"
        if head == "incremental":
            return "incremental", [self.incremental, self.general]
        if head == "deleted_tickets" and len(parts) == 1 and method == "GET":
            return "deleted_tickets.list", [self.deleted_list, self.general]
        if head == "deleted_users" and len(parts) == 2 and method == "DELETE":
            return "deleted_users.destroy", [self.user_deletes, self.general]
        if head == "job_statuses":
            return ("job_statuses.show_many" if parts[1:] == ["show_many"] else "job_statuses.get"), [self.general]
        family = ".".join(p for p in parts[:2] if p and not p.isdigit())
        return f"{family}.{method.lower()}", [self.general]

    def _count(self, family: str) -> None:
        with self._count_lock:
            self.request_counts[family] += 1
        self.session.stats.add("requests")

    def stats(self) -> dict:
        """Requests sent (``requests``, ``by_family``), what the retry layer absorbed
        (``throttled``, ``server_errors``, ``retries``) and seconds spent waiting for the pacers."""
        out = self.session.stats.as_dict()
        with self._count_lock:
            out["by_family"] = dict(self.request_counts)
        pacers = (self.general, self.incremental, self.deleted_list, self.user_deletes)
        out["paced_seconds"] = round(sum(p.waited for p in pacers), 3)
        out["jobs_in_flight_peak"] = self.jobs_in_flight_peak
        return out

    def job_poll_spacing(self) -> float:
        """Seconds from one job-status poll to the next.

        ``job_poll_interval`` while the request budget has room to spare (a poll then delays
        nothing). While requests queue for the budget, each poll takes the place of a useful
        request: polls are then spaced to take at most ``POLL_BUDGET_SHARE`` of the budget while
        job slots run short (a slot is given back only once a poll saw its job end, so a late
        poll holds up submissions), and 2.5 times further apart while slots are to spare.
        """
        if not self.general.busy():
            return self.job_poll_interval
        spacing = max(self.job_poll_interval, self.general.interval / POLL_BUDGET_SHARE)
        return spacing if self._slots_short() else 2.5 * spacing

    def _slots_short(self) -> bool:
        return self.jobs_in_flight >= self.max_jobs_in_flight - max(1, self.max_jobs_in_flight // 10)

    def close(self) -> None:
        self._watcher.close()
        self.session.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _get(self, path: str, *, endpoint: str, params=None, accept: tuple[int, ...] = ()):
        return self.session.request("GET", path, endpoint=endpoint, params=params, accept=accept)

    # --- export ----------------------------------------------------------------------
    def iter_ticket_pages(self, start_time: int = 0, *, cursor: str | None = None) -> Iterator[list[dict]]:
        """Every ticket changed since ``start_time`` (or after ``cursor``), a page at a time.

        Each ticket: id, status ("deleted" when soft-deleted), requester_id, created_at,
        updated_at (ISO strings as Zendesk sends them) and solved_at from the metric set (None
        when never solved). ``last_ticket_cursor`` keeps the cursor for the next export.
        """
        params = {"cursor": cursor} if cursor else {"start_time": int(start_time)}
        params["include"] = "metric_sets"
        for body in self._export("/api/v2/incremental/tickets/cursor.json", params, "incremental.tickets"):
            solved = {m.get("ticket_id"): m.get("solved_at") for m in body.get("metric_sets") or []}
            page = []
            for ticket in body.get("tickets") or []:
                row = {name: ticket.get(name) for name in TICKET_FIELDS}
                row["solved_at"] = solved.get(ticket.get("id"))
                page.append(row)
            self.last_ticket_cursor = body.get("after_cursor") or self.last_ticket_cursor
            if page:
                yield page

    def iter_user_pages(self, start_time: int = 0, *, cursor: str | None = None) -> Iterator[list[dict]]:
        """Every user changed since ``start_time``: id, role, active, created_at, updated_at."""
        params = {"cursor": cursor} if cursor else {"start_time": int(start_time)}
        for body in self._export("/api/v2/incremental/users/cursor.json", params, "incremental.users"):
            page = [{name: user.get(name) for name in USER_FIELDS} for user in body.get("users") or []]
            self.last_user_cursor = body.get("after_cursor") or self.last_user_cursor
            if page:
                yield page

    def _export(self, path: str, params: dict, endpoint: str) -> Iterator[dict]:
        include = params.get("include")
        while True:
            body = self._get(path, endpoint=endpoint, params=params).json()
            yield body
            after = body.get("after_cursor")
            if body.get("end_of_stream") or not after:
                return
            params = {"cursor": after}
            if include:
                params["include"] = include

    def iter_deleted_ticket_ids(self) -> Iterator[int]:
        """Ids of soft-deleted tickets awaiting permanent deletion (cursor pagination)."""
        params: dict = {"page[size]": MAX_IDS}
        while True:
            body = self._get("/api/v2/deleted_tickets.json", endpoint="deleted_tickets.list", params=params).json()
            for item in body.get("deleted_tickets") or []:
                yield int(item["id"])
            meta = body.get("meta") or {}
            if not meta.get("has_more") or not meta.get("after_cursor"):
                return
            params = {"page[size]": MAX_IDS, "page[after]": meta["after_cursor"]}

    # --- look-ups for an erasure request ----------------------------------------------
    def find_user_ids_by_email(self, email: str, *, roles: tuple[str, ...] | None = ("end-user",)) -> list[int]:
        """Ids of the users whose e-mail address is ``email`` (case-insensitive), ascending.

        Only users of ``roles`` count (default: end users; ``None``: any role), and only exact
        matches of the user's primary address: the search's other hits are dropped, so a loose
        match never names someone else. The address goes to Zendesk in the query string and
        nowhere else (never logged).
        """
        needle = (email or "").strip().lower()
        if not needle:
            return []
        found: set[int] = set()
        url: str | None = "/api/v2/users/search.json"
        params: dict | None = {"query": f"email:{needle}"}
        while url:
            body = self._get(url, endpoint="users.search", params=params).json()
            for user in body.get("users") or []:
                if str(user.get("email") or "").strip().lower() != needle:
                    continue
                if roles is not None and user.get("role") not in roles:
                    continue
                found.add(int(user["id"]))
            url, params = body.get("next_page"), None  # next_page carries the query itself
        return sorted(found)

    def iter_requested_tickets(self, user_id: int) -> Iterator[dict]:
        """The tickets ``user_id`` requested (id, status, requester_id, created_at, updated_at),
        a cursor page of 100 at a time; nothing when the user is unknown or deleted (404)."""
        path = f"/api/v2/users/{int(user_id)}/tickets/requested.json"
        params: dict = {"page[size]": MAX_IDS}
        while True:
            resp = self._get(path, endpoint="users.tickets_requested", params=params, accept=(404,))
            if resp.status_code == 404:
                return
            body = resp.json()
            for ticket in body.get("tickets") or []:
                yield {name: ticket.get(name) for name in TICKET_FIELDS}
            meta = body.get("meta") or {}
            if not meta.get("has_more") or not meta.get("after_cursor"):
                return
            params = {"page[size]": MAX_IDS, "page[after]": meta["after_cursor"]}

    def requested_ticket_ids(self, user_id: int) -> list[int]:
        """Ids of the tickets ``user_id`` requested (see :meth:`iter_requested_tickets`)."""
        return [int(t["id"]) for t in self.iter_requested_tickets(user_id)]

    # --- ticket erasure --------------------------------------------------------------
    def erase_tickets(
        self,
        ids: Iterable[int],
        *,
        on_result: Callable[[int, str], None] | None = None,
        defer_statuses: Iterable[str] = (),
    ) -> dict[int, str]:
        """Soft-delete, then permanently delete, each ticket; returns ``{id: outcome}``.

        Outcomes: ``"erased"``, ``"already_gone"`` (neither live nor soft-deleted any more),
        ``"not_yet"`` (its status, re-read right before its deletion, is in ``defer_statuses``:
        left alone) or ``"failed"`` (a job reported an error for it, or the API kept failing). A
        ticket that is already soft-deleted goes straight to permanent deletion.

        The ids go in chunks of 100, each through its own steps: statuses re-read with
        ``tickets/show_many`` (when ``defer_statuses`` is given) immediately before its soft
        deletion, the soft-deletion job, then the permanent-deletion job. Chunks run side by
        side, so while one chunk's job runs the next chunks are submitted and polled; at most
        ``max_jobs_in_flight`` jobs are queued or running at any time (each holds a slot from
        its submission until a poll saw it end). ``on_result`` is called once per id as soon
        as its outcome is known (serialised, from worker threads).
        """
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
            # (job polls and submissions go ahead of status re-reads: see _PRIORITY).
            workers = min(2 * self.max_jobs_in_flight, len(chunks))
            with ThreadPoolExecutor(workers, thread_name_prefix="zendesk-erase") as pool:
                futures = {pool.submit(self._erase_chunk, chunk, report, defer): chunk for chunk in chunks}
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

    def _erase_chunk(self, chunk: list[int], report: Callable[[int, str], None], defer: frozenset[str]) -> None:
        if defer:
            statuses = self.ticket_statuses(chunk)
            for tid in chunk:
                if statuses.get(tid) in defer:
                    report(tid, NOT_YET)
            chunk = [tid for tid in chunk if statuses.get(tid) not in defer]
        soft_ok, soft_missing, soft_failed = self._run_jobs(SOFT_DELETE, chunk, "tickets.destroy_many")
        for tid in soft_failed:
            report(tid, FAILED)
        missing_before = set(soft_missing)
        to_purge = missing_before | set(soft_ok)
        targets = [tid for tid in chunk if tid in to_purge]
        perm_ok, perm_missing, perm_failed = self._run_jobs(PERMANENT_DELETE, targets, "deleted_tickets.destroy_many")
        for tid in perm_ok:
            report(tid, ERASED)
        for tid in perm_missing:
            report(tid, ALREADY_GONE if tid in missing_before else ERASED)
        for tid in perm_failed:
            report(tid, FAILED)

    def _take_job_slot(self) -> None:
        self._job_slots.acquire()
        with self._jobs_lock:
            self.jobs_in_flight += 1
            self.jobs_in_flight_peak = max(self.jobs_in_flight_peak, self.jobs_in_flight)
        if self._slots_short():
            self._watcher.wake()  # a poll may be due sooner now

    def _submit_job(self, path: str, batch: list[int], endpoint: str):
        """``DELETE path?ids=batch`` holding a job slot: ``(response, job)``. The slot is kept
        (``job`` not None) while the job is queued or running, and given back otherwise."""
        self._take_job_slot()
        try:
            resp = self.session.request(
                "DELETE", path, endpoint=endpoint, params={"ids": ",".join(map(str, batch))}, accept=(400, 404, 422)
            )
            job = None if resp.status_code in (400, 404, 422) else (resp.json().get("job_status") or {})
        except BaseException:
            self._release_job_slot()
            raise
        if job is None:
            self._release_job_slot()
        return resp, job

    def _release_job_slot(self) -> None:
        with self._jobs_lock:
            self.jobs_in_flight -= 1
        self._job_slots.release()

    def _run_jobs(self, path: str, ids: list[int], endpoint: str) -> tuple[list[int], list[int], list[int]]:
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
                resp, job = self._submit_job(path, batch, endpoint)
                if job is None:
                    if len(batch) == 1:
                        (missing if resp.status_code == 404 else failed).append(batch[0])
                    else:
                        half = len(batch) // 2
                        stack.extend([batch[half:], batch[:half]])
                    break
                try:
                    job = self._wait_job(job)
                finally:
                    self._release_job_slot()
                results = job.get("results")
                wanted = set(batch)
                settled: set[int] = set()
                if isinstance(results, list):
                    for item in results:
                        tid = item.get("id") if isinstance(item, dict) else None
                        if tid not in wanted or tid in settled:
                            continue
                        settled.add(tid)
                        kind = _classify_result(item)
                        (ok if kind == "ok" else missing if kind == "missing" else failed).append(tid)
                elif job.get("status") == "completed" and (not isinstance(results, dict) or results.get("success", True)):
                    # Permanent ticket deletion reports only {"success": true}: all done.
                    ok.extend(batch)
                    settled = wanted
                rest = [tid for tid in batch if tid not in settled]
                if rest and attempts >= self.max_job_attempts:
                    log.warning("%s: %d ids unsettled after %d jobs", endpoint, len(rest), attempts)
                    failed.extend(rest)
                    rest = []
                if rest:
                    log.info("%s: job ended %s, resubmitting %d unprocessed ids", endpoint, job.get("status"), len(rest))
                batch = rest
        return ok, missing, failed

    def _wait_job(self, job: dict) -> dict:
        """The job's final status (completed or failed), polled by the client's job watcher
        together with every other job being waited for; ``{"status": "failed", "results":
        None}`` when it cannot be had (no id, expired or unknown, ``job_timeout`` passed)."""
        return self._watcher.wait(job)

    # --- user erasure ----------------------------------------------------------------
    def erase_user(self, user_id: int) -> str:
        """Soft, then permanent deletion: ``"erased"``, ``"already_gone"`` or ``"not_yet"``.

        ``"not_yet"``: Zendesk refused (422) because the user is still requester of a ticket
        that is not closed; not an error, the user is erasable once those tickets are gone.
        """
        uid = int(user_id)
        resp = self.session.request("DELETE", f"/api/v2/users/{uid}.json", endpoint="users.delete", accept=(404, 422))
        if resp.status_code == 422:
            return NOT_YET
        was_missing = resp.status_code == 404  # already soft-deleted, or gone
        resp = self.session.request(
            "DELETE", f"/api/v2/deleted_users/{uid}.json", endpoint="deleted_users.destroy", accept=(404,)
        )
        if resp.status_code == 404:
            return ALREADY_GONE if was_missing else ERASED
        return ERASED

    def erase_users(
        self, ids: Iterable[int], *, on_result: Callable[[int, str], None] | None = None
    ) -> dict[int, str]:
        """:meth:`erase_user` for each id, ``max_connections`` at a time; an id the API keeps
        failing on is ``"failed"``."""
        order = list(dict.fromkeys(int(i) for i in ids))
        outcomes: dict[int, str] = {}
        lock = threading.Lock()

        def one(uid: int) -> None:
            try:
                outcome = self.erase_user(uid)
            except HTTPError as exc:
                log.warning("user erasure failed for good (%s)", exc)
                outcome = FAILED
            with lock:
                outcomes[uid] = outcome
                if on_result is not None:
                    on_result(uid, outcome)

        if order:
            with ThreadPoolExecutor(min(self.max_connections, len(order)), thread_name_prefix="zendesk-users") as pool:
                for fut in [pool.submit(one, uid) for uid in order]:
                    fut.result()
        log.info("user erasure: %s", dict(Counter(outcomes.values())))
        return {uid: outcomes[uid] for uid in order}

    # --- verification ----------------------------------------------------------------
    def ticket_statuses(self, ids: Iterable[int]) -> dict[int, str]:
        """Current status of each live ticket (``tickets/show_many``, 100 ids a call)."""
        ordered = sorted({int(i) for i in ids})
        out: dict[int, str] = {}
        for i in range(0, len(ordered), MAX_IDS):
            chunk = ordered[i : i + MAX_IDS]
            body = self._get(
                "/api/v2/tickets/show_many.json", endpoint="tickets.show_many", params={"ids": ",".join(map(str, chunk))}
            ).json()
            out.update({int(t["id"]): str(t.get("status")) for t in body.get("tickets") or []})
        return out

    def remaining_tickets(self, ids: Iterable[int]) -> set[int]:
        """The ids that are still live or soft-deleted."""
        wanted = {int(i) for i in ids}
        if not wanted:
            return set()
        found = set()
        ordered = sorted(wanted)
        for i in range(0, len(ordered), MAX_IDS):
            chunk = ordered[i : i + MAX_IDS]
            body = self._get(
                "/api/v2/tickets/show_many.json", endpoint="tickets.show_many", params={"ids": ",".join(map(str, chunk))}
            ).json()
            found.update(int(t["id"]) for t in body.get("tickets") or [] if t.get("status") != "deleted")
        found.update(tid for tid in self.iter_deleted_ticket_ids() if tid in wanted)
        return found

    def remaining_users(self, ids: Iterable[int]) -> set[int]:
        """The user ids that are still live or soft-deleted."""
        wanted = sorted({int(i) for i in ids})
        found: set[int] = set()
        for i in range(0, len(wanted), MAX_IDS):
            chunk = wanted[i : i + MAX_IDS]
            body = self._get(
                "/api/v2/users/show_many.json", endpoint="users.show_many", params={"ids": ",".join(map(str, chunk))}
            ).json()
            found.update(int(u["id"]) for u in body.get("users") or [])
        for uid in wanted:
            if uid in found:
                continue
            resp = self._get(f"/api/v2/deleted_users/{uid}.json", endpoint="deleted_users.show", accept=(404,))
            if resp.status_code == 200:
                found.add(uid)
        return found


def _classify_result(item: dict) -> str:
    """One entry of a job's ``results``: "ok", "missing" (record not found) or "failed"."""
    if item.get("success") is True or (item.get("success") is None and not item.get("error") and not item.get("errors")):
        return "ok"
    text = " ".join(str(item.get(k) or "") for k in ("error", "errors", "details", "status")).lower()
    compact = text.replace("_", "").replace(" ", "")
    if "notfound" in compact:
        return "missing"
    return "failed"
