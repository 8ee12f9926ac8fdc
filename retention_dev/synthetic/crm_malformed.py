"""Malformed rows for the quarantine tests: NULL clocks, a last interaction in the future and,
on SQLite, impossible or unparsable stored dates."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import sqlalchemy as sa

from retention.systems.crm import schema

log = logging.getLogger("retention_dev.synthetic.crm")


def generate_malformed(engine: sa.Engine, *, now: dt.datetime | None = None) -> dict[str, list[int]]:
    """Add a few malformed rows for quarantine tests; return their ids per record type.

    Both backends: NULL clocks (contact last_interaction_at/created_at, event_date, course_end,
    survey_closed_at, financial_year_end) and a contact whose last interaction lies in the
    future. SQLite also gets impossible/unparsable stored dates ('2023-02-30', '2023-13-01',
    'not a date'), which PostgreSQL's date types cannot hold.
    """
    now = (now or dt.datetime.now(dt.UTC)).astimezone(dt.UTC)
    sqlite = engine.dialect.name == "sqlite"
    added: dict[str, list[int]] = {}
    t = schema

    def fmt(v: dt.datetime) -> Any:
        return v.replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f") if sqlite else v

    with engine.begin() as conn:
        def next_id(table: sa.Table) -> int:
            return int(conn.execute(sa.select(sa.func.coalesce(sa.func.max(table.c.id), 0))).scalar()) + 1

        def raw(table: sa.Table, values: dict[str, Any]) -> int:
            values = {"id": next_id(table), **values}
            cols = ", ".join(values)
            params = ", ".join(f":{k}" for k in values)
            conn.execute(sa.text(f"INSERT INTO {table.name} ({cols}) VALUES ({params})"), values)
            return values["id"]

        def contact(**over: Any) -> int:
            base = {
                "organisation_id": None, "kind": "lead", "first_name": "Malformed", "last_name": "Row",
                "email": "malformed@example.net", "phone": "555-0199", "workplace": "Example Malformed Ltd",
                "address": "1 Felaktiga gatan, Nowhere", "role": "Fixture", "opted_out": False,
                "last_interaction_at": None, "created_at": None,
            }
            return raw(t.contact, {**base, **over})

        c_null = contact()
        c_future = contact(last_interaction_at=fmt(now + dt.timedelta(days=3650)), created_at=fmt(now))
        added["crm_contact"] = [c_null, c_future]
        added["crm_event_participation"] = [
            raw(t.event_participation, {"contact_id": c_null, "event_name": "Malformed", "event_date": None, "kind": "event"})
        ]
        added["crm_course_registration"] = [
            raw(t.course_registration, {"contact_id": c_null, "course_name": "Malformed", "course_end": None})
        ]
        added["crm_survey_response"] = [
            raw(t.survey_response, {"contact_id": c_null, "survey_name": "Malformed", "survey_closed_at": None, "answers": "{}"})
        ]
        inv = {
            "contact_id": None, "invoice_number": "MALFORMED-1", "issued_on": "2020-01-01", "amount": "1.00",
            "billing_name": "Malformed Billing", "billing_address": "1 Felaktiga gatan, Nowhere",
        }
        added["crm_invoice"] = [raw(t.invoice, {**inv, "financial_year_end": None})]
        if sqlite:
            added["crm_contact"].append(contact(last_interaction_at="2023-02-30 10:00:00", created_at="yesterday-ish"))
            added["crm_event_participation"].append(
                raw(t.event_participation, {"contact_id": c_null, "event_name": "Malformed", "event_date": "2023-02-30", "kind": "event"})
            )
            added["crm_course_registration"].append(
                raw(t.course_registration, {"contact_id": c_null, "course_name": "Malformed", "course_end": "2023-13-01"})
            )
            added["crm_survey_response"].append(
                raw(t.survey_response, {"contact_id": c_null, "survey_name": "Malformed", "survey_closed_at": "not a date", "answers": "{}"})
            )
            added["crm_invoice"].append(raw(t.invoice, {**inv, "invoice_number": "MALFORMED-2", "financial_year_end": "2023-02-30"}))
    log.info("synthetic CRM: added %d malformed rows", sum(len(v) for v in added.values()))
    return added
