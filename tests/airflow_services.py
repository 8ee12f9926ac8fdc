"""A real Airflow deployment for tests: PostgreSQL metadata database, api-server, scheduler and
dag-processor as separate processes, with the LocalExecutor (or another executor whose workers
the test adds with :meth:`AirflowServices.spawn`, e.g. Celery workers)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AirflowServices:
    def __init__(self, home: Path, metadata_url: str, env: dict[str, str], executor: str = "LocalExecutor"):
        self.home = home
        port = free_port()
        self.api = f"http://127.0.0.1:{port}"
        self.env = {
            **os.environ,
            **env,
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_url,
            "AIRFLOW__CORE__EXECUTOR": executor,
            "AIRFLOW__CORE__PARALLELISM": "4",
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(ROOT / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api}/execution/",
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__API_AUTH__JWT_SECRET": "test-only-jwt-secret-0123456789abcdef",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
            # This checkout's src first: the tasks run the code under test, not another editable install.
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "dags"), str(ROOT)]),
        }
        self.procs: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def airflow(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        out = subprocess.run([sys.executable, "-m", "airflow", *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and out.returncode:
            raise RuntimeError(f"airflow {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        return out

    def start(self) -> AirflowServices:
        self.home.mkdir(parents=True, exist_ok=True)
        self.airflow("db", "migrate")
        for name, args in (("api-server", ["api-server", "--host", "127.0.0.1", "--port", self.env["AIRFLOW__API__PORT"]]), ("dag-processor", ["dag-processor"]), ("scheduler", ["scheduler", "--skip-serve-logs"])):
            self.spawn(name, *args)
        deadline = time.monotonic() + 360  # a loaded machine (a test suite beside other work) takes minutes to start the api-server
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.api}/api/v2/monitor/health", timeout=2).status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):  # not listening yet, or busy starting up on a loaded machine
                pass
            time.sleep(1)
        else:
            tail = self.tail()
            self.stop()  # the caller's try/finally has not begun: stop what was started here
            raise RuntimeError("api-server did not come up:\n" + tail)
        return self

    def spawn(self, name: str, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.Popen:
        """Start ``airflow <args>`` beside the services (a worker, with its own ``env`` additions
        and working directory), logging to ``<home>/<name>.log``; :meth:`stop` stops it too."""
        log = self.home / f"{name}.log"
        self.logs.append(log)
        with log.open("w") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "airflow", *args], env={**self.env, **(env or {})}, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    def wait_for_dag(self, dag_id: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.airflow("dags", "list", "-o", "plain", check=False).stdout.find(dag_id) >= 0:
                return
            time.sleep(2)
        raise RuntimeError(f"{dag_id} was never parsed:\n" + self.tail())

    def tail(self, n: int = 60) -> str:
        return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-n:]) for p in self.logs if p.exists())

    def task_errors(self, dag_id: str, run_id: str, states: dict[str, str | None], lines: int = 4) -> str:
        """The run's tasks that did not succeed (or were skipped), each with the last error lines
        of its log: what a failed assertion on a run shows first, before the services' tails."""
        out = []
        for task_id, state in sorted(states.items()):
            if state in ("success", "skipped"):
                continue
            errors = []
            for log in sorted((self.home / "logs" / f"dag_id={dag_id}" / f"run_id={run_id}" / f"task_id={task_id}").glob("attempt=*.log")):
                for line in log.read_text(errors="replace").splitlines():
                    try:
                        event = json.loads(line)
                    except ValueError:
                        continue
                    if str(event.get("level", "")).lower() in ("error", "critical"):
                        detail = event.get("error_detail") or ""
                        if isinstance(detail, list) and detail:  # the exception, innermost last
                            detail = f"{detail[-1].get('exc_type')}: {detail[-1].get('exc_value')}"
                        errors.append(f"{log.name}: {str(event.get('event'))[:300]} {str(detail)[:300]}".rstrip())
            out.append(f"{task_id} {state}: " + (" | ".join(errors[-lines:]) or "no error in its log"))
        return "\n".join(out) or "every task succeeded or was skipped"

    def stop(self) -> None:
        # Checked while everything still runs: whatever the services or their workers opened.
        wide = wildcard_listeners([p.pid for p in self.procs])
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        # The scheduler's log server (port 8793) listens on every interface unless told not to.
        assert not wide, f"Airflow services listened beyond 127.0.0.1: {wide}"


def _descendants(pids: list[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), list(pids)
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo.extend(children.get(pid, ()))
    return out


def wildcard_listeners(pids: list[int], tables: dict[str, str] | None = None) -> list[str]:
    """The listening TCP sockets of ``pids`` and their descendants bound to anything but a
    loopback address, as ``address:port`` (from /proc: no extra tool; ``tables``: the socket
    tables' text, read from /proc/net when not given)."""
    inodes: set[str] = set()
    for pid in _descendants(pids):
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    wide = []
    if tables is None:
        tables = {}
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            try:
                tables[table] = Path(table).read_text()
            except OSError:
                continue
    for text in tables.values():
        for line in text.splitlines()[1:]:
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            address, port = local.split(":")
            loopback = address in ("0100007F", "00000000000000000000000001000000") or address.endswith("7F")
            if not loopback:
                wide.append(f"{address}:{int(port, 16)}")
    return wide
