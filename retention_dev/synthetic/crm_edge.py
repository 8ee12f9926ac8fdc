"""The synthetic CRM's edge-case block (ids from 1, organisations named ``Edge: ...``): memberships
and leads at the one-year boundaries, 29 February, renewed and fixed-term memberships, opted-out
contacts, a lead without e-mail, a non-customer's event, the 90-day course and survey, invoices on
both sides of the bookkeeping boundary, a detached invoice and manual holds."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from retention.systems.crm import schema
from retention_dev.synthetic.crm_vocabulary import LOCAL_TZ
from retention_dev.synthetic.crm_writer import Writer


def _minus_years(d: dt.date, years: int) -> dt.date:
    try:
        return d.replace(year=d.year - years)
    except ValueError:  # 29 February → 28 February
        return d.replace(year=d.year - years, day=28)


class EdgeCases:
    """The fixed block of boundary cases (ids from 1)."""

    def __init__(self, w: Writer, now: dt.datetime):
        self.w = w
        self.now = now
        self.today = now.astimezone(LOCAL_TZ).date()
        self.contacts = 0
        self.ids = {t: 0 for t in schema.metadata.tables}

    def next_ids(self) -> dict[str, int]:
        return {t: n + 1 for t, n in self.ids.items()}

    def _id(self, table: str) -> int:
        self.ids[table] += 1
        return self.ids[table]

    def write(self) -> None:
        today, now = self.today, self.now
        one_year_ago = _minus_years(today, 1)
        rows: dict[str, list[dict[str, Any]]] = {t: [] for t in schema.metadata.tables}
        def ts(d):
            return now - d

        def org(name: str, periods: Sequence[tuple[dt.date, dt.date | None]]) -> int:
            oid = self._id("organisation")
            rows["organisation"].append({"id": oid, "name": f"Edge: {name}"})
            for start, end in periods:
                rows["membership"].append(
                    {"id": self._id("membership"), "organisation_id": oid, "starts_on": start, "ends_on": end}
                )
            return oid

        def person(org_id: int | None, *, last: dt.datetime | None, opted_out: bool = False, email: bool = True) -> int:
            cid = self._id("contact")
            self.contacts += 1
            rows["contact"].append(
                {
                    "id": cid,
                    "organisation_id": org_id,
                    "kind": "member" if org_id else "lead",
                    "first_name": "Edge",
                    "last_name": f"Case {cid}",
                    "email": f"edge{cid}@example.org" if email else "",
                    "phone": f"555-01{cid % 100:02d}",
                    "workplace": "Example Edge Lab",
                    "address": f"{cid} Testvägen, Edgeby",
                    "role": "Edge case",
                    "last_interaction_at": last,
                    "opted_out": opted_out,
                    "created_at": (last or now) - dt.timedelta(days=400),
                }
            )
            return cid

        def note(cid: int, at: dt.datetime) -> None:
            rows["communication_note"].append(
                {"id": self._id("communication_note"), "contact_id": cid, "noted_at": at, "body": "Edge note"}
            )

        def event(cid: int, on: dt.date, kind: str = "event") -> int:
            eid = self._id("event_participation")
            rows["event_participation"].append(
                {"id": eid, "contact_id": cid, "event_name": "Edge event", "event_date": on, "kind": kind}
            )
            return eid

        def invoice(cid: int | None, fy_end: dt.date) -> int:
            iid = self._id("invoice")
            rows["invoice"].append(
                {
                    "id": iid,
                    "contact_id": cid,
                    "invoice_number": f"EDGE-{iid:05d}",
                    "issued_on": fy_end - dt.timedelta(days=100),
                    "financial_year_end": fy_end,
                    "amount": "1500.00",
                    "billing_name": f"Edge Billing {iid}",
                    "billing_address": f"{iid} Exempelgatan, Edgeby",
                }
            )
            return iid

        def hold(record_type: str, record_id: int, reason: str, expires: dt.datetime | None) -> None:
            rows["legal_hold"].append(
                {
                    "id": self._id("legal_hold"),
                    "record_type": record_type,
                    "record_id": record_id,
                    "reason": reason,
                    "expires_at": expires,
                }
            )

        long_ago = today - dt.timedelta(days=3650)
        recently = ts(dt.timedelta(days=10))
        # Memberships at the boundaries.
        c_today = person(org("membership ends today", [(long_ago, today)]), last=recently)
        c_year = person(org("membership ended exactly one year ago", [(long_ago, one_year_ago)]), last=recently)
        person(
            org("membership ended one year ago minus one day", [(long_ago, one_year_ago + dt.timedelta(days=1))]),
            last=recently,
        )
        person(org("membership ended 2024-02-29", [(dt.date(2020, 3, 1), dt.date(2024, 2, 29))]), last=recently)
        renewed = org(
            "renewed membership (ended period, then open)",
            [(long_ago, today - dt.timedelta(days=730)), (today - dt.timedelta(days=729), None)],
        )
        person(renewed, last=ts(dt.timedelta(days=800)))
        person(org("fixed-term membership still running", [(long_ago, today + dt.timedelta(days=200))]), last=recently)
        # An active member with years-old data: nothing of the contact is due as a contact.
        old = person(org("active member with old data", [(long_ago, None)]), last=ts(dt.timedelta(days=6 * 365)))
        note(old, ts(dt.timedelta(days=6 * 365)))
        event(old, today - dt.timedelta(days=5 * 365))
        rows["course_registration"].append(
            {"id": self._id("course_registration"), "contact_id": old, "course_name": "Edge course",
             "course_end": today - dt.timedelta(days=90)}
        )
        rows["survey_response"].append(
            {"id": self._id("survey_response"), "contact_id": old, "survey_name": "Edge survey",
             "survey_closed_at": ts(dt.timedelta(days=90)), "answers": '{"q1": 4}'}
        )
        person(org("opted-out member of an active organisation", [(long_ago, None)]), last=recently, opted_out=True)
        # Leads.
        person(None, last=recently, opted_out=True)  # opted out: due at once
        person(None, last=ts(dt.timedelta(days=900)), opted_out=True)
        exact = now.astimezone(LOCAL_TZ)
        exact = exact.replace(year=exact.year - 1, day=28) if (exact.month, exact.day) == (2, 29) else exact.replace(
            year=exact.year - 1
        )
        person(None, last=exact.astimezone(dt.UTC))  # last interaction exactly one year ago
        no_mail = person(None, last=recently, email=False)
        event(no_mail, today - dt.timedelta(days=366))  # non-customer: event date is the clock
        # Invoices around the bookkeeping boundary (erasable from 1 Jan of FY-end year + 8).
        former = org("former member with invoices", [(long_ago, today - dt.timedelta(days=800))])
        billed = person(former, last=ts(dt.timedelta(days=800)))
        note(billed, ts(dt.timedelta(days=800)))
        event(billed, today - dt.timedelta(days=900))
        y = today.year
        inv_old_june = invoice(billed, dt.date(y - 8, 6, 30))  # erasable since 1 Jan this year
        invoice(billed, dt.date(y - 7, 6, 30))  # not before 1 Jan next year
        invoice(billed, dt.date(y - 8, 12, 31))  # erasable
        invoice(billed, dt.date(y - 7, 12, 31))  # not yet
        invoice(None, dt.date(y - 9, 6, 30))  # already detached, erasable
        # Manual holds on due records: live, expired, no expiry.
        held = person(org("former member under a live manual hold", [(long_ago, today - dt.timedelta(days=900))]),
                      last=ts(dt.timedelta(days=900)))
        hold("crm_contact", held, "Dispute (synthetic)", now + dt.timedelta(days=30))
        expired = person(org("former member whose hold expired", [(long_ago, today - dt.timedelta(days=900))]),
                         last=ts(dt.timedelta(days=900)))
        hold("crm_contact", expired, "Closed dispute (synthetic)", now - dt.timedelta(days=10))
        hold("crm_invoice", inv_old_june, "Audit (synthetic)", None)
        del c_today, c_year

        w = self.w
        for table in schema.metadata.tables:
            if rows[table]:
                names = list(rows[table][0])
                w.write(table, {k: [self._value(r[k]) for r in rows[table]] for k in names})

    def _value(self, v: Any) -> Any:
        if isinstance(v, dt.datetime):
            v = v.astimezone(dt.UTC).replace(tzinfo=None)
            return v.isoformat(sep=" ") if self.w.pg else v.strftime("%Y-%m-%d %H:%M:%S.%f")
        if isinstance(v, dt.date):
            return v.isoformat()
        return v
