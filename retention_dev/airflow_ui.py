"""Airflow's UI for the demo: api-server, scheduler and dag-processor on 127.0.0.1, as children.

The demo's DAG runs go through them (``airflow dags test --use-executor``: the LocalExecutor
runs each task in a worker that talks to this api-server), so every task writes its log where
the UI reads it. The DAGs stay paused: the scheduler starts no run of its own.
"""

from __future__ import annotations

import json
import os
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

    def start(self, timeout: float = 180.0) -> AirflowUI:
        if not port_free(self.port):
            raise RuntimeError(f"port {self.port} on 127.0.0.1 is taken: give the demo another one with --port")
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        for name, args in (
            ("api-server", ["api-server", "--host", "127.0.0.1", "--port", str(self.port)]),
            ("dag-processor", ["dag-processor"]),
            ("scheduler", ["scheduler"]),
        ):
            log = (self.logs_dir / f"{name}.log").open("w")
            self.procs.append(
                subprocess.Popen([sys.executable, "-m", "airflow", *args], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL)
            )
            log.close()
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
        self.procs = []
