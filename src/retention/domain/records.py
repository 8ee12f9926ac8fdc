"""The record types the policy can name, per system, and what a valid record of each looks like.

Connectors deliver one data frame per record type with a ``record_id`` column and the columns
listed here (clocks as tz-aware UTC timestamps). Nothing here holds names or addresses: the
frames carry only what the rules need.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RecordType:
    name: str
    system: str
    columns: tuple[str, ...]
    clocks: tuple[str, ...]
    # Clocks that record something that already happened: a value after the extract time is
    # malformed data, not a future deadline.
    past_only: tuple[str, ...] = ()
    # Columns a record must have (not null) to be judged at all.
    required: tuple[str, ...] = ()
    # Hard protections, enforced in code whatever the policy file says: column -> values.
    protected: dict = field(default_factory=dict)


RECORD_TYPES: dict[str, RecordType] = {
    rt.name: rt
    for rt in (
        RecordType(
            "newsletter_member",
            "newsletter",
            columns=("status", "last_changed", "timestamp_signup", "has_email"),
            clocks=("last_changed", "timestamp_signup"),
            past_only=("last_changed", "timestamp_signup"),
            required=("status", "last_changed"),
            protected={"status": ("subscribed", "transactional")},
        ),
        RecordType(
            "crm_contact",
            "crm",
            columns=(
                "kind", "organisation_id", "membership_active", "membership_end", "is_customer",
                "last_interaction_at", "opted_out", "has_email", "created_at", "has_invoice",
            ),
            clocks=("membership_end", "last_interaction_at", "created_at"),
            past_only=("last_interaction_at", "created_at"),
            required=("kind",),
            protected={"membership_active": (True,)},
        ),
        RecordType(
            "crm_event_participation",
            "crm",
            columns=("contact_id", "event_date", "membership_active", "membership_end", "is_customer", "opted_out"),
            clocks=("event_date", "membership_end"),
            required=("event_date",),
            protected={"membership_active": (True,)},
        ),
        RecordType("crm_course_registration", "crm", columns=("contact_id", "course_end"), clocks=("course_end",), required=("course_end",)),
        RecordType(
            "crm_survey_response", "crm", columns=("contact_id", "survey_closed_at"), clocks=("survey_closed_at",), required=("survey_closed_at",)
        ),
        RecordType(
            "crm_invoice", "crm", columns=("contact_id", "financial_year_end"), clocks=("financial_year_end",), required=("financial_year_end",)
        ),
        RecordType(
            "support_ticket",
            "ticketing",
            columns=("status", "requester_id", "solved_at", "created_at", "updated_at"),
            clocks=("solved_at", "created_at", "updated_at"),
            past_only=("solved_at", "created_at"),
            required=("status",),
            protected={"status": ("new", "open", "pending", "hold")},
        ),
        RecordType(
            "ticket_user",
            "ticketing",
            columns=("role", "tickets_remaining", "last_ticket_gone_at", "created_at", "updated_at"),
            clocks=("last_ticket_gone_at", "created_at", "updated_at"),
            required=("role",),
            protected={"role": ("agent", "admin")},
        ),
    )
}

SYSTEMS = ("newsletter", "crm", "ticketing")


def record_types_of(system: str) -> list[str]:
    return [name for name, rt in RECORD_TYPES.items() if rt.system == system]
