"""Zendesk Support API client: incremental export, look-ups, and two-step (soft, then permanent) erasure.

What it relies on, from the Zendesk Support API reference:

* Incremental cursor export ``GET /api/v2/incremental/{tickets,users}/cursor.json`` with
  ``start_time`` first and ``cursor=after_cursor`` until ``end_of_stream``; 10 requests a minute.
  ``include=metric_sets`` sideloads the ticket metrics, which carry ``solved_at``. Soft-deleted
  tickets are exported with status ``"deleted"``.
* Tickets are erased by background jobs, soft then permanent deletion, at most 30 jobs queued or
  running per account: :mod:`retention.systems.ticketing.jobs`.
* ``DELETE /api/v2/users/{id}`` soft-deletes a user and is refused (422) while the user is the
  requester of a ticket that is not closed; ``DELETE /api/v2/deleted_users/{id}`` then deletes
  for good, at most 700 users per 10 minutes.
* Tickets name, besides their requester, the users CC'd on or following them
  (``collaborator_ids``, ``email_cc_ids``, ``follower_ids``): kept as ids only (``cc_ids``).
  ``GET /api/v2/users/{id}/related`` counts a user's ``requested_tickets`` and ``ccd_tickets``,
  read for each end user right before their deletion.
* Account-wide limit of N requests per minute by plan; 429 with ``Retry-After`` beyond it (a
  ``Retry-After`` longer than ``max_retry_after`` fails the request instead of being waited out).
* Verification: ``GET /api/v2/users/show_many?ids=`` (<= 100) finds live users; of the rest,
  ``GET /api/v2/deleted_users/{id}`` answers 200 while a user is soft-deleted, 404 once deleted
  for good; ``GET /api/v2/deleted_users`` (cursor pagination, <= 100 a page) lists every deleted
  user, those deleted for good with null personal properties and the name "Permanently Deleted
  User"; ``GET /api/v2/deleted_users/count`` is the approximate size of that listing.
* Erasure requests: ``GET /api/v2/users/search?query=email:{address}`` finds a user by e-mail
  (offset pagination, ``next_page``); ``GET /api/v2/users/{id}/tickets/requested`` lists the
  tickets a user requested (cursor pagination ``page[size]``/``page[after]``). Zendesk leaves
  archived tickets (closed for 120 days) out of that list; they stay reachable by id.

Rate limits are kept on the client side by one :class:`~retention.systems.ratelimit.Pacer` per
limit (:mod:`retention.systems.ticketing.limits`), wired into the HTTP transport so that retries
are paced too and a ``Retry-After`` (429, 503) pushes the pacer back. Nothing personal is logged or
kept: exported records are cut down to ids, roles, statuses and times; log lines name endpoint
families and counts only.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Self

from retention.systems.http import HTTPError, RetryingSession
from retention.systems.ratelimit import PacedAdapter, Pacer
from retention.systems.ticketing.jobs import (
    ALREADY_GONE,
    ERASED,
    FAILED,
    JOB_STATUSES,
    MAX_IDS,
    MAX_JOBS,
    NOT_YET,
    PERMANENT_DELETE,
    POLL_BUDGET_SHARE,
    SOFT_DELETE,
    TicketJobs,
)
from retention.systems.ticketing.limits import ZendeskLimits

log = logging.getLogger(__name__)

TICKET_FIELDS = ("id", "status", "requester_id", "created_at", "updated_at")
# How Zendesk's deleted-users listing names a user deleted for good (their personal data null).
PERMANENTLY_DELETED = "Permanently Deleted User"
# The users a ticket names besides its requester (ids only; CCs and followers): ``cc_ids``.
TICKET_PEOPLE = ("collaborator_ids", "email_cc_ids", "follower_ids")


def ticket_row(ticket: dict) -> dict:
    """A ticket object cut down to the export's shape: ``TICKET_FIELDS`` and ``cc_ids``, the ids
    of the users CC'd on or following it (space-separated, ascending, the requester left out)."""
    row = {name: ticket.get(name) for name in TICKET_FIELDS}
    people: set[int] = set()
    for name in TICKET_PEOPLE:
        for uid in ticket.get(name) or ():
            if isinstance(uid, int) and not isinstance(uid, bool):
                people.add(uid)
            elif isinstance(uid, str) and uid.isdigit():
                people.add(int(uid))
    people.discard(ticket.get("requester_id"))
    row["cc_ids"] = " ".join(map(str, sorted(people)))
    return row
