"""Erasure requests without leaving the address behind: the request inbox (store/inbox.py), the
``request_id`` param of ``erasure_request`` (real dag.test runs against the stand-ins, the
fixtures of test_erasure_request.py) and the plugin (plugins/retention_requests.py) on a real
api-server, scheduler and dag-processor, whose metadata database is searched for the address.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa
from cryptography.fernet import Fernet
from test_erasure_request import DAG_ID, PERSON_NAME, Systems, assert_nothing_personal, pseudo, report_of, systems  # noqa: F401

from airflow_run import run_dag, task_states, xcom_values
from retention.config import ConfigError
from retention.domain.addresses import InvalidRequest

KEY = Fernet.generate_key().decode()


@pytest.fixture
def request_key(monkeypatch):
    monkeypatch.setenv("RETENTION_REQUEST_KEY", KEY)
    monkeypatch.delenv("RETENTION_REQUEST_KEY_FILE", raising=False)
    return KEY


def inbox():
    from retention.store.inbox import RequestInbox

    return RequestInbox.configured()


def inbox_rows(home: Path) -> list[dict]:
    if not (home / "ledger.db").exists():
        return []  # no ledger yet: nothing was ever filed
    engine = sa.create_engine(f"sqlite:///{home / 'ledger.db'}")
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(sa.text("select * from request_inbox")).mappings()]
    engine.dispose()
    return rows


def address_forms(address: str) -> list[str]:
    return [address, address.replace("@", "%40"), address.split("@")[0] + "@"]


# --- the inbox ----------------------------------------------------------------------------------


def test_the_inbox_keeps_the_address_encrypted_until_it_is_forgotten(retention_home, request_key):
    from retention.store.inbox import REQUEST_ID_PATTERN, UnknownRequest

    box = inbox()
    rid = box.file("Greta.Raderingsson@Example.ORG")
    assert re.fullmatch(REQUEST_ID_PATTERN, rid)
    (row,) = inbox_rows(retention_home)
    assert row["request_id"] == rid and "greta" not in json.dumps(row, default=str).lower()
    assert box.address(rid) == "greta.raderingsson@example.org"
    assert box.forget(rid) and not box.exists(rid) and inbox_rows(retention_home) == []
    assert not box.forget(rid)
    with pytest.raises(UnknownRequest, match="not in the request inbox"):
        box.address(rid)
    with pytest.raises(InvalidRequest, match="not a request id"):
        box.address("greta@example.org")


def test_a_malformed_address_is_refused_without_echo_and_nothing_is_stored(retention_home, request_key):
    for bad in ("greta.raderingsson", "greta raderingsson@example.org", "greta@example.org\n", 42):
        with pytest.raises(InvalidRequest) as info:
            inbox().file(bad)
        assert "\n" not in str(info.value) and "raderingsson" not in str(info.value)
    assert inbox_rows(retention_home) == []


def test_the_request_key_is_configuration(retention_home, monkeypatch, tmp_path):
    from retention.store.inbox import request_cipher

    monkeypatch.delenv("RETENTION_REQUEST_KEY", raising=False)
    monkeypatch.delenv("RETENTION_REQUEST_KEY_FILE", raising=False)
    with pytest.raises(ConfigError, match="no request key: set RETENTION_REQUEST_KEY"):
        request_cipher()
    monkeypatch.setenv("RETENTION_REQUEST_KEY", "not-a-fernet-key-but-long-enough-0123456789")
    with pytest.raises(ConfigError) as info:
        request_cipher()
    assert "not a Fernet key" in str(info.value) and "not-a-fernet" not in str(info.value)
    monkeypatch.delenv("RETENTION_REQUEST_KEY")
    monkeypatch.setenv("RETENTION_REQUEST_KEY_FILE", str(tmp_path / "missing.key"))
    with pytest.raises(ConfigError, match="RETENTION_REQUEST_KEY_FILE .*missing.key"):
        request_cipher()
    (tmp_path / "request.key").write_text(KEY + "\n")
    monkeypatch.setenv("RETENTION_REQUEST_KEY_FILE", str(tmp_path / "request.key"))
    rid = inbox().file("greta@example.org")

    # Another key cannot read it (one line, no address); the old key after the new one can.
    new = Fernet.generate_key().decode()
    monkeypatch.setenv("RETENTION_REQUEST_KEY", new)
    with pytest.raises(ConfigError, match="cannot be decrypted with the configured request key") as info:
        inbox().address(rid)
    assert "greta" not in str(info.value)
    monkeypatch.setenv("RETENTION_REQUEST_KEY", f"{new},{KEY}")
    assert inbox().address(rid) == "greta@example.org"


def test_setup_sh_generates_a_request_key_per_checkout(tmp_path):
    import os

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RETENTION_", "AIRFLOW"))}
    env["RETENTION_HOME"] = str(tmp_path / "home")
    script = (f'source "{root}/scripts/setup.sh" >/dev/null && '
              'python -c "from retention.store.inbox import request_cipher; request_cipher(); print(\'key ok\')"')
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.split()[-2:] == ["key", "ok"], out.stderr
    assert (tmp_path / "home" / "request.key").stat().st_mode & 0o077 == 0


# --- erasure_request by request id (dag.test) -------------------------------------------------------


@pytest.mark.airflow
def test_a_request_by_id_erases_the_person_and_then_forgets_the_address(systems, retention_home, request_key, capfd):  # noqa: F811
    s = systems
    rid = inbox().file(s.a_email)
    dry = run_dag({"request_id": rid, "dry_run": True}, dag_id=DAG_ID)
    assert dry.state == "success", task_states(dry)
    assert s.member("a").status_code == 200 and [r["request_id"] for r in inbox_rows(retention_home)] == [rid], \
        "a dry run erases nothing and keeps the address for the real run"

    dr = run_dag({"request_id": rid}, dag_id=DAG_ID)
    assert dr.state == "success", task_states(dr)
    assert s.member("a").status_code == 404 and s.user_state(s.a_uid) == "gone" and 10 not in s.ids("contact")
    assert inbox_rows(retention_home) == [], "the address is deleted once the request is complete"
    rep = report_of(retention_home, dr)
    assert rep["state"] == "success" and rep["request_key"] == pseudo().key_for("erasure_request", s.a_email)
    assert rep["request_id"] == rid
    out, err = capfd.readouterr()
    assert_nothing_personal(
        {"task output": out + err, "xcom": " ".join(xcom_values(dr) + xcom_values(dry)), "conf": json.dumps(dr.conf)},
        [*address_forms(s.a_email), s.mc_hash["a"], *PERSON_NAME],
    )


@pytest.mark.airflow
def test_a_failed_request_keeps_the_address_for_a_retry(systems, retention_home, request_key, monkeypatch, tmp_path):  # noqa: F811
    s = systems
    rid = inbox().file(s.a_email)
    broken = {"conn_type": "retention_crm", "extra": {"sqlalchemy_url": f"sqlite:///{tmp_path / 'no' / 'such' / 'crm.db'}"}}
    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_CRM", json.dumps(broken))
    dr = run_dag({"request_id": rid}, dag_id=DAG_ID)
    assert dr.state == "failed" and task_states(dr)["crm"] == "failed", task_states(dr)
    assert [r["request_id"] for r in inbox_rows(retention_home)] == [rid], "kept for the retry"

    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_CRM", json.dumps({"conn_type": "retention_crm", "extra": {"sqlalchemy_url": str(s.crm.url)}}))
    dr2 = run_dag({"request_id": rid}, dag_id=DAG_ID)
    assert dr2.state == "success", task_states(dr2)
    assert 10 not in s.ids("contact") and inbox_rows(retention_home) == []


@pytest.mark.airflow
def test_the_conf_names_exactly_one_of_email_and_request_id(systems, retention_home, request_key, capfd):  # noqa: F811
    s = systems
    rid = inbox().file(s.a_email)
    for conf, line in (
        ({}, "give either email or request_id"),
        ({"email": s.a_email, "request_id": rid}, "give either email or request_id, not both"),
        ({"request_id": "00000000-0000-4000-8000-000000000000"}, "not in the request inbox"),
    ):
        dr = run_dag(conf, dag_id=DAG_ID)
        states = task_states(dr)
        assert dr.state == "failed" and states["check_request"] == "failed", (conf, states)
        assert {states[t] for t in ("crm", "newsletter", "ticketing")} == {"upstream_failed"}
        out, err = capfd.readouterr()
        assert line in out + err, conf
        assert s.a_email not in (out + err).lower()
    with pytest.raises(Exception, match="request_id") as info:  # the param's pattern, before a run exists
        run_dag({"request_id": "greta@example.org"}, dag_id=DAG_ID)
    assert type(info.value).__name__ == "ParamValidationError"
    assert s.member("a").status_code == 200 and [r["request_id"] for r in inbox_rows(retention_home)] == [rid]


# --- through the plugin, on a real api-server and scheduler ---------------------------------------------


def _fresh_database(url: str) -> str:
    u = sa.engine.make_url(url)
    admin = sa.create_engine(u.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{u.database}" WITH (FORCE)'))
        conn.execute(sa.text(f'CREATE DATABASE "{u.database}"'))
    admin.dispose()
    return url


def _metadata_dump(url: str) -> dict[str, str]:
    """Every row of every table of Airflow's metadata database, as text."""
    engine = sa.create_engine(url)
    out = {}
    with engine.connect() as conn:
        tables = conn.execute(sa.text("select tablename from pg_tables where schemaname = 'public'")).scalars().all()
        for table in tables:
            rows = conn.execute(sa.text(f'select t::text from "{table}" t')).scalars().all()
            # xcom and dag_run.conf are JSON(B): their text is JSON, where "@" stays as it is.
            out[table] = "\n".join(rows)
    engine.dispose()
    return out


