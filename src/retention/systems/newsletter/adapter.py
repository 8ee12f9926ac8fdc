"""The newsletter provider (Mailchimp Marketing API v3) as a ``SourceSystem``.

Members are keyed by ``subscriber_hash``. E-mail addresses are fetched only to check that a
member has one, and dropped at once: nothing downstream of the extract sees them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from datetime import datetime

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from retention.domain.records import record_types_of
from retention.domain.statuses import Action, Status
from retention.progress import Progress
from retention.systems.base import Outcome, Recheck, outcomes_as_they_arrive
from retention.systems.newsletter.client import MailchimpClient

log = logging.getLogger("retention")

MEMBER_FIELDS = ("id", "email_address", "status", "last_changed", "timestamp_signup")


def _text(values: list) -> pa.Array:
    try:
        return pa.array(values, type=pa.string())
    except (pa.ArrowTypeError, pa.ArrowInvalid):  # a value that is not a string: keep it as text
        return pa.array([None if v is None else str(v) for v in values], type=pa.string())


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


def members_frame(columns: dict[str, list]) -> pd.DataFrame:
    """Member columns (as ``MailchimpClient.iter_member_columns`` yields them) as the extract frame.

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


def _status(outcome: str) -> Status:
    # The client says "erased", "already_gone" or "failed..." (with the reason after it).
    return Status(outcome) if outcome in (Status.ERASED, Status.ALREADY_GONE) else Status.FAILED


class NewsletterAdapter:
    system = "newsletter"
    record_types = tuple(record_types_of("newsletter"))
    erase_batch = 1000
    chunk_rows = 50_000

    def __init__(self, client: MailchimpClient, list_id: str, log_every: int = 50):
        self.client = client
        self.list_id = list_id
        self.log_every = log_every

    def extract(self, write, now: datetime) -> None:
        total = self.client.total_members(self.list_id)
        progress = Progress(log, "newsletter: reading members", total=total)
        # Pages are gathered into chunks: building a frame costs about as much for a thousand
        # members as for tens of thousands.
        chunk: dict[str, list] = {f: [] for f in MEMBER_FIELDS}
        for page in self.client.iter_member_columns(self.list_id, fields=MEMBER_FIELDS):
            for f in MEMBER_FIELDS:
                chunk[f] += page[f]
            progress.add(len(page["id"]))
            if len(chunk["id"]) >= self.chunk_rows:
                write("newsletter_member", members_frame(chunk))
                chunk = {f: [] for f in MEMBER_FIELDS}
        if chunk["id"]:
            write("newsletter_member", members_frame(chunk))
        progress.finish()

    def find_person(self, email: str) -> dict[str, pd.DataFrame]:
        """The member with this address (its id is the address's subscriber hash), if any."""
        member = self.client.get_member(self.list_id, self.client.subscriber_hash(email), fields=MEMBER_FIELDS[:1] + MEMBER_FIELDS[2:])
        found = [member] if member is not None else []
        columns = {f: [m.get(f) for m in found] for f in MEMBER_FIELDS}
        columns["email_address"] = ["@"] * len(found)  # found by its address: it has one
        return {"newsletter_member": members_frame(columns)}

    def erase(
        self, record_type: str, action: str, record_ids: Sequence[str], recheck: Recheck | None = None
    ) -> Iterator[Outcome]:
        if record_type != "newsletter_member" or action != Action.ERASE:
            raise ValueError(f"newsletter cannot {action} {record_type}")
        hashes = list(record_ids)
        if recheck is not None:
            # Right before the batch: the members of it that changed since the plan's extract
            # (Mailchimp lists them by since_last_changed), judged by the domain.
            changed = self._changed_since(recheck.since, set(hashes))
            left = recheck.leave_alone(changed) if len(changed) else {}
            for h in left:
                yield h, Status.DEFERRED
            hashes = [h for h in hashes if h not in left]
        yield from outcomes_as_they_arrive(
            lambda on_result: self.client.delete_permanent_many(self.list_id, hashes, on_result=on_result), _status
        )

    def _changed_since(self, since: datetime, wanted: set[str]) -> pd.DataFrame:
        chunk: dict[str, list] = {f: [] for f in MEMBER_FIELDS}
        # A second earlier than the extract (Mailchimp compares whole seconds): lists more, never less.
        since_text = (pd.Timestamp(since).floor("s") - pd.Timedelta(seconds=1)).isoformat()
        for page in self.client.iter_member_columns(self.list_id, fields=MEMBER_FIELDS, since_last_changed=since_text):
            for i, h in enumerate(page["id"]):
                if h in wanted:
                    for f in MEMBER_FIELDS:
                        chunk[f].append(page[f][i])
        return members_frame(chunk)

    def still_present(self, record_type: str, record_ids: Sequence[str]) -> set[str]:
        wanted = set(record_ids)
        if len(wanted) < 2000:
            return {h for h, exists in self.client.exists_many(self.list_id, wanted).items() if exists}
        # Many ids: one pass over the list's ids is far fewer requests than one GET per id.
        present = set()
        for page in self.client.iter_member_pages(self.list_id, fields=("id",)):
            present.update(m["id"] for m in page if m["id"] in wanted)
        return present

    def close(self) -> None:
        self.client.close()
