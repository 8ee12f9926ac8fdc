"""Shared test setup: an isolated RETENTION_HOME and AIRFLOW_HOME, a pseudonym key, PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_SESSION_TMP = Path(tempfile.mkdtemp(prefix="retention-tests-"))

# Set before anything imports Airflow: tests never touch a developer's own Airflow home.
os.environ.setdefault("RETENTION_PSEUDONYM_KEY", "test-only-pseudonym-key-0123456789abcdef")
os.environ["RETENTION_HOME"] = str(_SESSION_TMP / "retention")
os.environ.setdefault("AIRFLOW_HOME", str(_SESSION_TMP / "airflow"))
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(ROOT / "dags"))
os.environ.setdefault("AIRFLOW__CORE__PLUGINS_FOLDER", str(ROOT / "plugins"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__UNIT_TEST_MODE", "False")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
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
