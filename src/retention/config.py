"""Where things live and which secrets to use, resolved at task run time (never at parse time).

Environment variables (all optional except the pseudonym key):

- ``RETENTION_HOME``: working directory for staging, reports and local state
  (default ``<project>/.retention``).
- ``RETENTION_POLICY_FILE``: the policy (default ``include/policies/retention.yaml``).
- ``RETENTION_LEDGER_URL``: SQLAlchemy URL of the ledger, used when no Airflow Connection
  ``retention_ledger`` exists (default SQLite under ``RETENTION_HOME``).
- ``RETENTION_MAX_PLAN_AGE``: an ISO 8601 duration (default ``PT36H``); a plan made from an
  extract older than this is refused for erasure (a retried or cleared erase task a day or two
  later plans again instead).
- ``RETENTION_APPROVAL_TIMEOUT``: an ISO 8601 duration (default ``PT12H``): how long a plan over
  the plan-size guard waits for a person's approval before it counts as rejected (nothing is
  erased). ``PT0S``: nobody is asked, a plan over the guard halts the run as validation failure.
- ``RETENTION_STAGING_URL``: where runs stage their data between tasks, as an
  ``ObjectStoragePath`` URL: a local directory (default ``RETENTION_HOME/staging``) or, for
  workers on more than one machine, object storage every worker reaches, e.g.
  ``s3://bucket/prefix`` (any fsspec store Airflow has a filesystem for).
- ``RETENTION_STAGING_CONN_ID``: the Airflow Connection of that store (for ``s3://``: an ``aws``
  Connection, login and password the access key, extra ``endpoint_url`` and ``region_name``);
  without it the store's own environment is used (``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``...).
- ``RETENTION_STAGING_KEEP_DAYS``: days the staging a failed or halted run left behind is kept
  for diagnosis before the nightly run purges it (default 7, at least 2).
- ``RETENTION_DATA_DOCS_KEEP_DAYS``: days each run's Great Expectations suites, validation
  results and Data Docs (``RETENTION_HOME/data_docs``) are kept before the nightly run purges
  them (default 90, at least 1).
- ``RETENTION_PSEUDONYM_KEY`` or ``RETENTION_PSEUDONYM_KEY_FILE``: the HMAC key for the
  pseudonymous keys in the ledger. There is no default: a key in code would make the
  pseudonyms reversible by anyone who reads the code. A blank or low-entropy key is refused
  (:func:`key_weakness`); the ledger keeps the key's fingerprint (:func:`key_fingerprint`) and
  refuses another key.

Airflow Connections that name a database (the ledger's here, the CRM's in its hook) are read by
:func:`database_url`, and their extras by :func:`connection_extras`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
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
    """A user error: the input or the set-up is wrong. Its message is one line naming what is
    wrong and where, never a secret, a URL with credentials or a person's address; the command
    prints it without a traceback and a task fails with it."""


class SettingError(ConfigError, ValueError):
    """A Connection field or setting whose value is wrong (a non-numeric extra, a missing
    password). Also a ``ValueError``, as these were before they were named."""


class ConnectionFailed(ConfigError):
    """A system or database that could not be reached or refused us, named by where it is set
    (a Connection id) and its role. ``transient`` when trying again later may help (nothing
    listens yet, a name does not resolve for now): a task may retry it; a database that does
    not exist or a refused login will not fix itself."""

    def __init__(self, message: str, *, transient: bool):
        super().__init__(message)
        self.transient = transient


def retention_home() -> Path:
    home = Path(os.environ.get("RETENTION_HOME") or PROJECT_ROOT / ".retention")
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"RETENTION_HOME {home}: cannot make the directory ({exc.strerror})") from None
    return home


def policy_file() -> Path:
    return Path(os.environ.get("RETENTION_POLICY_FILE") or DEFAULT_POLICY)


def staging_root() -> Path:
    return retention_home() / "staging"


def staging_url() -> str:
    """``RETENTION_STAGING_URL``, or the local staging directory; a URL without a scheme or with
    a blank path is refused in one line (a typo must not stage identifiers somewhere unexpected)."""
    url = (os.environ.get("RETENTION_STAGING_URL") or "").strip()
    if not url:
        return f"file://{staging_root()}"
    scheme, sep, rest = url.partition("://")
    if not sep or not scheme or not rest.strip("/"):
        raise ConfigError(
            f"RETENTION_STAGING_URL {url!r}: expected a URL such as s3://bucket/prefix or file:///srv/staging"
        )
    return url


def staging_conn_id() -> str | None:
    """``RETENTION_STAGING_CONN_ID``: the Airflow Connection of the staging store, if any."""
    return (os.environ.get("RETENTION_STAGING_CONN_ID") or "").strip() or None


def reports_dir() -> Path:
    return _home_dir("reports")


def data_docs_dir() -> Path:
    """Great Expectations' projects, one per run and system (suites, validation results and
    their Data Docs), under ``RETENTION_HOME/data_docs``; the report names each system's index
    page relative to this directory."""
    return _home_dir("data_docs")


def _home_dir(name: str) -> Path:
    path = retention_home() / name
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"RETENTION_HOME: cannot make {path} ({exc.strerror})") from None
    return path


#: The fewest characters a pseudonym key may have, and the fewest distinct ones.
KEY_MIN_LENGTH = 32
KEY_MIN_DISTINCT = 10
#: A key must say at least this much that is not a repetition of what it said before (its
#: literal characters plus one per repeated stretch, see :func:`key_weakness`).
KEY_MIN_NOVELTY = 20
#: The least Shannon estimate of a key's information (bits per character of its own character
#: frequencies, times its length). ``secrets.token_hex(32)`` has about 240.
KEY_MIN_BITS = 100
_MAKE_KEY = "python -c 'import secrets; print(secrets.token_hex(32))'"
# The label whose HMAC under the key is the key's fingerprint (see key_fingerprint).
_FINGERPRINT_LABEL = b"retention: fingerprint of the pseudonym key, v1"


def pseudonym_key() -> bytes:
    """The HMAC key of the pseudonyms, from ``RETENTION_PSEUDONYM_KEY``, the file
    ``RETENTION_PSEUDONYM_KEY_FILE`` or the Airflow Variable ``retention_pseudonym_key``.

    A missing, blank, short or low-entropy key is a :class:`ConfigError` (one line naming where
    the key came from and what is wrong with it, never the key): the pseudonyms are only as
    secret as the key is hard to guess.
    """
    key = os.environ.get("RETENTION_PSEUDONYM_KEY")
    source = "RETENTION_PSEUDONYM_KEY"
    key_file = os.environ.get("RETENTION_PSEUDONYM_KEY_FILE")
    if not key and key_file:
        source = f"RETENTION_PSEUDONYM_KEY_FILE {key_file}"
        try:
            key = Path(key_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"RETENTION_PSEUDONYM_KEY_FILE {key_file}: {exc.strerror}") from None
        if not key:
            raise ConfigError(f"the pseudonym key in {source} is blank: write a random secret into it, e.g. with {_MAKE_KEY}")
    if not key:
        key = _airflow_variable("retention_pseudonym_key")
        source = "the Airflow Variable retention_pseudonym_key"
    if not key:
        raise ConfigError(
            "no pseudonym key: set RETENTION_PSEUDONYM_KEY (or RETENTION_PSEUDONYM_KEY_FILE, or the Airflow "
            f"Variable retention_pseudonym_key) to a secret of at least {KEY_MIN_LENGTH} characters"
        )
    problem = key_weakness(key)
    if problem:
        raise ConfigError(f"the pseudonym key ({source}) {problem}: use a random secret, e.g. from {_MAKE_KEY}")
    return key.encode()


def key_weakness(key: str) -> str | None:
    """What makes ``key`` unfit as a pseudonym key, or ``None``. Never repeats the key.

    Refused: a blank key; one shorter than ``KEY_MIN_LENGTH``; one that is mostly a repetition
    (``kkkk…``, ``abcdabcd…``, ``passwordpassword…1``: fewer than ``KEY_MIN_NOVELTY`` new
    characters when every stretch of four or more characters seen before counts as one); one of
    fewer than ``KEY_MIN_DISTINCT`` distinct characters; one below ``KEY_MIN_BITS`` bits by the
    Shannon estimate. These catch the keys people type, not a weak generator: generate keys.
    """
    if not key.strip():
        return "is blank"
    if len(key) < KEY_MIN_LENGTH:
        return f"is shorter than {KEY_MIN_LENGTH} characters"
    novelty = _novelty(key)
    if novelty < KEY_MIN_NOVELTY:
        return f"repeats itself (about {novelty} characters of it are not a repetition; at least {KEY_MIN_NOVELTY} must be)"
    distinct = len(set(key))
    if distinct < KEY_MIN_DISTINCT:
        return f"has only {distinct} distinct characters (at least {KEY_MIN_DISTINCT})"
    counts = [key.count(c) for c in set(key)]
    bits = -sum(n * math.log2(n / len(key)) for n in counts)
    if bits < KEY_MIN_BITS:
        return f"has too little entropy (about {bits:.0f} bits by its character frequencies; at least {KEY_MIN_BITS})"
    return None


def _novelty(text: str, min_copy: int = 4) -> int:
    """Characters of ``text`` that are not a copy of what came before (a greedy LZ77 parse:
    a stretch of ``min_copy`` or more characters that occurred earlier, overlap allowed, counts
    as one). Only the first 512 characters are read: enough to judge, and fast."""
    text = text[:512]
    i, novelty = 0, 0
    while i < len(text):
        longest = 0
        for start in range(i):
            n = 0
            while i + n < len(text) and text[start + n] == text[i + n]:
                n += 1
            longest = max(longest, n)
        i += longest if longest >= min_copy else 1
        novelty += 1
    return novelty


def key_fingerprint(key: bytes) -> str:
    """A fingerprint of the pseudonym key that cannot give the key back: the HMAC-SHA256 of a
    fixed label under the key, 16 hex characters. The ledger keeps it to refuse another key."""
    return hmac.new(key, _FINGERPRINT_LABEL, hashlib.sha256).hexdigest()[:16]


DEFAULT_STAGING_KEEP_DAYS = 7
DEFAULT_DATA_DOCS_KEEP_DAYS = 90


def staging_keep_days() -> float:
    """How long a failed or halted run's staging is kept (``RETENTION_STAGING_KEEP_DAYS``)."""
    # Under two days a run halted tonight, overridden and resumed tomorrow would lose its staging.
    return _days("RETENTION_STAGING_KEEP_DAYS", DEFAULT_STAGING_KEEP_DAYS, least=2)


