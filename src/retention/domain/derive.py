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


# An id the integer path takes: the canonical spelling of an int64 (no sign, no leading zero,
# at most 18 digits), so its text and its number are one to one and equal texts are equal numbers.
_CANONICAL = r"^(0|[1-9][0-9]{0,17})$"
_NO_DEADLINE = np.iinfo(np.int64).min  # a gone ticket without a deadline (as NaT's integer)


def _canonical_ints(ids: pa.Array) -> bool:
    """Every id is an integer's canonical text (none missing)."""
    return ids.null_count == 0 and (len(ids) == 0 or pc.all(pc.match_substring_regex(ids, _CANONICAL)).as_py())


def _int_ids(ids: pa.Array) -> np.ndarray:
    """Canonical integer texts (``_canonical_ints``) as an int64 numpy array of its own."""
    return np.asarray(pc.cast(ids, pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64).copy()


class TicketParties:
    """Every ticket's parties and which tickets this run's plan erases, gathered a part of the
    tickets at a time as Arrow columns (a few bytes a pair, where a frame of texts took a
    hundred), then summed up per user for ``derive_ticket_users``.

    A ticket a user requested, is CC'd on or follows remains unless this run's plan erases it
    (the engine then erases the user only once it is confirmed gone). Quarantined and held
    tickets remain.

    Zendesk's ids are integers: while every id gathered is an integer's canonical text, the
    pairs are held and summed as 64-bit integers, sorted and searched (``_sum_ints``), at a
    fraction of the memory of texts and their hash tables (the ticketing plan step at a million
    tickets peaked 60 MB above its start summing 1.3 million texts). An id of any other spelling
    ("007", "u1", a missing requester's id) turns the whole gathering to texts (``_sum_texts``),
    compared exactly as before; ``int_ids=False`` keeps texts from the start. Both answer alike
    because equal canonical texts are exactly equal integers, and a user id that is not canonical
    cannot equal a canonical party."""

    def __init__(self, unique_tickets: bool = True, int_ids: bool = True) -> None:
        # ``unique_tickets``: no ticket id comes twice (``kept_rows`` kept one listing of each),
        # so a part's (ticket, party) pairs are told apart within the part. Otherwise (tickets
        # without ids, every listing kept) they are told apart over all the parts, at several
        # times the memory.
        self.unique_tickets = unique_tickets
        self._ints = int_ids  # every id so far held as an int64
        # Held as numpy while the ids are integers (freed to the C allocator as they are read,
        # and taken again by the sums: Arrow's pool kept what it freed, 12 MB more at the
        # peak), as Arrow texts otherwise: (ticket ids, parties) and (ids, deadline integers).
        self._int_pairs: list[tuple[np.ndarray, np.ndarray]] = []
        self._int_gone: list[tuple[np.ndarray, np.ndarray]] = []
        self._pairs: list[pa.Table] = []
        self._gone: list[pa.Table] = []
        self._deadline_type: pa.DataType | None = None
        self._summed: tuple | None = None

    def _as_texts(self) -> None:
        """Hold every id gathered so far as text (an id came that is not an integer's canonical text)."""
        if self._ints:
            self._ints = False
            deadline_type = self._deadline_type or pa.timestamp("us", tz="UTC")
            self._pairs = [
                pa.table({"record_id": pc.cast(pa.array(t), pa.string()), "party": pc.cast(pa.array(p), pa.string())})
                for t, p in self._int_pairs
            ]
            self._gone = [
                pa.table({
                    "record_id": pc.cast(pa.array(i), pa.string()),
                    "deadline": pa.array(d, mask=d == _NO_DEADLINE).cast(deadline_type),
                })
                for i, d in self._int_gone
            ]
            self._int_pairs, self._int_gone = [], []

    def _ids(self, *columns: pa.Array) -> list:
        """The ids as int64 numpy arrays while every id is canonical, else as the texts."""
        if self._ints and not all(_canonical_ints(c) for c in columns):
            self._as_texts()
        return [_int_ids(c) for c in columns] if self._ints else list(columns)

    def add_tickets(self, tickets: pd.DataFrame) -> None:
        """A part of the judged tickets (``latest_tickets``' rows, before quarantine)."""
        if self._summed is not None:
            raise RuntimeError("the tickets' parties were summed up: no ticket can be added after")
        ccs = cc_pairs(tickets).rename(columns={"user_id": "party"})
        pairs = pd.concat([tickets[["record_id", "requester_id"]].astype("string").set_axis(["record_id", "party"], axis=1), ccs])
        pairs = pairs[pairs["party"].notna().to_numpy()]  # a ticket without a requester names no one by it
        if self.unique_tickets:
            pairs = pairs.drop_duplicates()  # a requester also CC'd counts once
        if len(pairs):
            record_id, party = self._ids(_text(pairs["record_id"]), _text(pairs["party"]))
            if self._ints:
                self._int_pairs.append((record_id, party))
            else:
                self._pairs.append(pa.table({"record_id": record_id, "party": party}))

    def add_plan(self, plan: pd.DataFrame) -> None:
        """A part of the tickets' plan (holds applied): the rows it erases, with their deadlines."""
        if self._summed is not None:
            raise RuntimeError("the tickets' parties were summed up: no plan can be added after")
        planned = plan.loc[(plan["record_type"] == TICKETS).to_numpy(dtype=bool) & plan["action"].isin(DESTRUCTIVE).to_numpy()]
        if len(planned):
            deadline = pa.array(pd.to_datetime(planned["deadline"], utc=True), from_pandas=True)
            self._deadline_type = self._deadline_type or deadline.type
            deadline = deadline.cast(self._deadline_type)  # one unit over every part: summed as integers
            (record_id,) = self._ids(_text(planned["record_id"]))
            if self._ints:
                dates = np.asarray(pc.fill_null(deadline.cast(pa.int64()), _NO_DEADLINE).to_numpy(zero_copy_only=False), dtype=np.int64)
                self._int_gone.append((record_id, dates))
            else:
                self._gone.append(pa.table({"record_id": record_id, "deadline": deadline}))

    def _sum(self) -> tuple:
        """Per party named on a ticket (``parties``): the tickets that remain, and the latest
        deadline of those this run erases (as the deadline's integers; ``has_gone``: it has
        one). Summed once, when the first users are derived; what was gathered goes then."""
        if self._summed is None:
            if not self.unique_tickets:
                self._as_texts()  # pairs told apart over all parts: the exact texts' group-by
            deadline_type = self._deadline_type or pa.timestamp("us", tz="UTC")
            if self._ints:
                parties, remaining, latest = self._sum_ints()
            else:
                parties, remaining, latest = self._sum_texts(deadline_type)
            self._pairs, self._gone, self._int_pairs, self._int_gone = [], [], [], []
            self._summed = (parties, remaining, latest, latest != _NO_DEADLINE, deadline_type)
        return self._summed

    def _gone_ints(self) -> tuple[np.ndarray, np.ndarray]:
        """The erased tickets' ids, sorted, once each, with the latest of their deadlines
        (``_NO_DEADLINE`` for none): a ticket planned twice counts its latest."""
        ids = np.concatenate([np.zeros(0, np.int64), *(i for i, _ in self._int_gone)])
        deadlines = np.concatenate([np.zeros(0, np.int64), *(d for _, d in self._int_gone)])
        self._int_gone = []
        if not len(ids):
            return ids, deadlines
        order = np.lexsort((deadlines, ids))  # by id, then deadline: the last of an id is its latest
        ids, deadlines = ids[order], deadlines[order]
        last = np.append(ids[1:] != ids[:-1], True)
        return ids[last], deadlines[last]

    def _sum_ints(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As ``_sum_texts``, for int64 ids, a part of the pairs at a time (each part let go once
        read): the parties of remaining tickets are counted, sorted in place, and those of erased
        tickets take their tickets' latest deadline. Nothing the size of all the pairs is
        copied: summing a million tickets' 1.3 million pairs at once took 36 MB above the pairs."""
        gone_ids, gone_deadlines = self._gone_ints()
        # The parties of remaining tickets fill one array as the parts are let go, not a list
        # of pieces concatenated after (both at once at the peak).
        remaining = np.empty(sum(len(p) for _, p in self._int_pairs), np.int64)
        filled = 0
        gone_parties: list[np.ndarray] = []
        gone_dates: list[np.ndarray] = []
        self._int_pairs.reverse()  # taken from the end: each part let go as it is read
        while self._int_pairs:
            tickets, party = self._int_pairs.pop()
            if len(gone_ids):
                at = np.minimum(np.searchsorted(gone_ids, tickets), len(gone_ids) - 1)
                gone = gone_ids[at] == tickets
                gone_parties.append(party[gone])
                gone_dates.append(gone_deadlines[at[gone]])
                party = party[~gone]
            remaining[filled : filled + len(party)] = party
            filled += len(party)
            del tickets, party
        remaining = remaining[:filled]
        remaining.sort()
        starts = np.flatnonzero(np.append(True, remaining[1:] != remaining[:-1])) if len(remaining) else np.zeros(0, np.int64)
        counted = remaining[starts]
        counts = np.diff(np.append(starts, len(remaining)))
        del remaining, starts
        gone_party = np.concatenate([np.zeros(0, np.int64), *gone_parties])
        gone_date = np.concatenate([np.zeros(0, np.int64), *gone_dates])
        parties = np.union1d(counted, gone_party)  # every party named on a ticket, once, sorted
        tickets_remaining = np.zeros(len(parties), np.int64)
        tickets_remaining[np.searchsorted(parties, counted)] = counts
        latest = np.full(len(parties), _NO_DEADLINE, np.int64)
        np.maximum.at(latest, np.searchsorted(parties, gone_party), gone_date)
        return parties, tickets_remaining, latest

    def _sum_texts(self, deadline_type: pa.DataType) -> tuple[pa.Array, np.ndarray, np.ndarray]:
        """As ``_sum_ints``, for texts: summed by the parties' dictionary codes with numpy (Arrow's
        hash group-by over 1.3 million pairs took the plan step from 337 to 392 MB)."""
        empty = pa.table({"record_id": pa.array([], pa.string()), "party": pa.array([], pa.string())})
        # One row per (ticket, party): a party named twice on a ticket counts once.
        pairs = pa.concat_tables([empty, *self._pairs])
        self._pairs = []
        if not self.unique_tickets:
            pairs = pairs.group_by(["record_id", "party"], use_threads=False).aggregate([])
        erased = pa.concat_tables(self._gone) if self._gone else pa.table(
            {"record_id": pa.array([], pa.string()), "deadline": pa.array([], deadline_type)}
        )
        # A ticket planned twice (several listings, or two plan rows): its latest deadline;
        # index_in below finds only a value's first row.
        if not self.unique_tickets or len(pc.unique(erased["record_id"])) != erased.num_rows:
            latest = erased.group_by("record_id", use_threads=False).aggregate([("deadline", "max")])
            erased = pa.table({"record_id": latest["record_id"], "deadline": latest["deadline_max"]})
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
        latest = np.full(len(parties), _NO_DEADLINE, dtype=np.int64)
        np.maximum.at(latest, codes[mine][dated], np.asarray(pc.fill_null(when, 0).to_numpy(zero_copy_only=False), dtype=np.int64)[dated])
        return parties, remaining, latest

    def _positions(self, user_ids: pa.Array, parties) -> tuple[np.ndarray, np.ndarray]:
        """(found, position in ``parties``) of each user id."""
        if self._ints:
            canonical = pc.fill_null(pc.match_substring_regex(user_ids, _CANONICAL), False)
            as_int = np.asarray(
                pc.if_else(canonical, pc.cast(pc.if_else(canonical, user_ids, "0"), pa.int64()), 0).to_numpy(zero_copy_only=False), dtype=np.int64
            )
            position = np.minimum(np.searchsorted(parties, as_int), max(len(parties) - 1, 0))
            found = np.asarray(canonical.to_numpy(zero_copy_only=False), dtype=bool)
            found &= parties[position] == as_int if len(parties) else False
            return found, position
        at = pc.index_in(user_ids, value_set=parties)
        found = np.asarray(pc.is_valid(at).to_numpy(zero_copy_only=False), dtype=bool)
        return found, np.asarray(pc.fill_null(at, 0).to_numpy(zero_copy_only=False), dtype=np.int64)

    def derive_users(self, users: pd.DataFrame) -> pd.DataFrame:
        """``users`` with ``tickets_remaining``, ``last_ticket_gone_at`` and ``had_ticket``.
        ``last_ticket_gone_at`` is the latest of the erased tickets' deadlines and the user's
        own last update, so a user touched after their last ticket went is judged from that
        touch. ``had_ticket``: some ticket names the user (requester, CC or follower)."""
        parties, remaining, latest, has_gone, deadline_type = self._sum()
        out = users.copy()
        found, position = self._positions(_text(out["record_id"]), parties)
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
