"""The ticketing system (Zendesk Support API) as a ``SourceSystem``.

Tickets come from the incremental cursor export (which may list a ticket more than once: the
last occurrence wins). Requesters are judged after their tickets: an end user is erasable
when none of their tickets remains after this run's plan. Zendesk itself refuses to delete a
requester of a ticket that is not closed; that comes back as ``deferred`` and is retried on a
later run.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime

import pandas as pd

from retention.systems.ticketing.client import ZendeskClient
from retention.progress import Progress

log = logging.getLogger("retention")

UNSOLVED = ("new", "open", "pending", "hold")
_OUTCOMES = {"erased": "erased", "already_gone": "already_gone", "not_yet": "deferred"}


def _times(values) -> pd.Series:
    return pd.to_datetime(pd.Series(values, dtype="object").replace("", None), utc=True, errors="coerce", format="ISO8601")


def tickets_frame(page: list[dict]) -> pd.DataFrame:
    raw = pd.DataFrame.from_records(page, columns=["id", "status", "requester_id", "solved_at", "created_at", "updated_at"])
    return pd.DataFrame(
        {
            "record_id": raw["id"].astype("Int64").astype("string"),
            "status": raw["status"].astype("string"),
            "requester_id": raw["requester_id"].astype("Int64").astype("string"),
            "solved_at": _times(raw["solved_at"]),
            "created_at": _times(raw["created_at"]),
            "updated_at": _times(raw["updated_at"]),
        }
    )


def users_frame(page: list[dict]) -> pd.DataFrame:
    raw = pd.DataFrame.from_records(page, columns=["id", "role", "created_at", "updated_at"])
    return pd.DataFrame(
        {
            "record_id": raw["id"].astype("Int64").astype("string"),
            "role": raw["role"].astype("string"),
            "created_at": _times(raw["created_at"]),
            "updated_at": _times(raw["updated_at"]),
        }
    )


def latest_tickets(frame: pd.DataFrame) -> pd.DataFrame:
    """The incremental export lists a ticket again each time it changes: keep the last."""
    return frame.drop_duplicates("record_id", keep="last") if frame["record_id"].notna().all() else frame


def derive_ticket_users(users: pd.DataFrame, plan_so_far: pd.DataFrame, frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Add ``tickets_remaining`` and ``last_ticket_gone_at`` to the users frame.

    A ticket remains unless this run's plan erases it. ``last_ticket_gone_at`` is the latest of
    the erased tickets' deadlines and the user's own last update, so a user touched after their
    last ticket went is judged from that touch.
    """
    users = users.drop_duplicates("record_id", keep="last")
    tickets = frames.get("support_ticket")
    if tickets is None:
        tickets = pd.DataFrame({"record_id": pd.Series(dtype="string"), "requester_id": pd.Series(dtype="string")})
    planned = plan_so_far[(plan_so_far["record_type"] == "support_ticket") & plan_so_far["action"].isin(["erase", "minimise"])]
    deadline = planned.set_index("record_id")["deadline"] if len(planned) else pd.Series(dtype="datetime64[us, UTC]")
    t = tickets[["record_id", "requester_id"]].copy()
    t["gone"] = t["record_id"].isin(deadline.index)
    remaining = t.loc[~t["gone"]].groupby("requester_id").size()
    out = users.copy()
    out["tickets_remaining"] = out["record_id"].map(remaining).fillna(0).astype("int64")
    updated = pd.to_datetime(out["updated_at"], utc=True)
    gone = t.loc[t["gone"], ["record_id", "requester_id"]]
    if len(gone):
        gone = gone.assign(deadline=gone["record_id"].map(deadline).to_numpy())
        gone_at = gone.groupby("requester_id")["deadline"].max()
        last = out[["record_id"]].merge(gone_at.rename("last").reset_index(), left_on="record_id", right_on="requester_id", how="left")["last"]
        last.index = out.index
        out["last_ticket_gone_at"] = pd.concat([pd.to_datetime(last, utc=True), updated], axis=1).max(axis=1)
    else:
        out["last_ticket_gone_at"] = updated
    return out


class TicketingAdapter:
    system = "ticketing"
    record_types = ("support_ticket", "ticket_user")
    # Ids per erase call. Each call ends with a drain of about two job durations in which the
    # request budget mostly idles (its last chunks wait for their soft, then their permanent
    # deletion job); at Zendesk's top limit (2500 requests a minute, ~80,000 tickets) a call
    # of 100,000 is more than a minute of work, so the drain costs under 2% of it. The ledger
    # hears of a call's outcomes when it returns: a task killed mid-call re-erases that call's
    # done records on its retry, as "already_gone". Long calls log their own progress.
    erase_batch = 100_000
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

    def erase(self, record_type: str, action: str, record_ids: Sequence[str]) -> dict[str, str]:
        if action != "erase":
            raise ValueError(f"ticketing cannot {action} {record_type}")
        ids = [int(i) for i in record_ids]
        progress = Progress(log, f"ticketing: {record_type} erase call", total=len(ids), every=30.0)
        if record_type == "support_ticket":
            # A ticket reopened since the plan (a customer replied) is unsolved again, and an
            # unsolved ticket is never erased: the client re-reads each chunk's statuses right
            # before that chunk's soft deletion and leaves unsolved ones alone ("not_yet").
            result = self.client.erase_tickets(ids, defer_statuses=UNSOLVED, on_result=lambda i, o: progress.add(1))
        elif record_type == "ticket_user":
            result = self.client.erase_users(ids, on_result=lambda i, o: progress.add(1))
        else:
            raise ValueError(f"unknown record type {record_type!r}")
        return {str(i): _OUTCOMES.get(result.get(i, "failed"), "failed") for i in ids}

    def still_present(self, record_type: str, record_ids: Sequence[str]) -> set[str]:
        ids = [int(i) for i in record_ids]
        if record_type == "support_ticket":
            return {str(i) for i in self.client.remaining_tickets(ids)}
        return {str(i) for i in self.client.remaining_users(ids)}

    def close(self) -> None:
        self.client.close()
