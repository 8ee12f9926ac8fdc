"""A real Airflow deployment for tests: PostgreSQL metadata database, api-server, scheduler and
dag-processor as separate processes with the LocalExecutor."""

from __future__ import annotations

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
    def __init__(self, home: Path, metadata_url: str, env: dict[str, str]):
        self.home = home
        port = free_port()
        self.api = f"http://127.0.0.1:{port}"
        self.env = {
            **os.environ,
            **env,
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_url,
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
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
        for name, args in (("api-server", ["api-server", "--host", "127.0.0.1", "--port", self.env["AIRFLOW__API__PORT"]]), ("dag-processor", ["dag-processor"]), ("scheduler", ["scheduler"])):
            log = self.home / f"{name}.log"
            self.logs.append(log)
            fh = log.open("w")
            self.procs.append(subprocess.Popen([sys.executable, "-m", "airflow", *args], env=self.env, stdout=fh, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 420  # minutes on a machine busy with other test sessions
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{self.api}/api/v2/monitor/health", timeout=2).status_code == 200:
                    break
            except (requests.ConnectionError, requests.Timeout):  # not up yet, or busy starting its workers
                pass
            time.sleep(1)
        else:
            raise RuntimeError("api-server did not come up:\n" + self.tail())
        return self

    def wait_for_dag(self, dag_id: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.airflow("dags", "list", "-o", "plain", check=False).stdout.find(dag_id) >= 0:
                return
            time.sleep(2)
        raise RuntimeError(f"{dag_id} was never parsed:\n" + self.tail())

    def tail(self, n: int = 60) -> str:
        return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-n:]) for p in self.logs if p.exists())

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