def data_docs_keep_days() -> float:
    """How long a run's GX suites, results and Data Docs are kept (``RETENTION_DATA_DOCS_KEEP_DAYS``)."""
    return _days("RETENTION_DATA_DOCS_KEEP_DAYS", DEFAULT_DATA_DOCS_KEEP_DAYS, least=1)


def _days(name: str, default: int, *, least: int, most: int = 3650) -> float:
    text = os.environ.get(name) or str(default)
    try:
        days = float(text)
    except ValueError:
        raise ConfigError(f"{name} {text!r}: give a number of days, e.g. {default}") from None
    if not least <= days <= most:
        raise ConfigError(f"{name} {text!r}: give between {least} and {most} days")
    return days


def _time_setting(name: str, default: str, example: str, *, positive: bool = False):
    """A length of time from the environment variable ``name`` (an ISO 8601 duration in days,
    hours, minutes and seconds, not months or years), as a ``timedelta``; one-line errors."""
    from datetime import timedelta

    from retention.domain.periods import Duration

    text = os.environ.get(name) or default
    try:
        length = Duration.parse(text)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    if length.months:
        raise ConfigError(f"{name} {text!r}: give days and hours (e.g. {example}), not months or years")
    out = timedelta(days=length.days, seconds=length.seconds)
    if positive and out <= timedelta(0):
        raise ConfigError(f"{name} {text!r}: give a time longer than zero, e.g. {example}")
    return out


