"""Start a stand-in server as a child process and wait until it listens.

Every stand-in is a module runnable as ``python -m retention_dev.standins.<name> --port 0
--state-file PATH [options]`` that prints ``LISTENING <port>`` as its first line on stdout once
it accepts connections, saves its state to ``--state-file`` on SIGTERM and exits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # retention_dev/ lives here


class StandIn:
    def __init__(self, module: str, *args: str, env: dict[str, str] | None = None, startup_timeout: float = 120.0):
        self.module = module
        self.args = list(args)
        self.env = env
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> StandIn:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
        env.update(self.env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"retention_dev.standins.{self.module}", "--host", "127.0.0.1", *self.args],
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        deadline = time.monotonic() + self.startup_timeout
        line = self.proc.stdout.readline()  # blocks until the server reports its port
        if not line.startswith("LISTENING "):
            self.stop()
            raise RuntimeError(f"stand-in {self.module} did not start (said {line.strip()!r})")
        self.port = int(line.split()[1])
        while time.monotonic() < deadline:
            try:
                requests.get(f"{self.base_url}/_standin/health", timeout=2)
                return self
            except requests.ConnectionError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"stand-in {self.module} did not answer within {self.startup_timeout}s")

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # the stand-in saves its state, then exits
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()

    def __enter__(self) -> StandIn:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
