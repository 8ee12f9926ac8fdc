"""What the project's Airflow hooks share: one Connection, its extras, options, the test, the UI.

A hook here (:class:`RetentionHook`) is an Airflow provider hook: ``conn_name_attr`` names the
constructor argument holding the connection id (``default_conn_name`` by default),
``conn_type``/``hook_name`` register it (``retention.airflow.provider``), ``get_conn()`` gives
the system's client, built on first use and kept, ``close()`` lets it go, and
``test_connection()`` answers ``(ok, message)`` for the UI's "Test" button. Nothing is read at
import or construction time: the Connection is fetched on first use, once per hook.

The extras are a JSON object (:meth:`RetentionHook.extras`; anything else is a clear error,
where Airflow would log a traceback and go on without them) and options are read from them
with their types (:meth:`RetentionHook.extra_option`); an option left empty in the form (null
or ``""``) takes its default.

Connection forms: Airflow 3.3's UI builds them from the provider's metadata alone
(``connection-types`` entries with ``conn-fields`` and ``ui-field-behaviour``, read without
importing the hooks); the hook methods ``get_ui_field_behaviour()`` and
``get_connection_form_widgets()`` are deprecated since Airflow 3.2 and only read where
``wtforms`` is installed. The forms are therefore data, in ``retention.systems.forms``, which
the provider registration reads without importing any hook.
"""

from __future__ import annotations

import copy
import os
from typing import Any, ClassVar, TypeVar

from airflow.sdk.bases.hook import BaseHook

from retention.config import SettingError, connection_extras, quiet_extra_parse_noise, unreadable_connection
from retention.systems.forms import FORMS, ui_field_behaviour

T = TypeVar("T", int, float, str)

_KINDS = {int: "an integer", float: "a number", str: "a string"}


class RetentionHook(BaseHook):
    """Base of the project's hooks; subclasses set the provider attributes and implement
    :meth:`create_conn` (what ``get_conn()`` returns) and :meth:`probe` (what
    ``test_connection()`` tries)."""

    conn_name_attr: ClassVar[str]
    default_conn_name: ClassVar[str]
    conn_type: ClassVar[str]
    hook_name: ClassVar[str]
    #: ``test_connection()``'s message on success, and the start of the one on failure.
    test_ok_message: ClassVar[str] = "Connection works."
    test_failed_prefix: ClassVar[str] = ""
    #: What the Connection's host is, for errors ("the Mailchimp API").
    role: ClassVar[str] = "the system"

    def __init__(self, conn_id: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        setattr(self, self.conn_name_attr, conn_id)
        self._connection: Any = None
        self._extras: dict[str, Any] | None = None
        self._client: Any = None

    # -- the Connection ----------------------------------------------------------------------
    @property
    def conn_id(self) -> str:
        return getattr(self, self.conn_name_attr)

    @property
    def connection(self) -> Any:
        """The Airflow Connection, fetched on first use and kept."""
        if self._connection is None:
            from airflow.sdk.exceptions import AirflowNotFoundException

            quiet_extra_parse_noise()
            try:
                self._connection = self.get_connection(self.conn_id)
            except AirflowNotFoundException:
                if os.environ.get(f"AIRFLOW_CONN_{self.conn_id.upper()}") is not None:
                    raise unreadable_connection(self.conn_id) from None
                raise SettingError(
                    f"connection {self.conn_id!r} is not defined: add it in Airflow, or set AIRFLOW_CONN_{self.conn_id.upper()}"
                ) from None
        return self._connection

    @property
    def extras(self) -> dict[str, Any]:
        """The Connection's extra as a dict (a copy: changing it changes nothing)."""
        return dict(self._extra())

    def _extra(self) -> dict[str, Any]:
        if self._extras is None:
            self._extras = connection_extras(self.connection, self.conn_id)
        return self._extras

    def extra_option(self, name: str, kind: type[T], default: T | None = None, *, minimum: float | None = None) -> T | None:
        """Extra ``name`` as ``kind`` (int, float or str), ``default`` when missing, null or
        ``""``; a ``ValueError`` naming the connection and the option when it is not of the kind
        or below ``minimum`` (the value itself is not repeated: it might be a secret)."""
        value = self._extra().get(name)
        if value is None or value == "":
            return default
        try:
            if isinstance(value, bool) or (kind is not str and not isinstance(value, int | float | str)):
                raise TypeError
            result = kind(value)
        except (TypeError, ValueError):
            raise SettingError(f"connection {self.conn_id!r}: extra {name!r} must be {_KINDS[kind]}") from None
        if minimum is not None and result < minimum:
            raise SettingError(f"connection {self.conn_id!r}: {name} must be >= {minimum:g}")
        return result

    def extra_options(self, kinds: dict[str, type]) -> dict[str, Any]:
        """The options of ``kinds`` (name -> int, float or str) that the extra sets, typed."""
        out = {}
        for name, kind in kinds.items():
            value = self.extra_option(name, kind)
            if value is not None:
                out[name] = value
        return out

    # -- the client --------------------------------------------------------------------------
    def get_conn(self) -> Any:
        """The system's client for this connection (created once per hook, then reused)."""
        if self._client is None:
            try:
                client = self.create_conn()
            except ValueError as exc:  # a client refusing a setting: name the Connection it came from
                if isinstance(exc, SettingError):
                    raise
                raise SettingError(f"connection {self.conn_id!r}: {exc}") from None
            session = getattr(client, "session", None)
            if hasattr(session, "where"):  # an HTTP API: its failures to connect name this Connection
                session.where = f"connection {self.conn_id!r} ({self.role})"
            self._client = client
        return self._client

    def create_conn(self) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        """Close the client (if one was made); the next ``get_conn()`` makes a new one."""
        client, self._client = self._client, None
        if client is not None and hasattr(client, "close"):
            client.close()

    def probe(self) -> None:
        """One cheap call that proves the connection works (raises otherwise)."""
        raise NotImplementedError

    def test_connection(self) -> tuple[bool, str]:
        try:
            self.probe()
        except Exception as exc:  # noqa: BLE001 - reported to the UI, not raised
            return False, f"{self.test_failed_prefix}{type(exc).__name__}: {exc}"
        return True, self.test_ok_message

    # -- the connection form (data in ``retention.systems.forms``) ---------------------------
    @classmethod
    def get_ui_field_behaviour(cls) -> dict[str, Any]:
        """Deprecated in Airflow 3.2 (the UI reads the provider metadata); kept for older UIs."""
        return ui_field_behaviour(cls.conn_type)

    @classmethod
    def connection_type_info(cls) -> dict[str, Any]:
        """This hook's entry in the provider metadata's ``connection-types``."""
        return {"connection-type": cls.conn_type, **copy.deepcopy(FORMS[cls.conn_type])}


__all__ = ["RetentionHook"]