DEFAULT_MAX_PLAN_AGE = "PT36H"


def max_plan_age():
    """How old a plan's extract may be when its erasure starts (``RETENTION_MAX_PLAN_AGE``)."""
    return _time_setting("RETENTION_MAX_PLAN_AGE", DEFAULT_MAX_PLAN_AGE, "PT36H")


DEFAULT_ERASE_BUDGET = "PT2H"


def erase_budget():
    """How long one system's erase step may erase (``RETENTION_ERASE_BUDGET``): what does not
    fit is carried over to the next run, so a backlog never holds a system's lock all day."""
    return _time_setting("RETENTION_ERASE_BUDGET", DEFAULT_ERASE_BUDGET, "PT2H", positive=True)


DEFAULT_RECONCILE_EVERY = "P7D"


def reconcile_every():
    """How often a system with a change feed is read in full to rebuild its record index and
    count its drift (``RETENTION_RECONCILE_EVERY``; zero: every night)."""
    return _time_setting("RETENTION_RECONCILE_EVERY", DEFAULT_RECONCILE_EVERY, "P7D")


DEFAULT_APPROVAL_TIMEOUT = "PT12H"


def approval_timeout():
    """How long a plan over the guard waits for approval (``RETENTION_APPROVAL_TIMEOUT``); a zero
    duration asks nobody. Light (no pandas): the DAG file reads it at parse time."""
    return _time_setting("RETENTION_APPROVAL_TIMEOUT", DEFAULT_APPROVAL_TIMEOUT, "PT12H")


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
        raise SettingError(f"connection {conn_id!r}: extra is not valid JSON") from None
    if not isinstance(parsed, dict):
        raise SettingError(f"connection {conn_id!r}: extra must be a JSON object, not {type(parsed).__name__}")
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
    raise SettingError(
        f"connection {conn_id!r}: unsupported conn_type {conn.conn_type!r}; "
        f"use postgres or sqlite, or extra.sqlalchemy_url"
    )


