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

Airflow Connections that name a database (the ledger's here, the CRM's in its hook) are read by
:func:`database_url`, and their extras by :func:`connection_extras`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import sqlalchemy as sa

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


def connection_extras(conn: Any, conn_id: str) -> dict[str, Any]:
    """The extra of an Airflow Connection as a dict; a clear error when it is not a JSON object
    (Airflow itself would log a traceback and carry on with no extras at all)."""
    raw = conn.extra
    if not raw:
        return {}
    try:
        parsed = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        raise ValueError(f"connection {conn_id!r}: extra is not valid JSON") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"connection {conn_id!r}: extra must be a JSON object, not {type(parsed).__name__}")
    # Airflow's own parse, which also registers the extra's secrets for masking in task logs.
    return dict(conn.extra_dejson)


#: Airflow stores ``postgresql://`` URIs as conn_type ``postgres``.
POSTGRES_TYPES = frozenset({"postgres", "postgresql"})


def database_url(
    conn: Any,
    *,
    conn_id: str,
    extra: Mapping[str, Any] | None = None,
    postgres_driver: str = "postgresql",
    postgres_types: Collection[str] = (),
    driver_params: bool = False,
    any_type: bool = False,
) -> sa.URL:
    """The SQLAlchemy URL an Airflow Connection names; the password is never in an error.

    * ``extra.sqlalchemy_url`` wins: any SQLAlchemy URL, taken as it is;
    * conn_type ``sqlite``: the database file is the URI's path (``sqlite:////abs/crm.db``, kept
      as the schema) or the host;
    * conn_type ``postgres``, ``postgresql`` or one of ``postgres_types``: ``postgres_driver``
      with login, password, host, port and the schema as the database, as Airflow's Postgres
      provider builds its ``sqlalchemy_url``;
    * any other conn_type: Airflow's own ``Connection.get_uri()`` with the conn_type as the
      dialect when ``any_type``, else a ``ValueError``.

    With ``driver_params`` the other extras are the URL's query (driver parameters), as
    ``Connection.get_uri()`` puts them; without, they are the caller's settings and left out.
    ``extra``: the Connection's extras when already read (:func:`connection_extras`).
    """
    import sqlalchemy as sa

    if extra is None:
        extra = connection_extras(conn, conn_id)
    if extra.get("sqlalchemy_url"):
        return _parse_url(str(extra["sqlalchemy_url"]), f"connection {conn_id!r}: extra sqlalchemy_url")
    kind = (conn.conn_type or "").lower()
    query: dict[str, str] = {}
    if driver_params:
        query = {k: str(v) for k, v in extra.items() if k != "sqlalchemy_url" and isinstance(v, str | int | float)}
    if kind == "sqlite":
        return sa.URL.create("sqlite", database=conn.schema or conn.host or None, query=query)
    if kind in POSTGRES_TYPES or kind in postgres_types:
        return sa.URL.create(
            postgres_driver,
            username=conn.login or None,
            password=conn.password or None,
            host=conn.host or None,
            port=conn.port or None,
            database=conn.schema or None,
            query=query,
        )
    if any_type:
        return _parse_url(conn.get_uri(), f"connection {conn_id!r}")
    raise ValueError(
        f"connection {conn_id!r}: unsupported conn_type {conn.conn_type!r}; "
        f"use postgres or sqlite, or extra.sqlalchemy_url"
    )


def _parse_url(text: str, what: str) -> sa.URL:
    import sqlalchemy as sa

    try:
        return sa.make_url(text)
    except (sa.exc.ArgumentError, ValueError):
        # SQLAlchemy's message quotes the whole URL, password and all.
        raise ValueError(f"{what} is not a SQLAlchemy URL") from None


def _airflow_variable(name: str) -> str | None:
    if not os.environ.get("AIRFLOW_HOME") and not os.environ.get(f"AIRFLOW_VAR_{name.upper()}"):
        return None
    try:
        from airflow.sdk import Variable

        return Variable.get(name, default=None)
    except Exception:  # outside a task, or no such variable
        return os.environ.get(f"AIRFLOW_VAR_{name.upper()}")


def _airflow_connection_url(conn_id: str) -> str | None:
    """The URL of the Connection ``conn_id``, or None when there is no such Connection. Any
    SQLAlchemy database: ``extra.sqlalchemy_url``, a postgres or sqlite Connection, or another
    conn_type read through ``Connection.get_uri()``; the other extras are driver parameters."""
    env = os.environ.get(f"AIRFLOW_CONN_{conn_id.upper()}")
    if env is None and not os.environ.get("AIRFLOW_HOME"):
        return None
    try:
        from airflow.sdk import BaseHook

        conn = BaseHook.get_connection(conn_id)
    except Exception:  # no such connection
        return None
    try:
        url = database_url(conn, conn_id=conn_id, driver_params=True, any_type=True)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return url.render_as_string(hide_password=False)
