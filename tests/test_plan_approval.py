"""Approval instead of a dead end (issue 11, item 4): a plan over the plan-size guard waits in
Airflow's human-in-the-loop operator (state ``awaiting_input``) for an approver, who answers
through the REST API of a real api-server, with a real scheduler on PostgreSQL. The approval is
bound to the plan's content hash and the policy version and recorded in the ledger; a rejected
plan, or one changed since its approval, erases nothing."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from datetime import UTC, datetime

import pytest
import requests
from smtp_server import SmtpServer
from test_backfill import fresh_database

from airflow_services import AirflowServices
from retention_dev.standins.process import StandIn

DAG = "retention_nightly"
KEY = "standin-key-us0"
CONF = {"systems": ["newsletter"], "max_plan_share": 0.01}  # 3 of 300 allowed: the guard trips
USERS = {"approver": "approver-test-password", "reviewer": "reviewer-test-password"}
ALERTS_TO = "retention-alerts@ops.example"
ADDRESS = re.compile(r"[\w.+-]+@[\w-]+(\.[\w-]+)+")
SYSTEM_TASKS = ("newsletter.validate", "newsletter.approve", "newsletter.erase", "newsletter.verify")


@pytest.fixture
def mailchimp(tmp_path, monkeypatch, retention_home):
    now = datetime.now(UTC).replace(microsecond=0).isoformat()
    standin = StandIn(
        "mailchimp", "--port", "0", "--state-file", str(tmp_path / "mc.state"), "--members", "300",
        "--seed", "11", "--now", now, "--api-key", KEY,
    ).start()
    monkeypatch.setenv(
        "AIRFLOW_CONN_RETENTION_MAILCHIMP",
        json.dumps({"conn_type": "retention_mailchimp", "host": f"{standin.base_url}/3.0", "password": KEY, "extra": {"list_id": "demo-list"}}),
    )
    yield standin
    standin.stop()


@pytest.fixture
def smtp(monkeypatch):
    with SmtpServer() as server:
        monkeypatch.setenv("AIRFLOW_CONN_RETENTION_ALERTS", json.dumps({
            "conn_type": "smtp", "host": "127.0.0.1", "port": server.port,
            "extra": {"disable_tls": True, "disable_ssl": True, "from_email": "airflow@ops.example", "to": ALERTS_TO,
                      "retry_limit": 0, "timeout": 5},
        }))
        yield server


class Api:
    """The Airflow REST API (v2) as one user of the simple auth manager."""

    def __init__(self, af: AirflowServices, user: str):
        token = requests.post(f"{af.api}/auth/token", json={"username": user, "password": USERS[user]}, timeout=30)
        token.raise_for_status()
        self.base = f"{af.api}/api/v2"
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token.json()['access_token']}"

    def get(self, path: str, **params) -> dict:
        r = self.session.get(f"{self.base}{path}", params=params, timeout=30)
        r.raise_for_status()
        return r.json()

    def call(self, method: str, path: str, body: dict) -> requests.Response:
        return self.session.request(method, f"{self.base}{path}", json=body, timeout=30)

    def trigger(self, conf: dict) -> str:
        r = self.call("POST", f"/dags/{DAG}/dagRuns", {"conf": conf, "logical_date": None})
        assert r.status_code == 200, r.text
        return r.json()["dag_run_id"]

    def run_state(self, run_id: str) -> str:
        return self.get(f"/dags/{DAG}/dagRuns/{run_id}")["state"]

    def task_states(self, run_id: str) -> dict[str, str | None]:
        tis = self.get(f"/dags/{DAG}/dagRuns/{run_id}/taskInstances", limit=100)["task_instances"]
        return {t["task_id"]: t["state"] for t in tis}

    def hitl(self, run_id: str, task_id: str = "newsletter.approve") -> str:
        return f"/dags/{DAG}/dagRuns/{run_id}/taskInstances/{task_id}/-1/hitlDetails"


def _wait(what, until, af: AirflowServices, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = until()
        if value:
            return value
        time.sleep(2)
    pytest.fail(f"timed out waiting for {what}\n{af.tail()}")


def awaiting_approval(api: Api, af: AirflowServices, run_id: str) -> dict:
    """Wait until the run's approval task waits for a human; return what the approver sees."""
    def waiting():
        states = api.task_states(run_id)
        if api.run_state(run_id) in ("success", "failed"):
            pytest.fail(f"run {run_id} ended without asking for approval: {states}\n{af.tail()}")
        return states.get("newsletter.approve") == "awaiting_input"

    _wait(f"{run_id} to await approval", waiting, af)
    return api.get(api.hitl(run_id))


