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
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

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
    port = _free_port()
    env = {
        **env,
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
    }
    home = Path(env.get("AIRFLOW_HOME") or ".airflow")
    before = {r["run_id"] for r in _runs(env)}
    print(f"==> {CONSUMER}: the erasure events queued a run; starting a scheduler to run it", flush=True)
    procs = []
    try:
        # The scheduler serves no logs: its log server would listen on every interface (8793).
        # Each in a process group of its own, so that its workers stop with it (below).
        for name, args in (("api-server", ["api-server", "--host", "127.0.0.1", "--port", str(port)]), ("scheduler", ["scheduler", "--skip-serve-logs"])):
            log = (home / f"warehouse-demo-{name}.log").open("w")
            procs.append(subprocess.Popen([sys.executable, "-m", "airflow", *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True))
        deadline = time.monotonic() + timeout
        run = None
        while time.monotonic() < deadline:
            fresh = [r for r in _runs(env) if r["run_id"] not in before]
            if fresh and fresh[0]["state"] in ("success", "failed"):
                run = fresh[0]
                break
            time.sleep(3)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
            try:  # what the service left behind in its group (the LocalExecutor's workers)
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    if run is None:
        print(f"==> {CONSUMER}: no run finished within {timeout:.0f}s (see {home}/warehouse-demo-*.log)", file=sys.stderr)
        return 1
    print(f"==> {CONSUMER}: run {run['run_id']} {run['state']}", flush=True)
    logs = home / "logs" / f"dag_id={CONSUMER}" / f"run_id={run['run_id']}"
    for path in sorted(logs.rglob("*.log")) if logs.exists() else ():
        for m in _LINE.finditer(path.read_text(errors="replace")):
            print(f"   {m.group(1)}", flush=True)
    return 0 if run["state"] == "success" else 1
