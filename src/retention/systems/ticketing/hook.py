"""Airflow hook for the Zendesk Support API (tickets and their requesters).

Connection (type ``zendesk``, default id ``retention_zendesk``):

* ``login``: the agent's e-mail address, ``password``: the API token (Basic ``{email}/token``);
  or ``extra.oauth_token`` for a Bearer token instead;
* ``host``: the subdomain (``acme``), the Zendesk host name (``acme.zendesk.com``) or a full
  base URL (the stand-in: ``http://127.0.0.1:8082``); ``port`` is appended when the host has
  none;
* ``extra`` (JSON, all optional): ``requests_per_minute`` (700: the plan's limit),
  ``incremental_per_minute`` (10), ``deleted_list_per_minute`` (10), ``user_deletes_per_10min``
  (700), ``max_connections`` (4), ``max_jobs_in_flight`` (30: Zendesk's job limit per account;
  lower it where other integrations of the account run jobs too), ``max_retries`` (10),
  ``timeout`` (60), ``job_poll_interval`` (0.1), ``oauth_token``.

For example (JSON form)::

    AIRFLOW_CONN_RETENTION_ZENDESK='{"conn_type": "retention_zendesk", "host": "http://127.0.0.1:8082",
        "login": "agent@example.org", "password": "token", "extra": {"requests_per_minute": 700}}'

Nothing is read at import time; the connection is looked up on first use.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from airflow.sdk.bases.hook import BaseHook

from retention.systems.ticketing.client import ZendeskClient

_INT_OPTIONS = (
    "requests_per_minute",
    "incremental_per_minute",
    "deleted_list_per_minute",
    "user_deletes_per_10min",
    "max_connections",
    "max_jobs_in_flight",
    "max_job_attempts",
    "max_retries",
)
_FLOAT_OPTIONS = ("timeout", "job_poll_interval", "job_timeout")


class ZendeskHook(BaseHook):
    """Builds a :class:`~retention.systems.ticketing.client.ZendeskClient` from a connection."""

    conn_name_attr = "zendesk_conn_id"
    default_conn_name = "retention_zendesk"
    conn_type = "retention_zendesk"
    hook_name = "Zendesk Support"

    def __init__(self, zendesk_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.zendesk_conn_id = zendesk_conn_id
        self._connection: Any = None
        self._client: ZendeskClient | None = None

    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return {
            "hidden_fields": ["schema"],
            "relabeling": {"login": "Agent e-mail", "password": "API token", "host": "Subdomain or base URL"},
            "placeholders": {
                "host": "acme (or https://acme.zendesk.com)",
                "extra": '{"requests_per_minute": 700, "incremental_per_minute": 10}',
            },
        }

    @property
    def connection(self) -> Any:
        if self._connection is None:
            self._connection = self.get_connection(self.zendesk_conn_id)
        return self._connection

    @property
    def extras(self) -> dict[str, Any]:
        return dict(self.connection.extra_dejson or {})

    def _target(self) -> dict[str, str]:
        """``{"base_url": ...}`` or ``{"subdomain": ...}`` from host (and port)."""
        conn = self.connection
        host = (conn.host or "").strip().rstrip("/")
        if not host:
            raise ValueError(f"connection {self.zendesk_conn_id!r} has no host (subdomain or base URL)")
        if "://" in host:
            parts = urlsplit(host)
            if conn.port and parts.port is None:
                host = f"{parts.scheme}://{parts.hostname}:{conn.port}{parts.path}"
            return {"base_url": host}
        if "." in host or ":" in host or conn.port:
            netloc = f"{host}:{conn.port}" if conn.port and ":" not in host else host
            return {"base_url": f"https://{netloc}"}
        return {"subdomain": host}

    def get_conn(self) -> ZendeskClient:
        """A client for this connection (created once per hook, then reused)."""
        if self._client is None:
            conn = self.connection
            extras = self.extras
            oauth = extras.get("oauth_token")
            if not oauth and not conn.password:
                raise ValueError(f"connection {self.zendesk_conn_id!r} has neither an API token nor an oauth_token")
            if not oauth and not conn.login:
                raise ValueError(f"connection {self.zendesk_conn_id!r}: an API token needs the agent e-mail (login)")
            options: dict[str, Any] = {}
            for name in _INT_OPTIONS:
                if extras.get(name) is not None:
                    options[name] = int(extras[name])
            for name in _FLOAT_OPTIONS:
                if extras.get(name) is not None:
                    options[name] = float(extras[name])
            self._client = ZendeskClient(
                **self._target(),
                email=conn.login or None,
                api_token=None if oauth else conn.password,
                oauth_token=oauth or None,
                **options,
            )
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def test_connection(self) -> tuple[bool, str]:
        try:
            client = self.get_conn()
            client.session.request("GET", "/api/v2/users/me.json", endpoint="users.me")
        except Exception as exc:  # noqa: BLE001 - reported to the UI, not raised
            return False, f"Zendesk check failed: {type(exc).__name__}: {exc}"
        return True, "Zendesk API answered."


__all__ = ["ZendeskHook"]
