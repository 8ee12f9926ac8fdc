"""The synthetic CRM generator: determinism, shape, due share, edge cases (SQLite and PostgreSQL).

PostgreSQL: ``RETENTION_TEST_PG_URL`` when set, else ``scripts/postgres.sh retention_crm_test``;
this module works in its own PostgreSQL schema (namespace), dropped at the end.
"""

from __future__ import annotations

import datetime as dt
import decimal
import os
import subprocess
import uuid
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa

from retention.systems.crm import schema
from retention.systems.crm.client import RECORD_TYPES, CrmConnector
from retention_dev.synthetic import crm as synthetic

ROOT = Path(__file__).resolve().parents[1]
NOW = dt.datetime(2025, 6, 1, 10, 0, tzinfo=dt.UTC)
TODAY = dt.date(2025, 6, 1)


def day_end(day) -> pd.Timestamp:
    """A calendar date that ends something (the record schema's ``end_of_day`` clocks) as the
    frame carries it: the end of that day in Stockholm, 00:00 of the next."""
    return pd.Timestamp(pd.Timestamp(day).date() + dt.timedelta(days=1), tz="Europe/Stockholm")


@pytest.fixture(scope="module")
def pg_url():
    url = os.environ.get("RETENTION_TEST_PG_URL")
    if not url:
        proc = subprocess.run(
            [str(ROOT / "scripts" / "postgres.sh"), "retention_crm_test"],
            check=False, capture_output=True, text=True, timeout=600,
        )
        if proc.returncode != 0 or not proc.stdout.strip():
            pytest.fail(f"PostgreSQL for the CRM tests could not be started:\n{proc.stderr}", pytrace=False)
        url = proc.stdout.strip().splitlines()[-1]
    namespace = f"crm_synth_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(url)
    yield url, namespace
    with admin.begin() as conn:
        conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{namespace}" CASCADE')
    admin.dispose()


class Backend:
    """An engine plus a way to start over with an empty reference schema."""

    def __init__(self, kind: str, tmp_path: Path, pg=None):
        self.kind = kind
        if kind == "sqlite":
            self.path = tmp_path / "crm.db"
            self.engine = sa.create_engine(f"sqlite:///{self.path}")
        else:
            url, self.namespace = pg
            self.engine = sa.create_engine(url, connect_args={"options": f"-c search_path={self.namespace}"})
        self.reset()

    def reset(self) -> sa.Engine:
        if self.kind == "sqlite":
            self.engine.dispose()
            self.path.unlink(missing_ok=True)
        else:
            with self.engine.begin() as conn:
                conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{self.namespace}" CASCADE')
                conn.exec_driver_sql(f'CREATE SCHEMA "{self.namespace}"')
        schema.create_schema(self.engine)
        return self.engine


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path):
    b = Backend(request.param, tmp_path, request.getfixturevalue("pg_url") if request.param != "sqlite" else None)
    yield b
    if b.kind != "sqlite":
        with b.engine.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{b.namespace}" CASCADE')
    b.engine.dispose()


def norm(v):
    """Stored values compared across backends: SQLite keeps dates/timestamps as text."""
    if isinstance(v, dt.datetime):
        v = v.astimezone(dt.UTC).replace(tzinfo=None) if v.tzinfo else v
        return v.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(v, dt.date):
        return v.isoformat()
    if isinstance(v, str) and len(v) >= 19 and v[4] == "-" and v[10] in " T" and v[13] == ":":
        return v[:10] + " " + v[11:19]
    if isinstance(v, decimal.Decimal | float):
        return f"{float(v):.2f}"
    if isinstance(v, bool):
        return int(v)
    return v


def dump(engine) -> dict[str, list[tuple]]:
    with engine.connect() as conn:
        return {
            name: [tuple(norm(v) for v in row) for row in conn.execute(sa.select(t).order_by(t.c.id))]
            for name, t in schema.metadata.tables.items()
        }


