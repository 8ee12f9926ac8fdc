"""The demo's warehouse: the example consumer DAG ``warehouse_erasures``
(``retention_dev/example_dags/``) triggered by the erasure asset events of the demo's run.

Two calls around the producer's run (``airflow dags test retention_nightly``):

* :func:`prepare` before it: Airflow's DAG bundles list ``dags/`` and the example DAGs, the
  consumer is registered in the metadata database and unpaused, so the producer's events queue
  a run of it (Airflow queues runs only for consumers it knows and that are not paused);
* :func:`run_consumer` after it: a scheduler (and the api-server its tasks report to) runs for as
  long as it takes the queued, asset-triggered run to finish, then stops; the run's lines (what
  the warehouse would erase, by rule and count) are printed.

A dry run emits no event: nothing is queued and :func:`run_consumer` says so without starting
anything. Everything binds to 127.0.0.1 and is stopped before it returns.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from retention_dev.airflow_ui import AirflowUI

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_DAGS = ROOT / "retention_dev" / "example_dags"
CONSUMER = "warehouse_erasures"
_LOCAL_BUNDLE = "airflow.dag_processing.bundles.local.LocalDagBundle"


def bundle_config(dags_folder: str | os.PathLike) -> str:
    """``[dag_processor] dag_bundle_config_list``: the project's DAGs and the example DAGs."""
    return json.dumps([
        {"name": "dags-folder", "classpath": _LOCAL_BUNDLE, "kwargs": {"path": str(dags_folder)}},
        {"name": "retention-examples", "classpath": _LOCAL_BUNDLE, "kwargs": {"path": str(EXAMPLE_DAGS)}},
    ])


def _airflow(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "airflow", *args], env=env, capture_output=True, text=True, timeout=timeout)


def prepare(env: dict) -> bool:
    """Before the producer runs (``env`` is the demo's Airflow environment, changed in place).
    False (with the reason printed) when the consumer could not be registered: the demo goes on
    without it."""
    env["AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST"] = bundle_config(env.get("AIRFLOW__CORE__DAGS_FOLDER") or ROOT / "dags")
    for args in (("dags", "reserialize"), ("dags", "unpause", CONSUMER)):
        out = _airflow(env, *args)
        if out.returncode:
            print(f"warehouse example not registered: airflow {' '.join(args)} failed\n{out.stderr[-2000:]}", file=sys.stderr)
            return False
    return True


def _queued(env: dict) -> bool:
    """Whether the producer's events queued a run of the consumer (Airflow's asset queue)."""
    code = (
        "from airflow.models.asset import AssetDagRunQueue as Q\n"
        "from airflow.utils.session import create_session\n"
        "import sqlalchemy as sa\n"
        f"with create_session() as s: print(s.scalar(sa.select(sa.func.count()).select_from(Q).where(Q.target_dag_id == {CONSUMER!r})))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    return out.returncode == 0 and out.stdout.strip().splitlines()[-1:] != ["0"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _runs(env: dict) -> list[dict]:
    out = _airflow(env, "dags", "list-runs", CONSUMER, "-o", "json").stdout
    listed = [line for line in out.splitlines() if line.startswith("[")]
    return json.loads(listed[-1]) if listed else []


_LINE = re.compile(r'"event":\s*"((?:warehouse: |[a-z]+: \d+ gone|  [a-z]+  ).*?)"')


def run_consumer(env: dict, timeout: float = 240) -> int:
    """After the producer's run: let a scheduler start and run the consumer's asset-triggered
    run; print what it logged. 0 when it succeeded or nothing was queued (a dry run)."""
    if not _queued(env):
        print(f"==> {CONSUMER}: no erasure event queued a run (a dry run emits none)", flush=True)
        return 0
    # The scheduler's tasks report to an api-server: both on a free port of 127.0.0.1, stopped
    # (with the workers they started) before this returns.
    ui = AirflowUI({**env, "AIRFLOW__CORE__EXECUTOR": "LocalExecutor", "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1"}, _free_port())
    before = {r["run_id"] for r in _runs(ui.env)}
    print(f"==> {CONSUMER}: the erasure events queued a run; starting a scheduler to run it", flush=True)
    try:
        ui.start()
    except RuntimeError as e:  # stopped already; the demo goes on without the consumer's run
        print(f"==> {CONSUMER}: {e}", file=sys.stderr)
        return 1
    try:
        ui.start_scheduler()
        deadline = time.monotonic() + timeout
        run = None
        while time.monotonic() < deadline:
            fresh = [r for r in _runs(ui.env) if r["run_id"] not in before]
            if fresh and fresh[0]["state"] in ("success", "failed"):
                run = fresh[0]
                break
            time.sleep(3)
    finally:
        ui.stop()
    if run is None:
        print(f"==> {CONSUMER}: no run finished within {timeout:.0f}s (see {ui.logs_dir})", file=sys.stderr)
        return 1
    print(f"==> {CONSUMER}: run {run['run_id']} {run['state']}", flush=True)
    logs = ui.home / "logs" / f"dag_id={CONSUMER}" / f"run_id={run['run_id']}"
    for path in sorted(logs.rglob("*.log")) if logs.exists() else ():
        for m in _LINE.finditer(path.read_text(errors="replace")):
            print(f"   {m.group(1)}", flush=True)
    return 0 if run["state"] == "success" else 1
