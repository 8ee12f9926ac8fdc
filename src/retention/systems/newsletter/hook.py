"""Airflow hook for the Mailchimp Marketing API v3 (newsletter audiences).

Connection (type ``retention_mailchimp``, default id ``retention_mailchimp``):

* ``password``: the API key (``<key>-<dc>``; the data centre picks the default base URL);
* ``host`` (optional): base URL override, e.g. the stand-in ``http://127.0.0.1:8081/3.0``;
  a bare host name gets ``https://`` and, without a path, ``/3.0``;
* ``extra`` (JSON): ``{"list_id": "...", "max_connections": 10}`` for one audience, or
  ``{"list_ids": ["...", "..."]}`` for several (every one is enforced; not both keys), and
  optionally ``max_retries``, ``backoff``, ``timeout``. The first audience's members keep their
  bare subscriber hash as record id, those of the others are ``<list_id>:<subscriber_hash>``
  (see ``retention.systems.newsletter.audiences``): add audiences after the first, never before.

In an Airflow task in the ``retention_mailchimp`` pool, ``max_connections`` is capped to the
task's slots (``retention.systems.pools``: one slot, one connection).

For example, as an environment variable (JSON form)::

    AIRFLOW_CONN_RETENTION_MAILCHIMP='{"conn_type": "retention_mailchimp", "password": "abc-us21",
        "extra": {"list_id": "a1b2c3d4e5"}}'

Nothing is read at import time; the connection is looked up on first use.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from retention.config import SettingError
from retention.systems.forms import MAILCHIMP_MAX_CONNECTIONS
from retention.systems.hooks import RetentionHook
from retention.systems.newsletter.audiences import checked_list_ids
from retention.systems.newsletter.client import MailchimpClient
from retention.systems.pools import MAILCHIMP_POOL, held_slots

_OPTIONS = {"max_retries": int, "backoff": float, "timeout": float}


class MailchimpHook(RetentionHook):
    """Builds a :class:`~retention.systems.newsletter.client.MailchimpClient` from a connection."""

    conn_name_attr = "mailchimp_conn_id"
    default_conn_name = "retention_mailchimp"
    conn_type = "retention_mailchimp"
    hook_name = "Mailchimp Marketing"
    role = "the Mailchimp API"
    test_ok_message = "Mailchimp API answered the ping."
    test_failed_prefix = "Mailchimp ping failed: "
    mailchimp_conn_id: str

    def __init__(self, mailchimp_conn_id: str = default_conn_name, **kwargs: Any) -> None:
        super().__init__(mailchimp_conn_id, **kwargs)

    # -- connection --------------------------------------------------------------------------
    @property
    def list_ids(self) -> tuple[str, ...]:
        """The audiences to enforce, in the Connection's order (``list_id``, or ``list_ids``)."""
        extra = self._extra()
        where = f"connection {self.mailchimp_conn_id!r}"
        if extra.get("list_ids") is None:
            list_id = self.extra_option("list_id", str)
            if not list_id:
                raise SettingError(f"{where} names no audience: set list_id (one) or list_ids (several) in its extra")
            return (list_id,)
        if extra.get("list_id") not in (None, ""):
            raise SettingError(f"{where}: its extra has both list_id and list_ids; name every audience in list_ids only")
        return checked_list_ids(extra["list_ids"], where)

    @property
    def list_id(self) -> str:
        """The first audience (the one a single-audience Connection names)."""
        return self.list_ids[0]

    @property
    def max_connections(self) -> int:
        """The Connection's ``max_connections``, capped in an Airflow task to the slots it holds
        of the ``retention_mailchimp`` pool (one slot, one connection): two DAGs at once then
        stay within Mailchimp's limit together."""
        configured = self.extra_option("max_connections", int, MAILCHIMP_MAX_CONNECTIONS, minimum=1)
        held = held_slots(MAILCHIMP_POOL)
        return configured if held is None else min(configured, held)

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

    def create_conn(self) -> MailchimpClient:
        api_key = self.connection.password
        if not api_key:
            raise SettingError(f"connection {self.mailchimp_conn_id!r} has no API key (password)")
        return MailchimpClient(
            api_key, base_url=self.base_url, max_connections=self.max_connections, **self.extra_options(_OPTIONS)
        )

    def get_conn(self) -> MailchimpClient:
        """A client for this connection (created once per hook, then reused)."""
        return super().get_conn()

    def probe(self) -> None:
        self.get_conn().ping()


__all__ = ["MailchimpHook"]
