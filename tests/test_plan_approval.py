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
from pathlib import Path

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
        r = self.call("GET", path, params=params)
        r.raise_for_status()
        return r.json()

    def call(self, method: str, path: str, body: dict | None = None, params: dict | None = None) -> requests.Response:
        for attempt in range(3):  # a loaded machine may keep the api-server busy for a while
            try:
                return self.session.request(method, f"{self.base}{path}", json=body, params=params, timeout=120)
            except requests.Timeout:
                if method != "GET" or attempt == 2:  # an answer is sent once
                    raise
        raise AssertionError("unreachable")

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


def _wait(what, until, af: AirflowServices, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = until()
        if value:
            return value
        time.sleep(2)
    pytest.fail(f"timed out waiting for {what}\n{af.tail()}")


def awaiting_approval(api: Api, af: AirflowServices, run_id: str) -> dict:
    """Wait until the run's approval task waits for a human; return what the approver sees.

    Also until the scheduler has taken in that the task paused: an answer that comes before
    (a test answers within milliseconds, a person never does) queues the task again while the
    executor's event for the pause is still unread, and the scheduler then marks the task failed
    ("finished with state success, but the task instance's state attribute is queued")."""
    def waiting():
        states = api.task_states(run_id)
        if api.run_state(run_id) in ("success", "failed"):
            pytest.fail(f"run {run_id} ended without asking for approval: {states}\n{af.tail()}")
        return states.get("newsletter.approve") == "awaiting_input"

    _wait(f"{run_id} to await approval", waiting, af)
    paused = re.compile(rf"TaskInstance Finished: dag_id={DAG}, task_id=newsletter\.approve, run_id={re.escape(run_id)},.*state=awaiting_input")
    scheduler_log = af.home / "scheduler.log"
    _wait(f"the scheduler to take in that {run_id} awaits approval", lambda: paused.search(scheduler_log.read_text(errors="replace")), af)
    return api.get(api.hitl(run_id))


def finished(api: Api, af: AirflowServices, run_id: str) -> tuple[str, dict]:
    state = _wait(f"{run_id} to finish", lambda: (s := api.run_state(run_id)) in ("success", "failed") and s, af)
    return state, api.task_states(run_id)


def approvals(home) -> list[dict]:
    from retention.store.ledger import Ledger

    return Ledger(f"sqlite:///{home / 'ledger.db'}").approvals()


def explain(af: AirflowServices, run_id: str, states: dict) -> str:
    """What a failed assertion on a run shows: its tasks that failed, with their errors, then
    every task's state."""
    return f"{af.task_errors(DAG, run_id, states)}\n{json.dumps(states)}"


def ledger_entries(home, run_id: str) -> list[dict]:
    import sqlalchemy as sa

    engine = sa.create_engine(f"sqlite:///{home / 'ledger.db'}")
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.text("select * from erasure_ledger where run_id = :r"), {"r": run_id}).mappings()]


def deletes(standin) -> int:
    return requests.get(f"{standin.base_url}/_standin/stats", timeout=10).json()["permanent_deletes"]


