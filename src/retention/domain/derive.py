"""Records judged from the plan of the records planned before them.

A ticket requester (a Zendesk end user) has no clock of their own: they are erasable when no
ticket of theirs (requested, CC'd on or followed) remains after this run. Planning therefore
plans tickets first, then completes the users' frame from that plan here: ``tickets_remaining``,
``last_ticket_gone_at`` and ``had_ticket`` (the schema's derived columns of ``ticket_user``). A
user no ticket names (a new account that has not filed one yet) is judged by the policy's rule
for users without tickets, from the account's creation.
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from retention.domain.statuses import DESTRUCTIVE


def latest_tickets(frame: pd.DataFrame) -> pd.DataFrame:
    """The incremental export lists a ticket again each time it changes: keep the last. And
    name the ticket's parties (``party_ids``: requester, CCs, followers), the users who may be
    erased only once it is gone."""
    frame = frame.drop_duplicates("record_id", keep="last") if frame["record_id"].notna().all() else frame
    requester = frame["requester_id"].astype("string").fillna("")
    cc = frame["cc_ids"].astype("string").fillna("") if "cc_ids" in frame else ""
    return frame.assign(party_ids=(requester + " " + cc).str.strip().astype("string"))


def cc_pairs(tickets: pd.DataFrame) -> pd.DataFrame:
    """(ticket record_id, user id) for every user CC'd on or following a ticket (``cc_ids``)."""
    if "cc_ids" not in tickets or tickets.empty:
        return pd.DataFrame({"record_id": pd.Series(dtype="string"), "user_id": pd.Series(dtype="string")})
    ids = tickets["cc_ids"].fillna("").astype(str).str.split()
    pairs = pd.DataFrame({"record_id": tickets["record_id"].to_numpy(), "user_id": ids.to_numpy()}).explode("user_id")
    pairs = pairs[pairs["user_id"].notna() & (pairs["user_id"] != "")]
    return pairs.astype({"record_id": "string", "user_id": "string"}).drop_duplicates()


def derive_ticket_users(users: pd.DataFrame, plan_so_far: pd.DataFrame, frames: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Add ``tickets_remaining``, ``last_ticket_gone_at`` and ``had_ticket`` to the users frame.

    A ticket a user requested, is CC'd on or follows remains unless this run's plan erases it
    (the engine then erases the user only once it is confirmed gone). ``last_ticket_gone_at`` is
    the latest of the erased tickets' deadlines and the user's own last update, so a user touched
    after their last ticket went is judged from that touch. ``had_ticket``: some ticket of the
    extract names the user (requester, CC or follower).
    """
    users = users.drop_duplicates("record_id", keep="last")
    tickets = frames.get("support_ticket")
    if tickets is None:
        tickets = pd.DataFrame({"record_id": pd.Series(dtype="string"), "requester_id": pd.Series(dtype="string")})
    planned = plan_so_far[(plan_so_far["record_type"] == "support_ticket") & plan_so_far["action"].isin(DESTRUCTIVE)]
    deadline = planned.set_index("record_id")["deadline"] if len(planned) else pd.Series(dtype="datetime64[us, UTC]")
    ccs = cc_pairs(tickets).rename(columns={"user_id": "requester_id"})
    # One row per (ticket, party): the requester, and each CC or follower.
    t = pd.concat([tickets[["record_id", "requester_id"]].astype("string"), ccs], ignore_index=True).drop_duplicates()
    t["gone"] = t["record_id"].isin(deadline.index)
    remaining = t.loc[~t["gone"]].groupby("requester_id").size()
    out = users.copy()
    ids = out["record_id"].astype("string")
    out["tickets_remaining"] = ids.map(remaining).fillna(0).astype("int64").to_numpy()
    out["had_ticket"] = ids.astype(str).isin(set(t["requester_id"].dropna().astype(str))).to_numpy()
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
