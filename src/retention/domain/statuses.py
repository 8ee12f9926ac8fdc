"""The words a plan and the ledger use, as enums: what a plan does with a record, and how an
erasure of one record ended.

They are ``StrEnum``s: a member compares equal to its value, so the ledger, staging files and
reports keep storing plain text, and code never spells the text itself.
"""

from __future__ import annotations

from enum import StrEnum


class Action(StrEnum):
    """What a plan does with one record."""

    ERASE = "erase"
    # The person goes, what a legal hold keeps stays (a contact whose invoices are still under
    # the bookkeeping period: the invoices keep their legal fields, detached from the person).
    MINIMISE = "minimise"
    # Kept: a legal hold (manual, or the law's) says so. Erases nothing; recorded as held.
    HOLD = "hold"
    # Not yet: the record is protected for now (an unsolved ticket in an erasure request) and
    # is tried again by a later run. Erases nothing; recorded as deferred.
    DEFER = "defer"


# The actions that touch the system.
DESTRUCTIVE = (Action.ERASE, Action.MINIMISE)


class Status(StrEnum):
    """A ledger entry's status: planned before the system is touched, then how it ended."""

    PLANNED = "planned"
    # Handed to the system, its answer not yet booked: a task killed now leaves this, and its
    # retry books a record it then finds gone as erased by this run, not as already gone.
    SUBMITTED = "submitted"
    ERASED = "erased"
    # The record was not there any more: success (erasure is idempotent).
    ALREADY_GONE = "already_gone"
    FAILED = "failed"
    HELD = "held"
    # The system or a dependency said "not yet" (a requester of an unclosed ticket, a ticket
    # reopened since the plan, an invoice that appeared since): a later run tries again.
    DEFERRED = "deferred"
    # Still due, not reached within the erase step's time budget (``RETENTION_ERASE_BUDGET``):
    # nothing was sent for it; the next run plans it again and takes it before anything new.
    CARRIED_OVER = "carried_over"


# An entry in one of these is finished: a resumed task does not touch its record again.
DONE = (Status.ERASED, Status.ALREADY_GONE, Status.HELD)
# Not finished and not erased as far as the ledger knows: a flow reports these as unfinished.
UNFINISHED = (Status.PLANNED, Status.SUBMITTED, Status.FAILED)
# The record no longer exists in its system.
GONE = (Status.ERASED, Status.ALREADY_GONE)

# The status an action is recorded with before (or instead of) touching the system.
STATUS_BEFORE = {
    Action.ERASE: Status.PLANNED,
    Action.MINIMISE: Status.PLANNED,
    Action.HOLD: Status.HELD,
    Action.DEFER: Status.DEFERRED,
}

# How a dry run names what it would do: the counts a dry run and a real run report line up.
WOULD = {Action.ERASE: "would_erase", Action.MINIMISE: "would_erase", Action.HOLD: "would_keep", Action.DEFER: "would_defer"}