def finished(api: Api, af: AirflowServices, run_id: str) -> tuple[str, dict]:
    state = _wait(f"{run_id} to finish", lambda: (s := api.run_state(run_id)) in ("success", "failed") and s, af)
    return state, api.task_states(run_id)


def approvals(home) -> list[dict]:
    from retention.store.ledger import Ledger

    return Ledger(f"sqlite:///{home / 'ledger.db'}").approvals()


def ledger_entries(home, run_id: str) -> list[dict]:
    import sqlalchemy as sa

    engine = sa.create_engine(f"sqlite:///{home / 'ledger.db'}")
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.text("select * from erasure_ledger where run_id = :r"), {"r": run_id}).mappings()]


def deletes(standin) -> int:
    return requests.get(f"{standin.base_url}/_standin/stats", timeout=10).json()["permanent_deletes"]


@pytest.mark.airflow
@pytest.mark.postgres
@pytest.mark.timeout(1500)
def test_a_plan_over_the_guard_is_erased_only_on_an_approval_of_exactly_that_plan(
    tmp_path, postgres_url_for, retention_home, mailchimp, smtp, monkeypatch,
):
    passwords = tmp_path / "passwords.json"
    passwords.write_text(json.dumps(USERS))
    meta = fresh_database(postgres_url_for("retention_airflow_approval"))
    af = AirflowServices(tmp_path / "airflow", meta, {
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{u}:admin" for u in USERS),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        "RETENTION_APPROVAL_TIMEOUT": "PT1H",
    }).start()
    try:
        subprocess.run([sys.executable, "-m", "retention.cli", "pools"], env=af.env, check=True, capture_output=True)
        af.wait_for_dag(DAG)
        approver, reviewer = Api(af, "approver"), Api(af, "reviewer")
        # Unpaused, the scheduler creates tonight's run of every system at once; it is not this
        # test's: marked failed before it can get anywhere near an erasure.
        af.airflow("dags", "unpause", DAG)

        def scheduled_run():
            runs = approver.get(f"/dags/{DAG}/dagRuns")["dag_runs"]
            return [r["dag_run_id"] for r in runs if r["run_type"] == "scheduled"]

        for run_id in _wait("the scheduled run", scheduled_run, af, timeout=120):
            r = approver.call("PATCH", f"/dags/{DAG}/dagRuns/{run_id}", {"state": "failed"})
            assert r.status_code == 200, r.text
        members_before = deletes(mailchimp)

        # 1. Rejected: nothing erased, and the ledger says who rejected which plan.
        rejected = reviewer.trigger(CONF)
        detail = awaiting_approval(reviewer, af, rejected)
        shown = detail["subject"] + "\n" + (detail["body"] or "")
        assert not ADDRESS.search(shown), shown  # pseudonyms and counts only
        plan_hash = re.search(r"plan hash `([0-9a-f]{64})`", shown).group(1)
        policy_version = re.search(r"policy version `([^`]+)`", shown).group(1)
        assert re.search(r"\d+ planned, 3 allowed of 300 extracted", shown), shown
        assert re.search(r"\| `newsletter_\w+` \| \d+ \|", shown), shown  # the counts per rule
        assert re.search(r"`[0-9a-f]{16,64}`", shown.split("Preview", 1)[1]), shown  # pseudonymous keys
        r = reviewer.call("PATCH", reviewer.hitl(rejected), {"chosen_options": ["Reject"]})
        assert r.status_code == 200, r.text
        state, states = finished(reviewer, af, rejected)
        assert states["newsletter.approve"] == "success", states
        assert states["newsletter.erase"] == "skipped" and states["newsletter.verify"] == "skipped", states
        assert state == "failed" and states["report"] == "failed", states  # due records were left: the run says so
        assert deletes(mailchimp) == members_before
        assert ledger_entries(retention_home, rejected) == []
        [decision] = [a for a in approvals(retention_home) if a["run_id"] == rejected]
        assert (decision["decision"], decision["decided_by"], decision["system"]) == ("rejected", "reviewer", "newsletter")
        assert (decision["plan_hash"], decision["policy_version"]) == (plan_hash, policy_version)
        report = json.loads((retention_home / "reports" / "latest.json").read_text())
        assert report["run_id"] == rejected and report["systems"]["newsletter"]["approval"]["decision"] == "rejected"
        # The tripped guard still alerts: as a notification that approval is awaited.
        mails = [(str(m["Subject"]), m.get_body(preferencelist=("plain", "html")).get_content()) for m in smtp.messages()]
        awaited = [(s, b) for s, b in mails if rejected in s and "awaits approval" in s]
        assert len(awaited) == 1, mails
        assert re.search(r"plan_size_guard: \d+ planned, 3 allowed of 300 extracted", awaited[0][1]), awaited
        assert not ADDRESS.search(awaited[0][1].replace(ALERTS_TO, "")), awaited

        # 2. Approved, but the plan changed between the approval and the erasure: its hash is
        # another's, and the old approval erases nothing of it.
        changed = approver.trigger(CONF)
        awaiting_approval(approver, af, changed)
        from retention.store.staging import RunStaging

        staging = RunStaging(DAG, changed)
        plan = staging.read_frame("newsletter", "plan")
        destructive = plan[plan["action"].isin(["erase", "minimise"])]
        staging.write_frame("newsletter", "plan", plan.drop(index=destructive.index[:1]))
        r = approver.call("PATCH", approver.hitl(changed), {"chosen_options": ["Approve"]})
        assert r.status_code == 200, r.text
        state, states = finished(approver, af, changed)
        assert states["newsletter.approve"] == "success" and states["newsletter.erase"] == "failed", states
        assert state == "failed", states
        assert deletes(mailchimp) == members_before
        assert ledger_entries(retention_home, changed) == []
        [decision] = [a for a in approvals(retention_home) if a["run_id"] == changed]
        assert (decision["decision"], decision["decided_by"]) == ("approved", "approver")

        # 3. Approved as it is: erased, and the ledger shows who approved which plan.
        approved = approver.trigger(CONF)
        detail = awaiting_approval(approver, af, approved)
        plan_hash = re.search(r"plan hash `([0-9a-f]{64})`", detail["body"]).group(1)
        planned = int(re.search(r"(\d+) planned, 3 allowed", detail["body"]).group(1))
        r = approver.call("PATCH", approver.hitl(approved), {"chosen_options": ["Approve"]})
        assert r.status_code == 200, r.text
        state, states = finished(approver, af, approved)
        logs = af.tail()
    finally:
        af.stop()

    assert state == "success", (states, logs)
    assert all(states[t] == "success" for t in SYSTEM_TASKS), states
    assert deletes(mailchimp) - members_before == planned
    entries = ledger_entries(retention_home, approved)
    assert len([e for e in entries if e["status"] in ("erased", "already_gone")]) == planned, entries
    [decision] = [a for a in approvals(retention_home) if a["run_id"] == approved]
    assert decision["decision"] == "approved" and decision["decided_by"] == "approver"
    assert decision["plan_hash"] == plan_hash and decision["policy_version"] == entries[0]["policy_version"]
    assert decision["planned"] == planned and decision["allowed"] == 3
    assert decision["decided_at"] is not None
