"""The port every source system sits behind, and the registry that builds an adapter.

Runs reach a system only through a ``SourceSystem``: they never call a hook or a client. An
adapter speaks its system's API through its client and delivers frames in the domain's record
schema (``retention.domain.records``); it makes no rule decision of its own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, runtime_checkable

import pandas as pd

from retention.domain.candidates import Condition
from retention.domain.records import SYSTEMS
from retention.domain.statuses import Status

Write = Callable[[str, pd.DataFrame], None]
Outcome = tuple[str, Status]


@dataclass(frozen=True)
class Recheck:
    """What an adapter does right before each destructive call: read the current state of the
    records it is about to erase and leave alone (yield ``deferred`` for) those the domain says
    may no longer be erased as planned (``surely_due``: those it surely lets go, as a condition).

    ``since``: when the plan's extract was read (a system that can list what changed since, as
    Mailchimp can, reads only that). ``leave_alone(current)``: current records (record_id and the
    schema's columns) -> {record_id: why}; the decision is the domain's, not the adapter's.
    """

    since: datetime
    leave_alone: Callable[[pd.DataFrame], dict[str, str]]
    # The domain's ``surely_due`` for the batch's record type (None: none): a system that can
    # evaluate it where the records are (the CRM, in its DELETE) may let go what it is true of
    # without reading and judging those records; ``leave_alone`` judges the rest.
    surely_due: Condition | None = None


class SourceSystem(Protocol):
    system: str
    # Erasure order: children before the records they belong to, tickets before requesters
    # (the domain's order: ``records.record_types_of(system)``).
    record_types: tuple[str, ...]
    # How many records one erase() call should get (the provider's batch size); an adapter may
    # also have ``erase_batches``, a mapping record type -> size that overrides it per type.
    erase_batch: int

    def extract(self, write: Write, now: datetime) -> None:
        """Stream every record of every record type to ``write`` in frames of the domain's schema."""

    def find_person(self, email: str) -> dict[str, pd.DataFrame]:
        """Every record of the person with this (normalised) address, by record type, in the
        domain's schema, plus the system's own hold list under ``"legal_hold"`` where it has one.
        The address is used for the look-up only: never logged, never in a frame."""

    def erase(
        self, record_type: str, action: str, record_ids: Sequence[str], recheck: Recheck | None = None
    ) -> Iterator[Outcome]:
        """Erase (or minimise) the records, yielding ``(record_id, Status)`` as each outcome is
        known: erased, already_gone (success), held (a hold the system itself keeps), deferred
        (the system says not yet, or ``recheck`` left it alone) or failed. Idempotent. With
        ``recheck``, the current state of the records is read right before each destructive
        call (for a database, inside the erasing transaction) and judged by it."""

    def still_present(self, record_type: str, record_ids: Sequence[str]) -> set[str]:
        """Which of these ids the system still holds (for verification)."""

    def close(self) -> None: ...


@runtime_checkable
class ChangeFeed(Protocol):
    """An adapter that can read only what changed since a cursor (besides ``extract``). The
    nightly extract keeps the system's records in the ledger's record index and reads through
    this from the stored cursor; after a full read (the first night, a reconciliation) the
    nightly index step rebuilds it from the staged records and stores the new cursor."""

    def extract_changes(self, write: Write, now: datetime, cursor: str | None) -> str:
        """cursor None: read everything (as `extract` does). Otherwise read only what changed
        since `cursor` (an opaque string this adapter returned last time). Calls
        write(record_type, frame) for new/changed records in the domain's schema (exactly the
        frames `extract` would give for those records), and write(f"{record_type}:gone", frame)
        with a single `record_id` column (string) for records the system reports as gone
        (permanently deleted). Returns the new cursor. The cursor must be conservative: reading
        a record twice is harmless, missing one is not (overlap a little where the API compares
        coarse times)."""


def batch_size(adapter: SourceSystem, record_type: str) -> int:
    """Records per ``erase()`` call for this record type."""
    return getattr(adapter, "erase_batches", {}).get(record_type, adapter.erase_batch)


def adapter_for(system: str) -> SourceSystem:
    """The adapter for a system, built from its Airflow Connection (task run time only)."""
    if system == "newsletter":
        from retention.systems.newsletter.adapter import NewsletterAdapter
        from retention.systems.newsletter.hook import MailchimpHook

        hook = MailchimpHook()
        return NewsletterAdapter(hook.get_conn(), hook.list_ids)
    if system == "crm":
        from retention.systems.crm.adapter import CrmAdapter
        from retention.systems.crm.hook import CrmHook

        return CrmAdapter(CrmHook().get_conn())
    if system == "ticketing":
        from retention.systems.ticketing.adapter import TicketingAdapter
        from retention.systems.ticketing.hook import ZendeskHook

        return TicketingAdapter(ZendeskHook().get_conn())
    raise ValueError(f"unknown system {system!r}; known: {', '.join(SYSTEMS)}")


_END = object()


def outcomes_as_they_arrive(call: Callable[[Callable[[object, str], None]], object], status: Callable[[str], Status]) -> Iterator[Outcome]:
    """Turn a client call that reports each outcome through a callback (``on_result(id, outcome)``,
    from any thread) into a stream of ``(record_id, Status)`` read in the caller's thread, so the
    erasure engine can book each outcome in the ledger as it arrives, not when a call of a
    hundred thousand records returns. An error of the call is raised after the outcomes before it."""
    import queue
    import threading

    arrived: queue.SimpleQueue = queue.SimpleQueue()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            call(lambda record_id, outcome: arrived.put((str(record_id), status(outcome))))
        except BaseException as exc:  # noqa: BLE001 - handed to the reading thread
            failure.append(exc)
        finally:
            arrived.put(_END)

    worker = threading.Thread(target=run, name="erase-call", daemon=True)
    worker.start()
    while (item := arrived.get()) is not _END:
        yield item
    worker.join()
    if failure:
        raise failure[0]
