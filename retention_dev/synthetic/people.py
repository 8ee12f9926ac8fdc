"""Synthetic people present in all three demo systems under one e-mail address.

The three generators make their people independently (the Zendesk stand-in derives its users'
addresses from their ids, ``user{id}@example.org``; Mailchimp's are made of syllables; the
CRM's are ``contact{id}@...``), so nobody is in more than one system. :func:`link` takes a few
Zendesk end users and gives their addresses to subscribed Mailchimp members and to CRM contacts
of active members, so an erasure request in the demo finds and erases a person everywhere.

Only addresses change, and only of records no nightly rule plans (a subscribed member, a
contact whose organisation is a member, a requester whose tickets are all from the last year):
the nightly counts stay those of the generated data. Two kinds of person:

* ``erasable``: only solved/closed tickets, no invoice: erased in all three systems;
* ``deferred``: an unsolved ticket (its tickets and Zendesk user are deferred) and an invoice
  under the bookkeeping period (the CRM contact is minimised, not erased).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import sqlalchemy as sa

from retention.systems.crm import schema
from retention_dev.standins import zendesk_data as zd
from retention_dev.standins.mailchimp_data import STATUS_CODE, MemberColumns

_DAY = 86_400


@dataclass(frozen=True)
class Person:
    email: str
    kind: str  # "erasable" or "deferred"


def zendesk_people(
    arrays: dict[str, np.ndarray], now: datetime, count: int = 2, exclude: set[int] = frozenset()
) -> list[tuple[str, int]]:
    """``(kind, user id)`` of end users whose tickets are all from the last year: for each
    kind, ``count`` of them, the ``erasable`` ones with only solved/closed tickets, the
    ``deferred`` ones with at least one unsolved."""
    status, requester, created = arrays["t_status"], arrays["t_requester"], arrays["t_created"]
    # The generator makes its recent tickets after one year ago, its due ones long before: this
    # split, and so the people chosen, does not depend on the day the data is made.
    recent_after = int(zd.one_year_before(now).timestamp())
    done = np.isin(status, [zd.STATUS_CODE["solved"], zd.STATUS_CODE["closed"]])
    unsolved = np.isin(status, zd.OPEN_CODES)
    old = np.zeros(int(requester.max()) + 1 - zd.USER_ID_BASE, dtype=bool)
    np.logical_or.at(old, requester - zd.USER_ID_BASE, (created < recent_after) | ~(done | unsolved))
    any_open = np.zeros_like(old)
    np.logical_or.at(any_open, requester - zd.USER_ID_BASE, unsolved)
    has = np.zeros_like(old)
    has[requester - zd.USER_ID_BASE] = True
    chosen: list[tuple[str, int]] = []
    for kind, want_open in (("erasable", False), ("deferred", True)):
        rows = np.flatnonzero(has & ~old & (any_open == want_open))
        picked = [int(r) + zd.USER_ID_BASE for r in rows[::-1] if int(r) + zd.USER_ID_BASE not in exclude][:count]
        chosen += [(kind, uid) for uid in picked]
    return chosen


def link(
    zendesk_arrays: dict[str, np.ndarray],
    members: MemberColumns,
    crm: sa.Engine,
    now: datetime,
    *,
    count: int = 2,
    edge_users: set[int] = frozenset(),
) -> list[Person]:
    """Give ``count`` people of each kind the same address in all three systems (``members``
    changed in place; the CRM updated); the people, in order erasable first. ``edge_users``:
    the Zendesk generator's edge-case users, left as they are."""
    chosen = zendesk_people(zendesk_arrays, now, count, exclude=edge_users)
    people = [Person(f"user{uid}@example.org", kind) for kind, uid in chosen]

    # Mailchimp: subscribed members from the end of the audience (the edge cases are at its start).
    subscribed = np.flatnonzero(members.status == STATUS_CODE["subscribed"])[::-1][: len(people)]
    if len(subscribed) < len(people):
        raise ValueError("not enough subscribed newsletter members to link")
    emails = members.emails.tolist()
    for row, person in zip(subscribed.tolist(), people, strict=True):
        emails[row] = person.email.encode()
        members.ids[row] = hashlib.md5(person.email.encode()).hexdigest().encode()
    members.emails = np.array(emails, dtype="S")

    # CRM: contacts of member organisations (an open membership), not opted out; the deferred
    # ones with an invoice still under the bookkeeping period, the erasable ones without any.
    c, m, i = schema.contact, schema.membership, schema.invoice
    active = sa.select(m.c.organisation_id).where(m.c.ends_on.is_(None))
    invoiced = sa.select(i.c.contact_id).where(i.c.contact_id.is_not(None))
    kept = sa.select(i.c.contact_id).where(i.c.financial_year_end >= now.date().replace(year=now.year - 2))
    base = sa.select(c.c.id).where(
        c.c.organisation_id.in_(active), c.c.kind == "member", c.c.opted_out.is_(False), c.c.email.is_not(None), c.c.email != ""
    )
    with crm.begin() as conn:
        for kind, query in (
            ("erasable", base.where(c.c.id.not_in(invoiced))),
            ("deferred", base.where(c.c.id.in_(kept))),
        ):
            mine = [p for p in people if p.kind == kind]
            ids = conn.execute(query.order_by(c.c.id.desc()).limit(len(mine))).scalars().all()
            if len(ids) < len(mine):
                raise ValueError(f"not enough CRM contacts for the {kind} people")
            for contact_id, person in zip(ids, mine, strict=True):
                conn.execute(sa.update(c).where(c.c.id == contact_id).values(email=person.email))
    return people
