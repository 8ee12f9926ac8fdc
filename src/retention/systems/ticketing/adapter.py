"""The ticketing system (Zendesk Support API) as a ``SourceSystem``.

Tickets come from the incremental cursor export (which may list a ticket more than once:
planning keeps the last occurrence). Requesters are judged after their tickets (the domain's
``derive``). Zendesk itself refuses to delete a requester of a ticket that is not closed; that
comes back as ``deferred`` and is retried on a later run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from datetime import datetime

import pandas as pd

from retention.domain.conform import from_rows
from retention.domain.records import protected_values, record_types_of
from retention.domain.statuses import Action, Status
from retention.progress import Progress
from retention.systems.base import Outcome, Recheck, outcomes_as_they_arrive
from retention.systems.ticketing.client import ZendeskClient

log = logging.getLogger("retention")

# The ticket statuses that protect a ticket (the domain's): a ticket reopened since the plan is
# one of them again, and the client leaves it alone.
UNSOLVED = protected_values("support_ticket", "status")
_OUTCOMES = {"erased": Status.ERASED, "already_gone": Status.ALREADY_GONE, "not_yet": Status.DEFERRED}


def _status(outcome: str) -> Status:
    return _OUTCOMES.get(outcome, Status.FAILED)


def _cursors(cursor: str | None) -> dict:
    """The two exports' cursors of a cursor ``extract_changes`` returned; ``{}`` for none. A cursor
    that is not ours is refused in one line (never guessed at: a wrong one would miss changes)."""
    if cursor is None:
        return {}
    try:
        parsed = json.loads(cursor)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict) or not set(parsed) <= {"tickets", "users"}:
        raise ValueError("ticketing: the stored change-feed cursor is not this adapter's; reconcile to read in full")
    return {k: v for k, v in parsed.items() if isinstance(v, str) and v}


def tickets_frame(page: list[dict]) -> pd.DataFrame:
    """Export or search results (ticket objects) in the domain's ``support_ticket`` schema."""
    return from_rows("support_ticket", page)


def users_frame(page: list[dict]) -> pd.DataFrame:
    """User objects in the domain's ``ticket_user`` schema (the derived columns come at planning;
    a re-read right before erasure may carry ``tickets_remaining``, the live tickets naming the
    user now, which the domain's recheck then judges instead of assuming none)."""
    frame = from_rows("ticket_user", page)
    if page and all("tickets_remaining" in u for u in page):
        frame["tickets_remaining"] = pd.Series([int(u["tickets_remaining"]) for u in page], index=frame.index, dtype="int64")
    return frame


