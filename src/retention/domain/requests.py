"""What an erasure request does with each record of the person: the request's plan.

A request overrides retention periods and the "active relationship" protections (the person
asked), never a legal hold, and never erases an unsolved ticket:

* **CRM.** Every contact with the address goes with its event participations, course
  registrations and survey responses (and its notes, which go with the contact). An invoice
  still under the bookkeeping period (the policy's ``invoice`` rule, as of the request) stays and
  its contact is *minimised*; an invoice past that period is erased. A manual hold keeps its
  record: a hold on a contact keeps everything of that contact; a held participation,
  registration or survey response keeps its contact too (a child cannot outlive its contact),
  the rest of the contact's records still go.
* **Newsletter.** The member is erased whatever its status.
* **Ticketing.** The person's solved and closed tickets are erased, then the user. A ticket that
  is not solved is *deferred*, and so is its requester; a held ticket keeps its requester.

Pure: the person's records (as ``SourceSystem.find_person`` found them) and the holds in force
in, plan rows out (``PLAN_COLUMNS``), erasing nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

import pandas as pd

from retention.domain.engine import plan_record_type
from retention.domain.holds import Holds
from retention.domain.policy import Policy
from retention.domain.pseudonyms import Pseudonymizer
from retention.domain.records import protected_values
from retention.domain.statuses import Action

RULE_ID = "erasure-request"
PLAN_COLUMNS = ["record_type", "record_id", "record_key", "rule_id", "action", "hold", "detail", "blocks"]
CRM_CHILDREN = ("crm_event_participation", "crm_course_registration", "crm_survey_response")


def _ids(frame: pd.DataFrame | None, column: str | None = None, value: str | None = None) -> list[str]:
    if frame is None or frame.empty:
        return []
    if column is not None:
        frame = frame[frame[column].astype("string") == value]
    return frame["record_id"].astype(str).tolist()


def plan_request(
    system: str,
    found: Mapping[str, pd.DataFrame],
    policy: Policy,
    as_of: datetime,
    holds: Holds,
    pseudonymizer: Pseudonymizer,
) -> pd.DataFrame:
    """The request's plan for one system's records of the person."""
    rows: list[dict] = []

    def add(record_type: str, record_id: str, action: Action, hold: str | None = None, detail: str | None = None,
            blocks: str | None = None) -> None:
        rows.append({"record_type": record_type, "record_id": record_id, "action": str(action), "hold": hold,
                     "detail": detail, "blocks": blocks})

    def held(record_type: str, record_id: str) -> str | None:
        return holds.reason(record_type, record_id, pseudonymizer.key_for(record_type, record_id))

    if system == "newsletter":
        for member in _ids(found.get("newsletter_member")):
            hold = held("newsletter_member", member)
            add("newsletter_member", member, Action.HOLD if hold else Action.ERASE, hold)
    elif system == "ticketing":
        tickets = found.get("support_ticket")
        unsolved_statuses = set(protected_values("support_ticket", "status"))
        for user in _ids(found.get("ticket_user")):
            unsolved = held_ticket = False
            mine = tickets[tickets["requester_id"].astype("string") == user] if tickets is not None and len(tickets) else None
            for ticket, status in (zip(mine["record_id"].astype(str), mine["status"].astype(str)) if mine is not None else ()):
                hold = held("support_ticket", ticket)
                if hold:
                    add("support_ticket", ticket, Action.HOLD, hold, blocks=user)
                    held_ticket = True
                elif status in unsolved_statuses:
                    add("support_ticket", ticket, Action.DEFER, detail="unsolved ticket: erase after it is solved", blocks=user)
                    unsolved = True
                else:
                    add("support_ticket", ticket, Action.ERASE, blocks=user)
            hold = held("ticket_user", user)
            if hold:
                add("ticket_user", user, Action.HOLD, hold)
            elif unsolved:
                add("ticket_user", user, Action.DEFER, detail="requester of an unsolved ticket")
            elif held_ticket:
                add("ticket_user", user, Action.HOLD, "requester of a ticket under legal hold")
            else:
                add("ticket_user", user, Action.ERASE)
    elif system == "crm":
        invoices = found.get("crm_invoice")
        due = set()
        if invoices is not None and len(invoices):
            due = set(plan_record_type(invoices, "crm_invoice", policy, as_of)["record_id"].astype(str))
        for contact in _ids(found.get("crm_contact")):
            contact_hold = held("crm_contact", contact)
            child_held = invoice_kept = False
            for record_type in CRM_CHILDREN:
                for rid in _ids(found.get(record_type), "contact_id", contact):
                    hold = contact_hold or held(record_type, rid)
                    child_held |= bool(hold)
                    add(record_type, rid, Action.HOLD if hold else Action.ERASE, hold)
            for rid in _ids(invoices, "contact_id", contact):
                hold = contact_hold or held("crm_invoice", rid) or (None if rid in due else "bookkeeping")
                invoice_kept |= bool(hold)
                add("crm_invoice", rid, Action.HOLD if hold else Action.ERASE, hold)
            if contact_hold:
                add("crm_contact", contact, Action.HOLD, contact_hold)
            elif child_held:
                add("crm_contact", contact, Action.HOLD, "a record of this contact is under legal hold")
            elif invoice_kept:
                add("crm_contact", contact, Action.MINIMISE, "bookkeeping")
            else:
                add("crm_contact", contact, Action.ERASE)
    else:
        raise ValueError(f"unknown system {system!r}")

    plan = pd.DataFrame(rows, columns=[c for c in PLAN_COLUMNS if c not in ("record_key", "rule_id")])
    plan["rule_id"] = RULE_ID
    plan["record_key"] = pseudonymizer.column(plan["record_type"], plan["record_id"]) if len(plan) else pd.Series(dtype="string")
    return plan[PLAN_COLUMNS].astype({c: "string" for c in PLAN_COLUMNS})
