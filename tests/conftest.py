"""Shared test setup: an isolated RETENTION_HOME and AIRFLOW_HOME, a pseudonym key, PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_SESSION_TMP = Path(tempfile.mkdtemp(prefix="retention-tests-"))

# Set before anything imports Airflow: tests never touch a developer's own Airflow home, config
# or metadata database, whatever the shell exports (scripts/setup.sh exports the repository's
# .airflow for the demo): the session's own home under /tmp, removed when the session ends.
os.environ.setdefault("RETENTION_PSEUDONYM_KEY", "test-only-pseudonym-key-0123456789abcdef")
os.environ["RETENTION_HOME"] = str(_SESSION_TMP / "retention")
os.environ["AIRFLOW_HOME"] = str(_SESSION_TMP / "airflow")
os.environ.pop("AIRFLOW_CONFIG", None)
for _name in [n for n in os.environ if n.startswith("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN")]:  # also _CMD, _SECRET
    del os.environ[_name]
# Nor the checkout's Connections file (scripts/setup.sh points Airflow's secrets backend at it,
# and a backend is asked before AIRFLOW_CONN_*): the tests' Connections are their own.
for _name in [n for n in os.environ if n.startswith("AIRFLOW__SECRETS__BACKEND")]:
    del os.environ[_name]
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_SESSION_TMP / 'airflow' / 'airflow.db'}"
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(ROOT / "dags"))
os.environ.setdefault("AIRFLOW__CORE__PLUGINS_FOLDER", str(ROOT / "plugins"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "False")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
# A plan over the guard halts the run instead of asking for approval: dag.test() cannot answer a
# human-in-the-loop request and would wait for ever. tests/test_plan_approval.py asks and answers
# through a real api-server.
os.environ.setdefault("RETENTION_APPROVAL_TIMEOUT", "PT0S")
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "dags"), str(ROOT), os.environ.get("PYTHONPATH")]))


@pytest.fixture
def retention_home(tmp_path, monkeypatch):
    """A fresh RETENTION_HOME (staging, ledger, reports) for one test."""
    home = tmp_path / "retention"
    monkeypatch.setenv("RETENTION_HOME", str(home))
    monkeypatch.delenv("RETENTION_LEDGER_URL", raising=False)
    return home


def _postgres_url(db: str) -> str:
    env = os.environ.get("RETENTION_TEST_PG_URL")
    if env and db == "retention_test":
        return env
    out = subprocess.run([str(ROOT / "scripts" / "postgres.sh"), db], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def postgres_url():
    """URL of a real PostgreSQL database (started by scripts/postgres.sh if needed)."""
    return _postgres_url("retention_test")


@pytest.fixture(scope="session")
def postgres_url_for():
    return _postgres_url


# --- the session's end: no server left running, no Airflow home left behind ----------------------


def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (Linux /proc: no extra dependency)."""
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            out.extend(kids)
            todo.extend(kids)
    return out


def _proc(pid: int) -> tuple[str, str, str] | None:
    """(state, name, command line) of a live process, or None when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    name = stat[stat.index("(") + 1 : stat.rindex(")")]
    return stat[stat.rindex(")") + 2], name, cmd


def _servers_left_running() -> list[int]:
    """This session's child processes still alive (stand-ins, Airflow services a test forgot to
    stop). The suite's PostgreSQL server is no child: scripts/postgres.sh detaches it."""
    alive = []
    for pid in _children(os.getpid()):
        info = _proc(pid)
        if info and info[0] != "Z" and info[1] not in {"postgres", "pg_ctl"}:
            alive.append(pid)
    return alive


def _stop(pids: list[int], sig: int, wait: float) -> list[int]:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        pids = [p for p in pids if (info := _proc(p)) and info[0] != "Z"]
        if not pids:
            break
        time.sleep(0.2)
    return pids


def pytest_sessionfinish(session, exitstatus):
    left = _servers_left_running()
    if left:
        names = sorted({" ".join(info[2].split()[1:4]) or info[1] for p in left if (info := _proc(p))})
        still = _stop(left, signal.SIGTERM, 30)
        _stop(still, signal.SIGKILL, 10)
        # A test that leaves a server running fails the session, so it is found and fixed.
        print(f"\nERROR: {len(left)} process(es) left running by the tests, now stopped: {'; '.join(names)}", file=sys.stderr)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    shutil.rmtree(_SESSION_TMP, ignore_errors=True)