USER_FIELDS = ("id", "role", "active", "created_at", "updated_at")


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
        max_retry_after: float | None = None,
    ):
        """``window_seconds`` scales the rate windows (60 s; 600 s for permanent user
        deletes); only tests change it, against a stand-in with the same scaling.

        ``max_jobs_in_flight`` caps this client's queued or running jobs: Zendesk's job limit
        of 30 per account by default (more is refused); set it lower where other integrations
        of the account run jobs too (their jobs and ours would otherwise meet 429s, which are
        waited out and retried). ``job_poll_interval`` (0.1 s): the spacing of job-status polls
        while the request budget has room to spare, a job's first poll before the client has
        seen how long jobs take, and the step by which polls of a job still running back off
        (growing by half up to five times it). ``max_retry_after``: the longest ``Retry-After``
        waited out (default ``RETENTION_MAX_RETRY_AFTER``, else 300 s); a longer one fails the
        request, and the session's requests until then, as retryable errors."""
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
        self.limits = ZendeskLimits(
            requests_per_minute=requests_per_minute,
            incremental_per_minute=incremental_per_minute,
            deleted_list_per_minute=deleted_list_per_minute,
            user_deletes_per_10min=user_deletes_per_10min,
            window_seconds=window_seconds,
        )
        self.general = self.limits.general
        self.incremental = self.limits.incremental
        self.deleted_list = self.limits.deleted_list
        self.user_deletes = self.limits.user_deletes
        self.request_counts: Counter = Counter()
        self._count_lock = threading.Lock()
        paced = PacedAdapter(self.limits.route, max_connections=self.max_connections, on_send=self._count)
        self.session = RetryingSession(
            url,
            auth=auth,
            headers=headers,
            max_connections=self.max_connections,
            max_retries=max_retries,
            timeout=timeout,
            adapter=paced,
            max_retry_after=max_retry_after,
        )
        paced.max_retry_after = self.session.max_retry_after
        self._jobs = TicketJobs(self)
        self.last_ticket_cursor: str | None = None
        self.last_user_cursor: str | None = None

    # --- plumbing --------------------------------------------------------------------
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
        out["paced_seconds"] = round(self.limits.paced_seconds(), 3)
        out["jobs_in_flight_peak"] = self.jobs_in_flight_peak
        return out

    @property
    def jobs_in_flight(self) -> int:
        """Jobs of this client queued or running now (each holds a job slot)."""
        return self._jobs.in_flight

    @property
    def jobs_in_flight_peak(self) -> int:
        return self._jobs.in_flight_peak

    def job_poll_spacing(self) -> float:
        """Seconds from one job-status poll to the next (see :meth:`TicketJobs.poll_spacing
        <retention.systems.ticketing.jobs.TicketJobs.poll_spacing>`)."""
        return self._jobs.poll_spacing()

    def close(self) -> None:
        self._jobs.close()
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
        updated_at (ISO strings as Zendesk sends them), cc_ids (see :func:`ticket_row`) and solved_at from the metric set (None
        when never solved). ``last_ticket_cursor`` keeps the cursor for the next export.
        """
        params = {"cursor": cursor} if cursor else {"start_time": int(start_time)}
        params["include"] = "metric_sets"
        for body in self._export("/api/v2/incremental/tickets/cursor.json", params, "incremental.tickets"):
            solved = {m.get("ticket_id"): m.get("solved_at") for m in body.get("metric_sets") or []}
            page = []
            for ticket in body.get("tickets") or []:
                row = ticket_row(ticket)
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
                yield ticket_row(ticket)
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
        keep: Callable[[list[dict]], set[int]] | None = None,
    ) -> dict[int, str]:
        """Soft-delete, then permanently delete, each ticket; returns ``{id: outcome}``.

        Outcomes: ``"erased"``, ``"already_gone"`` (neither live nor soft-deleted any more),
        ``"not_yet"`` (re-read right before its deletion, its status is in ``defer_statuses``, or
        ``keep`` keeps it: left alone) or ``"failed"`` (a job reported an error for it, or the API
        kept failing). A ticket that is already soft-deleted goes straight to permanent deletion.

        The ids go in chunks of 100, each through its own steps: the tickets re-read with
        ``tickets/show_many`` (when ``defer_statuses`` or ``keep`` is given; ``keep(tickets)`` gets
        them in the export's shape and returns the ids to leave alone) immediately before its
        soft deletion, the soft-deletion job, then the permanent-deletion job. Chunks run side by
        side, so while one chunk's job runs the next chunks are submitted and polled; at most
        ``max_jobs_in_flight`` jobs are queued or running at any time (each holds a slot from
        its submission until a poll saw it end). ``on_result`` is called once per id as soon
        as its outcome is known (serialised, from worker threads).
        """
        return self._jobs.erase_tickets(ids, on_result, defer_statuses, keep)

    def _wait_job(self, job: dict) -> dict:
        """The job's final status (completed or failed), polled by the client's job watcher
        together with every other job being waited for; ``{"status": "failed", "results":
        None}`` when it cannot be had (no id, expired or unknown, ``job_timeout`` passed)."""
        return self._jobs.wait(job)

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
        self, ids: Iterable[int], *, on_result: Callable[[int, str], None] | None = None,
        keep: Callable[[list[dict]], set[int]] | None = None,
    ) -> dict[int, str]:
        """:meth:`erase_user` for each id, ``max_connections`` at a time; an id the API keeps
        failing on is ``"failed"``. With ``keep``, each 100 users are re-read (``users/show_many``,
        and each end user's live tickets with ``users/{id}/related``) right before their deletion
        and those ``keep(users)`` returns are left alone (``"not_yet"``)."""
        order = list(dict.fromkeys(int(i) for i in ids))
        outcomes: dict[int, str] = {}
        lock = threading.Lock()

        def done(uid: int, outcome: str) -> None:
            with lock:
                outcomes[uid] = outcome
                if on_result is not None:
                    on_result(uid, outcome)

        def one(uid: int) -> None:
            try:
                outcome = self.erase_user(uid)
            except HTTPError as exc:
                log.warning("user erasure failed for good (%s)", exc)
                outcome = FAILED
            done(uid, outcome)

        step = MAX_IDS if keep else max(len(order), 1)
        for start in range(0, len(order), step):
            chunk = order[start : start + step]
            if keep:
                left = keep(self.current_users(chunk, with_tickets=True))
                for uid in chunk:
                    if uid in left:
                        done(uid, NOT_YET)
                chunk = [uid for uid in chunk if uid not in left]
            if chunk:
                with ThreadPoolExecutor(min(self.max_connections, len(chunk)), thread_name_prefix="zendesk-users") as pool:
                    for fut in [pool.submit(one, uid) for uid in chunk]:
                        fut.result()
        log.info("user erasure: %s", dict(Counter(outcomes.values())))
        return {uid: outcomes[uid] for uid in order}

    # --- current state, right before erasure -----------------------------------------
    def current_tickets(self, ids: Iterable[int]) -> list[dict]:
        """The live tickets among ``ids`` as they are now, in the export's shape (id, status,
        requester_id, created_at, updated_at, solved_at): ``tickets/show_many`` with the metric
        sets sideloaded, 100 ids a call."""
        ordered = sorted({int(i) for i in ids})
        out: list[dict] = []
        for i in range(0, len(ordered), MAX_IDS):
            chunk = ordered[i : i + MAX_IDS]
            body = self._get(
                "/api/v2/tickets/show_many.json", endpoint="tickets.show_many",
                params={"ids": ",".join(map(str, chunk)), "include": "metric_sets"},
            ).json()
            solved = {m.get("ticket_id"): m.get("solved_at") for m in body.get("metric_sets") or []}
            for ticket in body.get("tickets") or []:
                out.append({**ticket_row(ticket), "solved_at": solved.get(ticket.get("id"))})
        return out

    def current_users(self, ids: Iterable[int], *, with_tickets: bool = False) -> list[dict]:
        """The live users among ``ids`` as they are now (id, role, created_at, updated_at):
        ``users/show_many``, 100 ids a call. ``with_tickets``: each end user's
        ``tickets_remaining`` too, the live tickets they requested or are CC'd on
        (``users/{id}/related``, one call per end user, counts only)."""
        ordered = sorted({int(i) for i in ids})
        out: list[dict] = []
        for i in range(0, len(ordered), MAX_IDS):
            chunk = ordered[i : i + MAX_IDS]
            body = self._get(
                "/api/v2/users/show_many.json", endpoint="users.show_many", params={"ids": ",".join(map(str, chunk))}
            ).json()
            out.extend({name: u.get(name) for name in ("id", "role", "created_at", "updated_at")} for u in body.get("users") or [])
        if with_tickets:
            for user in out:
                user["tickets_remaining"] = 0  # staff are protected whatever they are named on
            end_users = [u for u in out if u.get("role") == "end-user"]
            if end_users:
                with ThreadPoolExecutor(min(self.max_connections, len(end_users)), thread_name_prefix="zendesk-related") as pool:
                    for user, count in zip(end_users, pool.map(self._tickets_naming, [u["id"] for u in end_users]), strict=True):
                        user["tickets_remaining"] = count
        return out

    def _tickets_naming(self, user_id: int) -> int:
        """How many live tickets the user requested or is CC'd on (``users/{id}/related``); a
        user gone meanwhile has none."""
        resp = self._get(f"/api/v2/users/{int(user_id)}/related.json", endpoint="users.related", accept=(404,))
        if resp.status_code == 404:
            return 0
        related = resp.json().get("user_related") or {}
        return int(related.get("requested_tickets") or 0) + int(related.get("ccd_tickets") or 0)

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
        """The user ids that are still live or soft-deleted, in about ``len(ids) / 100`` requests:
        ``users/show_many`` for the live ones, 100 ids a call; the rest through
        :meth:`soft_deleted_users`."""
        wanted = sorted({int(i) for i in ids})
        found: set[int] = set()
        for i in range(0, len(wanted), MAX_IDS):
            chunk = wanted[i : i + MAX_IDS]
            body = self._get(
                "/api/v2/users/show_many.json", endpoint="users.show_many", params={"ids": ",".join(map(str, chunk))}
            ).json()
            found.update(int(u["id"]) for u in body.get("users") or [])
        return found | self.soft_deleted_users([uid for uid in wanted if uid not in found])

    def soft_deleted_users(self, ids: Iterable[int]) -> set[int]:
        """Which of ``ids`` (users not live) are soft-deleted, not deleted for good.

        Zendesk has no ``show_many`` for deleted users: either one ``deleted_users/{id}`` each
        (200 while soft-deleted, 404 once deleted for good), or the listing ``deleted_users``,
        100 a page, which holds every deleted user of the account, those deleted for good
        included, named "Permanently Deleted User". Whichever takes fewer requests, judged by
        ``deleted_users/count``. From the listing, a wanted user not yet named so (Zendesk
        renames them a while after the deletion) is asked for by id: what says "gone" is
        always the per-user answer or that name, never the listing's silence about a user it
        does not hold (not deleted at all: live, or never there)."""
        wanted = sorted({int(i) for i in ids})
        if not wanted:
            return set()
        count = self._get("/api/v2/deleted_users/count.json", endpoint="deleted_users.count").json()
        pages = -(-int((count.get("count") or {}).get("value") or 0) // MAX_IDS)
        if pages >= len(wanted):
            candidates = wanted
        else:
            want = set(wanted)
            candidates = sorted(
                int(u["id"]) for u in self._iter_deleted_users() if int(u["id"]) in want and u.get("name") != PERMANENTLY_DELETED
            )
        found = set()
        for uid in candidates:
            resp = self._get(f"/api/v2/deleted_users/{uid}.json", endpoint="deleted_users.show", accept=(404,))
            if resp.status_code == 200:
                found.add(uid)
        return found

    def _iter_deleted_users(self) -> Iterator[dict]:
        """Every deleted user of the account, soft and for good (cursor pagination, 100 a page)."""
        params: dict = {"page[size]": MAX_IDS}
        while True:
            body = self._get("/api/v2/deleted_users.json", endpoint="deleted_users.list", params=params).json()
            yield from body.get("deleted_users") or []
            meta = body.get("meta") or {}
            if not meta.get("has_more") or not meta.get("after_cursor"):
                return
            params = {"page[size]": MAX_IDS, "page[after]": meta["after_cursor"]}


# Names that lived here before the client was split (jobs, limits and pacing moved out).
__all__ = [
    "ALREADY_GONE",
    "ERASED",
    "FAILED",
    "JOB_STATUSES",
    "MAX_IDS",
    "MAX_JOBS",
    "NOT_YET",
    "PERMANENT_DELETE",
    "POLL_BUDGET_SHARE",
    "SOFT_DELETE",
    "TICKET_FIELDS",
    "USER_FIELDS",
    "HTTPError",
    "Pacer",
    "ZendeskClient",
]
