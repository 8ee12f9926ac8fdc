"""Workers beyond one machine: retention_nightly through a scheduler with the CeleryExecutor, two
Celery workers (each its own working directory, RETENTION_HOME and hostname, as two machines
would have), Redis as the broker (Debian's redis-server, scripts/redis.sh) and the run's staging
on an S3-compatible server. Its tasks land on both workers, and the systems end exactly as after
a LocalExecutor run of the same data."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest
import sqlalchemy as sa
from test_backfill import fresh_database

from airflow_services import ROOT, AirflowServices, free_port, wildcard_listeners
from nightly_systems import standin_systems
from s3_server import s3_server

DAG = "retention_nightly"
SYSTEMS = ("newsletter", "crm", "ticketing")
WORKERS = ("worker-a", "worker-b")


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[str]:
    """Debian's redis-server on 127.0.0.1, a free port and a password; yields the broker URL."""
    binary = subprocess.run([str(ROOT / "scripts" / "redis.sh")], check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    port, password = free_port(), secrets.token_hex(16)
    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--requirepass", password, "--save", "", "--appendonly", "no",
         "--dir", str(directory), "--logfile", str(directory / "redis.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        import redis

        client = redis.Redis(host="127.0.0.1", port=port, password=password)
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("redis-server did not start: " + (directory / "redis.log").read_text(errors="replace")[-2000:]) from None
                time.sleep(0.2)
        client.close()
        assert not wildcard_listeners([proc.pid]), "redis-server listened beyond 127.0.0.1"
        yield f"redis://:{password}@127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _deploy(af: AirflowServices) -> None:
    # The deployment's set-up after `airflow db migrate`: the providers' pools.
    pools = subprocess.run([sys.executable, "-m", "retention.cli", "pools"], env=af.env, capture_output=True, text=True)
    assert pools.returncode == 0, pools.stderr
    af.wait_for_dag(DAG)
    af.airflow("dags", "unpause", DAG)


def _run_nightly(af: AirflowServices, run_id: str, as_of: str, timeout: float = 900) -> dict[str, dict]:
    """Trigger one nightly run as of ``as_of`` and wait for it; returns its task instances
    (task_id -> state and hostname) from the metadata database."""
    af.airflow("dags", "trigger", DAG, "--run-id", run_id, "--logical-date", as_of, "--conf", json.dumps({"max_plan_share": 1.0}))
    meta = sa.create_engine(af.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    try:
        deadline = time.monotonic() + timeout
        while True:
            with meta.connect() as conn:
                state = conn.execute(sa.text("select state from dag_run where dag_id = :d and run_id = :r"), {"d": DAG, "r": run_id}).scalar()
                tasks = {
                    t.task_id: {"state": t.state, "hostname": t.hostname}
                    for t in conn.execute(
                        sa.text("select task_id, state, hostname from task_instance where dag_id = :d and run_id = :r"), {"d": DAG, "r": run_id}
                    )
                }
            if state in ("success", "failed"):
                return {"state": state, "tasks": tasks}
            if time.monotonic() > deadline:
                pytest.fail(f"run {run_id} did not finish: {state} {tasks}\n{af.tail()}")
            time.sleep(5)
    finally:
        meta.dispose()


def _contents(as_of: datetime, home: Path, monkeypatch) -> dict[str, pd.DataFrame]:
    """What each system holds now, read as a nightly extract reads it (record ids, statuses,
    clocks; nothing personal), each frame sorted so that two systems' can be compared. Read
    with a RETENTION_HOME (and so a ledger) of its own: the extract takes the systems' locks."""
    monkeypatch.setenv("RETENTION_HOME", str(home))
    from retention.domain.records import record_types_of
    from retention.runs import nightly as pipeline
    from retention.systems import adapter_for

    run = pipeline.RunInfo.from_dict(pipeline.open_run("check", f"check_{time.time_ns()}", as_of, dry_run=True, max_plan_share=1.0))
    found = {}
    for system in SYSTEMS:
        adapter = adapter_for(system)
        try:
            pipeline.extract(run, system, adapter)
        finally:
            adapter.close()
        for record_type in record_types_of(system):
            frame = run.staging.read_extract(system, record_type)
            if frame is not None:
                found[record_type] = frame.sort_values(list(frame.columns)).reset_index(drop=True)
    run.staging.remove()
    return found


def _ledger(url: str) -> list[tuple]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return sorted(conn.execute(sa.text("select record_type, record_key, rule_id, action, status from erasure_ledger")).all())
    finally:
        engine.dispose()


def _local_run(tmp_path, postgres_url_for, now: str, as_of: str, monkeypatch) -> tuple[dict, dict, list]:
    with standin_systems(tmp_path / "local-systems", now) as systems:
        for k, v in systems["connections"].items():
            monkeypatch.setenv(k, v)
        ledger = fresh_database(postgres_url_for("retention_celery_local_ledger"))
        af = AirflowServices(tmp_path / "local-airflow", fresh_database(postgres_url_for("retention_celery_local_meta")), {
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False", "RETENTION_LEDGER_URL": ledger,
        }).start()
        try:
            _deploy(af)
            run = _run_nightly(af, "manual__local", as_of)
        finally:
            af.stop()
        return run, _contents(datetime.fromisoformat(as_of), tmp_path / "local-check", monkeypatch), _ledger(ledger)


@pytest.mark.airflow
@pytest.mark.postgres
@pytest.mark.timeout(2400)
def test_nightly_on_two_celery_workers_ends_as_a_local_run(tmp_path, postgres_url_for, retention_home, monkeypatch):
    started = time.monotonic()
    now = datetime.now(UTC).replace(microsecond=0).isoformat()
    as_of = now  # both runs enforce as of the moment the systems were generated for
    local, local_contents, local_ledger = _local_run(tmp_path, postgres_url_for, now, as_of, monkeypatch)
    assert local["state"] == "success", local
    with contextlib.ExitStack() as stack:
        systems = stack.enter_context(standin_systems(tmp_path / "celery-systems", now))
        for k, v in systems["connections"].items():
            monkeypatch.setenv(k, v)
        broker = stack.enter_context(redis_server(tmp_path / "redis"))
        s3 = stack.enter_context(s3_server())
        ledger = fresh_database(postgres_url_for("retention_celery_ledger"))
        meta = fresh_database(postgres_url_for("retention_celery_meta"))
        af = AirflowServices(tmp_path / "celery-airflow", meta, {
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            "AIRFLOW__CELERY__BROKER_URL": broker,
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + meta,
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": "2",
            "RETENTION_LEDGER_URL": ledger,
        }, executor="CeleryExecutor").start()
        stack.callback(af.stop)
        _deploy(af)
        homes = {}
        for name in WORKERS:
            cwd = tmp_path / name
            homes[name] = cwd / "retention"
            homes[name].mkdir(parents=True)
            af.spawn(name, "celery", "worker", "--celery-hostname", f"{name}@%h", "--concurrency", "2", "--skip-serve-logs", cwd=cwd, env={
                # A machine of its own: its working directory, RETENTION_HOME, task logs and host name.
                "RETENTION_HOME": str(homes[name]),
                "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(cwd / "logs"),
                "AIRFLOW__CORE__HOSTNAME_CALLABLE": "worker_hostname.hostname",
                "RETENTION_TEST_WORKER_HOSTNAME": name,
                "PYTHONPATH": os.pathsep.join([af.env["PYTHONPATH"], str(ROOT / "tests")]),
                # The run's staging: shared object storage, the only place both workers reach.
                "RETENTION_STAGING_URL": f"s3://{s3.bucket}/staging",
                "RETENTION_STAGING_CONN_ID": "retention_staging",
                "AIRFLOW_CONN_RETENTION_STAGING": s3.connection(),
            })
        deadline = time.monotonic() + 300
        while not all(" ready." in (af.home / f"{name}.log").read_text(errors="replace") for name in WORKERS):
            if time.monotonic() > deadline:
                pytest.fail("the Celery workers did not start:\n" + af.tail())
            time.sleep(2)

        celery = _run_nightly(af, "manual__celery", as_of)
        worker_logs = {name: sorted(str(p) for p in (tmp_path / name / "logs").rglob("*.log")) for name in WORKERS}
        staged = s3.keys()
        celery_contents = _contents(datetime.fromisoformat(as_of), tmp_path / "celery-check", monkeypatch)
        celery_ledger = _ledger(ledger)
        assert not wildcard_listeners([p.pid for p in af.procs]), "a worker listened beyond 127.0.0.1"
    elapsed = time.monotonic() - started
    print(f"celery test: {elapsed:.0f} s, load average {os.getloadavg()}", flush=True)

    assert celery["state"] == "success", (celery, af.tail())
    assert {t: s["state"] for t, s in celery["tasks"].items()} == {t: s["state"] for t, s in local["tasks"].items()}
    assert {s["state"] for s in celery["tasks"].values()} <= {"success", "skipped"}, celery["tasks"]
    ran = {t: s["hostname"] for t, s in celery["tasks"].items() if s["state"] == "success"}
    # Every task ran on one of the two workers, and both workers ran some.
    assert set(ran.values()) == set(WORKERS), ran
    assert all(worker_logs.values()), worker_logs
    # Staging went to the object store: nothing staged on either worker's disk, and the run
    # removed its staging from the store when its report was written.
    assert not [p for name in WORKERS for p in homes[name].rglob("*.parquet")], "staging written to a worker's local disk"
    assert [k for k in staged if "/manual__celery/" in k] == [], staged
    # The systems end exactly as after the LocalExecutor run, with the same ledger.
    assert celery_contents.keys() == local_contents.keys()
    for record_type, frame in local_contents.items():
        pd.testing.assert_frame_equal(celery_contents[record_type], frame, obj=record_type)
    assert celery_ledger == local_ledger
    assert [e for e in celery_ledger if e[4] == "erased"], "the run erased nothing: the data has no due records"