def table_counts(engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {
            name: conn.execute(sa.select(sa.func.count()).select_from(t)).scalar()
            for name, t in schema.metadata.tables.items()
        }


def test_same_seed_same_rows_different_seed_different_rows(backend):
    counts = synthetic.generate(backend.engine, contacts=800, seed=42, now=NOW)
    first = dump(backend.engine)
    assert counts == table_counts(backend.engine) == {k: len(v) for k, v in first.items()}
    assert counts["contact"] == 800
    synthetic.generate(backend.reset(), contacts=800, seed=42, now=NOW)
    assert dump(backend.engine) == first
    synthetic.generate(backend.reset(), contacts=800, seed=43, now=NOW)
    other = dump(backend.engine)
    assert other["contact"] != first["contact"] and other["communication_note"] != first["communication_note"]


def test_same_rows_on_sqlite_and_postgresql(tmp_path, pg_url):
    lite = Backend("sqlite", tmp_path)
    pg = Backend("postgresql", tmp_path, pg_url)
    try:
        for b in (lite, pg):
            synthetic.generate(b.engine, contacts=500, seed=7, now=NOW, notes_per_contact=1.5)
        a, b = dump(lite.engine), dump(pg.engine)
        for table in schema.metadata.tables:
            assert a[table] == b[table], table
        for rt in RECORD_TYPES:
            pd.testing.assert_frame_equal(
                CrmConnector(lite.engine).read_frame(rt, now=NOW),
                CrmConnector(pg.engine).read_frame(rt, now=NOW),
                obj=rt,
            )
    finally:
        lite.engine.dispose()
        with pg.engine.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{pg.namespace}" CASCADE')
        pg.engine.dispose()


def due_contacts(f: pd.DataFrame, now: dt.datetime) -> pd.Series:
    """The notice's contact rules, as the rule engine will apply them (bulk data keeps away
    from the exact boundaries, so calendar subtleties do not matter here)."""
    year = pd.DateOffset(years=1)
    now = pd.Timestamp(now)
    member = (f["kind"] == "member") & f["membership_end"].notna() & (
        (f["membership_end"] + year <= now) | f["opted_out"]
    )
    lead = (f["kind"] == "lead") & ((f["last_interaction_at"] + year <= now) | f["opted_out"])
    return ~f["membership_active"] & (member | lead)


@pytest.mark.parametrize("share", [0.10, 0.30])
def test_about_due_share_of_contacts_are_due(tmp_path, share):
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'crm.db'}")
    synthetic.generate(engine, contacts=6000, seed=1, now=NOW, due_share=share)
    f = CrmConnector(engine).read_frame("crm_contact", now=NOW)
    due = due_contacts(f, NOW)
    assert abs(due.mean() - share) < 0.02, due.mean()
    # the rest is a mix of active members, recently ended members and recent leads
    assert f["membership_active"].mean() > 0.4
    assert 0.02 < f["has_invoice"].mean() < 0.08


def test_notes_and_tags_per_contact(tmp_path):
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'crm.db'}")
    counts = synthetic.generate(engine, contacts=3000, seed=2, now=NOW, notes_per_contact=4, tags_per_contact=0.5)
    assert abs(counts["communication_note"] / 3000 - 4) < 0.2
    assert abs(counts["event_participation"] / 3000 - 0.5) < 0.1
    counts = synthetic.generate(
        sa.create_engine(f"sqlite:///{tmp_path / 'none.db'}"), contacts=50, seed=2, now=NOW,
        notes_per_contact=0, tags_per_contact=0,
    )
    assert counts["contact"] == 50