class TicketingAdapter:
    system = "ticketing"
    record_types = tuple(record_types_of("ticketing"))
    # Ids per erase call. Each call ends with a drain of about two job durations in which the
    # request budget mostly idles (its last chunks wait for their soft, then their permanent
    # deletion job); at Zendesk's top limit (2500 requests a minute, ~80,000 tickets) a call
    # of 50,000 is over half a minute of work, so the drain costs a few percent of it. Not
    # more: what a call holds grows with it (the batch's rows, keys and outcomes in the engine,
    # the client's), about 2 KB a ticket at its peak: calls of 100,000 took the erase step
    # from 376 MB at 250,000 tickets to 571 MB at a million. Long calls log their own progress.
    erase_batch = 50_000
    # Requesters go two requests each and, at Zendesk's own pace (700 permanent deletions per
    # 10 minutes), a call of 100,000 would run for days without a ledger commit.
    erase_batches = {"ticket_user": 1000}

    def __init__(self, client: ZendeskClient):
        self.client = client

    def extract(self, write, now: datetime) -> None:
        progress = Progress(log, "ticketing: exporting tickets")
        for page in self.client.iter_ticket_pages(0):
            write("support_ticket", tickets_frame(page))
            progress.add(len(page))
        progress.finish()
        progress = Progress(log, "ticketing: exporting users")
        for page in self.client.iter_user_pages(0):
            write("ticket_user", users_frame(page))
            progress.add(len(page))
        progress.finish()

    def extract_changes(self, write, now: datetime, cursor: str | None) -> str:
        """The tickets and users changed since ``cursor`` (both exports' cursors, as this method
        returned them; ``None``: everything, as ``extract``), in ``extract``'s frames.

        Zendesk's incremental exports list a soft-deleted ticket with status "deleted" and a
        soft-deleted user with ``active`` false, as a full read does: they are changes, not gone
        records. A record deleted for good leaves the exports without a word, so this feed reports
        nothing gone: the run that erased it drops it from the record index once verified, and a
        reconciliation (a full read) finds any other as drift. The export's own cursor is exact
        (Zendesk leaves the last minute out, so nothing changes behind it)."""
        cursors = _cursors(cursor)
        self.client.last_ticket_cursor = self.client.last_user_cursor = None
        progress = Progress(log, "ticketing: exporting changed tickets" if cursor else "ticketing: exporting tickets")
        for page in self.client.iter_ticket_pages(0, cursor=cursors.get("tickets")):
            write("support_ticket", tickets_frame(page))
            progress.add(len(page))
        progress.finish()
        progress = Progress(log, "ticketing: exporting changed users" if cursor else "ticketing: exporting users")
        for page in self.client.iter_user_pages(0, cursor=cursors.get("users")):
            write("ticket_user", users_frame(page))
            progress.add(len(page))
        progress.finish()
        # An export that answered no cursor at all leaves the one it started from.
        return json.dumps({
            "tickets": self.client.last_ticket_cursor or cursors.get("tickets"),
            "users": self.client.last_user_cursor or cursors.get("users"),
        }, sort_keys=True)

    def find_person(self, email: str) -> dict[str, pd.DataFrame]:
        """The person's end-user accounts (agents and admins are never found) and the tickets they
        requested. Zendesk leaves archived tickets (closed for over 120 days) out of that list."""
        users = [{"id": uid, "role": "end-user"} for uid in self.client.find_user_ids_by_email(email)]
        tickets = [t for user in users for t in self.client.iter_requested_tickets(user["id"])]
        return {"support_ticket": tickets_frame(tickets), "ticket_user": users_frame(users)}

    def erase(
        self, record_type: str, action: str, record_ids: Sequence[str], recheck: Recheck | None = None
    ) -> Iterator[Outcome]:
        if action != Action.ERASE:
            raise ValueError(f"ticketing cannot {action} {record_type}")
        ids = [int(i) for i in record_ids]
        progress = Progress(log, f"ticketing: {record_type} erase call", total=len(ids), every=30.0)
        frame = {"support_ticket": tickets_frame, "ticket_user": users_frame}.get(record_type)
        if frame is None:
            raise ValueError(f"unknown record type {record_type!r}")
        # Each 100 records are read again right before their deletion; the domain's check (when
        # the run gives one) leaves alone what changed since the plan.
        keep = (lambda rows: {int(i) for i in recheck.leave_alone(frame(rows))}) if recheck else None
        if record_type == "support_ticket":
            # A ticket reopened since the plan (a customer replied) is unsolved again, and an
            # unsolved ticket is never erased: the client leaves unsolved ones alone ("not_yet").
            def call(on_result):
                return self.client.erase_tickets(ids, defer_statuses=UNSOLVED, keep=keep, on_result=on_result)
        else:
            def call(on_result):
                return self.client.erase_users(ids, keep=keep, on_result=on_result)
        for outcome in outcomes_as_they_arrive(call, _status):
            progress.add(1)
            yield outcome

    def still_present(self, record_type: str, record_ids: Sequence[str]) -> set[str]:
        ids = [int(i) for i in record_ids]
        if record_type == "support_ticket":
            return {str(i) for i in self.client.remaining_tickets(ids)}
        return {str(i) for i in self.client.remaining_users(ids)}

    def close(self) -> None:
        self.client.close()
