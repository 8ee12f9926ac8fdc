"""The CRM (a SQL database through SQLAlchemy) as a ``SourceSystem``.

Children are erased before the contacts they belong to; a contact that still has invoices is
minimised (the person goes, the invoice keeps what bookkeeping law needs). The connector
checks the manual hold list again inside each erasing transaction, so a hold added after the
plan was made still stops the erasure.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime

from retention.systems.crm.client import CrmConnector
from retention.progress import Progress

log = logging.getLogger("retention")

# The connector's outcomes in the pipeline's terms.
_OUTCOMES = {
    "erased": "erased",
    "minimised": "erased",
    "already_gone": "already_gone",
    "held_legal_hold": "held",
    "held_invoice": "deferred",  # an invoice appeared after the plan: minimise on the next run
}


class CrmAdapter:
    system = "crm"
    record_types = ("crm_event_participation", "crm_course_registration", "crm_survey_response", "crm_invoice", "crm_contact")
    erase_batch = 50_000

    def __init__(self, connector: CrmConnector):
        self.connector = connector

    def extract(self, write, now: datetime) -> None:
        for record_type in (*self.record_types, "crm_legal_hold"):
            progress = Progress(log, f"crm: reading {record_type}")
            target = "legal_hold" if record_type == "crm_legal_hold" else record_type
            for frame in self.connector.iter_frames(record_type, now=now):
                frame = frame.assign(record_id=frame["record_id"].astype("string"))
                write(target, frame)
                progress.add(len(frame))
            progress.finish()

    def erase(self, record_type: str, action: str, record_ids: Sequence[str]) -> dict[str, str]:
        ids = [int(i) for i in record_ids]
        if action == "minimise":
            if record_type != "crm_contact":
                raise ValueError(f"only contacts are minimised, not {record_type}")
            result = self.connector.minimise_contacts(ids)
        elif action == "erase":
            result = self.connector.erase(record_type, ids)
        else:
            raise ValueError(f"unknown action {action!r}")
        return {str(i): _OUTCOMES.get(result.get(i, "failed"), "failed") for i in ids}

    def still_present(self, record_type: str, record_ids: Sequence[str]) -> set[str]:
        present = set()
        ids = [int(i) for i in record_ids]
        for start in range(0, len(ids), 10_000):
            present |= {str(i) for i in self.connector.existing(record_type, ids[start : start + 10_000])}
        return present

    def close(self) -> None:
        self.connector.engine.dispose()
