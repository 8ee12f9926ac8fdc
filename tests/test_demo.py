"""``./scripts/demo.sh``: a failed run shows its cause and no earlier run's report; ``--serve``
runs through Airflow's api-server, scheduler and dag-processor, with the task logs in the UI,
and stops everything on Ctrl-C. Small demo systems, their own RETENTION_HOME and AIRFLOW_HOME."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--members", "300", "--tickets", "120", "--contacts", "200"]


def demo_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW_CONN_")}
    env.update(
        RETENTION_HOME=str(tmp_path / "retention"),
        AIRFLOW_HOME=str(tmp_path / "airflow"),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{tmp_path / 'airflow' / 'airflow.db'}",
        **extra,
    )
    return env


def demo(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["./scripts/demo.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.timeout(1200)
def test_a_failed_run_shows_its_cause_and_no_earlier_report(tmp_path):
    first = demo(demo_env(tmp_path), "--reset", *SMALL)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    earlier = re.search(r"^Retention run (\S+)", first.stdout, re.M).group(1)
    # A plan-age setting the erase tasks refuse: the run fails there, with this one line.
    failed = demo(demo_env(tmp_path, RETENTION_MAX_PLAN_AGE="P1M"))
    assert failed.returncode == 1
    out = failed.stdout + failed.stderr
    assert f"Retention run {earlier}" not in out  # never the previous run's report
    assert re.search(r"task newsletter\.erase failed: \w+: RETENTION_MAX_PLAN_AGE 'P1M': give days and hours", out), out[-3000:]
    assert "nothing was due" not in out

    # A run that fails before any report is written: said so, and still no earlier report.
    broken = demo(demo_env(tmp_path, RETENTION_POLICY_FILE=str(tmp_path / "missing.yaml")))
    assert broken.returncode == 1
    out = broken.stdout + broken.stderr
    assert f"Retention run {earlier}" not in out
    assert re.search(r"task \S+ failed: ", out) or "no report was written" in out, out[-3000:]


def left_behind(home: Path, wait: float = 15.0) -> list[str]:
    """Processes still alive that were started with this ``RETENTION_HOME`` (read from
    /proc/PID/environ) or hold a file open under its directory's parent (the demo's AIRFLOW_HOME
    is beside it: an Airflow worker renames itself over its environment, so only its open
    metadata database shows whose it is), after up to ``wait`` seconds for stopping ones to
    end: what a demo that returned left running (an Airflow scheduler's workers, a log server)."""
    marker = f"RETENTION_HOME={home}".encode()
    deadline = time.monotonic() + wait
    while True:
        alive = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                if (marker in (proc / "environ").read_bytes().split(b"\0") or _holds_under(proc, home.parent)) \
                        and (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                    alive.append(f"{proc.name}: {command[:200]}")
            except OSError:
                continue
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def _holds_under(proc: Path, root: Path) -> bool:
    """Whether the process has a file open under ``root``."""
    try:
        fds = list((proc / "fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(fd).startswith(f"{root}/"):
                return True
        except OSError:
            continue
    return False


@pytest.mark.timeout(1200)
def test_a_reset_demo_erases_what_a_first_one_does(tmp_path):
    """--reset seeds the systems afresh but keeps the ledger, whose record index and change-feed
    cursors describe the old systems: the run reconciles, so the erasures per rule are a first
    run's (an incremental read would not see the reseeded records and erase nothing). And a
    demo that returned leaves nothing running (its warehouse consumer once left an Airflow log
    server listening on every address, and idle workers)."""
    erased = []
    for _ in range(2):
        out = demo(demo_env(tmp_path), "--reset", *SMALL)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        erased.append(re.search(r"^==> erased per rule: (\{.*\})$", out.stdout, re.M).group(1))
        assert left_behind(tmp_path / "retention") == []
    assert erased[1] == erased[0] and "newsletter/" in erased[0] and "ticketing/" in erased[0], erased
    assert '"reconcile": true' in out.stdout and "record index drift" in out.stdout, out.stdout[-3000:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(1200)
def test_serve_keeps_the_ui_and_the_stand_ins_up_with_task_logs(tmp_path):
    port = _free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as fh:
        proc = subprocess.Popen(["./scripts/demo.sh", "--reset", "--serve", "--port", str(port), *SMALL], cwd=ROOT,
                                env=demo_env(tmp_path), stdout=fh, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 900
        ui = None
        while time.monotonic() < deadline and proc.poll() is None:
            ui = re.search(r"Airflow's UI: (http://127\.0\.0\.1:\d+) \(user (\S+), password (\S+)\)", log.read_text())
            if ui:
                break
            time.sleep(2)
        assert ui, log.read_text()[-4000:]
        url, user, password = ui.groups()
        assert url == f"http://127.0.0.1:{port}"
        run_id = re.search(r"^Retention run (\S+)", log.read_text(), re.M).group(1)
        token = requests.post(f"{url}/auth/token", json={"username": user, "password": password}, timeout=30).json()["access_token"]
        logs = requests.get(
            f"{url}/api/v2/dags/retention_nightly/dagRuns/{run_id}/taskInstances/crm.plan/logs/1",
            headers={"Authorization": f"Bearer {token}", "Accept": "application/json"}, timeout=60,
        )
        assert logs.status_code == 200, logs.text[:500]
        assert "crm: plan" in logs.text  # the task's own progress line, in the UI's log
        # The stand-ins are up for the README's commands meanwhile.
        status = subprocess.run(["bash", "-c", "source scripts/setup.sh && retention explain --record-type crm_contact --record-id 3"],
                                cwd=ROOT, env=demo_env(tmp_path), capture_output=True, text=True, timeout=300)
        assert status.returncode == 0, status.stderr[-2000:]
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert "stopping" in log.read_text()
    with pytest.raises(requests.ConnectionError):  # the api-server is gone
        requests.get(f"http://127.0.0.1:{port}/api/v2/monitor/health", timeout=10)
    assert left_behind(tmp_path / "retention") == []  # nor the scheduler's workers
