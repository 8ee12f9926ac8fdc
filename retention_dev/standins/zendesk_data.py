"""Synthetic Zendesk Support data (tickets and users) for the stand-in server and tests.

Everything is derived from a seed with numpy: 500,000 tickets take well under a few seconds and
the same ``(n_tickets, seed, now, due_share)`` always gives the same data. Nobody real is in
here: the data holds ids, roles, statuses and times only; the stand-in derives placeholder
names and ``@example.org`` addresses from the ids when it serves a user.

:func:`generate` returns ``(TicketColumns, UserColumns)``: numpy arrays, one row per record,
times as Unix seconds (UTC) with ``NO_TIME`` for "never". ``.to_frame()`` gives a pandas view.

The mix, as the support-ticket rule sees it (solved/closed more than one year before ``now``):

* about ``due_share`` of the tickets are solved/closed with ``solved_at`` more than a year
  (plus a day) before ``now``; the rest were created within the last year, in every status
  (new/open/pending/hold/solved/closed), the solved/closed ones with a recent ``solved_at``;
* end users: about one per three tickets are requesters, every requester has at least one
  ticket and some have several; about 5 % more end users have no ticket at all; a few agents
  and one admin (the account owner) who request nothing.

Edge cases, always present (see ``TicketColumns.edge_cases``):

* ``solved_one_year_ago``: a closed ticket solved exactly one calendar year before ``now``
  (same wall-clock time in ``now``'s time zone);
* ``leap_day_solve``: a closed ticket solved on 2024-02-29 (when ``now`` is after it);
* ``user_due_and_open``: an end user with one due ticket and one open ticket (the user must
  survive: Zendesk refuses to delete a requester of a ticket that is not closed);
* ``user_all_due``: an end user all of whose (two) tickets are due;
* ``users_without_tickets``: end users who requested nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

TICKET_STATUSES = ("new", "open", "pending", "hold", "solved", "closed", "deleted")
STATUS_CODE = {name: code for code, name in enumerate(TICKET_STATUSES)}
OPEN_CODES = tuple(STATUS_CODE[s] for s in ("new", "open", "pending", "hold"))
ROLES = ("end-user", "agent", "admin")
ROLE_CODE = {name: code for code, name in enumerate(ROLES)}
NO_TIME = -1
USER_ID_BASE = 1_000_000_000  # user ids and ticket ids live in different ranges, as in Zendesk
MIN_TICKETS = 10

_DAY = 86_400
_YEAR = 365 * _DAY
# Status mix of tickets created within the last year (shares).
_RECENT_MIX = (("new", 0.05), ("open", 0.15), ("pending", 0.10), ("hold", 0.05), ("solved", 0.20), ("closed", 0.45))


@dataclass
class TicketColumns:
    ids: np.ndarray  # int64
    status: np.ndarray  # int8 code into TICKET_STATUSES
    requester_id: np.ndarray  # int64 (a user id)
    created_at: np.ndarray  # int64 Unix seconds
    updated_at: np.ndarray  # int64
    solved_at: np.ndarray  # int64, NO_TIME when never solved
    edge_cases: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def status_names(self) -> np.ndarray:
        return np.array(TICKET_STATUSES, dtype=object)[self.status]

    def to_frame(self):
        """A pandas frame with tz-aware UTC times (NaT for "never")."""
        import pandas as pd

        return pd.DataFrame(
            {
                "id": self.ids,
                "status": self.status_names(),
                "requester_id": self.requester_id,
                "created_at": _to_datetime(self.created_at),
                "updated_at": _to_datetime(self.updated_at),
                "solved_at": _to_datetime(self.solved_at),
            }
        )


@dataclass
class UserColumns:
    ids: np.ndarray  # int64
    role: np.ndarray  # int8 code into ROLES
    created_at: np.ndarray  # int64
    updated_at: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.ids)

    def role_names(self) -> np.ndarray:
        return np.array(ROLES, dtype=object)[self.role]

    def to_frame(self):
        import pandas as pd

        return pd.DataFrame(
            {
                "id": self.ids,
                "role": self.role_names(),
                "active": np.ones(len(self.ids), dtype=bool),
                "created_at": _to_datetime(self.created_at),
                "updated_at": _to_datetime(self.updated_at),
            }
        )


def _to_datetime(ts: np.ndarray):
    import pandas as pd

    out = pd.to_datetime(np.where(ts == NO_TIME, 0, ts), unit="s", utc=True)
    return out.where(ts != NO_TIME)


def _epoch(dt: datetime) -> int:
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp())


def one_year_before(now: datetime) -> datetime:
    """Same wall-clock time one calendar year earlier (29 February -> 28 February)."""
    try:
        return now.replace(year=now.year - 1)
    except ValueError:
        return now.replace(year=now.year - 1, day=28)


def generate(n_tickets: int, *, seed: int, now: datetime, due_share: float = 0.2) -> tuple[TicketColumns, UserColumns]:
    """Deterministic synthetic tickets and users; see the module docstring for the mix."""
    if n_tickets < MIN_TICKETS:
        raise ValueError(f"need at least {MIN_TICKETS} tickets for the edge cases")
    if not 0.0 <= due_share <= 1.0:
        raise ValueError("due_share must be within [0, 1]")
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    rng = np.random.default_rng(seed)
    now_s = _epoch(now)
    year_ago_s = _epoch(one_year_before(now))
    n = n_tickets

    # --- users -------------------------------------------------------------------------
    n_requesters = max(4, n // 3)
    n_idle = max(2, n_requesters // 20)  # end users without tickets
    n_agents = 3 + n // 50_000
    n_end = n_requesters + n_idle
    n_users = n_end + n_agents + 1
    user_ids = USER_ID_BASE + 1 + np.arange(n_users, dtype=np.int64)
    role = np.zeros(n_users, dtype=np.int8)
    role[n_end : n_end + n_agents] = ROLE_CODE["agent"]
    role[-1] = ROLE_CODE["admin"]

    # --- requesters --------------------------------------------------------------------
    # Rows 0..5 are the edge-case tickets. Requester rows 0 and 1 are the edge-case users and
    # get no other ticket; every other requester gets at least one ticket.
    req = np.empty(n, dtype=np.int64)
    req[0], req[1] = 2, 3
    req[2:4] = 0  # user_due_and_open
    req[4:6] = 1  # user_all_due
    rest = n - 6
    cover = rng.permutation(np.arange(2, n_requesters, dtype=np.int64))
    k = min(rest, len(cover))
    req[6 : 6 + k] = cover[:k]
    req[6 + k :] = rng.integers(2, n_requesters, size=rest - k)

    # --- statuses and times --------------------------------------------------------------
    status = np.empty(n, dtype=np.int8)
    created = np.empty(n, dtype=np.int64)
    solved = np.full(n, NO_TIME, dtype=np.int64)
    updated = np.empty(n, dtype=np.int64)

    due = rng.random(n) < due_share
    due[:6] = False  # edge rows are set by hand below
    n_due = int(due.sum())
    # Due: created 1-4 years ago, solved within 0.5 h - 60 days of creation, and at least one
    # year and a day before now; 90 % already closed (Zendesk closes solved tickets after days).
    latest_solve = year_ago_s - _DAY
    d_created = rng.integers(now_s - 4 * _YEAR, latest_solve - 60 * _DAY, size=n_due)
    d_solved = np.minimum(d_created + rng.integers(1800, 60 * _DAY, size=n_due), latest_solve)
    d_closed = rng.random(n_due) < 0.9
    status[due] = np.where(d_closed, STATUS_CODE["closed"], STATUS_CODE["solved"])
    created[due] = d_created
    solved[due] = d_solved
    updated[due] = np.where(d_closed, np.minimum(d_solved + 4 * _DAY, latest_solve), d_solved)

    recent = ~due
    recent[:6] = False
    n_recent = int(recent.sum())
    names = [name for name, _ in _RECENT_MIX]
    shares = np.array([share for _, share in _RECENT_MIX])
    r_status = rng.choice(np.array([STATUS_CODE[s] for s in names], dtype=np.int8), size=n_recent, p=shares / shares.sum())
    r_created = rng.integers(year_ago_s + _DAY, now_s - 3600, size=n_recent)
    r_done = (r_status == STATUS_CODE["solved"]) | (r_status == STATUS_CODE["closed"])
    r_solved = np.minimum(r_created + rng.integers(1800, 30 * _DAY, size=n_recent), now_s - 60)
    r_solved = np.where(r_done, r_solved, NO_TIME)
    r_updated = np.where(
        r_done,
        np.where(r_status == STATUS_CODE["closed"], np.minimum(r_solved + 4 * _DAY, now_s - 60), r_solved),
        np.minimum(r_created + rng.integers(0, 20 * _DAY, size=n_recent), now_s - 60),
    )
    status[recent] = r_status
    created[recent] = r_created
    solved[recent] = r_solved
    updated[recent] = r_updated

    # --- edge cases --------------------------------------------------------------------
    edge: dict = {}

    def set_row(row: int, st: str, c: int, s: int, u: int | None = None) -> None:
        status[row] = STATUS_CODE[st]
        created[row] = c
        solved[row] = s
        updated[row] = u if u is not None else (s if s != NO_TIME else c)

    set_row(0, "closed", year_ago_s - 3 * _DAY, year_ago_s)
    edge["solved_one_year_ago"] = 1
    leap = _epoch(datetime(2024, 2, 29, 12, 0, tzinfo=UTC))
    if leap < now_s - _DAY:
        set_row(1, "closed", leap - 2 * _DAY, leap, min(leap + 4 * _DAY, now_s - 60))
        edge["leap_day_solve"] = 2
    else:  # a "now" before the leap day: an ordinary recent closed ticket
        set_row(1, "closed", now_s - 10 * _DAY, now_s - 9 * _DAY)
    set_row(2, "closed", year_ago_s - 400 * _DAY, year_ago_s - 390 * _DAY, year_ago_s - 386 * _DAY)
    set_row(3, "open", now_s - 5 * _DAY, NO_TIME, now_s - 4 * _DAY)
    set_row(4, "closed", year_ago_s - 700 * _DAY, year_ago_s - 690 * _DAY, year_ago_s - 686 * _DAY)
    set_row(5, "solved", year_ago_s - 200 * _DAY, year_ago_s - 199 * _DAY)
    edge["user_due_and_open"] = int(user_ids[0])
    edge["user_all_due"] = int(user_ids[1])
    edge["users_without_tickets"] = [int(u) for u in user_ids[n_requesters:n_end]]

    ticket_ids = 1 + np.arange(n, dtype=np.int64)
    tickets = TicketColumns(
        ids=ticket_ids,
        status=status,
        requester_id=user_ids[req],
        created_at=created,
        updated_at=np.maximum(updated, created),
        solved_at=solved,
        edge_cases=edge,
    )

    # --- user times --------------------------------------------------------------------
    first_ticket = np.full(n_users, now_s - 3600, dtype=np.int64)
    np.minimum.at(first_ticket, req, created)
    u_created = first_ticket - rng.integers(0, 30 * _DAY, size=n_users)
    staff = role != ROLE_CODE["end-user"]
    u_created[staff] = now_s - 5 * _YEAR + rng.integers(0, _YEAR, size=int(staff.sum()))
    u_updated = np.minimum(u_created + rng.integers(0, 60 * _DAY, size=n_users), now_s - 60)
    users = UserColumns(ids=user_ids, role=role, created_at=u_created, updated_at=np.maximum(u_updated, u_created))
    return tickets, users


def count_due(tickets: TicketColumns, now: datetime) -> int:
    """Tickets solved/closed strictly more than one calendar year before ``now``."""
    cutoff = _epoch(one_year_before(now if now.tzinfo else now.replace(tzinfo=UTC)))
    done = np.isin(tickets.status, (STATUS_CODE["solved"], STATUS_CODE["closed"]))
    return int((done & (tickets.solved_at != NO_TIME) & (tickets.solved_at < cutoff)).sum())


def default_now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


__all__ = [
    "NO_TIME",
    "ROLES",
    "TICKET_STATUSES",
    "USER_ID_BASE",
    "TicketColumns",
    "UserColumns",
    "count_due",
    "default_now",
    "generate",
    "one_year_before",
]