def test_edge_cases_present(backend):
    engine = backend.engine
    synthetic.generate(engine, contacts=300, seed=5, now=NOW)
    con = CrmConnector(engine)
    c = con.read_frame("crm_contact", now=NOW)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(schema.organisation.c.name, schema.contact.c.id, schema.membership.c.ends_on)
            .join(schema.contact, schema.contact.c.organisation_id == schema.organisation.c.id)
            .join(schema.membership, schema.membership.c.organisation_id == schema.organisation.c.id)
            .where(schema.organisation.c.name.like("Edge:%"))
        ).all()
    ends: dict[str, list] = {}
    contact_of: dict[str, int] = {}
    for name, cid, end in rows:
        ends.setdefault(name, []).append(norm(end))
        contact_of[name] = cid
    c = c.set_index("record_id")

    def state(name):
        return c.loc[contact_of[f"Edge: {name}"]]

    assert ends["Edge: membership ends today"] == ["2025-06-01"]
    assert state("membership ends today")["membership_active"]
    assert ends["Edge: membership ended exactly one year ago"] == ["2024-06-01"]
    assert state("membership ended exactly one year ago")["membership_end"] == day_end("2024-06-01")
    assert ends["Edge: membership ended 2024-02-29"] == ["2024-02-29"]
    renewed = ends["Edge: renewed membership (ended period, then open)"]
    assert len(renewed) == 2 and None in renewed
    assert state("renewed membership (ended period, then open)")["membership_active"]
    old = state("active member with old data")
    assert old["membership_active"] and old["last_interaction_at"] < pd.Timestamp(NOW) - pd.DateOffset(years=5)
    assert state("opted-out member of an active organisation")["opted_out"]
    leads = c[c["kind"] == "lead"]
    assert (leads["opted_out"]).sum() >= 2
    assert (leads["last_interaction_at"] == pd.Timestamp("2024-06-01 10:00", tz="UTC")).any()
    assert (~leads["has_email"]).any()

    inv = con.read_frame("crm_invoice", now=NOW)
    fy = set((inv["financial_year_end"].dt.tz_convert("Europe/Stockholm") - pd.Timedelta(days=1)).dt.strftime("%Y-%m-%d"))
    assert {"2017-06-30", "2018-06-30", "2017-12-31", "2018-12-31", "2016-06-30"} <= fy  # both sides of 1 Jan 2025
    assert inv["contact_id"].isna().any()  # a detached invoice

    holds = con.read_frame("crm_legal_hold", now=NOW)
    live = holds["expires_at"].isna() | (holds["expires_at"] > pd.Timestamp(NOW))
    assert live.any() and (~live).any() and holds["expires_at"].isna().any()
    assert {"crm_contact", "crm_invoice"} <= set(holds["record_type"])

    e = con.read_frame("crm_event_participation", now=NOW)
    assert (~e["is_customer"] & (e["event_date"] == day_end("2024-05-31"))).any()
    courses = con.read_frame("crm_course_registration", now=NOW)
    assert (courses["course_end"] == day_end(TODAY - dt.timedelta(days=90))).any()
    surveys = con.read_frame("crm_survey_response", now=NOW)
    assert (surveys["survey_closed_at"] == pd.Timestamp(NOW - dt.timedelta(days=90))).any()


def test_generated_data_has_no_real_looking_contact_details(tmp_path):
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'crm.db'}")
    synthetic.generate(engine, contacts=400, seed=8, now=NOW)
    with engine.connect() as conn:
        emails = conn.exec_driver_sql("SELECT email FROM contact WHERE email <> ''").scalars().all()
        phones = conn.exec_driver_sql("SELECT phone FROM contact").scalars().all()
    assert all(e.rsplit("@", 1)[1] in ("example.org", "example.com", "example.net") for e in emails)
    assert all(p.startswith("555-") for p in phones)


def test_refuses_a_non_empty_crm_and_bad_arguments(tmp_path):
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'crm.db'}")
    synthetic.generate(engine, contacts=20, seed=1, now=NOW)
    with pytest.raises(RuntimeError, match="empty"):
        synthetic.generate(engine, contacts=20, seed=1, now=NOW)
    with pytest.raises(ValueError):
        synthetic.generate(engine, contacts=20, seed=1, now=NOW, due_share=1.5)


def test_postgresql_load_restores_constraints_and_sequences(pg_url, tmp_path):
    pg = Backend("postgresql", tmp_path, pg_url)
    try:
        engine = pg.engine
        insp = sa.inspect(engine)
        fks_before = {t: len(insp.get_foreign_keys(t)) for t in schema.metadata.tables}
        ix_before = {t: sorted(ix["name"] for ix in insp.get_indexes(t)) for t in schema.metadata.tables}
        counts = synthetic.generate(engine, contacts=1000, seed=3, now=NOW)
        insp = sa.inspect(engine)
        assert {t: len(insp.get_foreign_keys(t)) for t in schema.metadata.tables} == fks_before
        assert {t: sorted(ix["name"] for ix in insp.get_indexes(t)) for t in schema.metadata.tables} == ix_before
        with engine.begin() as conn:
            new_id = conn.execute(
                schema.contact.insert().values(kind="lead", opted_out=False).returning(schema.contact.c.id)
            ).scalar()
            assert new_id == counts["contact"] + 1
            with pytest.raises(sa.exc.IntegrityError), conn.begin_nested():
                conn.execute(schema.communication_note.insert().values(contact_id=10**9, body="orphan"))
    finally:
        with pg.engine.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{pg.namespace}" CASCADE')
        pg.engine.dispose()
