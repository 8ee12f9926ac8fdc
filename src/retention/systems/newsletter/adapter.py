"""The newsletter provider (Mailchimp Marketing API v3) as a ``SourceSystem``.

Members are keyed by ``subscriber_hash``, and every audience the Connection names is enforced:
a member of the first audience has its bare hash as record id, one of a further audience
``<list_id>:<hash>`` (``audiences.py`` says why). Every call loops over the audiences through the
one client, so Mailchimp's limit of simultaneous connections stays shared. E-mail addresses are
fetched only to check that a member has one, and dropped at once: nothing downstream of the
extract sees them.

``extract_changes`` reads only the members changed since a cursor (``since_last_changed`` per
audience), in the same frames; its docstring says what it cannot see (members erased for good).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from retention.domain.records import record_types_of
from retention.domain.statuses import Action, Status
from retention.progress import Progress
from retention.systems.base import Outcome, Recheck, outcomes_as_they_arrive
from retention.systems.newsletter.audiences import Audiences, hash_bytes, hash_text
from retention.systems.newsletter.client import MailchimpClient, text_array

log = logging.getLogger("retention")

MEMBER_FIELDS = ("id", "email_address", "status", "last_changed", "timestamp_signup")
CURSOR_VERSION = 1  # of the change cursor's JSON (extract_changes)


def _text(values: list | pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    if isinstance(values, (pa.Array, pa.ChunkedArray)) and values.type == pa.string():
        return values
    return text_array(values)  # a value that is not a string is kept as text


def _parse_times(values: list) -> pd.Series:
    # Mailchimp sends "" for a timestamp it does not have; that and anything unparsable (or
    # impossible, like 30 February) become NaT, and the plan step quarantines the record.
    text = _text(values)
    text = pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)
    try:  # Arrow's strict ISO 8601 cast, several times faster than pandas' parser
        return pd.Series(text.cast(pa.timestamp("us", tz="UTC")).to_pandas())
    except pa.ArrowInvalid:  # something malformed in this chunk: parse it value by value
        parsed = pd.to_datetime(text.to_pylist(), utc=True, errors="coerce", format="ISO8601")
        return pd.Series(parsed).dt.as_unit("us")


def members_frame(columns: dict[str, list | pa.Array | pa.ChunkedArray]) -> pd.DataFrame:
    """Member columns (as ``MailchimpClient.iter_member_columns`` or ``iter_member_arrays``
    yields them) as the extract frame.

    The e-mail address is reduced to whether there is one; the address itself goes no further.
    """
    has_email = pc.fill_null(pc.match_substring(_text(columns["email_address"]), "@"), False)
    return pd.DataFrame(
        {
            "record_id": pd.Series(_text(columns["id"]), dtype="string"),
            "status": pd.Series(_text(columns["status"]), dtype="string"),
            "last_changed": _parse_times(columns["last_changed"]),
            "timestamp_signup": _parse_times(columns["timestamp_signup"]),
            "has_email": has_email.to_numpy(zero_copy_only=False),
        }
    )


def _mailchimp_time(at: datetime) -> str:
    """A time as Mailchimp's parameters take it, to the whole second, e.g. 2026-11-20T12:00:00+00:00
    (rounded down: asking from a little earlier lists more, never less)."""
    return pd.Timestamp(at).tz_convert("UTC").floor("s").to_pydatetime().isoformat()


def _cursor_times(cursor: str | None, list_ids: Sequence[str]) -> dict[str, datetime]:
    """The time per audience a cursor from ``extract_changes`` holds (none for None); a
    ``ValueError`` in one line for anything this adapter did not write."""
    if cursor is None:
        return {}
    wrong = ValueError(
        "newsletter: the change cursor is not one this adapter wrote; read everything (no cursor) to start a new one"
    )
    try:
        data = json.loads(cursor)
        if not isinstance(data, dict) or data.get("v") != CURSOR_VERSION or not isinstance(data.get("since"), dict):
            raise wrong
        times = {}
        for list_id, text in data["since"].items():
            at = datetime.fromisoformat(text)
            if at.tzinfo is None:
                raise wrong
            times[str(list_id)] = at
    except (ValueError, TypeError):
        raise wrong from None
    # An audience the Connection no longer names is left out; one it names anew is read whole.
    return {list_id: at for list_id, at in times.items() if list_id in list_ids}


def _status(outcome: str) -> Status:
    # The client says "erased", "already_gone" or "failed..." (with the reason after it).
    return Status(outcome) if outcome in (Status.ERASED, Status.ALREADY_GONE) else Status.FAILED


class NewsletterAdapter:
    system = "newsletter"
    # How much earlier than the cursor a change read asks from (see ``extract_changes``).
    cursor_overlap = timedelta(seconds=60)
    record_types = tuple(record_types_of("newsletter"))
    erase_batch = 1000
    chunk_rows = 50_000

    def __init__(
        self, client: MailchimpClient, list_ids: str | Sequence[str] | None = None, log_every: int = 50, *, list_id: str | None = None
    ):
        ids = list_ids if list_ids is not None else list_id
        self.client = client
        self.audiences = Audiences([ids] if isinstance(ids, str) else ids)
        self.list_id = self.audiences.first
        self.log_every = log_every

    def extract(self, write, now: datetime) -> None:
        # Why every status is read, not only those the newsletter rules can match (Mailchimp's
        # ``status`` filter, the rest counted by ``total_items``): quarantine judges every member,
        # whatever its status (a subscribed member without an address, with no readable or a
        # future ``last_changed``, or listed twice is quarantined and counted), and validation
        # and the plan guard count the same rows; several filtered listings, each at its own
        # instant, would also disagree with their counts when a member changes status between
        # them. Filtered, the quarantine and the guard's counts would no longer be those of the
        # full read. The change feed takes no status filter either: a member leaving the
        # candidates (subscribing again) is a change the index must see.
        total = sum(self.client.total_members(list_id) for list_id in self.audiences.list_ids)
        self._read(write, dict.fromkeys(self.audiences.list_ids), total)

    def extract_changes(self, write, now: datetime, cursor: str | None) -> str:
        """Members changed since ``cursor`` in every audience (everything when it is None, or for
        an audience the cursor does not know yet), in the frames ``extract`` gives; the new cursor.

        Mailchimp lists them by ``since_last_changed`` on the very listing the full read pages
        through (same fields, no status filter), so a changed member comes in the row the full
        read gives it. ``last_changed`` moves with every change to a member, its status
        included; archiving (``DELETE``) keeps the member, listed with status ``archived`` and a
        new ``last_changed``, in this feed as in the full read. A member erased for good
        (``delete-permanent``, ours or anyone's) is no longer listed at all, nor anywhere else in
        the API: this feed cannot report it gone (``newsletter_member:gone`` is never written);
        the full reconciliation finds it missing.

        The cursor holds, per audience, Mailchimp's clock before the read began (``client.clock``):
        every change after it has a ``last_changed`` at or after it. The next read asks from
        ``cursor_overlap`` earlier, since Mailchimp keeps and compares whole seconds (a change in
        the cursor's own second must not be lost) and its servers' clocks may differ a little;
        what changed within the overlap is read twice, which is harmless.
        """
        since = _cursor_times(cursor, self.audiences.list_ids)
        started = self.client.clock()  # before any page: nothing changed later is missed
        reads = {
            list_id: None if since.get(list_id) is None else since[list_id] - self.cursor_overlap
            for list_id in self.audiences.list_ids
        }
        total = None
        if all(at is None for at in reads.values()):  # the whole of every audience, as extract reads it
            total = sum(self.client.total_members(list_id) for list_id in self.audiences.list_ids)
        self._read(write, reads, total)
        return json.dumps(
            {"v": CURSOR_VERSION, "since": {list_id: started.isoformat() for list_id in self.audiences.list_ids}},
            separators=(",", ":"),
        )

    def _read(self, write, since: dict[str, datetime | None], total: int | None) -> None:
        """Every audience's members (those changed since ``since[list_id]`` where it is a time)."""
        changes = any(at is not None for at in since.values())
        label = "newsletter: reading members changed since the last read" if changes else "newsletter: reading members"
        progress = Progress(log, label, total=total)
        # Pages (as Arrow arrays) are gathered into chunks: building a frame costs about as much
        # for a thousand members as for tens of thousands.
        chunk: dict[str, list[pa.Array]] = {f: [] for f in MEMBER_FIELDS}
        rows = 0

        def flush() -> None:
            write("newsletter_member", members_frame({f: pa.chunked_array(parts, pa.string()) for f, parts in chunk.items()}))

        for list_id in self.audiences.list_ids:
            at = since.get(list_id)
            since_text = None if at is None else _mailchimp_time(at)
            for page in self.client.iter_member_arrays(list_id, fields=MEMBER_FIELDS, since_last_changed=since_text):
                page["id"] = self.audiences.record_id_array(list_id, page["id"])
                for f in MEMBER_FIELDS:
                    chunk[f].append(page[f])
                rows += len(page["id"])
                progress.add(len(page["id"]))
                if rows >= self.chunk_rows:
                    flush()
                    chunk, rows = {f: [] for f in MEMBER_FIELDS}, 0
        if rows:
            flush()
        progress.finish()

    def find_person(self, email: str) -> dict[str, pd.DataFrame]:
        """The person's member in every audience (its id there is the address's subscriber hash)."""
        subscriber_hash = self.client.subscriber_hash(email)
        found = []
        for list_id in self.audiences.list_ids:
            member = self.client.get_member(list_id, subscriber_hash, fields=MEMBER_FIELDS[:1] + MEMBER_FIELDS[2:])
            if member is not None:
                found.append({**member, "id": self.audiences.record_id(list_id, member.get("id") or subscriber_hash)})
        columns = {f: [m.get(f) for m in found] for f in MEMBER_FIELDS}
        columns["email_address"] = ["@"] * len(found)  # found by its address: it has one
        return {"newsletter_member": members_frame(columns)}

    def erase(
        self, record_type: str, action: str, record_ids: Sequence[str], recheck: Recheck | None = None
    ) -> Iterator[Outcome]:
        if record_type != "newsletter_member" or action != Action.ERASE:
            raise ValueError(f"newsletter cannot {action} {record_type}")
        groups, unknown = self.audiences.by_audience(record_ids)
        if unknown:  # planned under a Connection that named another audience: not erased from a guess
            log.warning("newsletter: %d members of an audience the Connection no longer names were not erased", len(unknown))
            for rid in unknown:
                yield rid, Status.FAILED
        for list_id, members in groups.items():
            hashes = list(members)
            if recheck is not None:
                # Right before this audience's part of the batch: its members that changed since the
                # plan's extract (Mailchimp lists them by since_last_changed), judged by the domain.
                changed = self._changed_since(list_id, recheck.since, members)
                left = recheck.leave_alone(changed) if len(changed) else {}
                for rid in left:
                    yield rid, Status.DEFERRED
                hashes = [h for h in hashes if members[h] not in left]
            yield from outcomes_as_they_arrive(self._erasing(list_id, members, hashes), _status)

    def _erasing(self, list_id: str, members: dict[str, str], hashes: list[str]):
        """The client call that erases ``hashes`` from ``list_id``, reporting by record id."""

        def call(on_result) -> None:
            self.client.delete_permanent_many(list_id, hashes, on_result=lambda sh, outcome: on_result(members[sh], outcome))

        return call

    def _changed_since(self, list_id: str, since: datetime, wanted: dict[str, str]) -> pd.DataFrame:
        chunk: dict[str, list] = {f: [] for f in MEMBER_FIELDS}
        # A second earlier than the extract (Mailchimp compares whole seconds): lists more, never less.
        since_text = (pd.Timestamp(since).floor("s") - pd.Timedelta(seconds=1)).isoformat()
        for page in self.client.iter_member_columns(list_id, fields=MEMBER_FIELDS, since_last_changed=since_text):
            for i, h in enumerate(page["id"]):
                if h in wanted:
                    for f in MEMBER_FIELDS:
                        chunk[f].append(wanted[h] if f == "id" else page[f][i])
        return members_frame(chunk)

    # Ids verified at a time (the engine's batch for the system): a large check is one pass over
    # the whole list, so a batch this size keeps it to one pass up to 200,000 erasures. The
    # engine holds them as Arrow texts and ``still_present`` as sorted bytes: about 50 bytes an
    # id, 10 MB at the most.
    verify_batch = 200_000

    def still_present(self, record_type: str, record_ids: Sequence[str]) -> set[str]:
        present: set[str] = set()
        # Ids of no audience of ours are left out: not found in ours.
        for list_id, (hashes, positions) in self.audiences.sorted_hashes(record_ids).items():
            if len(hashes) < 2000:
                found = self.client.exists_many(list_id, [hash_text(h) for h in hashes])
                present.update(record_ids[int(p)] for h, p in zip(hashes, positions, strict=True) if found.get(hash_text(h)))
                continue
            # Many ids: one pass over the list's ids is far fewer requests than one GET per id;
            # each page's ids are looked up in the sorted hashes.
            for page in self.client.iter_member_pages(list_id, fields=("id",)):
                if not page:
                    continue
                listed = np.array([hash_bytes(str(m["id"])) for m in page], dtype=bytes)
                at = np.minimum(np.searchsorted(hashes, listed), len(hashes) - 1)
                present.update(record_ids[int(positions[i])] for i in at[hashes[at] == listed])
        return present

    def close(self) -> None:
        self.client.close()