def _parse_url(text: str, what: str) -> sa.URL:
    import sqlalchemy as sa

    try:
        return sa.make_url(text)
    except (sa.exc.ArgumentError, ValueError):
        # SQLAlchemy's message quotes the whole URL, password and all.
        raise SettingError(f"{what} is not a SQLAlchemy URL") from None


# What a database's driver says when it cannot connect -> (why, in our words; whether trying
# again later may help). The driver's own text names the host, the database and the user.
_DB_FAILURES = (
    ("could not translate host name", "its host name does not resolve", True),
    ("name or service not known", "its host name does not resolve", True),
    ("nodename nor servname", "its host name does not resolve", True),
    ("connection refused", "nothing listens at its host and port (connection refused)", True),
    ("timeout expired", "the connection timed out", True),
    ("timed out", "the connection timed out", True),
    ("does not exist", None, False),  # a database or a role: told apart below
    ("password authentication failed", "the server refused the user or password", False),
    ("no pg_hba.conf entry", "the server refuses connections from this host for this user", False),
    ("unable to open database file", "the database file cannot be opened (does its directory exist?)", False),
)


def database_failure(exc: BaseException, where: str) -> ConnectionFailed:
    """One line for a database that could not be connected to (the driver's message names the
    host and user; this one names only ``where`` it is set and why)."""
    text = str(exc).lower()
    for needle, why, transient in _DB_FAILURES:
        if needle in text:
            if why is None:
                why = "the server refused the user (no such role)" if "role" in text else "the database it names does not exist"
            return ConnectionFailed(f"{where}: cannot connect: {why}", transient=transient)
    return ConnectionFailed(f"{where}: cannot connect ({type(exc).__name__})", transient=True)


def create_engine(url: str | sa.URL, where: str, **kwargs: Any) -> sa.Engine:
    """``sa.create_engine`` whose failures to connect are :class:`ConnectionFailed` naming
    ``where`` (e.g. "connection 'retention_crm' (the CRM database)"), and whose unknown dialect
    or missing driver is a :class:`SettingError`; neither repeats the URL or the password."""
    import sqlalchemy as sa

    try:
        engine = sa.create_engine(url, **kwargs)
    except (sa.exc.NoSuchModuleError, ImportError) as exc:  # NoSuchModuleError is an ArgumentError
        missing = f" ({exc.name})" if getattr(exc, "name", None) else ""
        raise SettingError(f"{where}: the URL's database dialect or driver{missing} is not installed") from None
    except (sa.exc.ArgumentError, ValueError):
        raise SettingError(f"{where}: not a SQLAlchemy URL") from None

    @sa.event.listens_for(engine, "handle_error")
    def _connect_failed(context: Any) -> None:
        # Only a failure to connect (no connection yet): errors of statements stay as they are.
        if context.connection is None and isinstance(context.sqlalchemy_exception, sa.exc.OperationalError):
            raise database_failure(context.original_exception, where) from None

    return engine


class _ExtraParseNoise:
    """Drops Airflow's traceback for an extra that is not JSON: :func:`connection_extras` says
    the same in one line naming the Connection (and the task fails on it, where Airflow would go
    on without the extras)."""

    def filter(self, record: Any) -> bool:
        return not str(record.msg).startswith("Failed to deserialize extra property")


_EXTRA_NOISE = _ExtraParseNoise()


def quiet_extra_parse_noise() -> None:
    import logging

    logger = logging.getLogger("airflow.sdk.definitions.connection")
    if _EXTRA_NOISE not in logger.filters:
        logger.addFilter(_EXTRA_NOISE)


def unreadable_connection(conn_id: str) -> SettingError:
    """The error for an ``AIRFLOW_CONN_<ID>`` that is set but that Airflow cannot read (it says
    the Connection "isn't defined", and its own message would quote the URI, password and all)."""
    return SettingError(
        f"connection {conn_id!r}: the environment variable AIRFLOW_CONN_{conn_id.upper()} is set but is "
        "neither a connection URI nor a JSON object Airflow can read (check its port, quoting and JSON)"
    )


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

        quiet_extra_parse_noise()
        conn = BaseHook.get_connection(conn_id)
    except Exception:  # no such connection, or one Airflow cannot read
        if env is not None:
            raise unreadable_connection(conn_id) from None  # not a silent fall-back to a local ledger
        return None
    try:
        # psycopg2 is the PostgreSQL driver installed (SQLAlchemy 2.1's plain postgresql:// is psycopg 3).
        url = database_url(conn, conn_id=conn_id, postgres_driver="postgresql+psycopg2", driver_params=True, any_type=True)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return url.render_as_string(hide_password=False)
