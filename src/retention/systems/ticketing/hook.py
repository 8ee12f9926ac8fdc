"""Airflow hook for the Zendesk Support API (tickets and their requesters).

Connection (type ``retention_zendesk``, default id ``retention_zendesk``):

* ``login``: the agent's e-mail address, ``password``: the API token (Basic ``{email}/token``);
  or ``extra.oauth_token`` for a Bearer token instead;
* ``host``: the subdomain (``acme``), the Zendesk host name (``acme.zendesk.com``) or a full
  base URL (the stand-in: ``http://127.0.0.1:8082``); ``port`` is appended when the host has
  none;
* ``extra`` (JSON, all optional): ``requests_per_minute`` (700: the plan's limit),
  ``incremental_per_minute`` (10), ``deleted_list_per_minute`` (10), ``user_deletes_per_10min``
  (700), ``max_connections`` (4), ``max_jobs_in_flight`` (30: Zendesk's job limit per account;
  lower it where other integrations of the account run jobs too), ``max_retries`` (10),
  ``timeout`` (60), ``job_poll_interval`` (0.1), ``max_retry_after`` (the longest ``Retry-After``
  waited out, seconds; default ``RETENTION_MAX_RETRY_AFTER``, else 300), ``oauth_token``.

The per-account limits are the whole account's: in an Airflow task in the ``retention_zendesk``
pool, each is scaled to the task's slots (``retention.systems.pools``: a slot is a tenth).

For example (JSON form)::

    AIRFLOW_CONN_RETENTION_ZENDESK='{"conn_type": "retention_zendesk", "host": "http://127.0.0.1:8082",
        "login": "agent@example.org", "password": "token", "extra": {"requests_per_minute": 700}}'

Nothing is read at import time; the connection is looked up on first use.
"""

from __future__ import annotations

import inspect
from typing import Any
from urllib.parse import urlsplit

from retention.config import SettingError
from retention.systems.hooks import RetentionHook
from retention.systems.pools import ZENDESK_POOL, held_slots
from retention.systems.ticketing.client import ZendeskClient

_OPTIONS: dict[str, type] = {
    **dict.fromkeys(
        (
            "requests_per_minute",
            "incremental_per_minute",
            "deleted_list_per_minute",
            "user_deletes_per_10min",
            "max_connections",
            "max_jobs_in_flight",
            "max_job_attempts",
            "max_retries",
        ),
        int,
    ),
    **dict.fromkeys(("timeout", "job_poll_interval", "job_timeout", "max_retry_after"), float),
}
# The account's limits that a slot of the retention_zendesk pool is a tenth of.
_BUDGETS = ("requests_per_minute", "incremental_per_minute", "deleted_list_per_minute", "user_deletes_per_10min", "max_jobs_in_flight")


def shared_budget(options: dict[str, Any], held: int | None) -> dict[str, Any]:
    """The client's options for a task holding ``held`` slots of the ``retention_zendesk`` pool:
    each per-account limit (as configured, else the client's default) scaled to the slots' share,
    at least 1; ``held`` None (no pool held: the ``retention`` command) leaves them as they are."""
    if held is None:
        return options
    defaults = inspect.signature(ZendeskClient).parameters
    shared = dict(options)
    for name in _BUDGETS:
        shared[name] = max(1, int(options.get(name, defaults[name].default)) * held // ZENDESK_POOL.slots)
    return shared


class ZendeskHook(RetentionHook):
    """Builds a :class:`~retention.systems.ticketing.client.ZendeskClient` from a connection."""

    conn_name_attr = "zendesk_conn_id"
    default_conn_name = "retention_zendesk"
    conn_type = "retention_zendesk"
    hook_name = "Zendesk Support"
    role = "the Zendesk API"
    test_ok_message = "Zendesk API answered."
    test_failed_prefix = "Zendesk check failed: "
    zendesk_conn_id: str

    def __init__(self, zendesk_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(zendesk_conn_id, **kwargs)

    def _target(self) -> dict[str, str]:
        """``{"base_url": ...}`` or ``{"subdomain": ...}`` from host (and port)."""
        conn = self.connection
        host = (conn.host or "").strip().rstrip("/")
        if not host:
            raise SettingError(f"connection {self.zendesk_conn_id!r} has no host (subdomain or base URL)")
        if "://" in host:
            parts = urlsplit(host)
            if conn.port and parts.port is None:
                host = f"{parts.scheme}://{parts.hostname}:{conn.port}{parts.path}"
            return {"base_url": host}
        if "." in host or ":" in host or conn.port:
            netloc = f"{host}:{conn.port}" if conn.port and ":" not in host else host
            return {"base_url": f"https://{netloc}"}
        return {"subdomain": host}

    def create_conn(self) -> ZendeskClient:
        conn = self.connection
        oauth = self.extra_option("oauth_token", str)
        if not oauth and not conn.password:
            raise SettingError(f"connection {self.zendesk_conn_id!r} has neither an API token nor an oauth_token")
        if not oauth and not conn.login:
            raise SettingError(f"connection {self.zendesk_conn_id!r}: an API token needs the agent e-mail (login)")
        return ZendeskClient(
            **self._target(),
            email=conn.login or None,
            api_token=None if oauth else conn.password,
            oauth_token=oauth or None,
            # Two DAGs at once share the account's budget through the pool's slots.
            **shared_budget(self.extra_options(_OPTIONS), held_slots(ZENDESK_POOL)),
        )

    def get_conn(self) -> ZendeskClient:
        """A client for this connection (created once per hook, then reused)."""
        return super().get_conn()

    def probe(self) -> None:
        self.get_conn().session.request("GET", "/api/v2/users/me.json", endpoint="users.me")


__all__ = ["ZendeskHook"]
