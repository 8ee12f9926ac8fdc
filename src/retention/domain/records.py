"""The record types the policy can name: one schema each, used by every path.

A record type says which system holds it, its columns and their types (the frame an adapter
delivers, conformed by :func:`conform`), the values an enumerated column can take in its
system, which columns are clocks, which must be present, which values protect a record
whatever the policy says, and how it depends on other records.
Adapters build frames to this schema, the engine judges them, validation checks them, and a
replay reads their own clocks from it. Nothing here holds names or addresses: the frames
carry only what the rules need. (No heavy imports: DAG files read ``SYSTEMS`` at parse time.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

SYSTEMS = ("newsletter", "crm", "ticketing")

# Column kinds, by what they hold, and the dtype each has in a frame. Keys and references are
# text: ids differ per system (subscriber hashes, integers) and are only ever compared, never
# computed with. Clocks are instants in UTC.
KEY, TEXT, FLAG, TIME, COUNT = "key", "text", "flag", "time", "count"
DTYPES = {KEY: "string", TEXT: "string", FLAG: "bool", TIME: "datetime64[us, UTC]", COUNT: "int64"}

# A frame may carry this column: per row, the columns whose stored value could not be read (a
# word that is no boolean, a clock that is no date, an id that is no integer, bytes that are not
# UTF-8), comma-separated, else <NA>. Such a record is quarantined ("unreadable opted_out"),
# never judged on a guess. Adapters add it only when a row has such a value.
UNREADABLE = "unreadable"
# The stored spellings a flag is read from (case and surrounding blanks aside), besides the
# databases' own booleans and the integers 0 and 1. Anything else ('', 'maybe', 2) is unreadable.
FLAG_SPELLINGS = {
    True: frozenset({"true", "t", "yes", "y", "1", "on"}),
    False: frozenset({"false", "f", "no", "n", "0", "off"}),
}
# The instants a stored clock may hold, [from, until). Outside them a clock is a placeholder
# (0001-01-01, 1753-01-01, 1899-12-30, 1900-01-01, 9999-12-31 are common "no date" values) and
# unreadable: a year-0001 end would make a record due at once. Nothing of this organisation's
# records predates 1901, and no real clock lies beyond 2200 (periods are at most 100 years).
CLOCK_RANGE = (datetime(1901, 1, 1, tzinfo=UTC), datetime(2200, 1, 1, tzinfo=UTC))

# The CRM's own list of manual holds (by record id) is extracted beside its records.
SOURCE_HOLDS = "legal_hold"
SOURCE_HOLD_COLUMNS = {"record_type": TEXT, "record_id": KEY, "reason": TEXT, "expires_at": TIME}


@dataclass(frozen=True)
class RecordType:
    name: str
    system: str
    # Column -> kind (KEY, TEXT, FLAG, TIME, COUNT), besides record_id (always KEY).
    columns: dict[str, str]
    clocks: tuple[str, ...]
    # Clocks that record something that already happened: a value after the extract time is
    # malformed data, not a future deadline.
    past_only: tuple[str, ...] = ()
    # Clocks that, stored as a calendar date without a time, name the last day of something (a
    # membership's end, an event, a course's end, a financial year's end): the relationship
    # lasts that whole local day, so the clock is the end of that day in the policy's time
    # zone, i.e. 00:00 of the next (``durations.day_instants``). Any other date clock is the
    # start of its day. Clocks given as instants are taken as they are.
    end_of_day: tuple[str, ...] = ()
    # Columns a record must have (not null) to be judged at all.
    required: tuple[str, ...] = ()
    # Flags a record must have set to be judged at all: column -> quarantine reason.
    must_be_true: dict[str, str] = field(default_factory=dict)
    # Hard protections, enforced in code whatever the policy file says: column -> values. The
    # policy must list each of them too (``protections``), or it is refused.
    protected: dict[str, tuple] = field(default_factory=dict)
    # Records these protections do not cover: column -> values (any column matching lifts
    # them). An active member who asked not to be contacted keeps the membership record, but
    # their event and service participation, kept for marketing, goes (clause 3: opt-out ends
    # marketing use at once). The policy may lift a protection for these records, never more.
    unprotected_when: dict[str, tuple] = field(default_factory=dict)
    # The values an enumerated text column can take in its system: column -> values. A policy
    # value outside them (a typo such as 'unsubscibed') would match no record, so it is
    # refused. Flags take true or false; other columns have no known values.
    values: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # A due record with this flag set is minimised instead of erased, under this legal hold:
    # (flag column, hold). A contact with invoices under the bookkeeping period goes, the
    # invoices keep what bookkeeping law needs.
    minimise_when: tuple[str, str] | None = None
    # The records whose ids are in this column (space-separated) can only be erased once this
    # one is gone: (column, record type). A requester, a CC or a follower goes after the ticket.
    blocks: tuple[str, str] | None = None
    # Columns computed by planning from the record types planned before (not extracted).
    derived: tuple[str, ...] = ()
    # The clocks a record carries of its own (created, last changed in its system): a copy
    # restored from a backup has none later than the erasure it survived.
    own_clocks: tuple[str, ...] = ()

    @property
    def extracted_columns(self) -> dict[str, str]:
        return {c: t for c, t in self.columns.items() if c not in self.derived}

    def known_values(self, column: str) -> tuple | None:
        """The values ``column`` can take, or None when they are not enumerated."""
        if column in self.values:
            return self.values[column]
        if self.columns.get(column) == FLAG:
            return (True, False)
        return None


RECORD_TYPES: dict[str, RecordType] = {
    rt.name: rt
    for rt in (
        RecordType(
            "newsletter_member",
            "newsletter",
            columns={"status": TEXT, "last_changed": TIME, "timestamp_signup": TIME, "has_email": FLAG},
            clocks=("last_changed", "timestamp_signup"),
            past_only=("last_changed", "timestamp_signup"),
            required=("status", "last_changed"),
            must_be_true={"has_email": "no e-mail address"},
            protected={"status": ("subscribed", "transactional")},
            # Mailchimp Marketing API v3, list member ``status``.
            values={"status": ("subscribed", "unsubscribed", "cleaned", "pending", "transactional", "archived")},
            own_clocks=("last_changed", "timestamp_signup"),
        ),
        RecordType(
            "crm_event_participation",
            "crm",
            columns={
                "contact_id": KEY, "event_date": TIME, "membership_active": FLAG, "membership_end": TIME,
                "is_customer": FLAG, "opted_out": FLAG,
            },
            clocks=("event_date", "membership_end"),
            # The event's day is its last; a membership ends with its end date.
            end_of_day=("event_date", "membership_end"),
            required=("event_date",),
            protected={"membership_active": (True,)},
            unprotected_when={"opted_out": (True,)},
            own_clocks=("event_date",),
        ),
        RecordType(
            "crm_course_registration", "crm", columns={"contact_id": KEY, "course_end": TIME}, clocks=("course_end",),
            end_of_day=("course_end",), required=("course_end",), own_clocks=("course_end",),
        ),
        RecordType(
            "crm_survey_response", "crm", columns={"contact_id": KEY, "survey_closed_at": TIME}, clocks=("survey_closed_at",),
            # A timestamp in the reference CRM; a CRM that keeps only the closing day closes at its end.
            end_of_day=("survey_closed_at",), required=("survey_closed_at",), own_clocks=("survey_closed_at",),
        ),
        RecordType(
            "crm_invoice", "crm", columns={"contact_id": KEY, "financial_year_end": TIME}, clocks=("financial_year_end",),
            # The financial year's last day; the invoice rule's alignment counts from the year
            # that day is in (engine: ``next_calendar_year``).
            end_of_day=("financial_year_end",), required=("financial_year_end",), own_clocks=("financial_year_end",),
        ),
        RecordType(
            "crm_contact",
            "crm",
            columns={
                "kind": TEXT, "organisation_id": KEY, "membership_active": FLAG, "membership_end": TIME, "is_customer": FLAG,
                "last_interaction_at": TIME, "opted_out": FLAG, "has_email": FLAG, "created_at": TIME, "has_invoice": FLAG,
            },
            clocks=("membership_end", "last_interaction_at", "created_at"),
            end_of_day=("membership_end",),
            past_only=("last_interaction_at", "created_at"),
            required=("kind",),
            protected={"membership_active": (True,)},
            # The CRM's ``contact.kind`` (crm/schema.py: CHECK kind IN ('member', 'lead')).
            values={"kind": ("member", "lead")},
            minimise_when=("has_invoice", "bookkeeping"),
            own_clocks=("created_at", "last_interaction_at"),
        ),
        RecordType(
            "support_ticket",
            "ticketing",
            # ``cc_ids``: the users CC'd on or following the ticket (Zendesk's collaborator_ids,
            # email_cc_ids, follower_ids), ids only, space-separated: the ticket is a basis for
            # keeping them too. ``party_ids`` (derived): the requester and those, the users
            # who may only be erased once the ticket is gone.
            columns={
                "status": TEXT, "requester_id": KEY, "solved_at": TIME, "created_at": TIME, "updated_at": TIME,
                "cc_ids": TEXT, "party_ids": TEXT,
            },
            clocks=("solved_at", "created_at", "updated_at"),
            past_only=("solved_at", "created_at"),
            required=("status",),
            protected={"status": ("new", "open", "pending", "hold")},
            # Zendesk Support's ticket ``status`` (custom statuses map onto these categories;
            # closed tickets are "closed"); the incremental export lists soft-deleted tickets
            # with status "deleted".
            values={"status": ("new", "open", "pending", "hold", "solved", "closed", "deleted")},
            blocks=("party_ids", "ticket_user"),
            derived=("party_ids",),
            own_clocks=("created_at", "updated_at", "solved_at"),
        ),
        RecordType(
            "ticket_user",
            "ticketing",
            # Derived from the tickets (``derive``): ``tickets_remaining``, the tickets that stay
            # after this run which the user requested, is CC'd on or follows (the engine erases
            # the user only once those this run erases are confirmed gone); ``had_ticket``,
            # whether any ticket of the extract names them at all (a user with none, a new
            # account say, is judged from its creation instead).
            columns={
                "role": TEXT, "created_at": TIME, "updated_at": TIME, "tickets_remaining": COUNT, "last_ticket_gone_at": TIME,
                "had_ticket": FLAG,
            },
            clocks=("last_ticket_gone_at", "created_at", "updated_at"),
            required=("role",),
            protected={"role": ("agent", "admin")},
            # Zendesk Support's user ``role``.
            values={"role": ("end-user", "agent", "admin")},
            derived=("tickets_remaining", "last_ticket_gone_at", "had_ticket"),
            own_clocks=("created_at", "updated_at"),
        ),
    )
}


def record_types_of(system: str) -> list[str]:
    """The system's record types in planning and erasure order: children before the records
    they belong to, tickets before their requesters."""
    return [name for name, rt in RECORD_TYPES.items() if rt.system == system]


def protected_values(record_type: str, column: str) -> tuple:
    """The values of ``column`` that protect a record of ``record_type`` in code."""
    return RECORD_TYPES[record_type].protected.get(column, ())


def known_values(record_type: str, column: str) -> tuple | None:
    """The values ``column`` of ``record_type`` can take (flags: True, False), or None when the
    column is not enumerated (clocks, keys, counts)."""
    return RECORD_TYPES[record_type].known_values(column)


def blocked_by(record_type: str) -> list[tuple[str, str]]:
    """(record type, column) of the records that must be gone before one of ``record_type`` goes."""
    return [(rt.name, rt.blocks[0]) for rt in RECORD_TYPES.values() if rt.blocks and rt.blocks[1] == record_type]