@pytest.mark.airflow
@pytest.mark.postgres
@pytest.mark.timeout(2700)
def test_a_plan_over_the_guard_is_erased_only_on_an_approval_of_exactly_that_plan(
    tmp_path, postgres_url_for, retention_home, mailchimp, smtp, monkeypatch,
):
    passwords = tmp_path / "passwords.json"
    passwords.write_text(json.dumps(USERS))
    meta = fresh_database(postgres_url_for("retention_airflow_approval"))
    af = AirflowServices(tmp_path / "airflow", meta, {
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": ",".join(f"{u}:admin" for u in USERS),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
        # Long enough for the test to answer, short enough to watch one request time out.
        "RETENTION_APPROVAL_TIMEOUT": "PT5M",  # an answer on a busy machine must not race the timeout
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
        assert re.search(r"\| `newsletter-[\w-]+` \| \d+ \|", shown), shown  # the counts per rule
        assert re.search(r"`[0-9a-f]{16,64}`", shown.split("Preview", 1)[1]), shown  # pseudonymous keys
        r = reviewer.call("PATCH", reviewer.hitl(rejected), {"chosen_options": ["Reject"]})
        assert r.status_code == 200, r.text
        state, states = finished(reviewer, af, rejected)
        assert states["newsletter.approve"] == "success", explain(af, rejected, states)
        assert states["newsletter.erase"] == "skipped" and states["newsletter.verify"] == "skipped", explain(af, rejected, states)
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
        assert states["newsletter.approve"] == "success" and states["newsletter.erase"] == "failed", (
            explain(af, changed, states), af.tail(200))
        assert state == "failed", json.dumps(states)
        assert deletes(mailchimp) == members_before
        assert ledger_entries(retention_home, changed) == []
        [decision] = [a for a in approvals(retention_home) if a["run_id"] == changed]
        assert (decision["decision"], decision["decided_by"]) == ("approved", "approver")

        # 3. Nobody answers: after RETENTION_APPROVAL_TIMEOUT the request counts as rejected.
        timed_out = approver.trigger(CONF)
        awaiting_approval(approver, af, timed_out)
        state, states = finished(approver, af, timed_out)
        assert states["newsletter.approve"] == "success" and states["newsletter.erase"] == "skipped", explain(af, timed_out, states)
        assert state == "failed", states
        assert deletes(mailchimp) == members_before
        [decision] = [a for a in approvals(retention_home) if a["run_id"] == timed_out]
        assert (decision["decision"], decision["decided_by"]) == ("timed_out", None)

        # 4. Approved as it is: erased, and the ledger shows who approved which plan.
        approved = approver.trigger(CONF)
        detail = awaiting_approval(approver, af, approved)
        plan_hash = re.search(r"plan hash `([0-9a-f]{64})`", detail["body"]).group(1)
        planned = int(re.search(r"(\d+) planned, 3 allowed", detail["body"]).group(1))
        r = approver.call("PATCH", approver.hitl(approved), {"chosen_options": ["Approve"]})
        assert r.status_code == 200, r.text
        state, states = finished(approver, af, approved)
        why = af.task_errors(DAG, approved, states)  # what failed first, then the services' tails
        logs = af.tail()
    finally:
        af.stop()

    assert state == "success", f"{why}\n{states}\n{logs}"
    assert all(states[t] == "success" for t in SYSTEM_TASKS), states
    assert deletes(mailchimp) - members_before == planned
    entries = ledger_entries(retention_home, approved)
    assert len([e for e in entries if e["status"] in ("erased", "already_gone")]) == planned, entries
    [decision] = [a for a in approvals(retention_home) if a["run_id"] == approved]
    assert decision["decision"] == "approved" and decision["decided_by"] == "approver"
    assert decision["plan_hash"] == plan_hash and decision["policy_version"] == entries[0]["policy_version"]
    assert decision["planned"] == planned and decision["allowed"] == 3
    assert decision["decided_at"] is not None


# --- the steps without Airflow: what an approval is bound to --------------------------------------

def _plan(rows: int = 6):
    import pandas as pd

    return pd.DataFrame({
        "record_type": pd.Categorical(["member"] * rows), "record_id": [f"id{i}" for i in range(rows)],
        "record_key": [f"{i:016x}" for i in range(rows)], "rule_id": ["r_a", "r_b"] * (rows // 2),
        "action": ["erase", "hold"] * (rows // 2), "blocks": pd.Series([pd.NA] * rows, dtype="string"),
    })


def test_a_plan_hash_is_its_content_in_any_order_and_nothing_else():
    from retention.domain.approval import plan_hash

    plan = _plan()
    h = plan_hash(plan)
    assert len(h) == 64 and h == plan_hash(plan.iloc[::-1]) == plan_hash(plan[list(reversed(plan.columns))])
    assert plan_hash(plan.assign(record_type=plan["record_type"].astype(str))) == h  # categorical or not
    assert plan_hash(plan.iloc[1:]) != h  # a row less
    changed = plan.copy()
    changed.loc[0, "action"] = "minimise"
    assert plan_hash(changed) != h  # a row changed
    assert plan_hash(plan.assign(extra=1)) != h


def test_the_newest_decision_on_a_plan_counts():
    from datetime import datetime

    from retention.domain.approval import Decision, approved, decision_of

    t = [datetime(2026, 12, 2, h) for h in range(3)]
    assert approved([]) is None
    assert approved([{"decision": "approved", "decided_at": t[0]}])["decided_at"] == t[0]
    assert approved([{"decision": "approved", "decided_at": t[0]}, {"decision": "rejected", "decided_at": t[1]}]) is None
    assert approved([{"decision": "timed_out", "decided_at": t[0]}, {"decision": "approved", "decided_at": t[2]}]) is not None
    assert decision_of(["Approve"], approve="Approve", timed_out=False) is Decision.APPROVED
    assert decision_of(["Reject"], approve="Approve", timed_out=False) is Decision.REJECTED
    assert decision_of(["Approve"], approve="Approve", timed_out=True) is Decision.TIMED_OUT


def test_a_plan_over_the_guard_is_erased_only_with_an_approval_of_its_hash_and_policy_version(mailchimp, retention_home, monkeypatch):
    from retention.checks.validation import PlanRejected
    from retention.runs import nightly as pipeline
    from retention.store.ledger import Ledger
    from retention.systems.newsletter.adapter import NewsletterAdapter
    from retention.systems.newsletter.client import MailchimpClient

    def adapter():
        return NewsletterAdapter(MailchimpClient(KEY, base_url=f"{mailchimp.base_url}/3.0"), "demo-list")

    monkeypatch.setenv("RETENTION_APPROVAL_TIMEOUT", "PT1H")
    run = pipeline.RunInfo.from_dict(pipeline.open_run(DAG, "manual__guard", None, dry_run=False, max_plan_share=0.01))
    pipeline.extract(run, "newsletter", adapter())
    pipeline.plan(run, "newsletter")
    validated = pipeline.validate(run, "newsletter")  # over the guard, GX passed: no failure, a question
    assert validated["needs_approval"] and validated["allowed"] == 3 and validated["planned"] > 3, validated
    request = pipeline.approval_request(run, "newsletter")
    assert validated["plan_hash"] in request["body"] and run.policy_version in request["body"]
    assert not ADDRESS.search(request["subject"] + request["body"])

    with pytest.raises(PlanRejected, match="no approval of this plan"):
        pipeline.erase(run, "newsletter", adapter())
    ledger = Ledger(f"sqlite:///{retention_home / 'ledger.db'}")
    # An approval of the same plan under another policy version does not count.
    ledger.record_approval(
        dag_id=DAG, run_id="other", system="newsletter", plan_hash=validated["plan_hash"], policy_version="another",
        decision="approved", decided_by="someone", decided_at=datetime.now(UTC), planned=1, allowed=1, extracted=1,
    )
    with pytest.raises(PlanRejected, match="no approval of this plan"):
        pipeline.erase(run, "newsletter", adapter())
    pipeline.record_approval(run, "newsletter", "rejected", "reviewer", datetime.now(UTC))
    with pytest.raises(PlanRejected, match="the plan was rejected"):
        pipeline.erase(run, "newsletter", adapter())
    assert deletes(mailchimp) == 0 and ledger_entries(retention_home, run.run_id) == []

    pipeline.record_approval(run, "newsletter", "approved", "approver", datetime.now(UTC))
    erased = pipeline.erase(run, "newsletter", adapter())
    assert erased["approval"]["decided_by"] == "approver" and erased["approval"]["plan_hash"] == validated["plan_hash"]
    assert deletes(mailchimp) == validated["planned"]
    pipeline.verify(run, "newsletter", adapter())
    report = pipeline.report(run, ("newsletter",))
    assert report["state"] == "success" and report["not_approved"] == [], report
    text = Path(report["report"]).with_suffix(".txt").read_text()
    assert "approved by approver; erased on that approval" in text, text


def test_without_an_approval_timeout_a_plan_over_the_guard_halts_validation(mailchimp, retention_home, monkeypatch):
    from retention.checks.validation import PlanRejected
    from retention.runs import nightly as pipeline
    from retention.systems.newsletter.adapter import NewsletterAdapter
    from retention.systems.newsletter.client import MailchimpClient

    monkeypatch.setenv("RETENTION_APPROVAL_TIMEOUT", "PT0S")
    run = pipeline.RunInfo.from_dict(pipeline.open_run(DAG, "manual__halt", None, dry_run=False, max_plan_share=0.01))
    pipeline.extract(run, "newsletter", NewsletterAdapter(MailchimpClient(KEY, base_url=f"{mailchimp.base_url}/3.0"), "demo-list"))
    pipeline.plan(run, "newsletter")
    with pytest.raises(PlanRejected, match=r"plan_size_guard: \d+ planned, 3 allowed of 300 extracted"):
        pipeline.validate(run, "newsletter")


def test_a_bad_approval_timeout_is_one_line(monkeypatch):
    from retention.config import ConfigError, approval_timeout

    monkeypatch.setenv("RETENTION_APPROVAL_TIMEOUT", "12 hours")
    with pytest.raises(ConfigError, match=r"^RETENTION_APPROVAL_TIMEOUT: .*'12 hours'") as err:
        approval_timeout()
    assert "\n" not in str(err.value)
