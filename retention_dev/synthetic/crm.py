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

This module holds :func:`generate` and the command line; the parts live next to it:
``crm_edge`` (the edge-case block), ``crm_bulk`` (the bulk block), ``crm_writer`` (bulk loading
and text columns), ``crm_vocabulary`` (names, places, the category mix), ``crm_malformed``
(:func:`generate_malformed`).
"""

from __future__ import annotations

import datetime as dt
import logging

import sqlalchemy as sa

from retention.systems.crm import schema
from retention_dev.synthetic.crm_bulk import CHUNK, Bulk
from retention_dev.synthetic.crm_edge import EdgeCases
from retention_dev.synthetic.crm_malformed import generate_malformed
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
from retention_dev.synthetic.crm_writer import Writer

__all__ = [
    "CHUNK", "COURSES", "DAY", "DOMAINS", "DUE", "DUE_P", "EVENTS", "FIRST_NAMES", "LAST_NAMES", "LOCAL_TZ", "NOT_DUE",
    "NOT_DUE_P", "ROLES", "STREETS", "SURVEYS", "generate", "generate_malformed", "main",
]

log = logging.getLogger(__name__)


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
        w = Writer(conn)
        edge = EdgeCases(w, now)
        edge.write()
        Bulk(
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
