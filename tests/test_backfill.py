"""Backfills with a real scheduler on a PostgreSQL metadata database, beside the nightly schedule."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest
import sqlalchemy as sa

from airflow_services import AirflowServices
from nightly_systems import standin_systems
from retention.config import DEFAULT_POLICY
from retention.domain.policy import load_policy

DAG = "retention_nightly"


def fresh_database(url: str) -> str:
    """Drop and recreate the database of ``url``; return the URL."""
    u = sa.engine.make_url(url)
    admin = sa.create_engine(u.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{u.database}" WITH (FORCE)'))
        conn.execute(sa.text(f'CREATE DATABASE "{u.database}"'))
    admin.dispose()
    return url


@pytest.fixture
def systems(tmp_path, retention_home, monkeypatch):
    now = datetime.now(UTC).replace(microsecond=0).isoformat()
    with standin_systems(tmp_path, now) as found:
        for k, v in found["connections"].items():
            monkeypatch.setenv(k, v)
        yield found


def _runs(af: AirflowServices) -> list[dict]:
    out = af.airflow("dags", "list-runs", DAG, "-o", "json", check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("[{") or line.strip() == "[]"]
    return json.loads(lines[-1]) if lines else []


def _plan_now_is_empty(as_of) -> dict:
    """What a run as of ``as_of`` would still erase from the systems' final contents."""
    from retention.runs import nightly as pipeline
    from retention.systems import adapter_for

    run = pipeline.RunInfo.from_dict(pipeline.open_run("check", f"check_{time.time()}", as_of, dry_run=True, max_plan_share=1.0))
    destructive = {}
    for system in ("newsletter", "crm", "ticketing"):
        adapter = adapter_for(system)
        try:
            pipeline.extract(run, system, adapter)
            pipeline.plan(run, system)
            plan = run.staging.read_frame(system, "plan")
            destructive[system] = int(plan["action"].isin(["erase", "minimise"]).sum())
            pipeline.validate(run, system)
            pipeline.erase(run, system, adapter)
            pipeline.verify(run, system, adapter)
        finally:
            adapter.close()
    pipeline.report(run, ("newsletter", "crm", "ticketing"))
    return destructive


