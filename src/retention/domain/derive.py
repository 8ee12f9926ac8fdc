"""Records judged from the plan of the records planned before them.

A ticket requester (a Zendesk end user) has no clock of their own: they are erasable when no
ticket of theirs (requested, CC'd on or followed) remains after this run. Planning therefore
plans tickets first, then completes the users' frame from that plan here: ``tickets_remaining``,
``last_ticket_gone_at`` and ``had_ticket`` (the schema's derived columns of ``ticket_user``). A
user no ticket names (a new account that has not filed one yet) is judged by the policy's rule
for users without tickets, from the account's creation.

Planning may take a record type a part of its extract at a time (``planning.plan_parts``), so
what needs every row is split from what a part needs: which rows are judged at all
(``kept_rows``, over the ids alone), and the tickets' parties (``TicketParties``, gathered a
part of the tickets and their plan at a time, compact, and summed up once for the users).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from retention.domain.statuses import DESTRUCTIVE

TICKETS = "support_ticket"
USERS = "ticket_user"
# The record types the incremental export lists again each time one changes (``kept_rows``).
LISTED_AGAIN = (TICKETS, USERS)


def kept_rows(record_type: str, ids: pd.Series) -> np.ndarray | None:
    """Which rows of a record type's extract are judged (None: all), from its ids alone. The
    incremental export lists a ticket or a user again each time it changes: the last listing is
    kept. (Tickets only when every one has an id: a ticket without one is quarantined, and its
    listings are not told apart.)"""
    if record_type == TICKETS:
        return ~ids.duplicated(keep="last").to_numpy(dtype=bool) if ids.notna().all() else None
    if record_type == USERS:
        return ~ids.duplicated(keep="last").to_numpy(dtype=bool)
    return None


def with_parties(tickets: pd.DataFrame) -> pd.DataFrame:
    """Name each ticket's parties (``party_ids``: requester, CCs, followers), the users who may
    be erased only once it is gone."""
    requester = tickets["requester_id"].astype("string").fillna("")
    cc = tickets["cc_ids"].astype("string").fillna("") if "cc_ids" in tickets else ""
    return tickets.assign(party_ids=(requester + " " + cc).str.strip().astype("string"))


def latest_tickets(frame: pd.DataFrame) -> pd.DataFrame:
    """The tickets judged, each with its parties: the last listing of each (``kept_rows``)."""
    keep = kept_rows(TICKETS, frame["record_id"])
    return with_parties(frame.loc[keep] if keep is not None else frame)


def cc_pairs(tickets: pd.DataFrame) -> pd.DataFrame:
    """(ticket record_id, user id) for every user CC'd on or following a ticket (``cc_ids``)."""
    if "cc_ids" not in tickets or tickets.empty:
        return pd.DataFrame({"record_id": pd.Series(dtype="string"), "user_id": pd.Series(dtype="string")})
    ids = tickets["cc_ids"].fillna("").astype(str).str.split()
    pairs = pd.DataFrame({"record_id": tickets["record_id"].to_numpy(), "user_id": ids.to_numpy()}).explode("user_id")
    pairs = pairs[pairs["user_id"].notna() & (pairs["user_id"] != "")]
    return pairs.astype({"record_id": "string", "user_id": "string"}).drop_duplicates()


def _text(values: pd.Series) -> pa.Array:
    return pa.array(values.astype("string"), type=pa.string(), from_pandas=True)


