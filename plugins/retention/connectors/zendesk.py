"""Zendesk Support API client: incremental export and two-step (soft, then permanent) erasure.

What it relies on, from the Zendesk Support API reference:

* Incremental cursor export ``GET /api/v2/incremental/{tickets,users}/cursor.json`` with
  ``start_time`` first and ``cursor=after_cursor`` until ``end_of_stream``; 10 requests a minute.
  ``include=metric_sets`` sideloads the ticket metrics, which carry ``solved_at``. Soft-deleted
  tickets are exported with status ``"deleted"``.
* ``DELETE /api/v2/tickets/destroy_many?ids=`` (<= 100 ids) soft-deletes as a background job;
  ``DELETE /api/v2/deleted_tickets/destroy_many?ids=`` (<= 100) deletes soft-deleted tickets for
  good, also as a job; ``GET /api/v2/job_statuses/{id}`` reports queued/working/completed/failed.
  At most 30 jobs may be queued or running per account.
* ``DELETE /api/v2/users/{id}`` soft-deletes a user and is refused (422) while the user is the
  requester of a ticket that is not closed; ``DELETE /api/v2/deleted_users/{id}`` then deletes
  for good, at most 700 users per 10 minutes.
* Account-wide limit of N requests per minute by plan; 429 with ``Retry-After`` beyond it.
* Erasure requests: ``GET /api/v2/users/search?query=email:{address}`` finds a user by e-mail
  (offset pagination, ``next_page``); ``GET /api/v2/users/{id}/tickets/requested`` lists the
  tickets a user requested (cursor pagination ``page[size]``/``page[after]``). Zendesk leaves
  archived tickets (closed for 120 days) out of that list; they stay reachable by id.

Rate limits are kept on the client side by :class:`Pacer` (one per limit), wired into the HTTP
adapter so that retries are paced too and a 429 pushes the pacer back by ``Retry-After``.
Nothing personal is logged or kept: exported records are cut down to ids, roles, statuses and
times; log lines name endpoint families and counts only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Self

from requests.adapters import HTTPAdapter

from retention.http import HTTPError, RetryingSession, retry_after_seconds

log = logging.getLogger(__name__)

MAX_IDS = 100
SOFT_DELETE = "/api/v2/tickets/destroy_many.json"
PERMANENT_DELETE = "/api/v2/deleted_tickets/destroy_many.json"
TICKET_FIELDS = ("id", "status", "requester_id", "created_at", "updated_at")
USER_FIELDS = ("id", "role", "active", "created_at", "updated_at")

ERASED, ALREADY_GONE, FAILED, NOT_YET = "erased", "already_gone", "failed", "not_yet"


class Pacer:
    """Spaces calls so that no rolling ``window`` of seconds sees more than ``limit`` of them.

    A reservation scheduler (GCRA with a burst of one): each call takes the next free slot, one
    interval after the previous one, and sleeps until it. The interval leaves a margin of
    ``1 - safety`` of the window, and at least ``min_slack`` seconds per window, for the jitter
    between taking a slot and the request reaching the server. Thread safe.
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
        self._lock = threading.Lock()
        self.waited = 0.0

    def reserve(self) -> float:
        """Take the next slot; returns how long to wait for it."""
        with self._lock:
            now = self.clock()
            slot = max(now, self._next)
            self._next = slot + self.interval
            delay = slot - now
            self.waited += delay
            return delay

    def acquire(self) -> None:
        delay = self.reserve()
        if delay > 0:
            self.sleep(delay)

    def defer(self, seconds: float) -> None:
        """No slot before ``seconds`` from now (the server said so with ``Retry-After``)."""
        with self._lock:
            self._next = max(self._next, self.clock() + seconds)


class _PacedAdapter(HTTPAdapter):
    """Paces and counts every request actually sent, retries included."""

    def __init__(self, client: ZendeskClient, **kwargs):
        self._client = client
        super().__init__(**kwargs)

    def send(self, request, **kwargs):
        family, pacers = self._client._classify(request.method, request.path_url)
        for pacer in pacers:
            pacer.acquire()
        self._client._count(family)
        response = super().send(request, **kwargs)
        if response.status_code == 429:
            wait_s = retry_after_seconds(response.headers.get("Retry-After"))
            if wait_s:
                pacers[0].defer(wait_s)  # the most specific limit that applies
        return response


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
        job_poll_interval: float = 1.0,
        deleted_list_per_minute: int = 10,
        user_deletes_per_10min: int = 700,
        max_jobs_in_flight: int = 8,
        max_job_attempts: int = 5,
        job_timeout: float = 900.0,
        window_seconds: float = 60.0,
    ):
        """``window_seconds`` scales the rate windows (60 s; 600 s for permanent user
        deletes); only tests change it, against a stand-in with the same scaling."""
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
        self.job_poll_interval = job_poll_interval
        self.max_jobs_in_flight = max(1, max_jobs_in_flight)
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
            return "job_statuses.get", [self.general]
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
        return out

    def close(self) -> None:
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
        self, ids: Iterable[int], *, on_result: Callable[[int, str], None] | None = None
    ) -> dict[int, str]:
        """Soft-delete, then permanently delete, each ticket; returns ``{id: outcome}``.

        Outcomes: ``"erased"``, ``"already_gone"`` (neither live nor soft-deleted any more) or
        ``"failed"`` (a job reported an error for it, or the API kept failing). A ticket that is
        already soft-deleted goes straight to permanent deletion. Up to ``max_jobs_in_flight``
        chunks of 100 run at once, so the next job is submitted while others run. ``on_result``
        is called once per id as soon as its outcome is known (serialised, from worker threads).
        """
        order = list(dict.fromkeys(int(i) for i in ids))
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
            workers = min(self.max_jobs_in_flight, len(chunks))
            with ThreadPoolExecutor(workers, thread_name_prefix="zendesk-erase") as pool:
                futures = {pool.submit(self._erase_chunk, chunk, report): chunk for chunk in chunks}
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

    def _erase_chunk(self, chunk: list[int], report: Callable[[int, str], None]) -> None:
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
                resp = self.session.request(
                    "DELETE", path, endpoint=endpoint, params={"ids": ",".join(map(str, batch))}, accept=(400, 404, 422)
                )
                if resp.status_code in (400, 404, 422):
                    if len(batch) == 1:
                        (missing if resp.status_code == 404 else failed).append(batch[0])
                    else:
                        half = len(batch) // 2
                        stack.extend([batch[half:], batch[:half]])
                    break
                job = self._wait_job(resp.json().get("job_status") or {})
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
        """Poll a job status until it completes or fails; sparing: the interval grows to 5x."""
        delay = self.job_poll_interval
        deadline = time.monotonic() + self.job_timeout
        job_id = job.get("id")
        while job.get("status") not in ("completed", "failed"):
            if job_id is None or time.monotonic() > deadline:
                log.warning("job status: gave up waiting")
                return {"status": "failed", "results": None}
            time.sleep(delay)
            resp = self._get(f"/api/v2/job_statuses/{job_id}.json", endpoint="job_statuses", accept=(404,))
            if resp.status_code == 404:  # expired or unknown: treat as failed without results
                return {"status": "failed", "results": None}
            job = resp.json().get("job_status") or {}
            delay = min(delay * 1.5, self.job_poll_interval * 5)
        return job

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
