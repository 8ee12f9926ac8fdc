"""CRM schema, mapping and connector on SQLite and a real PostgreSQL.

PostgreSQL: ``RETENTION_TEST_PG_URL`` when set, else ``scripts/postgres.sh retention_crm_test``.
Each module works in its own PostgreSQL schema (namespace), dropped at the end. A missing
PostgreSQL fails the tests; it never skips them.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import random
import subprocess
import uuid
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa
import yaml

from retention.systems.crm import schema
from retention.systems.crm.client import FRAME_COLUMNS, RECORD_TYPES, CrmConnector
from retention.systems.crm.mapping import CrmMapping, MappingError
from retention_dev.synthetic import crm as synthetic

ROOT = Path(__file__).resolve().parents[1]
NOW = dt.datetime(2025, 6, 1, 10, 0, tzinfo=dt.UTC)
TODAY = dt.date(2025, 6, 1)
UTC = dt.UTC

def day_end(day) -> pd.Timestamp:
    """A calendar date that ends something (the record schema's ``end_of_day`` clocks) as the
    frame carries it: the end of that day in Stockholm, 00:00 of the next."""
    return pd.Timestamp(pd.Timestamp(day).date() + dt.timedelta(days=1), tz="Europe/Stockholm")



# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def pg_url():
    url = os.environ.get("RETENTION_TEST_PG_URL")
    if not url:
        proc = subprocess.run(
            [str(ROOT / "scripts" / "postgres.sh"), "retention_crm_test"], check=False, capture_output=True, text=True, timeout=600
        )
        if proc.returncode != 0 or not proc.stdout.strip():
            pytest.fail(f"PostgreSQL for the CRM tests could not be started:\n{proc.stderr}", pytrace=False)
        url = proc.stdout.strip().splitlines()[-1]
    namespace = f"crm_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(url)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{namespace}"')
    yield url, namespace
    with admin.begin() as conn:
        conn.exec_driver_sql(f'DROP SCHEMA "{namespace}" CASCADE')
    admin.dispose()


def reset_namespace(engine, namespace: str) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{namespace}" CASCADE')
        conn.exec_driver_sql(f'CREATE SCHEMA "{namespace}"')


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, tmp_path):
    """An engine on an empty reference schema: a fresh SQLite file, or this module's
    PostgreSQL namespace emptied (tests may rename tables)."""
    if request.param == "sqlite":
        eng = sa.create_engine(f"sqlite:///{tmp_path / 'crm.db'}")
    else:
        url, namespace = request.getfixturevalue("pg_url")
        eng = sa.create_engine(url, connect_args={"options": f"-c search_path={namespace}"})
        reset_namespace(eng, namespace)
    schema.create_schema(eng)
    yield eng
    if request.param != "sqlite":
        reset_namespace(eng, namespace)
    eng.dispose()


def count(engine, table: str, where: str = "") -> int:
    with engine.connect() as conn:
        return conn.exec_driver_sql(f"SELECT COUNT(*) FROM {table} {where}").scalar()


def insert(engine, table: sa.Table, rows: list[dict]) -> None:
    with engine.begin() as conn:
        conn.execute(table.insert(), rows)


def contact_row(cid: int, org: int | None, **over) -> dict:
    row = {
        "id": cid,
        "organisation_id": org,
        "kind": "member" if org else "lead",
        "first_name": "Testa",
        "last_name": f"Exempel{cid}",
        "email": f"person{cid}@example.org",
        "phone": "555-0100",
        "workplace": "Example Lab",
        "address": "1 Testvägen",
        "role": "Tester",
        "last_interaction_at": NOW - dt.timedelta(days=30),
        "opted_out": False,
        "created_at": NOW - dt.timedelta(days=400),
    }
    row.update(over)
    return row


@pytest.fixture
def small(engine):
    """A handful of hand-made rows with known relationship states (as of NOW)."""
    insert(engine, schema.organisation, [{"id": i, "name": f"Org {i}"} for i in range(1, 7)])
    insert(
        engine,
        schema.membership,
        [
            # 1: renewed - an ended period followed by an open one: active
            {"id": 1, "organisation_id": 1, "starts_on": dt.date(2018, 1, 1), "ends_on": dt.date(2022, 12, 31)},
            {"id": 2, "organisation_id": 1, "starts_on": dt.date(2023, 1, 1), "ends_on": None},
            # 2: ends exactly today: still active
            {"id": 3, "organisation_id": 2, "starts_on": dt.date(2020, 1, 1), "ends_on": TODAY},
            # 3: ended yesterday; an older period too: latest end wins
            {"id": 4, "organisation_id": 3, "starts_on": dt.date(2015, 1, 1), "ends_on": dt.date(2017, 1, 1)},
            {"id": 5, "organisation_id": 3, "starts_on": dt.date(2018, 1, 1), "ends_on": TODAY - dt.timedelta(days=1)},
            # 4: ends in the future (fixed term): active
            {"id": 6, "organisation_id": 4, "starts_on": dt.date(2024, 1, 1), "ends_on": dt.date(2026, 1, 1)},
            # 5: ended 2024-02-29
            {"id": 7, "organisation_id": 5, "starts_on": dt.date(2020, 1, 1), "ends_on": dt.date(2024, 2, 29)},
            # 6: never had a membership
        ],
    )
    insert(
        engine,
        schema.contact,
        [
            contact_row(1, 1),
            contact_row(2, 2),
            contact_row(3, 3, opted_out=True),
            contact_row(4, 4),
            contact_row(5, 5, email=""),
            contact_row(6, 6, email=None),
            contact_row(7, None, last_interaction_at=NOW - dt.timedelta(days=800)),
        ],
    )
    insert(
        engine,
        schema.communication_note,
        [{"id": i, "contact_id": c, "noted_at": NOW - dt.timedelta(days=i), "body": "Talked"} for i, c in
         enumerate([1, 1, 3, 3, 3, 7], start=1)],
    )
    insert(
        engine,
        schema.event_participation,
        [
            {"id": 1, "contact_id": 3, "event_name": "Day", "event_date": dt.date(2023, 5, 1), "kind": "event"},
            {"id": 2, "contact_id": 3, "event_name": "Day", "event_date": dt.date(2024, 5, 1), "kind": "service"},
            {"id": 3, "contact_id": 7, "event_name": "Day", "event_date": dt.date(2022, 5, 1), "kind": "event"},
            {"id": 4, "contact_id": 1, "event_name": "Day", "event_date": dt.date(2020, 5, 1), "kind": "event"},
        ],
    )
    insert(
        engine,
        schema.course_registration,
        [{"id": 1, "contact_id": 3, "course_name": "SAML", "course_end": dt.date(2024, 1, 1)},
         {"id": 2, "contact_id": 1, "course_name": "SAML", "course_end": dt.date(2024, 1, 1)}],
    )
    insert(
        engine,
        schema.survey_response,
        [{"id": 1, "contact_id": 3, "survey_name": "S", "survey_closed_at": NOW - dt.timedelta(days=100), "answers": "{}"},
         {"id": 2, "contact_id": 7, "survey_name": "S", "survey_closed_at": NOW - dt.timedelta(days=10), "answers": "{}"}],
    )
    insert(
        engine,
        schema.invoice,
        [
            {"id": 1, "contact_id": 5, "invoice_number": "INV-1", "issued_on": dt.date(2023, 3, 1),
             "financial_year_end": dt.date(2023, 6, 30), "amount": "1200.50", "billing_name": "Billing Five",
             "billing_address": "5 Exempelgatan"},
            {"id": 2, "contact_id": None, "invoice_number": "INV-2", "issued_on": dt.date(2014, 3, 1),
             "financial_year_end": dt.date(2014, 12, 31), "amount": "10.00", "billing_name": "Old",
             "billing_address": "2 Exempelgatan"},
        ],
    )
    insert(
        engine,
        schema.legal_hold,
        [{"id": 1, "record_type": "crm_contact", "record_id": 4, "reason": "Dispute", "expires_at": None}],
    )
    return engine


def frame(engine, record_type: str, now=NOW, **kw) -> pd.DataFrame:
    return CrmConnector(engine, **kw).read_frame(record_type, now=now)


# ------------------------------------------------------------------------------ schema
@pytest.mark.filterwarnings("ignore:Skipped unsupported reflection of expression-based index")
def test_schema_creates_tables_and_indexes(engine):
    insp = sa.inspect(engine)
    assert set(schema.metadata.tables) <= set(insp.get_table_names())
    for table in schema.metadata.tables.values():
        indexed = {tuple(ix["column_names"]) for ix in insp.get_indexes(table.name)}
        for fk in table.foreign_keys:
            assert (fk.parent.name,) in indexed, (table.name, fk.parent.name)
    for table, clock in [("membership", "ends_on"), ("contact", "last_interaction_at"), ("contact", "created_at"),
                         ("communication_note", "noted_at"), ("event_participation", "event_date"),
                         ("course_registration", "course_end"), ("survey_response", "survey_closed_at"),
                         ("invoice", "financial_year_end"), ("legal_hold", "expires_at")]:
        assert (clock,) in {tuple(ix["column_names"]) for ix in insp.get_indexes(table)}, (table, clock)
    schema.drop_schema(engine)
    assert not set(schema.metadata.tables) & set(sa.inspect(engine).get_table_names())
    schema.create_schema(engine)
    schema.create_schema(engine)  # idempotent


# ------------------------------------------------------------------------------ frames
def test_frames_have_exact_columns_and_dtypes(small):
    for rt in RECORD_TYPES:
        f = frame(small, rt)
        assert list(f.columns) == list(FRAME_COLUMNS[rt]), rt
        assert {c: str(t) for c, t in f.dtypes.items()} == FRAME_COLUMNS[rt], rt
        assert len(f) > 0, rt
    c = frame(small, "crm_contact").set_index("record_id")
    assert str(c["last_interaction_at"].dt.tz) == "UTC"
    # an end date comes through as the end of that day in Stockholm
    inv = frame(small, "crm_invoice").set_index("record_id")
    assert inv.loc[1, "financial_year_end"] == day_end("2023-06-30")


def test_empty_table_yields_one_empty_typed_frame(engine):
    frames = list(CrmConnector(engine).iter_frames("crm_contact", now=NOW))
    assert len(frames) == 1 and frames[0].empty
    assert {c: str(t) for c, t in frames[0].dtypes.items()} == FRAME_COLUMNS["crm_contact"]


def test_frames_carry_no_personal_data(small):
    for rt in RECORD_TYPES:
        f = frame(small, rt)
        text = f.astype(str).to_string()
        for needle in ("@example", "Exempel", "Testa", "555-", "Testvägen", "Billing", "Exempelgatan"):
            assert needle not in text, (rt, needle)


def test_contact_relationship_columns(small):
    c = frame(small, "crm_contact").set_index("record_id")
    # renewed: active, no end
    assert c.loc[1, "membership_active"] and pd.isna(c.loc[1, "membership_end"]) and c.loc[1, "is_customer"]
    # ends exactly today: still active today
    assert c.loc[2, "membership_active"] and pd.isna(c.loc[2, "membership_end"])
    # ended yesterday, latest period wins
    assert not c.loc[3, "membership_active"]
    assert c.loc[3, "membership_end"] == day_end(TODAY - dt.timedelta(days=1))
    assert c.loc[3, "opted_out"]
    assert c.loc[4, "membership_active"]  # fixed term running
    assert c.loc[5, "membership_end"] == day_end("2024-02-29")
    assert not c.loc[5, "has_email"] and not c.loc[6, "has_email"] and c.loc[1, "has_email"]
    assert c.loc[5, "has_invoice"] and not c.loc[1, "has_invoice"]
    # organisation without any membership: not a customer
    assert not c.loc[6, "membership_active"] and not c.loc[6, "is_customer"]
    # lead
    assert c.loc[7, "kind"] == "lead" and pd.isna(c.loc[7, "organisation_id"])
    assert not c.loc[7, "membership_active"] and not c.loc[7, "is_customer"] and pd.isna(c.loc[7, "membership_end"])
    assert c.loc[1, "kind"] == "member" and c.loc[1, "organisation_id"] == 1


def test_membership_day_is_the_stockholm_calendar_day(small):
    # 22:30 UTC on 1 June is already 2 June in Stockholm: the period ending 1 June is over.
    late = dt.datetime(2025, 6, 1, 22, 30, tzinfo=UTC)
    c = frame(small, "crm_contact", now=late).set_index("record_id")
    assert not c.loc[2, "membership_active"]
    assert c.loc[2, "membership_end"] == day_end("2025-06-01")
    early = dt.datetime(2025, 6, 1, 21, 30, tzinfo=UTC)  # 23:30 in Stockholm
    assert frame(small, "crm_contact", now=early).set_index("record_id").loc[2, "membership_active"]


def test_event_participation_carries_the_contacts_relationship(small):
    e = frame(small, "crm_event_participation").set_index("record_id")
    assert e.loc[1, "contact_id"] == 3 and e.loc[1, "opted_out"] and not e.loc[1, "membership_active"]
    assert e.loc[1, "membership_end"] == day_end(TODAY - dt.timedelta(days=1))
    assert not e.loc[3, "is_customer"]  # a lead
    assert e.loc[4, "membership_active"] and e.loc[4, "is_customer"]
    assert e.loc[2, "event_date"] == day_end("2024-05-01")


def test_legal_hold_frame(small):
    h = frame(small, "crm_legal_hold")
    assert h.to_dict("records") == [
        {"record_type": "crm_contact", "record_id": 4, "reason": "Dispute", "expires_at": pd.NaT}
    ]


def test_chunking_returns_every_row_exactly_once(engine):
    synthetic.generate(engine, contacts=300, seed=3, now=NOW)
    whole = {rt: frame(engine, rt) for rt in RECORD_TYPES}
    con = CrmConnector(engine, chunk_size=7)
    for rt in RECORD_TYPES:
        chunks = list(con.iter_frames(rt, now=NOW))
        assert all(len(ch) <= 7 for ch in chunks)
        assert len(chunks) == -(-len(whole[rt]) // 7), rt
        joined = pd.concat(chunks, ignore_index=True)
        pd.testing.assert_frame_equal(joined, whole[rt])
        if rt != "crm_legal_hold":
            assert joined["record_id"].is_unique
            assert len(joined) == count(engine, schema.TABLES[rt.removeprefix("crm_")].name)


def test_stopping_early_releases_the_connection(engine):
    synthetic.generate(engine, contacts=100, seed=3, now=NOW)
    con = CrmConnector(engine, chunk_size=10)
    for _ in range(3):
        it = con.iter_frames("crm_contact", now=NOW)
        next(it)
        it.close()
    assert con.erase("crm_contact", [999_999]) == {999_999: "already_gone"}


# ------------------------------------------------------------------------------ erase
CHILDREN = ("communication_note", "event_participation", "course_registration", "survey_response")


def children_of(engine, cid: int) -> dict[str, int]:
    return {t: count(engine, t, f"WHERE contact_id = {cid}") for t in CHILDREN}


def test_erase_contact_takes_its_children_and_is_idempotent(small):
    con = CrmConnector(small)
    assert sum(children_of(small, 3).values()) == 7
    before_other = children_of(small, 1)
    assert con.erase("crm_contact", [3, 7]) == {3: "erased", 7: "erased"}
    assert children_of(small, 3) == dict.fromkeys(CHILDREN, 0)
    assert children_of(small, 7) == dict.fromkeys(CHILDREN, 0)
    assert children_of(small, 1) == before_other
    assert con.existing("crm_contact", [1, 3, 7]) == {1}
    assert con.erase("crm_contact", [3, 7]) == {3: "already_gone", 7: "already_gone"}
    assert con.erase("crm_contact", []) == {}


def test_erase_refuses_contact_with_invoice(small):
    con = CrmConnector(small)
    before = {t: count(small, t) for t in schema.metadata.tables}
    assert con.erase("crm_contact", [5, 1]) == {5: "held_invoice", 1: "erased"}
    assert con.existing("crm_contact", [5]) == {5}
    assert count(small, "invoice", "WHERE contact_id = 5") == 1
    assert count(small, "invoice") == before["invoice"]


def test_minimise_keeps_only_the_bookkeeping_fields(small):
    con = CrmConnector(small)
    insert(small, schema.communication_note, [{"id": 50, "contact_id": 5, "noted_at": NOW, "body": "x"}])
    insert(small, schema.event_participation,
           [{"id": 50, "contact_id": 5, "event_name": "x", "event_date": TODAY, "kind": "event"}])
    with small.connect() as conn:
        inv_before = conn.execute(sa.select(schema.invoice).where(schema.invoice.c.id == 1)).mappings().one()
    assert con.minimise_contacts([5, 2, 404]) == {5: "minimised", 2: "erased", 404: "already_gone"}
    assert con.existing("crm_contact", [5, 2]) == set()
    assert children_of(small, 5) == dict.fromkeys(CHILDREN, 0)
    with small.connect() as conn:
        inv = conn.execute(sa.select(schema.invoice).where(schema.invoice.c.id == 1)).mappings().one()
    assert inv["contact_id"] is None
    for col in ("invoice_number", "issued_on", "financial_year_end", "amount", "billing_name", "billing_address"):
        assert inv[col] == inv_before[col], col
    assert con.minimise_contacts([5]) == {5: "already_gone"}
    # the invoice itself goes only when erase("crm_invoice") is asked for
    assert con.erase("crm_invoice", [1, 1, 3]) == {1: "erased", 3: "already_gone"}
    assert con.existing("crm_invoice", [1, 2]) == {2}


def test_legal_holds_refuse_erasure(small):
    con = CrmConnector(small)
    later = NOW + dt.timedelta(days=3650)  # holds are judged at the time of the call
    insert(
        small,
        schema.legal_hold,
        [
            {"id": 2, "record_type": "crm_contact", "record_id": 1, "reason": "Expired", "expires_at": NOW - dt.timedelta(days=1)},
            {"id": 3, "record_type": "crm_event_participation", "record_id": 1, "reason": "Live", "expires_at": later},
            {"id": 4, "record_type": "crm_survey_response", "record_id": 2, "reason": "Live", "expires_at": None},
            {"id": 5, "record_type": "crm_invoice", "record_id": 2, "reason": "Audit", "expires_at": None},
        ],
    )
    # 4: hold on the contact; 3: hold on one of its events; 7: hold on its survey; 1: expired hold
    assert con.erase("crm_contact", [4, 3, 7, 1]) == {
        4: "held_legal_hold", 3: "held_legal_hold", 7: "held_legal_hold", 1: "erased"
    }
    assert con.existing("crm_contact", [4, 3, 7]) == {4, 3, 7}
    assert children_of(small, 3)["communication_note"] == 3
    assert con.minimise_contacts([4]) == {4: "held_legal_hold"}
    assert con.erase("crm_event_participation", [1, 2]) == {1: "held_legal_hold", 2: "erased"}
    assert con.erase("crm_invoice", [2]) == {2: "held_legal_hold"}
    assert con.erase("crm_survey_response", [1]) == {1: "erased"}
    assert con.erase("crm_course_registration", [1, 2]) == {1: "erased", 2: "already_gone"}  # 2 went with contact 1


@pytest.mark.parametrize("record_type", ["crm_contact", "crm_event_participation", "crm_course_registration",
                                         "crm_survey_response", "crm_invoice"])
def test_the_recheck_judges_the_extracts_frame_read_inside_the_erasure(small, record_type):
    """Right before the deletes, inside their transaction, the records are read again and the
    recheck gets exactly the frame the extract would give for them now (the same columns,
    dtypes and values, by the same conversion); what it returns is left alone
    (``changed_since_plan``) and stays, and the rest of the batch goes ahead."""
    con = CrmConnector(small)
    whole = con.read_frame(record_type)
    ids = [int(i) for i in whole["record_id"]]
    assert len(ids) >= 2
    seen: list[pd.DataFrame] = []

    def recheck(frame: pd.DataFrame) -> set[int]:
        seen.append(frame)
        return {ids[0]}

    out = con.erase(record_type, ids, recheck=recheck)
    assert len(seen) == 1, "the erasure did not read the records' current state"
    pd.testing.assert_frame_equal(
        seen[0].sort_values("record_id").reset_index(drop=True), whole.sort_values("record_id").reset_index(drop=True)
    )
    assert out[ids[0]] == "changed_since_plan"
    assert con.existing(record_type, [ids[0]]) == {ids[0]}
    assert "erased" in out.values()


@pytest.mark.parametrize("record_type", ["crm_contact", "crm_event_participation", "crm_course_registration",
                                         "crm_survey_response", "crm_invoice"])
def test_the_recheck_of_a_batch_sees_what_a_whole_read_says_of_its_records(engine, record_type):
    """For any batch, however it cuts through organisations and a contact's records, the frame
    the erasure re-reads gives each record the row a whole read gives it (membership active or
    ended and when, customer or not, invoice or not): a batch's check never judges a record on a
    part of what it belongs to. (A batch-scoped read of the memberships and invoices was
    measured and was slower: PostgreSQL aggregates the whole membership table in about 0.1 s.)"""
    synthetic.generate(engine, contacts=1200, seed=7, now=NOW)
    con = CrmConnector(engine)
    whole = con.read_frame(record_type).set_index("record_id", drop=False)  # now, as the erasure reads
    ids = [int(i) for i in whole["record_id"]]
    rng = random.Random(3)
    batches = [ids[:1], ids[:50], ids[::7], rng.sample(ids, min(300, len(ids))), ids]
    if record_type == "crm_contact":  # the edge cases: renewed, ending today, ended, leads, invoices
        assert whole["membership_active"].any() and whole["membership_end"].notna().any() and whole["has_invoice"].any()
    for batch in batches:
        seen: list[pd.DataFrame] = []
        out = _recheck_only(con, record_type, batch, seen)
        assert set(out.values()) == {"changed_since_plan"}  # all left alone: nothing erased
        got = seen[0].sort_values("record_id").reset_index(drop=True)
        want = whole.loc[sorted(batch)].reset_index(drop=True)
        pd.testing.assert_frame_equal(got, want)
    assert len(con.read_frame(record_type)) == len(whole)


def _recheck_only(con: CrmConnector, record_type: str, batch: list[int], seen: list) -> dict[int, str]:
    """An erasure whose recheck records the batch's frame and leaves every record alone."""

    def recheck(frame: pd.DataFrame) -> set[int]:
        seen.append(frame)
        return {int(i) for i in frame["record_id"]}

    return con.erase(record_type, batch, recheck=recheck)


def _state(engine) -> dict[str, list[int]]:
    with engine.connect() as conn:
        return {t: sorted(conn.exec_driver_sql(f"SELECT id FROM {t}").scalars()) for t in (*CHILDREN, "contact", "invoice")}


def _erase_in_parts(engine, record_type: str, ids: list[int], parts: int, recheck) -> dict[int, str]:
    con = CrmConnector(engine, erase_connections=parts)
    if record_type == "crm_contact":
        return con.minimise_contacts(ids, recheck=recheck)
    return con.erase(record_type, ids, recheck=recheck)


@pytest.mark.parametrize("record_type", ["crm_contact", "crm_event_participation"])
def test_a_large_batch_goes_in_parts_side_by_side_with_the_outcomes_of_one(engine, record_type, monkeypatch):
    """On PostgreSQL a batch is split into ``erase_connections`` parts, each its own transaction,
    side by side: each part's check runs while the other's rows are locked (a barrier both must
    reach at once, which one transaction after the other never does). The outcomes and what is
    left in the database are those of one transaction over the whole batch: holds, invoices and
    the check's verdicts alike. SQLite (one writer at a time) keeps one transaction."""
    import threading

    import retention.systems.crm.erasure as erasure

    monkeypatch.setattr(erasure, "MIN_PART", 50)
    postgres = engine.dialect.name == "postgresql"

    def seeded() -> list[int]:
        synthetic.generate(engine, contacts=600, seed=11, now=NOW)
        ids = [int(i) for i in CrmConnector(engine).read_frame(record_type)["record_id"]]
        held = ids[5]  # a live manual hold in the CRM's own list
        insert(engine, schema.legal_hold,
               [{"id": 9001, "record_type": record_type, "record_id": held, "reason": "Dispute", "expires_at": None}])
        return ids

    def with_a_fresh_crm() -> None:
        if postgres:
            with engine.connect() as conn:
                namespace = conn.exec_driver_sql("SELECT current_schema()").scalar()
            reset_namespace(engine, namespace)
        else:
            schema.metadata.drop_all(engine)
        schema.create_schema(engine)

    ids = seeded()
    leave = set(ids[1::9])  # what the check says may no longer be erased
    seen: list[list[int]] = []
    meet = threading.Barrier(2, timeout=20)

    def side_by_side(frame: pd.DataFrame) -> set[int]:
        seen.append(sorted(int(i) for i in frame["record_id"]))
        if postgres:
            meet.wait()  # both parts in their transactions, rows locked, at the same time
        return {int(i) for i in frame["record_id"]} & leave

    batch = [*ids, 10**9]  # and one never there
    split = _erase_in_parts(engine, record_type, batch, 2, side_by_side)
    after_split = _state(engine)
    assert len(seen) == (2 if postgres else 1)
    assert sorted(i for part in seen for i in part) == sorted(ids), "every record checked once, in one part"

    with_a_fresh_crm()
    assert seeded() == ids
    whole = _erase_in_parts(engine, record_type, batch, 1, lambda f: {int(i) for i in f["record_id"]} & leave)
    assert split == whole
    assert _state(engine) == after_split
    assert split[10**9] == "already_gone" and split[ids[5]] == "held_legal_hold" and split[ids[1]] == "changed_since_plan"
    assert {"erased", "minimised"} & set(split.values())


def test_a_part_that_fails_leaves_the_other_committed_and_raises(engine, monkeypatch):
    """A part whose transaction fails rolls back alone: the other part's erasures stand (as a
    killed call's would), every part runs to its end, and the failure reaches the caller, whose
    retry then finds those records gone."""
    import retention.systems.crm.erasure as erasure

    monkeypatch.setattr(erasure, "MIN_PART", 50)
    synthetic.generate(engine, contacts=300, seed=4, now=NOW)
    ids = sorted(int(i) for i in CrmConnector(engine).read_frame("crm_event_participation")["record_id"])
    assert len(ids) >= 100

    def fail_the_first_part(frame: pd.DataFrame) -> set[int]:
        if ids[0] in set(frame["record_id"].astype(int)):
            raise RuntimeError("the check failed")
        return set()

    with pytest.raises(RuntimeError, match="the check failed"):
        _erase_in_parts(engine, "crm_event_participation", ids, 2, fail_the_first_part)
    left = set(_state(engine)["event_participation"]) & set(ids)
    if engine.dialect.name == "postgresql":
        half = -(-len(ids) // 2)
        assert left == set(ids[:half])  # the failed part rolled back, the other committed
    else:
        assert left == set(ids)  # one transaction: nothing erased


def test_erase_rejects_unknown_or_protected_record_types(small):
    con = CrmConnector(small)
    with pytest.raises(ValueError):
        con.erase("crm_legal_hold", [1])
    with pytest.raises(ValueError):
        con.erase("newsletter_member", [1])
    with pytest.raises(ValueError):
        list(con.iter_frames("crm_nothing"))
    with pytest.raises(TypeError):
        con.erase("crm_contact", [True])


def test_statements_per_batch_do_not_grow_with_the_batch(engine):
    synthetic.generate(engine, contacts=1200, seed=5, now=NOW)
    con = CrmConnector(engine)
    f = con.read_frame("crm_contact", now=NOW)
    ids = f.loc[~f["has_invoice"], "record_id"].tolist()
    statements: list[str] = []

    def track(conn, cursor, statement, *args):
        statements.append(statement)

    sa.event.listen(engine, "before_cursor_execute", track)
    try:
        per_call = []
        for batch in (ids[:5], ids[5:505]):
            statements.clear()
            out = con.erase("crm_contact", batch)
            per_call.append(len(statements))
            assert set(out.values()) <= {"erased", "held_legal_hold"}
        statements.clear()
        con.minimise_contacts(ids[600:1000])
        minimise = len(statements)
    finally:
        sa.event.remove(engine, "before_cursor_execute", track)
    assert per_call[0] == per_call[1] <= 6
    assert minimise <= 7


def test_find_contact_ids_by_email(small):
    con = CrmConnector(small)
    assert con.find_contact_ids_by_email("PERSON3@Example.ORG ") == [3]
    assert con.find_contact_ids_by_email("nobody@example.org") == []
    assert con.find_contact_ids_by_email("") == []


def test_logs_carry_no_personal_data(small, caplog):
    caplog.set_level(logging.DEBUG, logger="retention")
    con = CrmConnector(small)
    con.find_contact_ids_by_email("person3@example.org")
    for rt in RECORD_TYPES:
        con.read_frame(rt, now=NOW)
    con.erase("crm_contact", [3, 5])
    con.minimise_contacts([5])
    assert caplog.records
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "@" not in text and "Exempel" not in text and "555" not in text


# ------------------------------------------------------------------------------ malformed
def test_malformed_rows_come_through_as_nat(engine):
    synthetic.generate(engine, contacts=60, seed=1, now=NOW)
    bad = synthetic.generate_malformed(engine, now=NOW)
    clocks = {
        "crm_event_participation": "event_date",
        "crm_course_registration": "course_end",
        "crm_survey_response": "survey_closed_at",
        "crm_invoice": "financial_year_end",
    }
    con = CrmConnector(engine, chunk_size=25)
    for rt, clock in clocks.items():
        f = con.read_frame(rt, now=NOW).set_index("record_id")
        assert f.loc[bad[rt], clock].isna().all(), rt
        assert f.drop(index=bad[rt])[clock].notna().all(), rt
    c = con.read_frame("crm_contact", now=NOW).set_index("record_id")
    null, future, *impossible = bad["crm_contact"]
    assert pd.isna(c.loc[null, "last_interaction_at"]) and pd.isna(c.loc[null, "created_at"])
    assert c.loc[future, "last_interaction_at"] > pd.Timestamp(NOW)
    for cid in impossible:  # SQLite only: '2023-02-30' and 'yesterday-ish'
        assert pd.isna(c.loc[cid, "last_interaction_at"]) and pd.isna(c.loc[cid, "created_at"])
    if engine.dialect.name == "sqlite":
        assert impossible and len(bad["crm_invoice"]) == 2


def test_impossible_membership_end_is_nat(tmp_path):
    # SQLite only: PostgreSQL's date type cannot hold 2023-02-30.
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'crm.db'}")
    schema.create_schema(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO organisation (id, name) VALUES (1, 'O')")
        conn.exec_driver_sql(
            "INSERT INTO membership (id, organisation_id, starts_on, ends_on) VALUES (1, 1, '2020-01-01', '2023-02-30')"
        )
    insert(engine, schema.contact, [contact_row(1, 1)])
    c = frame(engine, "crm_contact").set_index("record_id")
    assert not c.loc[1, "membership_active"] and pd.isna(c.loc[1, "membership_end"]) and c.loc[1, "is_customer"]


# ------------------------------------------------------------------------------ mapping
RENAMES = {
    # logical table: (physical table, {logical column: physical column})
    "contact": ("person", {"email": "e_mail", "last_interaction_at": "last_touch", "organisation_id": "org_ref"}),
    "communication_note": ("person_note", {"contact_id": "person_ref"}),
    "event_participation": ("tag", {"contact_id": "person_ref", "event_date": "held_on"}),
    "membership": ("member_period", {"ends_on": "valid_to", "organisation_id": "org_ref"}),
    "invoice": ("bill", {"contact_id": "person_ref", "financial_year_end": "fy_end"}),
    "legal_hold": ("hold_list", {"expires_at": "until"}),
}


def rename_database(engine) -> None:
    with engine.begin() as conn:
        for logical, (table, cols) in RENAMES.items():
            for old, new in cols.items():
                conn.exec_driver_sql(f"ALTER TABLE {logical} RENAME COLUMN {old} TO {new}")
            conn.exec_driver_sql(f"ALTER TABLE {logical} RENAME TO {table}")


def write_mapping(path: Path) -> Path:
    doc = {"version": 1, "tables": {lt: {"table": t, "columns": cols} for lt, (t, cols) in RENAMES.items()}}
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def test_mapping_reads_and_erases_renamed_tables(engine, tmp_path):
    synthetic.generate(engine, contacts=150, seed=9, now=NOW)
    before = {rt: frame(engine, rt) for rt in RECORD_TYPES}
    rename_database(engine)
    with pytest.raises(MappingError):
        CrmConnector(engine).check()  # the default mapping no longer matches
    mapping = CrmMapping.load(write_mapping(tmp_path / "crm_mapping.yaml"), engine=engine)
    con = CrmConnector(engine, mapping, chunk_size=40)
    for rt in RECORD_TYPES:
        pd.testing.assert_frame_equal(con.read_frame(rt, now=NOW), before[rt])
    contacts = before["crm_contact"]
    holds = before["crm_legal_hold"]
    held = contacts["record_id"].isin(holds.loc[holds["record_type"] == "crm_contact", "record_id"])
    plain = contacts.loc[~contacts["has_invoice"] & ~held, "record_id"].head(20).tolist()
    billed = contacts.loc[contacts["has_invoice"] & ~held, "record_id"].head(3).tolist()
    bills = count(engine, "bill")
    out = con.erase("crm_contact", plain + billed)
    assert out == {**dict.fromkeys(plain, "erased"), **dict.fromkeys(billed, "held_invoice")}
    assert con.existing("crm_contact", plain + billed) == set(billed)
    ids = ",".join(map(str, plain))
    assert count(engine, "person_note", f"WHERE person_ref IN ({ids})") == 0
    assert count(engine, "tag", f"WHERE person_ref IN ({ids})") == 0
    assert con.minimise_contacts(billed) == dict.fromkeys(billed, "minimised")
    assert count(engine, "bill", f"WHERE person_ref IN ({','.join(map(str, billed))})") == 0
    assert count(engine, "bill") == bills
    owner = int(contacts["record_id"].iloc[-1])
    with engine.connect() as conn:
        email = conn.exec_driver_sql(f"SELECT e_mail FROM person WHERE id = {owner}").scalar()
    assert con.find_contact_ids_by_email(email.upper()) == [owner]


def test_shipped_mapping_is_the_identity(engine):
    shipped = CrmMapping.load(ROOT / "include" / "crm_mapping.yaml", engine=engine)
    assert shipped.to_dict() == CrmMapping.default().to_dict()


def test_mapping_errors_name_file_table_and_column(engine, tmp_path):
    def load(doc, **kw):
        p = tmp_path / "bad.yaml"
        p.write_text(yaml.safe_dump(doc), encoding="utf-8")
        return CrmMapping.load(p, **kw)

    with pytest.raises(MappingError, match=r"bad\.yaml.*'customers'.*unknown logical table"):
        load({"tables": {"customers": {"table": "x"}}})
    with pytest.raises(MappingError, match=r"bad\.yaml.*'contact'.*'mail'.*unknown logical column"):
        load({"tables": {"contact": {"columns": {"mail": "email"}}}})
    with pytest.raises(MappingError, match=r"'contact'.*'email'.*required"):
        load({"tables": {"contact": {"columns": {"email": None}}}})
    with pytest.raises(MappingError, match=r"bad\.yaml.*'contact'.*'email'.*'e_mail' does not exist"):
        load({"tables": {"contact": {"columns": {"email": "e_mail"}}}}, engine=engine)
    with pytest.raises(MappingError, match=r"bad\.yaml.*'invoice'.*'bills'.*does not exist"):
        load({"tables": {"invoice": {"table": "bills"}}}, engine=engine)
    with pytest.raises(MappingError, match="bad.yaml"):
        (tmp_path / "bad.yaml").write_text("tables: [unclosed", encoding="utf-8")
        CrmMapping.load(tmp_path / "bad.yaml")
    with pytest.raises(MappingError, match="cannot read"):
        CrmMapping.load(tmp_path / "missing.yaml")
    # optional columns may be absent from a foreign CRM
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE contact DROP COLUMN workplace")
    load({"tables": {"contact": {"columns": {"workplace": None}}}}, engine=engine)
