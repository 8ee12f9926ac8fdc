"""Where things live and which secrets to use, resolved at task run time (never at parse time).

Environment variables (all optional except the pseudonym key):

- ``RETENTION_HOME``: working directory for staging, reports and local state
  (default ``<project>/.retention``).
- ``RETENTION_POLICY_FILE``: the policy (default ``include/policies/retention.yaml``).
- ``RETENTION_LEDGER_URL``: SQLAlchemy URL of the ledger, used when no Airflow Connection
  ``retention_ledger`` exists (default SQLite under ``RETENTION_HOME``).
- ``RETENTION_PSEUDONYM_KEY`` or ``RETENTION_PSEUDONYM_KEY_FILE``: the HMAC key for the
  pseudonymous keys in the ledger. There is no default: a key in code would make the
  pseudonyms reversible by anyone who reads the code.
"""

from __future__ import annotations

import os
from pathlib import Path

# A checkout (src/retention/config.py) names its own root; an installed package takes
# RETENTION_PROJECT_ROOT, else the working directory (the Docker image's AIRFLOW_HOME).
_CHECKOUT = Path(__file__).resolve().parents[2]
PROJECT_ROOT = Path(
    os.environ.get("RETENTION_PROJECT_ROOT") or (_CHECKOUT if (_CHECKOUT / "src" / "retention").is_dir() else Path.cwd())
)
DEFAULT_POLICY = PROJECT_ROOT / "include" / "policies" / "retention.yaml"
LEDGER_CONN_ID = "retention_ledger"


class ConfigError(RuntimeError):
    pass


def retention_home() -> Path:
    home = Path(os.environ.get("RETENTION_HOME") or PROJECT_ROOT / ".retention")
    home.mkdir(parents=True, exist_ok=True)
    return home


def policy_file() -> Path:
    return Path(os.environ.get("RETENTION_POLICY_FILE") or DEFAULT_POLICY)


def staging_root() -> Path:
    return retention_home() / "staging"


def reports_dir() -> Path:
    path = retention_home() / "reports"
    path.mkdir(parents=True, exist_ok=True)
    return path


def pseudonym_key() -> bytes:
    key = os.environ.get("RETENTION_PSEUDONYM_KEY")
    key_file = os.environ.get("RETENTION_PSEUDONYM_KEY_FILE")
    if not key and key_file:
        try:
            key = Path(key_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"RETENTION_PSEUDONYM_KEY_FILE {key_file}: {exc.strerror}") from None
    if not key:
        key = _airflow_variable("retention_pseudonym_key")
    if not key:
        raise ConfigError(
            "no pseudonym key: set RETENTION_PSEUDONYM_KEY (or RETENTION_PSEUDONYM_KEY_FILE, or the Airflow "
            "Variable retention_pseudonym_key) to a secret of at least 32 characters"
        )
    if len(key) < 32:
        raise ConfigError("the pseudonym key is shorter than 32 characters")
    return key.encode()


def ledger_url() -> str:
    url = _airflow_connection_url(LEDGER_CONN_ID)
    if url:
        return url
    return os.environ.get("RETENTION_LEDGER_URL") or f"sqlite:///{retention_home() / 'ledger.db'}"


def _airflow_variable(name: str) -> str | None:
    if not os.environ.get("AIRFLOW_HOME") and not os.environ.get(f"AIRFLOW_VAR_{name.upper()}"):
        return None
    try:
        from airflow.sdk import Variable

        return Variable.get(name, default=None)
    except Exception:  # outside a task, or no such variable
        return os.environ.get(f"AIRFLOW_VAR_{name.upper()}")


def _airflow_connection_url(conn_id: str) -> str | None:
    env = os.environ.get(f"AIRFLOW_CONN_{conn_id.upper()}")
    if env is None and not os.environ.get("AIRFLOW_HOME"):
        return None
    try:
        from airflow.sdk import BaseHook

        conn = BaseHook.get_connection(conn_id)
    except Exception:  # no such connection
        return None
    extra = conn.extra_dejson or {}
    if extra.get("sqlalchemy_url"):
        return extra["sqlalchemy_url"]
    uri = conn.get_uri()
    # Airflow writes "postgres://"; SQLAlchemy 2 wants "postgresql://".
    return uri.replace("postgres://", "postgresql://", 1)
