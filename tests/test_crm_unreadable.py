"""CRM values read strictly, and one bad row never stops the CRM (issue 10, items 5 and 7).

A CRM whose columns mix storage types: ``contact.opted_out`` holding text ('no', 'false', '0',
'yes', 't', '', 'maybe') beside integers, a membership that "ended" in year 1, a contact whose
``kind`` is not UTF-8, and a ``survey_response`` table with text ids (one non-numeric, one NULL)
and text clocks (one unparsable, one in year 1). On PostgreSQL the database is ``SQL_ASCII``, as
old CRMs are, so text columns can hold any bytes. Every outcome is judged from the database
with plain SQL and from the run's report: the unreadable rows are quarantined with the column
named, nothing is erased on a guess, and the rest is erased normally.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from retention.runs import nightly as P
from retention.systems.crm import schema
from retention.systems.crm.adapter import CrmAdapter
from retention.systems.crm.client import CrmConnector

UTC = dt.UTC
DAG_ID = "retention_nightly"
PG_DB = "retention_crm_unreadable_test"
SQL_ASCII_DB = "retention_crm_sqlascii_test"

NOW = dt.datetime.now(UTC)
RECENT = NOW - dt.timedelta(days=30)  # a lead's last interaction: due only when opted out (P0D)
LONG_AGO = NOW - dt.timedelta(days=3 * 365)
# A value the connector must never echo (logs, errors, report): it is what a person could write.
SECRET = "maybe-secret-value"

# contact id -> stored opted_out; every one a lead last heard of 30 days ago.
OPTED_OUT = {
    1: 1, 2: "no", 3: "false", 4: "0", 5: "yes", 6: "t", 7: "f", 8: "", 9: SECRET, 10: "TRUE ", 11: " No",
}
ERASED_CONTACTS = {1, 5, 6, 10}  # opted out, so due at once
KEPT_CONTACTS = {2, 3, 4, 7, 11}  # not opted out: due in a year
UNREADABLE_OPTED_OUT = {8, 9}
MEMBER_YEAR_ONE = 12  # a former member whose membership "ended" 0001-01-01
NOT_UTF8 = 13  # opted out and due, but its kind is bytes that are not UTF-8
# survey_response rows: (id, closed at); all belong to contact 2 (kept).
SURVEYS = [
    ("101", LONG_AGO.strftime("%Y-%m-%dT%H:%M:%SZ")),  # due (P90D), erased
    ("102", "soon"),  # unreadable clock
    ("103", "0001-01-01 00:00:00"),  # year 1: unreadable, never due at once
    ("LEGACY-7", LONG_AGO.strftime("%Y-%m-%d %H:%M:%S")),  # non-numeric id
    (None, LONG_AGO.strftime("%Y-%m-%d %H:%M:%S")),  # NULL id
    ("104", (NOW - dt.timedelta(days=10)).strftime("%Y-%m-%d")),  # closed 10 days ago: kept
]


@pytest.fixture(params=["sqlite", "postgresql"])
def crm_url(request, tmp_path, retention_home):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'crm.db'}"
        return
    try:
        base = request.getfixturevalue("postgres_url_for")(PG_DB)
    except Exception as exc:  # noqa: BLE001 - a missing PostgreSQL is a failure, not a skip
        pytest.fail(f"PostgreSQL could not be started: {exc}", pytrace=False)
    url = sql_ascii_database(base)
    engine = sa.create_engine(url)
    reset_pg(engine)
    yield url
    reset_pg(engine)
    engine.dispose()


def sql_ascii_database(base_url: str) -> str:
    """A database whose encoding is SQL_ASCII (text columns take any bytes), created once."""
    url = sa.make_url(base_url)
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        if not conn.exec_driver_sql("SELECT 1 FROM pg_database WHERE datname = %s", (SQL_ASCII_DB,)).first():
            conn.exec_driver_sql(
                f"CREATE DATABASE {SQL_ASCII_DB} ENCODING 'SQL_ASCII' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'"
            )
    admin.dispose()
    return url.set(database=SQL_ASCII_DB).render_as_string(hide_password=False)


def reset_pg(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP SCHEMA IF EXISTS public CASCADE")
        conn.exec_driver_sql("CREATE SCHEMA public")
    engine.dispose()


def build_crm(url: str) -> None:
    """The reference schema, then the foreign parts: a text ``opted_out`` (SQLite keeps text in
    its BOOLEAN column as it is), a ``survey_response`` with text ids and clocks, and values
    that cannot be read."""
    engine = sa.create_engine(url)
    pg = engine.dialect.name == "postgresql"
    schema.metadata.create_all(engine)
    with engine.begin() as conn:
        if pg:
            conn.exec_driver_sql("ALTER TABLE contact ALTER COLUMN opted_out DROP DEFAULT")
            conn.exec_driver_sql("ALTER TABLE contact ALTER COLUMN opted_out TYPE text USING opted_out::text")
        conn.exec_driver_sql("DROP TABLE survey_response")
        conn.exec_driver_sql(
            "CREATE TABLE survey_response (id TEXT, contact_id BIGINT, survey_name TEXT, survey_closed_at TEXT, answers TEXT)"
        )
        conn.execute(
            sa.insert(schema.organisation), [{"id": 1, "name": "Year One AB"}]
        )
        conn.execute(
            sa.insert(schema.membership),
            [{"id": 1, "organisation_id": 1, "starts_on": dt.date(1, 1, 1), "ends_on": dt.date(1, 1, 1)}],
        )
        rows = [
            {"id": cid, "kind": "lead", "email": f"c{cid}@example.org", "opted_out": value}
            for cid, value in OPTED_OUT.items()
        ]
        rows.append({"id": MEMBER_YEAR_ONE, "kind": "member", "email": "m@example.org", "opted_out": "false", "organisation_id": 1})
        rows.append({"id": NOT_UTF8, "kind": "lead", "email": "u@example.org", "opted_out": "true"})
        for r in rows:
            conn.exec_driver_sql(
                "INSERT INTO contact (id, organisation_id, kind, email, opted_out, last_interaction_at, created_at) "
                "VALUES (%(id)s, %(org)s, %(kind)s, %(email)s, %(opted_out)s, %(last)s, %(created)s)"
                if pg else
                "INSERT INTO contact (id, organisation_id, kind, email, opted_out, last_interaction_at, created_at) "
                "VALUES (:id, :org, :kind, :email, :opted_out, :last, :created)",
                {
                    **r, "org": r.get("organisation_id"),
                    "last": RECENT if pg else RECENT.strftime("%Y-%m-%d %H:%M:%S.%f"),
                    "created": LONG_AGO if pg else LONG_AGO.strftime("%Y-%m-%d %H:%M:%S.%f"),
                },
            )
        # 'lea' then a byte that is not UTF-8 (latin-1 e-acute); a foreign CRM need not check kind.
        if pg:
            conn.exec_driver_sql("ALTER TABLE contact DROP CONSTRAINT ck_contact_kind")
            conn.exec_driver_sql(f"UPDATE contact SET kind = E'lea\\xe9' WHERE id = {NOT_UTF8}")
        else:
            conn.exec_driver_sql("PRAGMA ignore_check_constraints = ON")
            conn.exec_driver_sql(f"UPDATE contact SET kind = CAST(X'6C6561E9' AS TEXT) WHERE id = {NOT_UTF8}")
        for sid, closed in SURVEYS:
            conn.execute(
                sa.text("INSERT INTO survey_response (id, contact_id, survey_closed_at) VALUES (:id, 2, :closed)"),
                {"id": sid, "closed": closed},
            )
    engine.dispose()


def table_ids(url: str, table: str) -> set:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return {r[0] for r in conn.exec_driver_sql(f"SELECT id FROM {table}")}
    finally:
        engine.dispose()


def run_pipeline(url: str, as_of: dt.datetime, before_erase=None) -> tuple[P.RunInfo, dict]:
    run_id = f"manual__crm_unreadable_{uuid.uuid4().hex[:8]}"
    info = P.RunInfo.from_dict(P.open_run(DAG_ID, run_id, as_of, dry_run=False, max_plan_share=1.0))
    adapter = CrmAdapter(CrmConnector(sa.create_engine(url)))
    try:
        P.extract(info, "crm", adapter)
        P.plan(info, "crm")
        P.validate(info, "crm")
        if before_erase is not None:
            before_erase()
        P.erase(info, "crm", adapter)
        P.verify(info, "crm", adapter)
    finally:
        adapter.close()
        report_step = P.report(info, ("crm",))
    return info, json.loads(Path(report_step["report"]).read_text())


EXPECTED_QUARANTINE = {
    "crm_contact": {"unreadable opted_out": 2, "unreadable membership_end": 1, "unreadable kind": 1},
    "crm_survey_response": {"unreadable record_id": 1, "missing key": 1, "unreadable survey_closed_at": 2},
}


def assert_outcome(url: str, report: dict) -> None:
    contacts = {int(i) for i in table_ids(url, "contact")}
    assert not ERASED_CONTACTS & contacts, f"opted-out leads not erased: {sorted(ERASED_CONTACTS & contacts)}"
    assert KEPT_CONTACTS <= contacts, f"leads erased a year early: {sorted(KEPT_CONTACTS - contacts)}"
    assert UNREADABLE_OPTED_OUT <= contacts, "a contact with an unreadable opt-out was erased"
    assert MEMBER_YEAR_ONE in contacts, "a membership ended in year 1 made its contact due"
    assert NOT_UTF8 in contacts, "a contact whose kind cannot be read was erased"
    surveys = table_ids(url, "survey_response")
    assert surveys == {"102", "103", "LEGACY-7", None, "104"}, surveys
    assert report["state"] == "success", report["state"]
    assert report["systems"]["crm"]["quarantined"] == EXPECTED_QUARANTINE


def test_unreadable_values_are_quarantined_and_the_rest_erased(crm_url, caplog, capfd):
    caplog.set_level(logging.INFO, logger="retention")
    build_crm(crm_url)
    _info, report = run_pipeline(crm_url, NOW)
    assert_outcome(crm_url, report)
    # Table, column and key are named; the value never is.
    # (the run's logging may go to the captured log or, once Airflow configured it, to stderr)
    text = "\n".join([*(r.getMessage() for r in caplog.records), *capfd.readouterr()])
    assert "survey_response.survey_closed_at" in text and "contact.opted_out" in text and "contact.kind" in text
    assert "survey_response: id 102" in text and "has a NULL survey_response.id" in text
    assert SECRET not in text and "LEGACY-7" not in text and "soon" not in text


def test_frames_fetched_in_pieces_are_the_frames_of_one_fetch(crm_url, monkeypatch):
    """A frame is made of fetches of ``FETCH_ROWS`` rows (the rows as Python values are the
    largest thing a read holds): each frame is what one fetch of ``chunk_size`` rows gives,
    unreadable values included, whichever pieces they fell in."""
    import pandas as pd

    from retention.domain.records import UNREADABLE
    from retention.systems.crm import reads

    build_crm(crm_url)
    engine = sa.create_engine(crm_url)
    try:
        con = CrmConnector(engine, chunk_size=4)
        whole = {rt: list(con.iter_frames(rt, now=NOW)) for rt in ("crm_contact", "crm_survey_response")}
        monkeypatch.setattr(reads, "FETCH_ROWS", 3)
        for rt, expected in whole.items():
            frames = list(con.iter_frames(rt, now=NOW))
            assert [len(f) for f in frames] == [len(f) for f in expected], rt
            assert all(len(f) <= 4 for f in frames)
            assert any(UNREADABLE in f for f in frames), rt
            for got, want in zip(frames, expected, strict=True):
                pd.testing.assert_frame_equal(got, want)
    finally:
        engine.dispose()


def test_a_value_unreadable_since_the_plan_defers_the_erasure(crm_url):
    """Inside the erasing transaction the records are read again: a planned contact whose
    opt-out became unreadable, or whose kind became bytes that are not UTF-8, is left alone
    (deferred), and the rest of the batch is erased."""
    build_crm(crm_url)

    def spoil() -> None:
        engine = sa.create_engine(crm_url)
        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE contact SET opted_out = 'maybe' WHERE id = 5")
            if engine.dialect.name == "postgresql":
                conn.exec_driver_sql("UPDATE contact SET kind = E'lea\\xe9' WHERE id = 6")
            else:
                conn.exec_driver_sql("PRAGMA ignore_check_constraints = ON")
                conn.exec_driver_sql("UPDATE contact SET kind = CAST(X'6C6561E9' AS TEXT) WHERE id = 6")
        engine.dispose()

    _info, report = run_pipeline(crm_url, NOW, before_erase=spoil)
    contacts = {int(i) for i in table_ids(crm_url, "contact")}
    assert {5, 6} <= contacts, "a contact whose values became unreadable after the plan was erased"
    assert not {1, 10} & contacts, "the rest of the batch was not erased"
    assert report["state"] == "success"
    assert report["ledger"]["crm"]["lead"] == {"erased": 2, "deferred": 2}, report["ledger"]["crm"]


@pytest.mark.airflow
def test_airflow_run_quarantines_unreadable_rows(request, retention_home, monkeypatch):
    from airflow_run import run_dag, task_states

    try:
        base = request.getfixturevalue("postgres_url_for")(PG_DB)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"PostgreSQL could not be started: {exc}", pytrace=False)
    url = sql_ascii_database(base)
    engine = sa.create_engine(url)
    reset_pg(engine)
    try:
        build_crm(url)
        monkeypatch.setenv("AIRFLOW_CONN_RETENTION_CRM", json.dumps({"conn_type": "retention_crm", "extra": {"sqlalchemy_url": url}}))
        dr = run_dag({"systems": ["crm"], "max_plan_share": 1.0})
        states = task_states(dr)
        assert dr.state == "success", states
        for step in ("extract", "plan", "validate", "erase", "verify"):
            assert states[f"crm.{step}"] == "success", states
        report = json.loads((retention_home / "reports" / "latest.json").read_text())
        assert report["run_id"] == dr.run_id
        assert_outcome(url, report)
    finally:
        reset_pg(engine)