def _token(api: str, user: str, password: str) -> str:
    resp = requests.post(f"{api}/auth/token", json={"username": user, "password": password}, timeout=30)
    assert resp.status_code in (200, 201), resp.text
    return resp.json()["access_token"]


@pytest.mark.airflow
@pytest.mark.postgres
@pytest.mark.timeout(1500)
def test_a_request_through_the_plugin_leaves_no_address_in_airflow(
    tmp_path, postgres_url_for, systems, retention_home, request_key,  # noqa: F811
):
    from airflow_services import AirflowServices

    s = systems
    meta = _fresh_database(postgres_url_for("retention_airflow_inbox"))
    passwords = tmp_path / "passwords.json"
    passwords.write_text(json.dumps({"admin": "admin-test-pw", "viewer": "viewer-test-pw"}))
    af = AirflowServices(tmp_path / "airflow", meta, {
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin,viewer:viewer",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
    }).start()
    api, url = af.api, f"{af.api}/retention-requests"
    try:
        subprocess.run([sys.executable, "-m", "retention.cli", "pools"], env=af.env, check=True, capture_output=True)
        af.wait_for_dag(DAG_ID)
        af.airflow("dags", "unpause", DAG_ID)

        # No token: refused, nothing filed. A viewer may not trigger runs: refused too.
        assert requests.post(f"{url}/api/requests", json={"email": s.a_email}, timeout=30).status_code == 401
        assert requests.get(f"{url}/", timeout=30).status_code == 401
        viewer = {"Authorization": f"Bearer {_token(api, 'viewer', 'viewer-test-pw')}"}
        assert requests.post(f"{url}/api/requests", json={"email": s.a_email}, headers=viewer, timeout=30).status_code == 403
        assert inbox_rows(retention_home) == []

        admin = {"Authorization": f"Bearer {_token(api, 'admin', 'admin-test-pw')}"}
        form = requests.get(f"{url}/", headers=admin, timeout=30)
        assert form.status_code == 200 and "<form" in form.text and 'name="email"' in form.text

        # A malformed address: one line, not echoed, nothing filed, no run.
        bad = "greta raderingsson@example.org"
        for body in ({"email": bad}, {"email": [s.a_email]}, {"address": s.a_email}):
            resp = requests.post(f"{url}/api/requests", json=body, headers=admin, timeout=30)
            assert resp.status_code in (400, 422), (body, resp.status_code)
            detail = resp.json()["detail"]
            assert isinstance(detail, str) and "\n" not in detail, detail
            assert "raderingsson" not in resp.text and s.a_email not in resp.text.lower(), resp.text
        resp = requests.post(f"{url}/", data={"email": bad}, headers=admin, timeout=30)
        assert resp.status_code == 400 and "not an e-mail address" in resp.text and "raderingsson" not in resp.text
        assert inbox_rows(retention_home) == []

        resp = requests.post(f"{url}/api/requests", json={"email": s.a_email}, headers=admin, timeout=30)
        assert resp.status_code == 201, resp.text
        filed = resp.json()
        rid, run_id = filed["request_id"], filed["dag_run_id"]
        assert [r["request_id"] for r in inbox_rows(retention_home)] == [rid]
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            try:
                run = requests.get(f"{api}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}", headers=admin, timeout=30).json()
            except requests.Timeout:  # the api-server also serves the running tasks: busy on a loaded machine
                continue
            if run["state"] in ("success", "failed"):
                break
            time.sleep(3)
        else:
            pytest.fail(f"the request's run did not finish\n{af.tail()}")
        if run["state"] != "success":
            tis = requests.get(f"{api}/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances", headers=admin, timeout=60).json()
            states = {ti["task_id"]: (ti["state"], ti["try_number"]) for ti in tis["task_instances"]}
            failed = [p for p in (af.home / "logs").rglob("*") if p.is_file() and "erasure_request" in str(p)]
            pytest.fail(f"the request's run failed: {states}\n" + "\n".join(
                f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:]) for p in failed))
        assert run["conf"] == {"request_id": rid}

        # The person is erased in all three systems; the address is gone from the inbox.
        assert s.member("a").status_code == 404 and s.user_state(s.a_uid) == "gone"
        assert 10 not in s.ids("contact") and s.member("b").status_code == 200
        assert inbox_rows(retention_home) == []

        # Nowhere in Airflow: its metadata database (dag_run.conf, log, xcom, every table), the
        # task logs and the services' own logs.
        dump = _metadata_dump(meta)
        assert rid in dump["dag_run"] and "retention_erasure_request" in dump["log"], "the dump reads the right tables"
        texts = {f"metadata table {t}": text for t, text in dump.items()}
        logs = [p for p in (af.home / "logs").rglob("*") if p.is_file()]
        assert any(run_id in str(p) or "erasure_request" in str(p) for p in logs), "task logs were written"
        texts |= {f"task log {p.relative_to(af.home)}": p.read_text(errors="replace") for p in logs}
        assert any("address deleted from the request inbox" in text for text in texts.values()), "the report said so"
        texts |= {f"service log {p.name}": p.read_text(errors="replace") for p in af.logs}
        assert_nothing_personal(texts, [*address_forms(s.a_email), s.mc_hash["a"], *PERSON_NAME])
    finally:
        af.stop()
