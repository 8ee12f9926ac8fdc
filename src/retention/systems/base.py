"""The small interface every source system implements for the pipeline."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Protocol

import pandas as pd

Write = Callable[[str, pd.DataFrame], None]

# What an erasure of one record can come to. "deferred": the system says not yet (a Zendesk
# user still requester of an open ticket); the next run tries again.
OUTCOMES = ("erased", "already_gone", "failed", "deferred")


class SourceSystem(Protocol):
    system: str
    # Planning and erasure order: children before parents, tickets before their requesters.
    record_types: tuple[str, ...]
    # How many records one erase() call should get (the provider's batch size); an adapter may
    # also have ``erase_batches``, a mapping record type -> size that overrides it per type.
    erase_batch: int

    def extract(self, write: Write, now: datetime) -> None:
        """Stream every record of every record type to ``write`` in frames (record_id + columns)."""

    def erase(self, record_type: str, action: str, record_ids: Sequence[str]) -> dict[str, str]:
        """Erase (or minimise) the records; one outcome per id from OUTCOMES. Idempotent."""

    def still_present(self, record_type: str, record_ids: Sequence[str]) -> set[str]:
        """Which of these ids the system still holds (for verification)."""

    def close(self) -> None: ...


def batch_size(adapter: SourceSystem, record_type: str) -> int:
    """Records per ``erase()`` call for this record type."""
    return getattr(adapter, "erase_batches", {}).get(record_type, adapter.erase_batch)


def derive_frame(adapter: SourceSystem, record_type: str, frame: pd.DataFrame, plan_so_far: pd.DataFrame) -> pd.DataFrame:
    """Let an adapter complete a frame from the plan of the record types before it."""
    hook = getattr(adapter, "derive_frame", None)
    return hook(record_type, frame, plan_so_far) if hook else frame