class TicketParties:
    """Every ticket's parties and which tickets this run's plan erases, gathered a part of the
    tickets at a time as Arrow columns (a few bytes a pair, where a frame of texts took a
    hundred), then summed up per user for ``derive_ticket_users``.

    A ticket a user requested, is CC'd on or follows remains unless this run's plan erases it
    (the engine then erases the user only once it is confirmed gone). Quarantined and held
    tickets remain."""

    def __init__(self, unique_tickets: bool = True) -> None:
        # ``unique_tickets``: no ticket id comes twice (``kept_rows`` kept one listing of each),
        # so a part's (ticket, party) pairs are told apart within the part. Otherwise (tickets
        # without ids, every listing kept) they are told apart over all the parts, at several
        # times the memory.
        self.unique_tickets = unique_tickets
        self._pairs: list[pa.Table] = []
        self._gone: list[pa.Table] = []
        self._summed: tuple | None = None

    def add_tickets(self, tickets: pd.DataFrame) -> None:
        """A part of the judged tickets (``latest_tickets``' rows, before quarantine)."""
        ccs = cc_pairs(tickets).rename(columns={"user_id": "party"})
        pairs = pd.concat([tickets[["record_id", "requester_id"]].astype("string").set_axis(["record_id", "party"], axis=1), ccs])
        if self.unique_tickets:
            pairs = pairs.drop_duplicates()  # a requester also CC'd counts once
        if len(pairs):
            self._pairs.append(pa.table({"record_id": _text(pairs["record_id"]), "party": _text(pairs["party"])}))
        self._summed = None

    def add_plan(self, plan: pd.DataFrame) -> None:
        """A part of the tickets' plan (holds applied): the rows it erases, with their deadlines."""
        planned = plan.loc[(plan["record_type"] == TICKETS).to_numpy(dtype=bool) & plan["action"].isin(DESTRUCTIVE).to_numpy()]
        if len(planned):
            deadline = pd.to_datetime(planned["deadline"], utc=True)
            self._gone.append(pa.table({"record_id": _text(planned["record_id"]), "deadline": pa.array(deadline, from_pandas=True)}))
        self._summed = None

    def _sum(self) -> tuple:
        """Per party named on a ticket (``parties``, texts): the tickets that remain, and the
        latest deadline of those this run erases (as the deadline's integers; ``has_gone``: it
        has one). Summed by the parties' codes with numpy: Arrow's hash group-by over 1.3
        million pairs took the ticketing plan step from 337 to 392 MB at a million tickets."""
        if self._summed is None:
            empty = pa.table({"record_id": pa.array([], pa.string()), "party": pa.array([], pa.string())})
            # One row per (ticket, party): a party named twice on a ticket counts once.
            pairs = pa.concat_tables([empty, *self._pairs])
            if not self.unique_tickets:
                pairs = pairs.group_by(["record_id", "party"], use_threads=False).aggregate([])
            erased = pa.concat_tables(self._gone) if self._gone else pa.table(
                {"record_id": pa.array([], pa.string()), "deadline": pa.array([], pa.timestamp("us", tz="UTC"))}
            )
            # A ticket planned twice (several listings, or two plan rows): its latest deadline, as
            # the join this replaced took; index_in below finds only a value's first row.
            if not self.unique_tickets or len(pc.unique(erased["record_id"])) != erased.num_rows:
                latest = erased.group_by("record_id", use_threads=False).aggregate([("deadline", "max")])
                erased = pa.table({"record_id": latest["record_id"], "deadline": latest["deadline_max"]})
            deadline_type = erased.schema.field("deadline").type
            encoded = pc.dictionary_encode(pairs["party"].combine_chunks())
            parties = encoded.dictionary  # every party named on a ticket, once
            codes = np.asarray(pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False), dtype=np.int64)
            del encoded
            at = pc.index_in(pairs["record_id"], value_set=erased["record_id"].combine_chunks())
            gone = np.asarray(pc.is_valid(at).to_numpy(zero_copy_only=False), dtype=bool)
            named = codes >= 0
            remaining = np.bincount(codes[named & ~gone], minlength=len(parties))
            mine = named & gone
            when = pc.take(erased["deadline"].combine_chunks().cast(pa.int64()), pc.filter(at, pa.array(mine)))
            dated = np.asarray(pc.is_valid(when).to_numpy(zero_copy_only=False), dtype=bool)
            latest = np.full(len(parties), np.iinfo(np.int64).min, dtype=np.int64)
            np.maximum.at(latest, codes[mine][dated], np.asarray(pc.fill_null(when, 0).to_numpy(zero_copy_only=False), dtype=np.int64)[dated])
            has_gone = latest != np.iinfo(np.int64).min
            self._summed = (parties, remaining, latest, has_gone, deadline_type)
        return self._summed

    def derive_users(self, users: pd.DataFrame) -> pd.DataFrame:
        """``users`` with ``tickets_remaining``, ``last_ticket_gone_at`` and ``had_ticket``.
        ``last_ticket_gone_at`` is the latest of the erased tickets' deadlines and the user's
        own last update, so a user touched after their last ticket went is judged from that
        touch. ``had_ticket``: some ticket names the user (requester, CC or follower)."""
        parties, remaining, latest, has_gone, deadline_type = self._sum()
        out = users.copy()
        at = pc.index_in(_text(out["record_id"]), value_set=parties)
        found = np.asarray(pc.is_valid(at).to_numpy(zero_copy_only=False), dtype=bool)
        position = np.asarray(pc.fill_null(at, 0).to_numpy(zero_copy_only=False), dtype=np.int64)
        out["tickets_remaining"] = np.where(found, remaining[position] if len(parties) else 0, 0).astype("int64")
        out["had_ticket"] = found
        updated = pd.to_datetime(out["updated_at"], utc=True)
        gone_at = found & (has_gone[position] if len(parties) else False)
        if gone_at.any():
            values = latest[position] if len(parties) else np.zeros(len(out), dtype=np.int64)
            last = pa.array(values, mask=~gone_at).cast(deadline_type).to_pandas()
            last.index = out.index
            out["last_ticket_gone_at"] = pd.concat([pd.to_datetime(last, utc=True), updated], axis=1).max(axis=1)
        else:
            out["last_ticket_gone_at"] = updated
        return out


def derive_ticket_users(users: pd.DataFrame, plan_so_far: pd.DataFrame, frames: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Add ``tickets_remaining``, ``last_ticket_gone_at`` and ``had_ticket`` to the users frame
    (the last listing of each user), from ``frames``' tickets and the plan so far."""
    keep = kept_rows(USERS, users["record_id"])
    users = users.loc[keep] if keep is not None else users
    tickets = frames.get(TICKETS)
    parties = TicketParties(unique_tickets=tickets is None or bool(tickets["record_id"].notna().all() and tickets["record_id"].is_unique))
    if tickets is not None:
        parties.add_tickets(tickets)
    parties.add_plan(plan_so_far)
    return parties.derive_users(users)
