"""Zendesk's rate limits, kept on the client side: one pacer per limit and the route of each call.

* the account's limit of N requests a minute by plan (every call counts against it);
* the incremental exports: 10 requests a minute;
* the list of soft-deleted tickets: 10 requests a minute;
* permanent user deletions: 700 per 10 minutes.

``window_seconds`` scales the windows (60 s; 600 s for the user deletions); only tests change
it, against a stand-in with the same scaling. The pacing itself is generic
(:mod:`retention.systems.ratelimit`).
"""

from __future__ import annotations

from retention.systems.ratelimit import Pacer, Route

# Who goes first when calls wait for the request budget: the job-status poll (every job
# waiting on it holds a job slot), then job submissions (their job slot is taken already;
# permanent before soft, so that begun tickets finish first), then the rest.
PRIORITY = {
    "job_statuses.show_many": 3,
    "job_statuses.get": 3,
    "deleted_tickets.destroy_many.delete": 2,
    "tickets.destroy_many.delete": 1,
}


class ZendeskLimits:
    """The pacers of one client and the :class:`Route` of each of its calls."""

    def __init__(
        self,
        *,
        requests_per_minute: int = 700,
        incremental_per_minute: int = 10,
        deleted_list_per_minute: int = 10,
        user_deletes_per_10min: int = 700,
        window_seconds: float = 60.0,
    ):
        self.general = Pacer(requests_per_minute, window_seconds)
        self.incremental = Pacer(incremental_per_minute, window_seconds)
        self.deleted_list = Pacer(deleted_list_per_minute, window_seconds)
        self.user_deletes = Pacer(user_deletes_per_10min, 10 * window_seconds)

    @property
    def pacers(self) -> tuple[Pacer, ...]:
        return (self.general, self.incremental, self.deleted_list, self.user_deletes)

    def paced_seconds(self) -> float:
        """Seconds calls spent waiting for the pacers, all limits together."""
        return sum(p.waited for p in self.pacers)

    def route(self, method: str, path_url: str) -> Route:
        """The family (endpoint name, no ids), pacers (most specific first) and priority of a call."""
        family, pacers = self._classify(method, path_url)
        return Route(family, pacers, PRIORITY.get(family, 0))

    def _classify(self, method: str, path_url: str) -> tuple[str, tuple[Pacer, ...]]:
        path = path_url.split("?", 1)[0].removesuffix(".json").rstrip("/")
        _, found, rest = path.partition("/api/v2/")
        parts = rest.split("/") if found else []
        head = parts[0] if parts else "other"
        if head == "incremental":
            return "incremental", (self.incremental, self.general)
        if head == "deleted_tickets" and len(parts) == 1 and method == "GET":
            return "deleted_tickets.list", (self.deleted_list, self.general)
        if head == "deleted_users" and len(parts) == 2 and method == "DELETE":
            return "deleted_users.destroy", (self.user_deletes, self.general)
        if head == "job_statuses":
            return ("job_statuses.show_many" if parts[1:] == ["show_many"] else "job_statuses.get"), (self.general,)
        family = ".".join(p for p in parts[:2] if p and not p.isdigit())
        return f"{family}.{method.lower()}", (self.general,)
