"""The synthetic CRM's bulk block: organisations with their membership periods, then contacts
in chunks (each from ``(seed, chunk index)``) with their notes, event tags, course
registrations, survey responses, invoices and a few manual holds; about ``due_share`` of the
contacts due as of ``now``."""

from __future__ import annotations

import numpy as np

from retention_dev.synthetic.crm_vocabulary import (
    COURSES,
    DAY,
    DOMAINS,
    DUE,
    DUE_P,
    EVENTS,
    FIRST_NAMES,
    LAST_NAMES,
    LOCAL_TZ,
    NOT_DUE,
    NOT_DUE_P,
    ROLES,
    STREETS,
    SURVEYS,
)
from retention_dev.synthetic.crm_writer import Writer, concat, date_text, with_nulls, zero_fill

CHUNK = 100_000


class Bulk:
    """The bulk block, generated per chunk of contacts from ``(seed, chunk index)``."""

    def __init__(self, w: Writer, *, now, seed, contacts, first, due_share, notes_per_contact, tags_per_contact):
        self.w = w
        self.now_s = int(now.timestamp())
        self.today = np.datetime64(now.astimezone(LOCAL_TZ).date(), "D")
        self.seed = int(seed)
        self.n = int(contacts)
        self.ids = dict(first)
        self.due_share = float(due_share)
        self.notes = float(notes_per_contact)
        self.tags = float(tags_per_contact)

    def rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *key])

    def take(self, table: str, n: int) -> np.ndarray:
        start = self.ids[table]
        self.ids[table] = start + n
        return np.arange(start, start + n, dtype=np.int64)

    def write(self) -> None:
        if self.n == 0:
            return
        pools = self._organisations()
        for k, start in enumerate(range(0, self.n, CHUNK)):
            self._contacts(k, min(CHUNK, self.n - start), pools)

    def _organisations(self) -> dict[str, np.ndarray]:
        rng = self.rng(0, 0)
        n = max(3, self.n // 8)
        n_recent = max(1, round(n * 0.10))
        n_old = max(1, round(n * 0.25))
        n_active = n - n_recent - n_old
        ids = self.take("organisation", n)
        kinds = np.array(["active"] * n_active + ["recent"] * n_recent + ["old"] * n_old)
        rng.shuffle(kinds)
        w = self.w
        w.write("organisation", {"id": ids, "name": concat("Synthetic Org ", ids)})

        today = self.today
        org_ids, starts, ends = [], [], []  # ends: days from today (None = open)

        def add(oid, start_days, end_days):
            org_ids.append(oid)
            starts.append(today - start_days.astype("timedelta64[D]"))
            ends.append(end_days)

        a = ids[kinds == "active"]
        renewed = rng.random(len(a)) < 0.30
        fixed = (rng.random(len(a)) < 0.15) & ~renewed
        open_start = rng.integers(30, 3650, len(a))
        end_active = np.where(fixed, -rng.integers(1, 700, len(a)), np.iinfo(np.int64).min)  # future end
        add(a, open_start, end_active)
        r = a[renewed]
        prev_end = open_start[renewed] + 1
        add(r, prev_end + rng.integers(365, 1500, len(r)), prev_end)
        for kind, lo, hi in (("recent", 5, 356), ("old", 372, 2200)):
            o = ids[kinds == kind]
            end = rng.integers(lo, hi, len(o))
            add(o, end + rng.integers(365, 2000, len(o)), end)
            earlier = rng.random(len(o)) < 0.3
            e = o[earlier]
            e_end = end[earlier] + rng.integers(400, 800, len(e))
            add(e, e_end + rng.integers(365, 1500, len(e)), e_end)

        org_id = np.concatenate(org_ids)
        start = np.concatenate(starts)
        end_days = np.concatenate(ends)
        open_ = end_days == np.iinfo(np.int64).min
        end = today - np.where(open_, 0, end_days).astype("timedelta64[D]")
        order = np.argsort(org_id, kind="stable")
        org_id, start, end, open_ = org_id[order], start[order], end[order], open_[order]
        w.write(
            "membership",
            {
                "id": self.take("membership", len(org_id)),
                "organisation_id": org_id,
                "starts_on": date_text(start),
                "ends_on": with_nulls(date_text(end), open_),
            },
        )
        return {k: ids[kinds == k] for k in ("active", "recent", "old")}

    def _contacts(self, k: int, n: int, pools: dict[str, np.ndarray]) -> None:
        rng = self.rng(1, k)
        w, now_s, today = self.w, self.now_s, self.today
        ids = self.take("contact", n)

        due = rng.random(n) < self.due_share
        cat = np.where(
            due,
            len(NOT_DUE) + rng.choice(len(DUE), n, p=DUE_P),
            rng.choice(len(NOT_DUE), n, p=NOT_DUE_P),
        )
        # 0 active member, 1 recent ex-member, 2 recent lead,
        # 3 old ex-member, 4 stale lead, 5 opted-out recent lead, 6 opted-out recent ex-member
        member = np.isin(cat, (0, 1, 3, 6))
        pool_of = {0: "active", 1: "recent", 3: "old", 6: "recent"}
        org = np.full(n, -1, dtype=np.int64)
        for c, pool in pool_of.items():
            m = cat == c
            org[m] = pools[pool][rng.integers(0, len(pools[pool]), m.sum())]
        opted = np.isin(cat, (5, 6))
        opted |= (cat == 0) & (rng.random(n) < 0.05)
        opted |= np.isin(cat, (3, 4)) & (rng.random(n) < 0.10)

        ago = np.where(
            np.isin(cat, (2, 5)),
            rng.integers(0, 356 * DAY, n),
            np.where(cat == 4, rng.integers(372 * DAY, 5 * 365 * DAY, n), rng.integers(0, 3 * 365 * DAY, n)),
        )
        last = now_s - ago
        created = last - rng.integers(0, 4 * 365 * DAY, n)
        mail = rng.random(n)
        email = concat("contact", ids, "@", DOMAINS[ids % len(DOMAINS)]).astype(object)
        email[mail < 0.02] = ""
        first = FIRST_NAMES[rng.integers(0, len(FIRST_NAMES), n)]
        last_name = LAST_NAMES[rng.integers(0, len(LAST_NAMES), n)]
        w.write(
            "contact",
            {
                "id": ids,
                "organisation_id": with_nulls(org, ~member),
                "kind": np.where(member, "member", "lead"),
                "first_name": first,
                "last_name": last_name,
                "email": email,
                "phone": concat("555-", zero_fill(ids % 10_000, 4)),
                "workplace": np.where(member, concat("Synthetic Org ", org), "Example Prospects AB"),
                "address": concat(ids % 97 + 1, " ", STREETS[ids % len(STREETS)]),
                "role": ROLES[rng.integers(0, len(ROLES), n)],
                "last_interaction_at": w.ts(last),
                "opted_out": opted,
                "created_at": w.ts(created),
            },
        )

        # Communication notes.
        cnt = rng.poisson(self.notes, n)
        cid = np.repeat(ids, cnt)
        span = np.repeat(now_s - created, cnt)
        noted = np.repeat(created, cnt) + (rng.random(len(cid)) * span).astype(np.int64)
        nid = self.take("communication_note", len(cid))
        w.write(
            "communication_note",
            {"id": nid, "contact_id": cid, "noted_at": w.ts(noted), "body": concat("Synthetic note ", nid)},
        )
        # Event participation tags.
        cnt = rng.poisson(self.tags, n)
        cid = np.repeat(ids, cnt)
        m = len(cid)
        w.write(
            "event_participation",
            {
                "id": self.take("event_participation", m),
                "contact_id": cid,
                "event_name": EVENTS[rng.integers(0, len(EVENTS), m)],
                "event_date": date_text(today - rng.integers(0, 1500, m).astype("timedelta64[D]")),
                "kind": np.where(rng.random(m) < 0.85, "event", "service"),
            },
        )
        # Course registrations (some courses still running).
        cid = ids[rng.random(n) < 0.10]
        m = len(cid)
        w.write(
            "course_registration",
            {
                "id": self.take("course_registration", m),
                "contact_id": cid,
                "course_name": COURSES[rng.integers(0, len(COURSES), m)],
                "course_end": date_text(today - rng.integers(-60, 730, m).astype("timedelta64[D]")),
            },
        )
        # Survey responses.
        cid = ids[rng.random(n) < 0.15]
        m = len(cid)
        w.write(
            "survey_response",
            {
                "id": self.take("survey_response", m),
                "contact_id": cid,
                "survey_name": SURVEYS[rng.integers(0, len(SURVEYS), m)],
                "survey_closed_at": w.ts(now_s - rng.integers(0, 730 * DAY, m)),
                "answers": concat('{"q1": ', rng.integers(1, 6, m), "}"),
            },
        )
        # Invoices: financial years ending 31 Dec or 30 Jun, 1..10 years back.
        billed = ids[rng.random(n) < 0.04]
        cid = np.repeat(billed, rng.integers(1, 3, len(billed)))
        m = len(cid)
        year = int(str(today)[:4]) - rng.integers(1, 11, m)
        june = rng.random(m) < 0.30
        fy_end = np.array(
            [f"{y:04d}-06-30" if j else f"{y:04d}-12-31" for y, j in zip(year.tolist(), june.tolist(), strict=True)],
            dtype="datetime64[D]",
        )
        iid = self.take("invoice", m)
        w.write(
            "invoice",
            {
                "id": iid,
                "contact_id": cid,
                "invoice_number": concat("INV-", zero_fill(iid, 8)),
                "issued_on": date_text(fy_end - rng.integers(0, 365, m).astype("timedelta64[D]")),
                "financial_year_end": date_text(fy_end),
                "amount": concat(rng.integers(500, 20_000, m), ".", zero_fill(rng.integers(0, 100, m), 2)),
                "billing_name": concat("Synthetic Billing ", cid),
                "billing_address": concat(cid % 89 + 1, " ", STREETS[cid % len(STREETS)]),
            },
        )
        # Manual holds on a few contacts: no expiry, live, expired.
        held = ids[rng.random(n) < 0.0005]
        m = len(held)
        which = rng.integers(0, 3, m)
        expires = now_s + np.where(which == 1, 30 * DAY, -30 * DAY)
        w.write(
            "legal_hold",
            {
                "id": self.take("legal_hold", m),
                "record_type": np.full(m, "crm_contact"),
                "record_id": held,
                "reason": np.full(m, "Synthetic hold"),
                "expires_at": with_nulls(w.ts(expires), which == 0),
            },
        )
