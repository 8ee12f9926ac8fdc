"""What every part of the Zendesk stand-in shares: the record codes, the packed export keys,
times as text and the API's error answer.

Ticket statuses are ``zendesk_data.STATUS_CODE`` plus ``GONE`` (permanently deleted); users are
``ACTIVE``, ``SOFT_DELETED`` or ``USER_GONE``. The incremental exports run in ``(updated_at, id)``
order, packed into one int: ``updated_at << SHIFT | (row + 1)``.
"""

from __future__ import annotations

import time

import numpy as np

from retention_dev.standins import zendesk_data as zd

DELETED = zd.STATUS_CODE["deleted"]  # soft-deleted
GONE = DELETED + 1  # permanently deleted
CLOSED = zd.STATUS_CODE["closed"]
ACTIVE, SOFT_DELETED, USER_GONE = 0, 1, 2
SHIFT = 32
LOW = (1 << SHIFT) - 1


def iso(ts: int) -> str | None:
    if ts is None or ts < 0:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(ts)))


def iso_many(ts: np.ndarray) -> list[str | None]:
    """:func:`iso` for a whole column at once (an export page)."""
    ts = np.asarray(ts, dtype=np.int64)
    text = np.datetime_as_string(np.maximum(ts, 0).astype("datetime64[s]"), unit="s").tolist()
    return [None if t < 0 else f"{x}Z" for t, x in zip(ts.tolist(), text, strict=True)]


class ApiError(Exception):
    def __init__(self, status: int, error: str, description: str = "", headers: dict | None = None, details=None):
        super().__init__(error)
        self.status = status
        self.body = {"error": error, "description": description or error}
        if details is not None:
            self.body["details"] = details
        self.headers = headers or {}
