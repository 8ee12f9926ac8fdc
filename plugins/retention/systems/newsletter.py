"""The newsletter provider (Mailchimp Marketing API v3) as a ``SourceSystem``.

Members are keyed by ``subscriber_hash``. E-mail addresses are fetched only to check that a
member has one, and dropped at once: nothing downstream of the extract sees them.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import pandas as pd

from retention.connectors.mailchimp import MailchimpClient

MEMBER_FIELDS = ("id", "email_address", "status", "last_changed", "timestamp_signup")


def _parse_times(values: pd.Series) -> pd.Series:
    # Mailchimp sends "" for a timestamp it does not have; anything unparsable becomes NaT
    # and the record is quarantined by the plan step.
    return pd.to_datetime(values.replace("", None), utc=True, errors="coerce", format="ISO8601")


def members_frame(members: list[dict]) -> pd.DataFrame:
    raw = pd.DataFrame.from_records(members, columns=list(MEMBER_FIELDS))
    email = raw["email_address"].astype("string")
    return pd.DataFrame(
        {
            "record_id": raw["id"].astype("string"),
            "status": raw["status"].astype("string"),
            "last_changed": _parse_times(raw["last_changed"]),
            "timestamp_signup": _parse_times(raw["timestamp_signup"]),
            "has_email": email.str.contains("@", regex=False).fillna(False).astype(bool),
        }
    )


class NewsletterAdapter:
    system = "newsletter"
    record_types = ("newsletter_member",)
    erase_batch = 1000

    def __init__(self, client: MailchimpClient, list_id: str, log_every: int = 50):
        self.client = client
        self.list_id = list_id
        self.log_every = log_every

    def extract(self, write, now: datetime) -> None:
        import logging

        from retention.progress import Progress

        total = self.client.total_members(self.list_id)
        progress = Progress(logging.getLogger("retention"), "newsletter: reading members", total=total)
        for page in self.client.iter_member_pages(self.list_id, fields=MEMBER_FIELDS):
            write("newsletter_member", members_frame(page))
            progress.add(len(page))
        progress.finish()

    def erase(self, record_type: str, action: str, record_ids: Sequence[str]) -> dict[str, str]:
        if record_type != "newsletter_member" or action != "erase":
            raise ValueError(f"newsletter cannot {action} {record_type}")
        outcomes = self.client.delete_permanent_many(self.list_id, list(record_ids))
        return {h: ("failed" if o.startswith("failed") else o) for h, o in outcomes.items()}

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
