"""Two DAGs at once against one Mailchimp stand-in stay within its 10 simultaneous connections
(issue 11, item 5): the providers' limits are Airflow pools, honoured by a real scheduler."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime

import pytest
import requests
from hypothesis import given
from hypothesis import strategies as st
from test_backfill import fresh_database

from airflow_services import ROOT, AirflowServices
from retention_dev.standins.process import StandIn

MAX_IN_FLIGHT = 10  # the stand-in's (and Mailchimp's) simultaneous connections per API key
POLICY = str(ROOT / "include" / "policies" / "retention.yaml")
# Two DAGs that each read the whole audience with as many connections as they may use.
RUNS = {
    "replay_erasures": {"systems": ["newsletter"], "dry_run": True},
    "policy_preview": {"systems": ["newsletter"], "old_policy": POLICY, "new_policy": POLICY},
}


@pytest.fixture
def mailchimp(tmp_path, monkeypatch):
    now = datetime.now(UTC).replace(microsecond=0).isoformat()
    standin = StandIn(
        "mailchimp", "--port", "0", "--members", "20000", "--seed", "3", "--now", now,
        "--max-connections", str(MAX_IN_FLIGHT), "--state-file", str(tmp_path / "mc.state"),
    ).start()
    conn = {"conn_type": "retention_mailchimp", "host": f"{standin.base_url}/3.0", "password": "standin-key-us0", "extra": {"list_id": "demo-list"}}
    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_MAILCHIMP", json.dumps(conn))
    # Every page of members is slow, so that the two runs' reads overlap however the scheduler starts them.
    requests.post(f"{standin.base_url}/_standin/faults", json={"slow_ms": 3000, "match": "/members?"}, timeout=10).raise_for_status()
    yield standin
    standin.stop()


def _state(af: AirflowServices, dag_id: str) -> tuple[str, dict[str, str]]:
    out = af.airflow("dags", "list-runs", dag_id, "-o", "json", check=False).stdout
    runs = json.loads([line for line in out.splitlines() if line.startswith("[")][-1] or "[]")
    if not runs:
        return "none", {}
    run = runs[0]
    out = af.airflow("tasks", "states-for-dag-run", dag_id, run["run_id"], "-o", "json", check=False).stdout
    listed = [line for line in out.splitlines() if line.startswith("[{")]
    return run["state"], ({t["task_id"]: t["state"] for t in json.loads(listed[-1])} if listed else {})


@pytest.mark.airflow
@pytest.mark.postgres
@pytest.mark.timeout(900)
def test_two_dags_at_once_stay_within_mailchimps_connections(tmp_path, postgres_url_for, retention_home, mailchimp):
    meta = fresh_database(postgres_url_for("retention_airflow_pools"))
    af = AirflowServices(tmp_path / "airflow", meta, {}).start()
    try:
        # The set-up step that creates the providers' pools (idempotent: twice is as once).
        setup = [subprocess.run([sys.executable, "-m", "retention.cli", "pools"], env=af.env, capture_output=True, text=True) for _ in range(2)]
        for dag_id in RUNS:
            af.wait_for_dag(dag_id)
            af.airflow("dags", "unpause", dag_id)
        triggers = [
            subprocess.Popen([sys.executable, "-m", "airflow", "dags", "trigger", dag_id, "--conf", json.dumps(conf)], env=af.env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for dag_id, conf in RUNS.items()
        ]
        assert [p.wait(timeout=120) for p in triggers] == [0, 0]
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            states = {dag_id: _state(af, dag_id) for dag_id in RUNS}
            if all(s in ("success", "failed") for s, _ in states.values()):
                break
            time.sleep(5)
        else:
            pytest.fail(f"runs did not finish: {states}\n{af.tail()}")
        pools = af.airflow("pools", "list", "-o", "json").stdout
    finally:
        af.stop()
    stats = requests.get(f"{mailchimp.base_url}/_standin/stats", timeout=10).json()

    assert stats["requests_by_kind"], stats
    assert stats["max_in_flight"] <= MAX_IN_FLIGHT, f"peak {stats['max_in_flight']} requests in flight: {stats}"
    assert stats["throttled"] == 0, stats
    assert {d: s for d, (s, _) in states.items()} == dict.fromkeys(RUNS, "success"), (states, af.tail())
    assert [p.returncode for p in setup] == [0, 0], [p.stderr[-2000:] for p in setup]
    listed = {p["pool"]: int(p["slots"]) for p in json.loads([line for line in pools.splitlines() if line.startswith("[")][-1])}
    assert listed["retention_mailchimp"] == MAX_IN_FLIGHT and listed["retention_zendesk"] > 0, listed


# --- which task takes which slots, and what a task's client then uses --------------------------

PROVIDER_TASKS = {  # dag -> task ids that talk to a provider (the CRM's need no pool), and their slots
    "retention_nightly": {f"{s}.{t}": 8 for s in ("newsletter", "ticketing") for t in ("extract", "erase", "verify")},
    "replay_erasures": {f"{s}.{t}": 8 for s in ("newsletter", "ticketing") for t in ("find", "erase", "verify")},
    "policy_preview": {"preview_newsletter": 8, "preview_ticketing": 8},
    "erasure_request": {"newsletter": 2, "ticketing": 2},
}
POOL_OF = {"newsletter": "retention_mailchimp", "ticketing": "retention_zendesk"}


def _dag(dag_id: str):
    from airflow_run import ensure_metadata_db, load_dag

    ensure_metadata_db()  # a DagBag reads the metadata database
    return load_dag(dag_id)


@pytest.mark.parametrize("dag_id", sorted(PROVIDER_TASKS))
def test_every_task_that_talks_to_a_provider_takes_slots_of_its_pool(dag_id):
    dag = _dag(dag_id)
    expected = PROVIDER_TASKS[dag_id]
    for task in dag.tasks:
        if task.task_id in expected:
            system = "newsletter" if "newsletter" in task.task_id else "ticketing"
            assert (task.pool, task.pool_slots) == (POOL_OF[system], expected[task.task_id]), task.task_id
        else:
            assert task.pool == "default_pool", f"{task.task_id} talks to no provider but takes {task.pool}"


def test_a_request_fits_beside_a_whole_system_task_and_two_of_those_never_run_at_once():
    from retention.systems.pools import BULK_SLOTS, POOLS, REQUEST_SLOTS

    for pool in POOLS.values():
        assert BULK_SLOTS + REQUEST_SLOTS <= pool.slots < 2 * BULK_SLOTS


def _in_task(dag_id: str, task_id: str):
    from airflow.sdk.execution_time.context import set_current_context

    return set_current_context({"task": _dag(dag_id).get_task(task_id)})


def test_a_mailchimp_client_opens_only_the_connections_its_task_holds(monkeypatch):
    from retention.systems.newsletter.hook import MailchimpHook

    conn = {"conn_type": "retention_mailchimp", "host": "http://127.0.0.1:9/3.0", "password": "k-us0", "extra": {"list_id": "l", "max_connections": 10}}
    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_MAILCHIMP", json.dumps(conn))
    assert MailchimpHook().get_conn().max_connections == 10  # the retention command: no pool held
    with _in_task("retention_nightly", "newsletter.extract"):
        assert MailchimpHook().get_conn().max_connections == 8
    with _in_task("erasure_request", "newsletter"):
        assert MailchimpHook().get_conn().max_connections == 2
    with _in_task("retention_nightly", "crm.extract"):  # another pool: nothing shared through this one
        assert MailchimpHook().get_conn().max_connections == 10


def test_a_zendesk_client_paces_itself_to_its_slots_share_of_the_budget(monkeypatch):
    from retention.systems.ticketing.hook import ZendeskHook

    extra = {"requests_per_minute": 700, "incremental_per_minute": 10}
    conn = {"conn_type": "retention_zendesk", "host": "http://127.0.0.1:9", "login": "a@example.org", "password": "t", "extra": extra}
    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_ZENDESK", json.dumps(conn))
    whole = ZendeskHook().get_conn()
    with _in_task("retention_nightly", "ticketing.erase"):
        bulk = ZendeskHook().get_conn()
    with _in_task("erasure_request", "ticketing"):
        request = ZendeskHook().get_conn()
    # A pacer's interval is the window over its limit: 8 and 2 tenths of it together are the whole.
    assert bulk.general.interval == pytest.approx(whole.general.interval * 10 / 8)
    assert request.general.interval == pytest.approx(whole.general.interval * 10 / 2)
    assert (whole.max_jobs_in_flight, bulk.max_jobs_in_flight, request.max_jobs_in_flight) == (30, 24, 6)
    assert request.incremental.interval == pytest.approx(whole.incremental.interval * 5)


@given(
    held=st.lists(st.integers(1, 10), min_size=1, max_size=10).filter(lambda h: sum(h) <= 10),
    budget=st.integers(10, 100_000),
    configured=st.integers(1, 50),
)
def test_tasks_the_scheduler_runs_at_once_stay_within_the_providers_limits(held, budget, configured):
    """Whatever slots the tasks running at once hold (the scheduler lets their sum reach the pool's
    size, never more), their Zendesk budgets together stay within the account's and their
    Mailchimp connections within 10."""
    from retention.systems.ticketing.hook import _BUDGETS, shared_budget

    options = dict.fromkeys(_BUDGETS, budget)
    for name in _BUDGETS:
        assert sum(shared_budget(options, h)[name] for h in held) <= budget
    assert sum(min(configured, h) for h in held) <= 10


def test_pools_before_the_metadata_database_is_migrated_is_one_line_and_exit_2(tmp_path):
    env = {**os.environ, "AIRFLOW_HOME": str(tmp_path)}
    env.pop("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", None)
    out = subprocess.run([sys.executable, "-m", "retention.cli", "pools"], env=env, capture_output=True, text=True)
    assert out.returncode == 2, out
    assert out.stderr.strip().count("\n") == 0 and "airflow db migrate" in out.stderr and "Traceback" not in out.stderr, out.stderr
