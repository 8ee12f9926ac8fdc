"""The demo's environment, kept between commands: its systems' state and the Connections to them.

Everything lives under ``$RETENTION_HOME/demo`` (the stand-ins' state files, the SQLite CRM, the
stand-ins' pid and log files while they run in the background) except the Connections, which
are in ``$RETENTION_HOME/connections.json``: the file Airflow's own
``LocalFilesystemBackend`` secrets backend reads (``scripts/setup.sh`` points
``[secrets] backend`` at it), so the ``retention`` command, ``airflow dags test`` and the
api-server, scheduler and workers all find the same ``retention_crm``, ``retention_mailchimp``
and ``retention_zendesk``. The stand-ins listen on a free port each time they start, and the
file is rewritten with it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from retention import config

MAILCHIMP_KEY = "standin-key-us0"
LIST_ID = "demo-list"
ZENDESK_LOGIN = "agent@example.org"
ZENDESK_TOKEN = "standin-token"
# The demo stand-in allows more than Zendesk's documented limits, so the demo is quick; the
# Connection says so too (the client's defaults are the real limits).
ZENDESK_ARGS = ("--job-seconds", "0.2", "--incremental-per-minute", "600", "--user-deletes-per-10min", "7000")
ZENDESK_EXTRA = {"incremental_per_minute": 600, "user_deletes_per_10min": 7000, "job_poll_interval": 0.2}
#: Airflow's own file-based secrets backend (the settings file both Airflow and the CLI read).
FILE_BACKEND = "airflow.secrets.local_filesystem.LocalFilesystemBackend"


def demo_dir() -> Path:
    return config.retention_home() / "demo"


def connections_file() -> Path:
    """The Connections file: the one ``[secrets] backend_kwargs`` names, else the default."""
    kwargs = os.environ.get("AIRFLOW__SECRETS__BACKEND_KWARGS")
    if os.environ.get("AIRFLOW__SECRETS__BACKEND") == FILE_BACKEND and kwargs:
        path = json.loads(kwargs).get("connections_file_path")
        if path:
            return Path(path)
    return config.retention_home() / "connections.json"


def crm_url() -> str:
    return f"sqlite:///{demo_dir() / 'crm.db'}"


def mailchimp_state() -> Path:
    return demo_dir() / "mailchimp.state"


def zendesk_state() -> Path:
    return demo_dir() / "zendesk.state"


def seeded() -> bool:
    """Whether the demo has seeded its three systems (the stand-ins can start from their state)."""
    return all(p.exists() for p in (demo_dir() / "crm.db", mailchimp_state(), zendesk_state()))


def connections(*, mailchimp_url: str | None, zendesk_url: str | None) -> dict[str, dict]:
    """The demo's Connections in ``LocalFilesystemBackend``'s JSON form (extras as JSON text)."""
    conns: dict[str, dict] = {
        "retention_crm": {"conn_type": "retention_crm", "extra": json.dumps({"sqlalchemy_url": crm_url()})},
    }
    if mailchimp_url:
        conns["retention_mailchimp"] = {
            "conn_type": "retention_mailchimp", "host": f"{mailchimp_url}/3.0", "password": MAILCHIMP_KEY,
            "extra": json.dumps({"list_id": LIST_ID}),
        }
    if zendesk_url:
        conns["retention_zendesk"] = {
            "conn_type": "retention_zendesk", "host": zendesk_url, "login": ZENDESK_LOGIN, "password": ZENDESK_TOKEN,
            "extra": json.dumps(ZENDESK_EXTRA),
        }
    return conns


def write_connections(*, mailchimp_url: str | None, zendesk_url: str | None) -> Path:
    """Write (replace) the demo's Connections in the Connections file, keeping any other entry
    the file holds; readable by its owner only (it holds the stand-ins' keys)."""
    path = connections_file()
    current: dict = {}
    if path.exists() and path.read_text().strip():
        try:
            current = json.loads(path.read_text())
        except ValueError:
            raise config.ConfigError(f"{path}: not a JSON object; fix or remove it") from None
    current.update(connections(mailchimp_url=mailchimp_url, zendesk_url=zendesk_url))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(current, fh, indent=2)
    os.replace(tmp, path)
    return path


def airflow_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with Airflow's secrets backend on the Connections file
    when none is configured (``scripts/setup.sh`` sets the same)."""
    env = dict(os.environ if env is None else env)
    if not env.get("AIRFLOW__SECRETS__BACKEND"):
        env["AIRFLOW__SECRETS__BACKEND"] = FILE_BACKEND
        env["AIRFLOW__SECRETS__BACKEND_KWARGS"] = json.dumps({"connections_file_path": str(connections_file())})
    return env
