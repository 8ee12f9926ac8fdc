"""Airflow hook for the Mailchimp Marketing API v3 (newsletter audience).

Connection (type ``mailchimp``, default id ``retention_mailchimp``):

* ``password``: the API key (``<key>-<dc>``; the data centre picks the default base URL);
* ``host`` (optional): base URL override, e.g. the stand-in ``http://127.0.0.1:8081/3.0``;
  a bare host name gets ``https://`` and, without a path, ``/3.0``;
* ``extra`` (JSON): ``{"list_id": "...", "max_connections": 10}``, and optionally
  ``max_retries``, ``backoff``, ``timeout``.

For example, as an environment variable (JSON form)::

    AIRFLOW_CONN_RETENTION_MAILCHIMP='{"conn_type": "retention_mailchimp", "password": "abc-us21",
        "extra": {"list_id": "a1b2c3d4e5"}}'

Nothing is read at import time; the connection is looked up on first use.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from airflow.sdk.bases.hook import BaseHook

from retention.systems.newsletter.client import MailchimpClient

MAILCHIMP_MAX_CONNECTIONS = 10  # Mailchimp's limit of simultaneous connections per user


class MailchimpHook(BaseHook):
    """Builds a :class:`~retention.systems.newsletter.client.MailchimpClient` from a connection."""

    conn_name_attr = "mailchimp_conn_id"
    default_conn_name = "retention_mailchimp"
    conn_type = "retention_mailchimp"
    hook_name = "Mailchimp Marketing"

    def __init__(self, mailchimp_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mailchimp_conn_id = mailchimp_conn_id
        self._connection: Any = None
        self._client: MailchimpClient | None = None

    # -- UI ----------------------------------------------------------------------------------
    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        return {
            "hidden_fields": ["schema", "port", "login"],
            "relabeling": {"password": "API key", "host": "Base URL (optional)"},
            "placeholders": {
                "host": "https://us21.api.mailchimp.com/3.0 (default: from the key's data centre)",
                "extra": '{"list_id": "a1b2c3d4e5", "max_connections": 10}',
            },
        }

    # -- connection --------------------------------------------------------------------------
    @property
    def connection(self) -> Any:
        if self._connection is None:
            self._connection = self.get_connection(self.mailchimp_conn_id)
        return self._connection

    @property
    def extras(self) -> dict[str, Any]:
        return dict(self.connection.extra_dejson or {})

    @property
    def list_id(self) -> str:
        list_id = self.extras.get("list_id")
        if not list_id:
            raise ValueError(f"connection {self.mailchimp_conn_id!r} has no list_id in its extra")
        return str(list_id)

    @property
    def max_connections(self) -> int:
        value = int(self.extras.get("max_connections") or MAILCHIMP_MAX_CONNECTIONS)
        if value < 1:
            raise ValueError(f"connection {self.mailchimp_conn_id!r}: max_connections must be >= 1")
        return value

    @property
    def base_url(self) -> str | None:
        """The base URL override from ``host``, or None (derive it from the key)."""
        conn = self.connection
        host = (conn.host or "").strip()
        if not host:
            return None
        if "://" not in host:
            scheme = "https"
            if conn.port:
                host = f"{host}:{conn.port}"
            host = f"{scheme}://{host}"
        if urlsplit(host).path in ("", "/"):
            host = host.rstrip("/") + "/3.0"
        return host.rstrip("/")

    def get_conn(self) -> MailchimpClient:
        """A client for this connection (created once per hook, then reused)."""
        if self._client is None:
            conn = self.connection
            api_key = conn.password
            if not api_key:
                raise ValueError(f"connection {self.mailchimp_conn_id!r} has no API key (password)")
            extras = self.extras
            options: dict[str, Any] = {}
            for name, cast in (("max_retries", int), ("backoff", float), ("timeout", float)):
                if extras.get(name) is not None:
                    options[name] = cast(extras[name])
            self._client = MailchimpClient(
                api_key, base_url=self.base_url, max_connections=self.max_connections, **options
            )
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def test_connection(self) -> tuple[bool, str]:
        try:
            self.get_conn().ping()
        except Exception as exc:  # noqa: BLE001 - reported to the UI, not raised
            return False, f"Mailchimp ping failed: {type(exc).__name__}: {exc}"
        return True, "Mailchimp API answered the ping."


__all__ = ["MailchimpHook"]
