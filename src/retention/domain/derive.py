"""Records judged from the plan of the records planned before them.

A ticket requester (a Zendesk end user) has no clock of their own: they are erasable when no
ticket of theirs remains after this run. Planning therefore plans tickets first, then
completes the users' frame from that plan here: ``tickets_remaining`` and
``last_ticket_gone_at`` (the schema's derived columns of ``ticket_user``).
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from retention.domain.statuses import DESTRUCTIVE


def latest_tickets(frame: pd.DataFrame) -> pd.DataFrame:
    """The incremental export lists a ticket again each time it changes: keep the last."""
    return frame.drop_duplicates("record_id", keep="last") if frame["record_id"].notna().all() else frame


def derive_ticket_users(users: pd.DataFrame, plan_so_far: pd.DataFrame, frames: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Add ``tickets_remaining`` and ``last_ticket_gone_at`` to the users frame.

    A ticket remains unless this run's plan erases it. ``last_ticket_gone_at`` is the latest of
    the erased tickets' deadlines and the user's own last update, so a user touched after their
    last ticket went is judged from that touch.
    """
    users = users.drop_duplicates("record_id", keep="last")
    tickets = frames.get("support_ticket")
    if tickets is None:
        tickets = pd.DataFrame({"record_id": pd.Series(dtype="string"), "requester_id": pd.Series(dtype="string")})
    planned = plan_so_far[(plan_so_far["record_type"] == "support_ticket") & plan_so_far["action"].isin(DESTRUCTIVE)]
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


def derive_frame(record_type: str, frame: pd.DataFrame, plan_so_far: pd.DataFrame, frames: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Complete a frame from the frames and plan of the record types planned before it."""
    if record_type == "support_ticket":
        return latest_tickets(frame)
    if record_type == "ticket_user":
        return derive_ticket_users(frame, plan_so_far, frames)
    return frame