@pytest.mark.airflow
@pytest.mark.postgres
@pytest.mark.timeout(1800)
def test_backfill_beside_the_nightly_schedule(tmp_path, postgres_url_for, retention_home, systems):
    meta = fresh_database(postgres_url_for("retention_airflow_meta"))
    af = AirflowServices(tmp_path / "airflow", meta, {}).start()
    print(f"airflow logs: {af.home}", flush=True)
    try:
        # The deployment's set-up step after `airflow db migrate`: the providers' pools, without
        # which no task that talks to a provider is ever scheduled.
        subprocess.run([sys.executable, "-m", "retention.cli", "pools"], env=af.env, check=True, capture_output=True)
        af.wait_for_dag(DAG)
        today = pd.Timestamp.now(tz="Europe/Stockholm").normalize()
        # Backfill dates are read in UTC: four days back to two days back gives three runs
        # (logical dates at Stockholm midnight, 23:00 UTC the day before).
        first, last = (today - timedelta(days=5)).date(), (today - timedelta(days=2)).date()
        # Unpausing lets the scheduler create tonight's run (the latest interval) beside the backfill;
        # the backfill may run all of its runs at once: only the system lock keeps them apart.
        af.airflow("dags", "unpause", DAG)
        af.airflow("backfill", "create", "--dag-id", DAG, "--from-date", str(first), "--to-date", str(last), "--max-active-runs", "3")
        deadline = time.monotonic() + 1500
        while time.monotonic() < deadline:
            runs = _runs(af)
            backfilled = [r for r in runs if r["run_id"].startswith("backfill__")]
            if len(backfilled) >= 3 and len(runs) > len(backfilled) and all(r["state"] in ("success", "failed") for r in runs):
                break
            print(time.strftime("%H:%M:%S"), sorted((r["logical_date"], r["state"]) for r in runs), flush=True)
            time.sleep(15)
        else:
            pytest.fail(f"runs did not finish: {_runs(af)}\n{af.tail()}")

        # A backfill before enforcement started (the DAG's START_DATE, 2026-01-01) fails with
        # a message: Airflow would clamp its range and create no run, a silent success.
        # The scheduler marks the first backfill completed a loop after its last run ends; until
        # then Airflow refuses a second one ("Another backfill is running"): ask again.
        deadline = time.monotonic() + 180
        while True:
            out = af.airflow("backfill", "create", "--dag-id", DAG, "--from-date", "2025-06-02", "--to-date", "2025-06-03", check=False)
            if out.returncode == 0 or "Another backfill is running" not in out.stdout + out.stderr or time.monotonic() > deadline:
                break
            time.sleep(5)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            early = [r for r in _runs(af) if r["logical_date"].startswith("2025-06")]
            if len(early) >= 2 and all(r["state"] in ("success", "failed") for r in early):
                break
            time.sleep(10)
        else:
            pytest.fail(f"the early backfill's runs did not finish: {_runs(af)}\n{af.tail()}")
        early_tasks = {
            r["run_id"]: af.airflow("tasks", "states-for-dag-run", DAG, r["run_id"], "-o", "json", check=False).stdout
            for r in early
        }
        early_logs = "\n".join(p.read_text(errors="replace") for p in af.home.rglob("*.log") if "open_run" in str(p))
    finally:
        af.stop()

    assert {r["state"] for r in early} == {"failed"}, early
    for run_id, out in early_tasks.items():
        listed = [line for line in out.splitlines() if line.startswith("[{")]
        assert listed, out
        states = {t["task_id"]: t["state"] for t in json.loads(listed[-1])}
        assert states["open_run"] == "failed" and states["report"] == "failed", (run_id, states)
        assert all(s in ("upstream_failed", None) for t, s in states.items() if t not in ("open_run", "report")), states
    assert "is before the start date of retention_nightly" in early_logs
    runs = [r for r in runs if not r["logical_date"].startswith("2025-06")]

    assert len([r for r in runs if r["run_id"].startswith("backfill__")]) >= 3, runs
    assert [r for r in runs if r["run_id"].startswith("scheduled__")], "the nightly schedule did not run beside the backfill"
    assert {r["state"] for r in runs} == {"success"}, (runs, af.tail())
    meta_engine = sa.create_engine(meta)
    with meta_engine.connect() as conn:
        interval_end = dict(
            conn.execute(sa.text("select run_id, data_interval_end from dag_run where dag_id = :d"), {"d": DAG}).all()
        )
    meta_engine.dispose()
    for r in runs:
        r["data_interval_end"] = interval_end[r["run_id"]]
    policy = load_policy(DEFAULT_POLICY)
    ledger = sa.create_engine(f"sqlite:///{retention_home / 'ledger.db'}")
    with ledger.connect() as conn:
        recorded = {r.run_id: r for r in conn.execute(sa.text("select * from erasure_run"))}
        entries = conn.execute(sa.text("select run_id, record_type, record_key, status, policy_version from erasure_ledger")).all()
    for r in runs:
        rec = recorded[r["run_id"]]
        assert rec.state == "success" and rec.policy_version == policy.version
        assert pd.Timestamp(rec.as_of, tz="UTC") == pd.Timestamp(r["data_interval_end"]).tz_convert("UTC"), "a run must enforce as of its own data interval end"
    assert {e.policy_version for e in entries} == {policy.version}
    erased = [(e.record_type, e.record_key) for e in entries if e.status in ("erased", "already_gone")]
    assert erased, "the backfill erased nothing: the test data has no due records"
    assert len(erased) == len(set(erased)), "a record was erased by two runs"
    assert not [e for e in entries if e.status == "already_gone"], "two runs planned the same records concurrently"

    # The systems now hold what one run as of the latest logical time would leave.
    latest = max(pd.Timestamp(r["data_interval_end"]) for r in runs)
    assert _plan_now_is_empty(latest.to_pydatetime()) == {"newsletter": 0, "crm": 0, "ticketing": 0}
