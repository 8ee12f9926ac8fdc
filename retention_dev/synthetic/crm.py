"""Deterministic synthetic CRM data for tests and benchmarks (reference schema only).

``generate(engine, contacts=..., seed=..., now=...)`` fills an empty reference schema with
organisations, membership periods, contacts (members and leads), communication notes, event
participation tags, course registrations, survey responses, invoices and manual legal holds.
Everything is a function of the arguments: the same seed, size and ``now`` give the same rows
on SQLite and PostgreSQL. Rows are generated with numpy in chunks of contacts and bulk-loaded
(``COPY`` on PostgreSQL, ``executemany`` elsewhere), so a million contacts with their notes and
tags load in well under a few minutes on PostgreSQL.

About ``due_share`` of the bulk contacts are due under the notice's rules as of ``now``
(former members one year after their organisation's last membership ended, at once if opted
out; leads one year after their last interaction, at once if opted out); the others are active
members, recently ended members and recent leads. Bulk values keep at least a few days away from
the one-year boundaries; the boundaries themselves are in the edge-case block.

The edge-case block (always present, ids from 1, organisations named ``Edge: ...``) holds:
a membership ending exactly today (still active) and exactly one year ago (due today), one day
short of a year, one ending 2024-02-29, a renewed membership (ended period followed by an open
one: active), a fixed-term membership still running, an active member with years-old data, an
opted-out member of an active organisation, opted-out leads (recent and stale), a lead whose
last interaction was exactly a year ago, a lead without e-mail, a non-customer's event, a
course that ended exactly 90 days ago and a survey closed exactly 90 days ago, invoices whose
financial year ends 30 June or 31 December on both sides of the bookkeeping boundary (erasable
from 1 January of FY-end year + 8), a detached invoice, and live, expired and open-ended manual
holds.

All personal data is made up: e-mail addresses at example.org/.com/.net, 555 phone numbers,
invented streets.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
from collections.abc import Sequence
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import sqlalchemy as sa

from retention.systems.crm import schema

log = logging.getLogger(__name__)

LOCAL_TZ = ZoneInfo("Europe/Stockholm")
CHUNK = 100_000
DAY = 86_400

FIRST_NAMES = np.array(
    ["Alva", "Bror", "Cilla", "Dag", "Ebba", "Frej", "Greta", "Hjalmar", "Idun", "Jarl", "Kajsa", "Loke"]
)
LAST_NAMES = np.array(
    ["Exempelsson", "Testberg", "Provlund", "Syntetisk", "Påhittad", "Fiktivdal", "Modellqvist", "Demoström"]
)
ROLES = np.array(["Developer", "Identity architect", "IT manager", "Librarian", "Researcher", "Administrator"])
STREETS = np.array(["Exempelgatan", "Testvägen", "Påhittade gränd", "Synthetic Street", "Fiktiva allén"])
DOMAINS = np.array(["example.org", "example.com", "example.net"])
EVENTS = np.array(["Federation day", "eduroam workshop", "Sambi webinar", "Identity forum", "Service onboarding"])
COURSES = np.array(["SAML basics", "OIDC for operators", "Federation metadata", "MFA in practice"])
SURVEYS = np.array(["Member survey", "Service satisfaction", "Event evaluation"])

# Contact categories of the bulk block: (kind, organisation pool, due?)
NOT_DUE = (("member", "active"), ("member", "recent"), ("lead", None))
NOT_DUE_P = (0.75, 0.05, 0.20)
DUE = (("member", "old"), ("lead", None), ("lead", None), ("member", "recent"))
DUE_P = (0.50, 0.35, 0.075, 0.075)  # old former member, stale lead, opted-out lead, opted-out recent ex-member


# ------------------------------------------------------------------------------ writing
class _Writer:
    """Bulk insert of column arrays: COPY on PostgreSQL, executemany elsewhere."""

    def __init__(self, conn: sa.Connection):
        self.conn = conn
        self.pg = conn.dialect.name == "postgresql"
        self.counts: dict[str, int] = {}
        self._fks: list[tuple[str, str, list[str], str, list[str]]] = []
        self._indexes: list[sa.Index] = []
        if self.pg:
            conn.exec_driver_sql("SET LOCAL TIME ZONE 'UTC'")  # naive timestamps below are UTC
            self._drop_constraints()

    def _drop_constraints(self) -> None:
        """Bulk-load practice: drop foreign keys and secondary indexes of the (empty) tables,
        recreate them after the load (``finish``); one validation pass instead of per-row checks."""
        q = self.conn.dialect.identifier_preparer.quote
        insp = sa.inspect(self.conn)
        for t in schema.metadata.tables.values():
            for fk in insp.get_foreign_keys(t.name):
                self._fks.append(
                    (t.name, fk["name"], fk["constrained_columns"], fk["referred_table"], fk["referred_columns"])
                )
            present = {ix["name"] for ix in insp.get_indexes(t.name)}
            self._indexes += [ix for ix in t.indexes if ix.name in present]
        for table, name, *_ in self._fks:
            self.conn.exec_driver_sql(f"ALTER TABLE {q(table)} DROP CONSTRAINT {q(name)}")
        for ix in self._indexes:
            self.conn.exec_driver_sql(f"DROP INDEX {q(ix.name)}")

    def write(self, table: str, cols: dict[str, Any]) -> None:
        names = list(cols)
        n = len(cols[names[0]]) if names else 0
        if n == 0:
            return
        if self.pg:
            # Every non-null value quoted, NULL as an unquoted empty field: PostgreSQL's CSV
            # format then tells NULL from the empty string.
            buf = io.BytesIO()
            pacsv.write_csv(
                pa.table({k: _arrow(v) for k, v in cols.items()}),
                buf,
                pacsv.WriteOptions(include_header=False, quoting_style="all_valid"),
            )
            buf.seek(0)
            cur = self.conn.connection.cursor()
            try:
                cur.copy_expert(f"COPY {table} ({', '.join(names)}) FROM STDIN WITH (FORMAT csv)", buf)
            finally:
                cur.close()
        else:
            lists = [_pylist(cols[k]) for k in names]
            sql = f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
            self.conn.exec_driver_sql(sql, list(zip(*lists, strict=True)))
        self.counts[table] = self.counts.get(table, 0) + n

    def ts(self, epoch_s: np.ndarray) -> np.ndarray:
        """Epoch seconds → timestamp text as each backend stores it (UTC)."""
        s = np.datetime_as_string(np.asarray(epoch_s, dtype="int64").astype("datetime64[s]"), unit="s")
        if self.pg or s.size == 0:
            return s
        return _cat(np.char.replace(s, "T", " "), ".000000")

    def finish(self) -> None:
        if self.pg:
            q = self.conn.dialect.identifier_preparer.quote
            for ix in self._indexes:
                ix.create(self.conn)
            for table, name, cols, ref, ref_cols in self._fks:
                self.conn.exec_driver_sql(
                    f"ALTER TABLE {q(table)} ADD CONSTRAINT {q(name)} FOREIGN KEY "
                    f"({', '.join(map(q, cols))}) REFERENCES {q(ref)} ({', '.join(map(q, ref_cols))})"
                )
            for t in schema.metadata.tables:
                self.conn.exec_driver_sql(
                    f"SELECT setval(pg_get_serial_sequence('{t}', 'id'), "
                    f"COALESCE((SELECT MAX(id) FROM {t}), 0) + 1, false)"
                )


def _arrow(v: Any) -> pa.Array:
    if isinstance(v, np.ndarray) and v.dtype != object:
        return pa.array(v)
    return pa.array(list(v))


def _pylist(v: Any) -> list:
    if isinstance(v, np.ndarray):
        if v.dtype == bool:
            return v.astype(int).tolist()
        return v.tolist()
    return [int(x) if isinstance(x, (bool, np.bool_)) else x for x in v]


def _cat(*parts: Any) -> np.ndarray:
    """Element-wise string concatenation of arrays and scalars (empty arrays allowed, which
    numpy's own string functions reject)."""
    arrays = [p for p in parts if isinstance(p, np.ndarray)]
    n = len(arrays[0]) if arrays else 1
    if n == 0:
        return np.array([], dtype=str)
    out = np.full(n, "", dtype=str)
    for p in parts:
        out = np.strings.add(out, p.astype(str) if isinstance(p, np.ndarray) else str(p))
    return out


def _zfill(a: np.ndarray, width: int) -> np.ndarray:
    return np.char.zfill(a.astype(str), width) if a.size else a.astype(str)


def _dates(d: np.ndarray) -> np.ndarray:
    return np.datetime_as_string(np.asarray(d, dtype="datetime64[D]"), unit="D")


def _with_nulls(values: np.ndarray, null: np.ndarray) -> np.ndarray:
    out = values.astype(object)
    out[null] = None
    return out


def _minus_years(d: dt.date, years: int) -> dt.date:
    try:
        return d.replace(year=d.year - years)
    except ValueError:  # 29 February → 28 February
        return d.replace(year=d.year - years, day=28)


# ------------------------------------------------------------------------------ generate
def generate(
    engine: sa.Engine,
    *,
    contacts: int,
    seed: int,
    now: dt.datetime,
    due_share: float = 0.10,
    notes_per_contact: float = 3,
    tags_per_contact: float = 2,
) -> dict[str, int]:
    """Fill the (created, empty) reference schema; return the number of rows per table.

    ``contacts`` counts all contacts, the edge-case block (about twenty) included; at least the
    edge-case block is always written.
    """
    if not 0.0 <= due_share <= 1.0:
        raise ValueError("due_share must be between 0 and 1")
    if contacts < 0 or notes_per_contact < 0 or tags_per_contact < 0:
        raise ValueError("sizes must not be negative")
    now = now.replace(tzinfo=dt.UTC) if now.tzinfo is None else now.astimezone(dt.UTC)
    schema.create_schema(engine)
    with engine.connect() as conn:
        if conn.execute(sa.select(sa.func.count()).select_from(schema.contact)).scalar():
            raise RuntimeError("generate() needs an empty CRM schema (contact table has rows)")
    t0 = dt.datetime.now()
    with engine.begin() as conn:
        w = _Writer(conn)
        edge = _EdgeCases(w, now)
        edge.write()
        _Bulk(
            w,
            now=now,
            seed=seed,
            contacts=max(contacts - edge.contacts, 0),
            first=edge.next_ids(),
            due_share=due_share,
            notes_per_contact=notes_per_contact,
            tags_per_contact=tags_per_contact,
        ).write()
        w.finish()
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql("ANALYZE")
    counts = {t: w.counts.get(t, 0) for t in schema.metadata.tables}
    log.info(
        "synthetic CRM: %d contacts, %d rows in total, %.1f s",
        counts["contact"],
        sum(counts.values()),
        (dt.datetime.now() - t0).total_seconds(),
    )
    return counts


class _EdgeCases:
    """The fixed block of boundary cases (ids from 1)."""

    def __init__(self, w: _Writer, now: dt.datetime):
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


class _Bulk:
    """The bulk block, generated per chunk of contacts from ``(seed, chunk index)``."""

    def __init__(self, w: _Writer, *, now, seed, contacts, first, due_share, notes_per_contact, tags_per_contact):
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
        w.write("organisation", {"id": ids, "name": _cat("Synthetic Org ", ids)})

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
                "starts_on": _dates(start),
                "ends_on": _with_nulls(_dates(end), open_),
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
        email = _cat("contact", ids, "@", DOMAINS[ids % len(DOMAINS)]).astype(object)
        email[mail < 0.02] = ""
        first = FIRST_NAMES[rng.integers(0, len(FIRST_NAMES), n)]
        last_name = LAST_NAMES[rng.integers(0, len(LAST_NAMES), n)]
        w.write(
            "contact",
            {
                "id": ids,
                "organisation_id": _with_nulls(org, ~member),
                "kind": np.where(member, "member", "lead"),
                "first_name": first,
                "last_name": last_name,
                "email": email,
                "phone": _cat("555-", _zfill(ids % 10_000, 4)),
                "workplace": np.where(member, _cat("Synthetic Org ", org), "Example Prospects AB"),
                "address": _cat(ids % 97 + 1, " ", STREETS[ids % len(STREETS)]),
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
            {"id": nid, "contact_id": cid, "noted_at": w.ts(noted), "body": _cat("Synthetic note ", nid)},
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
                "event_date": _dates(today - rng.integers(0, 1500, m).astype("timedelta64[D]")),
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
                "course_end": _dates(today - rng.integers(-60, 730, m).astype("timedelta64[D]")),
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
                "answers": _cat('{"q1": ', rng.integers(1, 6, m), "}"),
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
                "invoice_number": _cat("INV-", _zfill(iid, 8)),
                "issued_on": _dates(fy_end - rng.integers(0, 365, m).astype("timedelta64[D]")),
                "financial_year_end": _dates(fy_end),
                "amount": _cat(rng.integers(500, 20_000, m), ".", _zfill(rng.integers(0, 100, m), 2)),
                "billing_name": _cat("Synthetic Billing ", cid),
                "billing_address": _cat(cid % 89 + 1, " ", STREETS[cid % len(STREETS)]),
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
                "expires_at": _with_nulls(w.ts(expires), which == 0),
            },
        )


# ------------------------------------------------------------------------------ malformed
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


def main(argv: list[str] | None = None) -> int:
    """``python -m retention_dev.synthetic.crm --contacts N``: the demo CRM. Creates the reference schema
    where missing in the CRM of the ``retention_crm`` Connection and, when it has no contacts yet,
    seeds N synthetic ones (the demo and compose's demo profile; never a production CRM's data)."""
    import argparse

    from retention.systems.crm.hook import CrmHook

    parser = argparse.ArgumentParser(prog="python -m retention_dev.synthetic.crm", description=main.__doc__)
    parser.add_argument("--contacts", type=int, required=True, help="synthetic contacts to seed into an empty CRM")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    engine = CrmHook().get_engine()
    schema.create_schema(engine)
    with engine.connect() as conn:
        existing = conn.execute(sa.select(sa.func.count()).select_from(schema.contact)).scalar()
    if existing:
        print(f"CRM has {existing} contacts: nothing seeded")
        return 0
    counts = generate(engine, contacts=args.contacts, seed=args.seed, now=dt.datetime.now(dt.UTC))
    print(f"seeded synthetic CRM: {counts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
