"""The compose stack's database roles, on a real PostgreSQL: each does its job and no more.

The scripts docker-compose.yml runs are run here as they are, with psql, against the test
server (scripts/postgres.sh), with role and database names of this test:

* docker/postgres-init/10-retention-databases.sh (the postgres service's first start): Airflow's
  metadata role and the ledger's role, each owning its database and unable to reach the other's;
  the ledger, opened as its role, migrates its own schema;
* docker/crm-demo-init/10-connector-role.sh (the demo CRM's first start) and
  docker/crm-connector-grants.sql (crm-demo-grants, and a real CRM's administrator): the CRM
  connector's role. The CRM part of the nightly run then extracts, plans, erases, minimises and
  verifies as that role, with the ledger as the ledger's role; and the role is refused what the
  connector never does (insert, alter, drop, truncate, delete an organisation or a manual hold,
  rewrite a contact, reach the ledger).

The test server trusts every local login, so the passwords are not checked here; the roles'
privileges are what PostgreSQL enforces whatever the authentication.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
SERVER_INIT = ROOT / "docker" / "postgres-init" / "10-retention-databases.sh"
CRM_INIT = ROOT / "docker" / "crm-demo-init" / "10-connector-role.sh"
GRANTS = ROOT / "docker" / "crm-connector-grants.sql"

# Names of this test's own (roles are shared by the whole server, unlike databases).
AIRFLOW_DB = "compose_test_airflow"
LEDGER_DB = "compose_test_ledger"
CRM_DB = "compose_test_crm"
CONNECTOR = "compose_test_crm_connector"


def _psql() -> str:
    found = shutil.which("psql") or next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin/psql"))), None)
    if found is None:
        pytest.fail("psql not found (scripts/postgres.sh installs PostgreSQL)")
    return str(found)


@pytest.fixture(scope="module")
def server(postgres_url_for):
    """(superuser URL, environment for psql) of the test server, without this test's leftovers."""
    url = sa.engine.make_url(postgres_url_for("retention_test"))
    env = {
        **{k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")},
        "PGHOST": url.host or "127.0.0.1",
        "PGPORT": str(url.port or 5432),
        "POSTGRES_USER": url.username or "postgres",
        "POSTGRES_DB": "postgres",
        "PATH": f"{Path(_psql()).parent}:{os.environ.get('PATH', '')}",
    }
    admin = url.set(database="postgres")
    _drop_all(admin)
    yield admin, env
    _drop_all(admin)


def _drop_all(admin: sa.URL) -> None:
    engine = sa.create_engine(admin, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            for db in (AIRFLOW_DB, LEDGER_DB, CRM_DB):
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
            for role in (AIRFLOW_DB, LEDGER_DB, CONNECTOR):
                conn.exec_driver_sql(f'DROP ROLE IF EXISTS "{role}"')
    finally:
        engine.dispose()


def _run(script: Path, env: dict[str, str]) -> None:
    out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, f"{script.name}: {out.stderr}"


def _as(admin: sa.URL, role: str, db: str) -> sa.Engine:
    return sa.create_engine(admin.set(username=role, password=None, database=db))


def _refused(engine: sa.Engine, sql: str) -> str:
    """The error PostgreSQL gives the statement (it must give one)."""
    with pytest.raises(sa.exc.DBAPIError) as err:
        with engine.begin() as conn:
            conn.exec_driver_sql(sql)
    return str(err.value.orig)


@pytest.fixture(scope="module")
def roles(server):
    admin, env = server
    env = {**env, "AIRFLOW_DB": AIRFLOW_DB, "AIRFLOW_DB_PASSWORD": "test-only", "LEDGER_DB": LEDGER_DB, "LEDGER_DB_PASSWORD": "test-only"}
    _run(SERVER_INIT, env)
    _run(SERVER_INIT, env)  # a second run changes nothing and does not fail
    return admin


def test_server_init_gives_each_component_its_own_database(roles):
    admin = roles
    engine = sa.create_engine(admin)
    try:
        with engine.connect() as conn:
            owners = dict(conn.exec_driver_sql(
                "SELECT d.datname, r.rolname FROM pg_database d JOIN pg_roles r ON r.oid = d.datdba WHERE d.datname IN (%s, %s)",
                (AIRFLOW_DB, LEDGER_DB)).all())
            powers = conn.exec_driver_sql(
                "SELECT rolname, rolsuper, rolcreatedb, rolcreaterole, rolcanlogin FROM pg_roles WHERE rolname IN (%s, %s)",
                (AIRFLOW_DB, LEDGER_DB)).all()
    finally:
        engine.dispose()
    assert owners == {AIRFLOW_DB: AIRFLOW_DB, LEDGER_DB: LEDGER_DB}
    assert sorted(powers) == [(AIRFLOW_DB, False, False, False, True), (LEDGER_DB, False, False, False, True)]
    # Airflow's role can create its schema (airflow db migrate) in its own database ...
    airflow = _as(admin, AIRFLOW_DB, AIRFLOW_DB)
    with airflow.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS migrate_probe (id int)")
    airflow.dispose()
    # ... and neither role can connect to the other's database.
    for role, other in ((AIRFLOW_DB, LEDGER_DB), (LEDGER_DB, AIRFLOW_DB)):
        engine = _as(admin, role, other)
        with pytest.raises(sa.exc.OperationalError, match="permission denied for database"):
            engine.connect().close()
        engine.dispose()


def test_ledger_migrates_itself_as_its_role(roles):
    from retention.store import migrations
    from retention.store.ledger import Ledger

    engine = _as(roles, LEDGER_DB, LEDGER_DB)
    try:
        Ledger(engine)
        assert migrations.stored_versions(engine) == {migrations.head()}
        Ledger(engine)  # opened again: at head, nothing to do
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def crm(roles, server):
    """The demo CRM: its database, the connector's role, the synthetic contacts written by the
    owner (the superuser here, as crm-demo-data in the demo), then the grants."""
    from retention_dev.synthetic import crm as synthetic

    admin, env = server
    engine = sa.create_engine(admin, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{CRM_DB}"')  # the postgres image does it (POSTGRES_DB)
    engine.dispose()
    _run(CRM_INIT, {**env, "POSTGRES_DB": CRM_DB, "CRM_DB_USER": CONNECTOR, "CRM_DB_PASSWORD": "test-only"})
    owner = sa.create_engine(admin.set(database=CRM_DB))
    synthetic.generate(owner, contacts=600, seed=7, now=dt.datetime.now(dt.UTC), due_share=0.05)
    owner.dispose()
    out = subprocess.run(
        ["psql", "-v", "ON_ERROR_STOP=1", "--no-psqlrc", "-q", "-v", f"connector={CONNECTOR}", "-d", CRM_DB, "-U", env["POSTGRES_USER"], "-f", str(GRANTS)],
        env=env, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return admin.set(database=CRM_DB)


def test_nightly_crm_run_as_the_connector_role(crm, roles, retention_home, monkeypatch):
    """Extract, plan, validate, erase (rows locked, then deleted), minimise and verify, all as
    the connector's role, with the ledger as the ledger's role."""
    from retention.runs import nightly as P
    from retention.systems.crm.adapter import CrmAdapter
    from retention.systems.crm.client import CrmConnector

    ledger_url = roles.set(username=LEDGER_DB, password=None, database=LEDGER_DB)
    monkeypatch.setenv("RETENTION_LEDGER_URL", ledger_url.render_as_string(hide_password=False))
    monkeypatch.delenv("AIRFLOW_CONN_RETENTION_LEDGER", raising=False)
    engine = _as(crm, CONNECTOR, CRM_DB)
    run_id = f"manual__compose_roles_{uuid.uuid4().hex[:8]}"
    info = P.RunInfo.from_dict(P.open_run("retention_nightly", run_id, dt.datetime.now(dt.UTC), dry_run=False, max_plan_share=None))
    adapter = CrmAdapter(CrmConnector(engine))
    try:
        P.extract(info, "crm", adapter)
        P.plan(info, "crm")
        P.validate(info, "crm")
        P.erase(info, "crm", adapter)
        P.verify(info, "crm", adapter)
    finally:
        adapter.close()
        report = json.loads(Path(P.report(info, ("crm",))["report"]).read_text())
        engine.dispose()
    assert report["state"] == "success", report
    crm_report = report["systems"]["crm"]
    # Deleted (contacts with their children, registrations, invoices) and minimised (a contact
    # whose invoice stays: invoice.contact_id set NULL), then checked gone.
    assert crm_report["erase"]["outcomes"].get("erased", 0) > 0, crm_report
    assert any(action.endswith("/minimise") and n > 0 for action, n in crm_report["planned"].items()), crm_report
    assert crm_report["verify"] == {"dry_run": False, "checked": crm_report["erase"]["outcomes"]["erased"], "still_present": 0}
    with sa.create_engine(ledger_url).connect() as conn:
        statuses = dict(conn.exec_driver_sql(
            "SELECT status, count(*) FROM erasure_ledger WHERE run_id = %s GROUP BY status", (run_id,)).all())
    assert statuses.get("erased") == crm_report["erase"]["outcomes"]["erased"], statuses


@pytest.mark.parametrize(("what", "sql"), [
    ("insert a contact", "INSERT INTO contact (kind) VALUES ('lead')"),
    ("rewrite a contact", "UPDATE contact SET email = NULL"),
    ("move a note to another contact", "UPDATE communication_note SET contact_id = contact_id"),
    ("rewrite an invoice", "UPDATE invoice SET amount = 0"),
    ("delete an organisation", "DELETE FROM organisation"),
    ("delete a membership", "DELETE FROM membership"),
    ("delete a manual hold", "DELETE FROM legal_hold"),
    ("add a manual hold", "INSERT INTO legal_hold (record_type, record_id, reason) VALUES ('crm_contact', 1, 'x')"),
    ("truncate", "TRUNCATE contact"),
    ("drop a table", "DROP TABLE survey_response"),
    ("alter a table", "ALTER TABLE contact ADD COLUMN probe int"),
    ("create a table", "CREATE TABLE probe (id int)"),
    # PostgreSQL only warns that no privilege was granted: the insert after it is refused.
    ("grant itself more", f'GRANT INSERT ON contact TO "{CONNECTOR}"; INSERT INTO contact (kind) VALUES (\'lead\')'),
])
def test_connector_role_is_refused_what_the_connector_never_does(crm, what, sql):
    engine = _as(crm, CONNECTOR, CRM_DB)
    try:
        message = _refused(engine, sql)
    finally:
        engine.dispose()
    assert "permission denied" in message or "must be owner" in message, f"{what}: {message}"


def test_connector_role_cannot_reach_the_ledger_or_airflow(crm, roles):
    for db in (LEDGER_DB, AIRFLOW_DB):
        engine = _as(crm, CONNECTOR, db)
        with pytest.raises(sa.exc.OperationalError, match="permission denied for database"):
            engine.connect().close()
        engine.dispose()


def test_each_grant_is_needed(crm):
    """Without the grant of UPDATE (id), the lock before the erasure is refused: the grant
    that looks the least needed is what PostgreSQL asks for SELECT ... FOR UPDATE."""
    admin = sa.create_engine(crm)
    engine = _as(crm, CONNECTOR, CRM_DB)
    try:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'REVOKE UPDATE (id) ON survey_response FROM "{CONNECTOR}"')
        assert "permission denied" in _refused(engine, "SELECT id FROM survey_response LIMIT 1 FOR UPDATE")
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'GRANT UPDATE (id) ON survey_response TO "{CONNECTOR}"')
        admin.dispose()
        engine.dispose()
