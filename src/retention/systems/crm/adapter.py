"""The CRM (a SQL database through SQLAlchemy) as a ``SourceSystem``.

Children are erased before the contacts they belong to (the domain's order); a contact planned
``minimise`` keeps its invoices, detached (the person goes, the invoice keeps what bookkeeping
law needs). The connector checks the manual hold list again inside each erasing transaction,
so a hold added after the plan was made still stops the erasure.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from datetime import datetime
from itertools import repeat

import pandas as pd

from retention.domain.candidates import candidates
from retention.domain.conform import conform
from retention.domain.policy import Policy
from retention.domain.records import SOURCE_HOLDS, record_types_of
from retention.domain.statuses import Action, Status
from retention.progress import Progress
from retention.systems.base import Outcome, Recheck
from retention.systems.crm.client import CrmConnector

log = logging.getLogger("retention")

# The connector's outcomes in the ledger's terms.
_OUTCOMES = {
    "erased": Status.ERASED,
    "minimised": Status.ERASED,
    "already_gone": Status.ALREADY_GONE,
    "held_legal_hold": Status.HELD,
    "held_invoice": Status.DEFERRED,  # an invoice appeared after the plan: minimise on the next run
    "changed_since_plan": Status.DEFERRED,  # the run's check of the current state left it alone
}


def _keyed(frame: pd.DataFrame) -> pd.DataFrame:
    """Ids as the ledger and plans name them (text)."""
    return frame.assign(**{c: frame[c].astype("string") for c in ("record_id", "contact_id") if c in frame})


class CrmAdapter:
    system = "crm"
    record_types = tuple(record_types_of("crm"))
    erase_batch = 50_000

    def __init__(self, connector: CrmConnector):
        self.connector = connector

    # The nightly run may hand ``extract`` its policy: the CRM then reads only the candidates.
    narrows_extract = True

    def extract(
        self, write, now: datetime, *, policy: Policy | None = None, as_of: datetime | None = None, full: bool = False
    ) -> dict[str, int] | None:
        """Stream the records to ``write``: every record (no ``policy``, or ``full``, the
        reconciliation's whole read), or only the candidates of a plan under ``policy`` as of
        ``as_of`` (default ``now``; any earlier as-of is covered too), the rows the domain's
        ``candidates`` names, selected by the database. Narrowed, returns how many records
        each record type has in all (``COUNT(*)``), which is what the plan-size guard weighs
        the plan against; whole, None (the rows written are all there are)."""
        narrowed = policy is not None and not full
        totals: dict[str, int] = {}
        for record_type in (*self.record_types, "crm_legal_hold"):
            target = SOURCE_HOLDS if record_type == "crm_legal_hold" else record_type
            condition = None
            if narrowed and record_type != "crm_legal_hold":  # the hold list is read whole: it is small
                condition = candidates(record_type, policy, as_of or now, now)
                totals[target] = self.connector.count_rows(record_type, now=now)
            progress = Progress(log, f"crm: reading {record_type}" + (" (candidates)" if condition is not None else ""))
            read = 0
            for frame in self.connector.iter_frames(record_type, now=now, candidates=condition):
                write(target, frame.assign(record_id=frame["record_id"].astype("string")))
                progress.add(len(frame))
                read += len(frame)
            progress.finish()
            if narrowed:
                totals.setdefault(target, read)
                if condition is not None:
                    log.info("crm extract %s: %d candidate rows of %d", record_type, read, totals[target])
        return totals if narrowed else None

    def find_person(self, email: str) -> dict[str, pd.DataFrame]:
        """The contacts with this address and what belongs to them: children and invoices (with
        their contact), the number of notes per contact (notes go with their contact), and the
        CRM's hold list."""
        # A database error must not print the address it was given.
        self.connector.engine.hide_parameters = True
        contacts = self.connector.find_contact_ids_by_email(email)
        owned = {rt: _keyed(f) for rt, f in self.connector.contact_records(contacts).items()}
        owned["crm_contact"] = pd.DataFrame({"record_id": pd.Series([str(c) for c in contacts], dtype="string")})
        owned[SOURCE_HOLDS] = self.connector.read_frame("crm_legal_hold")
        return owned

    def erase(
        self, record_type: str, action: str, record_ids: Sequence[str], recheck: Recheck | None = None
    ) -> Iterator[Outcome]:
        ids = [int(i) for i in record_ids]
        extra = {"recheck": self._check(record_type, recheck)} if recheck else {}
        if action == Action.ERASE and recheck is not None and recheck.surely_due is not None:
            extra["surely_due"] = recheck.surely_due
        if action == Action.MINIMISE:
            if record_type != "crm_contact":
                raise ValueError(f"only contacts are minimised, not {record_type}")
            result = self.connector.minimise_contacts(ids, **extra)
        elif action == Action.ERASE:
            result = self.connector.erase(record_type, ids, **extra)
        else:
            raise ValueError(f"unknown action {action!r}")
        # One transaction per call: its outcomes are known (and true) once it has committed.
        # Handed on through iterators in C: a generator step per record cost a third of a second
        # for a million.
        status_of = {code: _OUTCOMES.get(code, Status.FAILED) for code in {*result.values(), "failed"}}
        yield from zip(map(str, ids), map(status_of.__getitem__, map(result.get, ids, repeat("failed"))))

    @staticmethod
    def _check(record_type: str, recheck: Recheck):
        """The domain's check, as the connector calls it inside the erasing transaction: on the
        records' current frame (the membership, opt-out and clocks they are judged by)."""

        def check(frame: pd.DataFrame) -> set[int]:
            current = conform(record_type, frame.assign(record_id=frame["record_id"].astype("string")))
            return {int(i) for i in recheck.leave_alone(current)}

        return check

    def still_present(self, record_type: str, record_ids: Sequence[str]) -> set[str]:
        present = set()
        ids = [int(i) for i in record_ids]
        for start in range(0, len(ids), 10_000):
            present |= {str(i) for i in self.connector.existing(record_type, ids[start : start + 10_000])}
        return present

    def close(self) -> None:
        self.connector.engine.dispose()
