"""CrmHook: an Airflow Connection (from AIRFLOW_CONN_RETENTION_CRM) → a working CrmConnector."""

from __future__ import annotations

import datetime as dt
import importlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml

from retention.systems.crm import schema
from retention.systems.crm.client import CrmConnector
from retention.systems.crm.mapping import MappingError
from retention_dev.synthetic import crm as synthetic

ROOT = Path(__file__).resolve().parents[1]
NOW = dt.datetime(2025, 6, 1, 10, 0, tzinfo=dt.UTC)


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
    return sa.make_url(url)


@pytest.fixture
def crm_db(tmp_path):
    path = tmp_path / "crm.db"
    engine = sa.create_engine(f"sqlite:///{path}")
    synthetic.generate(engine, contacts=120, seed=4, now=NOW)
    engine.dispose()
    return path


def set_conn(monkeypatch, **conn) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_CRM", json.dumps(conn))


def test_import_reads_nothing(monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_RETENTION_CRM", raising=False)
    sys.modules.pop("retention.systems.crm.hook", None)
    module = importlib.import_module("retention.systems.crm.hook")
    hook = module.CrmHook()  # no connection needed until get_conn()
    assert hook.crm_conn_id == "retention_crm"
    assert (module.CrmHook.conn_name_attr, module.CrmHook.default_conn_name, module.CrmHook.conn_type) == (
        "crm_conn_id", "retention_crm", "retention_crm"
    )


def test_crm_connection_with_sqlalchemy_url_mapping_and_chunk_size(monkeypatch, crm_db):
    from retention.systems.crm.hook import CrmHook

    set_conn(
        monkeypatch,
        conn_type="retention_crm",
        extra={"sqlalchemy_url": f"sqlite:///{crm_db}", "mapping": "include/crm_mapping.yaml", "chunk_size": 25,
               "erase_connections": 3},
    )
    connector = CrmHook().get_conn()
    assert isinstance(connector, CrmConnector)
    assert connector.chunk_size == 25
    assert connector.erase_connections == 3
    assert Path(connector.mapping.source).resolve() == ROOT / "include" / "crm_mapping.yaml"
    frames = list(connector.iter_frames("crm_contact", now=NOW))
    assert len(frames) == 5 and sum(len(f) for f in frames) == 120


def test_sqlite_uri_connection(monkeypatch, crm_db):
    from retention.systems.crm.hook import CrmHook

    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_CRM", f"sqlite:///{crm_db}")
    hook = CrmHook()
    assert hook.get_sqlalchemy_url().database == str(crm_db)
    connector = hook.get_conn()
    assert connector.chunk_size == 50_000
    assert connector.erase_connections == 2
    assert len(connector.read_frame("crm_invoice", now=NOW)) > 0
    assert hook.test_connection()[0]


def test_postgres_uri_connection(monkeypatch, pg_url):
    from retention.systems.crm.hook import CrmHook

    namespace = f"crm_hook_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(pg_url)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{namespace}"')
    try:
        # JSON form of a postgres Connection; the extra URL pins the test's namespace.
        url = pg_url.set(query={"options": f"-csearch_path={namespace}"})
        set_conn(
            monkeypatch,
            conn_type="postgres", host=pg_url.host, port=pg_url.port, login=pg_url.username,
            schema=pg_url.database,
        )
        hook = CrmHook()
        built = hook.get_sqlalchemy_url()
        assert (built.drivername, built.host, built.port, built.database) == (
            "postgresql+psycopg2", pg_url.host, pg_url.port, pg_url.database
        )
        set_conn(monkeypatch, conn_type="postgres", host="unused.invalid",
                 extra={"sqlalchemy_url": url.render_as_string(hide_password=False)})
        hook = CrmHook()
        engine = hook.get_engine()
        schema.create_schema(engine)
        synthetic.generate(engine, contacts=50, seed=1, now=NOW)
        connector = hook.get_conn()
        assert connector.dialect == "postgresql"
        assert len(connector.read_frame("crm_contact", now=NOW)) == 50
        engine.dispose()
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{namespace}" CASCADE')
        admin.dispose()


def test_postgresql_uri_form_is_understood(monkeypatch):
    from retention.systems.crm.hook import CrmHook

    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_CRM", "postgresql://crm_user:secret@db.example.org:5433/crm")
    url = CrmHook().get_sqlalchemy_url()
    assert (url.drivername, url.username, url.host, url.port, url.database) == (
        "postgresql+psycopg2", "crm_user", "db.example.org", 5433, "crm"
    )


def test_mapping_path_errors_are_clear(monkeypatch, crm_db, tmp_path):
    from retention.systems.crm.hook import CrmHook

    bad = tmp_path / "crm_mapping.yaml"
    bad.write_text(yaml.safe_dump({"tables": {"contact": {"columns": {"email": "mail"}}}}), encoding="utf-8")
    set_conn(monkeypatch, conn_type="retention_crm", extra={"sqlalchemy_url": f"sqlite:///{crm_db}", "mapping": str(bad)})
    connector = CrmHook().get_conn()
    with pytest.raises(MappingError, match=r"crm_mapping\.yaml.*'contact'.*'email'.*'mail'"):
        connector.read_frame("crm_contact", now=NOW)
    ok, message = CrmHook().test_connection()
    assert not ok and "MappingError" in message
    set_conn(monkeypatch, conn_type="retention_crm", extra={"sqlalchemy_url": f"sqlite:///{crm_db}", "mapping": "nope.yaml"})
    with pytest.raises(MappingError, match="nope.yaml"):
        CrmHook().get_conn()


def test_unsupported_connection_type(monkeypatch):
    from retention.systems.crm.hook import CrmHook

    set_conn(monkeypatch, conn_type="http", host="crm.example.org")
    with pytest.raises(ValueError, match="unsupported conn_type"):
        CrmHook().get_conn()


def test_url_forms_and_no_password_in_errors(monkeypatch, crm_db):
    from retention.systems.crm.hook import CrmHook

    set_conn(monkeypatch, conn_type="sqlite", host=str(crm_db))  # the file in host instead of the URI path
    assert CrmHook().get_sqlalchemy_url().database == str(crm_db)
    set_conn(monkeypatch, conn_type="retention_crm", host="db.example.org", login="crm", password="p@ss/word",
             schema="crm", extra={"mapping": "include/crm_mapping.yaml", "chunk_size": 10})
    url = CrmHook().get_sqlalchemy_url()
    assert (url.drivername, url.host, url.username, url.password, url.database) == (
        "postgresql+psycopg2", "db.example.org", "crm", "p@ss/word", "crm"
    )
    assert not url.query  # the hook's own extras are settings, not driver parameters
    assert "p@ss/word" not in repr(url)
    set_conn(monkeypatch, conn_type="retention_crm", extra={"sqlalchemy_url": "postgresql://crm:s3cret@db:port/crm"})
    with pytest.raises(ValueError, match="sqlalchemy_url is not a SQLAlchemy URL") as err:
        CrmHook().get_sqlalchemy_url()
    assert "s3cret" not in str(err.value)
    set_conn(monkeypatch, conn_type="retention_crm", extra={"sqlalchemy_url": f"sqlite:///{crm_db}", "chunk_size": 0})
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        CrmHook().get_conn()
    set_conn(monkeypatch, conn_type="retention_crm", extra={"sqlalchemy_url": f"sqlite:///{crm_db}", "erase_connections": 0})
    with pytest.raises(ValueError, match="erase_connections must be >= 1"):
        CrmHook().get_conn()


def test_one_connector_per_hook_and_close(monkeypatch, crm_db):
    from retention.systems.crm.hook import CrmHook

    set_conn(monkeypatch, conn_type="retention_crm", extra={"sqlalchemy_url": f"sqlite:///{crm_db}"})
    hook = CrmHook()
    connector = hook.get_conn()
    assert hook.get_conn() is connector and hook.get_engine() is connector.engine
    hook.close()
    assert hook.get_conn() is not connector
    hook.close()


def test_ledger_url_from_a_connection(monkeypatch, crm_db):
    from retention import config

    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_LEDGER", json.dumps(
        {"conn_type": "postgres", "host": "postgres", "port": 5432, "schema": "retention_ledger",
         "login": "airflow", "password": "air@flow", "extra": {"sslmode": "require"}}))
    # psycopg2, the driver installed: SQLAlchemy 2.1 reads a plain postgresql:// as psycopg 3, which is not.
    assert config.ledger_url() == "postgresql+psycopg2://airflow:air%40flow@postgres:5432/retention_ledger?sslmode=require"
    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_LEDGER", f"sqlite:///{crm_db}")
    assert config.ledger_url() == f"sqlite:///{crm_db}"
    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_LEDGER", json.dumps(
        {"conn_type": "generic", "extra": {"sqlalchemy_url": f"sqlite:///{crm_db}"}}))
    assert config.ledger_url() == f"sqlite:///{crm_db}"
    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_LEDGER", "mysql://u:p@db:3306/ledger")
    assert config.ledger_url() == "mysql://u:p@db:3306/ledger"
