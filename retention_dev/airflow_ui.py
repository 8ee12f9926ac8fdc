"""Airflow's UI for the demo: api-server, scheduler and dag-processor on 127.0.0.1, as children.

The demo's DAG run goes through the api-server (``airflow dags test --use-executor``: the
LocalExecutor runs each task in a worker that talks to the api-server's execution API), so every
task writes its log where the UI reads it. The scheduler and dag-processor start after that run
(:meth:`AirflowUI.start_rest`): on SQLite every writer more during the run makes the workers wait
for the database lock. The scheduler serves no logs (``--skip-serve-logs``: its log server would
listen on all addresses; the api-server reads the log files itself). The DAGs stay paused: the
scheduler starts no run of its own.

Each service runs in a process group of its own, and :meth:`AirflowUI.stop` ends the group after
the service: the LocalExecutor's workers are the scheduler's children and would outlive it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

DEFAULT_PORT = 8080


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class AirflowUI:
    def __init__(self, env: dict[str, str], port: int = DEFAULT_PORT):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.home = Path(env["AIRFLOW_HOME"])
        self.env = {
            **env,
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__CORE__EXECUTOR": env.get("AIRFLOW__CORE__EXECUTOR", "LocalExecutor"),
            # Paused at creation whatever the DAG says: the demo's runs are the only ones.
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        }
        self.procs: list[subprocess.Popen] = []
        self.logs_dir = self.home / "demo-services"

    def _spawn(self, name: str, *args: str) -> None:
        with (self.logs_dir / f"{name}.log").open("w") as log:
            self.procs.append(
                subprocess.Popen([sys.executable, "-m", "airflow", *args], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
            )

    def start_scheduler(self) -> None:
        """A scheduler that serves no logs (its log server would listen on every interface)."""
        self._spawn("scheduler", "scheduler", "--skip-serve-logs")

    def start_rest(self) -> None:
        """The scheduler and the dag-processor (after the demo's run)."""
        self._spawn("dag-processor", "dag-processor")
        self.start_scheduler()

    def start(self, timeout: float = 180.0) -> AirflowUI:
        """The api-server, once it answers."""
        if not port_free(self.port):
            raise RuntimeError(f"port {self.port} on 127.0.0.1 is taken: give the demo another one with --port")
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self._spawn("api-server", "api-server", "--host", "127.0.0.1", "--port", str(self.port))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.url}/api/v2/monitor/health", timeout=2).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"Airflow's api-server did not come up: see {self.logs_dir}")

    def login(self) -> tuple[str, str | None]:
        """The UI's user and password (Airflow's simple auth manager generates the password)."""
        path = Path(os.environ.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE")
                    or self.home / "simple_auth_manager_passwords.json.generated")
        try:
            users = json.loads(path.read_text())
        except (OSError, ValueError):
            return "admin", None
        user = "admin" if "admin" in users else next(iter(users), "admin")
        return user, users.get(user)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            try:  # what the service left behind in its group (the LocalExecutor's workers)
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        # An idle LocalExecutor worker catches SIGTERM and waits on its queue for a word the
        # stopped scheduler never sends: what is still in a group after a grace is killed.
        deadline = time.monotonic() + 10
        for p in self.procs:
            while _group_alive(p.pid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if _group_alive(p.pid):
                os.killpg(p.pid, signal.SIGKILL)
        self.procs = []


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of the group that is not ours: not one we started
        return False
    return True
