"""The request inbox: an erasure request's e-mail address, encrypted, until the request completes.

The plugin (plugins/retention_requests.py) files a request here and triggers ``erasure_request``
with ``{"request_id": ...}`` only, so the address never reaches Airflow's metadata database (the
DAG run's conf, its audit log). The tasks read the address back by id; the report deletes it once
the request is complete. Table ``request_inbox`` in the ledger database (``store/ledger.py``,
revision 0006).

The request key is a Fernet key (``cryptography``, installed with Airflow): 32 random bytes,
url-safe base64, from ``RETENTION_REQUEST_KEY`` or the file ``RETENTION_REQUEST_KEY_FILE``.
Several keys separated by commas rotate it: the first encrypts, all of them decrypt. A missing or
malformed key, and a stored address the configured keys cannot decrypt, are one-line
:class:`ConfigError` messages naming the setting, never the key or the address.
"""

from __future__ import annotations

import functools
import os
import re
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa

from retention.config import ConfigError
from retention.domain.addresses import REQUEST_ID_PATTERN, InvalidRequest, normalise_email
from retention.store.ledger import Ledger, request_inbox

if TYPE_CHECKING:
    from cryptography.fernet import MultiFernet

_REQUEST_ID = re.compile(REQUEST_ID_PATTERN)
_MAKE_KEY = "python -c 'from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'"


class UnknownRequest(InvalidRequest):
    """No request of that id in the inbox (never filed, or completed and forgotten)."""


def request_cipher() -> MultiFernet:
    """The configured request key(s) as a MultiFernet (the first key encrypts)."""
    from cryptography.fernet import Fernet, MultiFernet

    text = os.environ.get("RETENTION_REQUEST_KEY")
    source = "RETENTION_REQUEST_KEY"
    key_file = os.environ.get("RETENTION_REQUEST_KEY_FILE")
    if not text and key_file:
        source = f"RETENTION_REQUEST_KEY_FILE {key_file}"
        try:
            text = Path(key_file).read_text()
        except OSError as exc:
            raise ConfigError(f"RETENTION_REQUEST_KEY_FILE {key_file}: {exc.strerror}") from None
    keys = [k.strip() for k in (text or "").split(",") if k.strip()]
    if not keys:
        raise ConfigError(
            "no request key: set RETENTION_REQUEST_KEY (or RETENTION_REQUEST_KEY_FILE) to a Fernet key, "
            f"e.g. from {_MAKE_KEY}"
        )
    fernets = []
    for n, key in enumerate(keys, 1):
        try:
            fernets.append(Fernet(key))
        except (ValueError, TypeError):
            which = f"key {n} of {len(keys)}" if len(keys) > 1 else "the key"
            raise ConfigError(
                f"the request key ({source}, {which}) is not a Fernet key (32 random bytes, url-safe base64): "
                f"make one with {_MAKE_KEY}"
            ) from None
    return MultiFernet(fernets)


def checked_request_id(value: object) -> str:
    """The request id, or :class:`InvalidRequest` in one line (an id is no secret: it is named)."""
    if not isinstance(value, str) or not _REQUEST_ID.fullmatch(value):
        raise InvalidRequest("erasure request: request_id is not a request id (a UUID the request form gave)")
    return value


@functools.lru_cache(maxsize=4)
def _ledger(url: str) -> Ledger:
    return Ledger(url)


class RequestInbox:
    """Filed requests in the ledger database, the address encrypted under the request key."""

    def __init__(self, ledger: Ledger, cipher: MultiFernet | None = None):
        self.engine = ledger.engine
        self._cipher = cipher

    @classmethod
    def configured(cls) -> RequestInbox:
        """The inbox in the configured ledger database (one engine per URL and process: the
        api-server files requests for as long as it runs)."""
        from retention import config

        return cls(_ledger(config.ledger_url()))

    @property
    def cipher(self) -> MultiFernet:
        if self._cipher is None:
            self._cipher = request_cipher()
        return self._cipher

    def file(self, address: object) -> str:
        """Check the address, store it encrypted; the new request id. A malformed address is an
        :class:`InvalidRequest` that does not repeat it, and nothing is stored."""
        token = self.cipher.encrypt(normalise_email(address).encode()).decode()
        request_id = str(uuid.uuid4())
        with self.engine.begin() as conn:
            conn.execute(request_inbox.insert().values(request_id=request_id, address_token=token, filed_at=datetime.now(UTC)))
        return request_id

    def address(self, request_id: object) -> str:
        """The request's address, decrypted (for the tasks that look the person up)."""
        from cryptography.fernet import InvalidToken

        rid = checked_request_id(request_id)
        with self.engine.connect() as conn:
            token = conn.execute(sa.select(request_inbox.c.address_token).where(request_inbox.c.request_id == rid)).scalar()
        if token is None:
            raise UnknownRequest(
                f"erasure request {rid}: not in the request inbox (never filed, or completed and its address deleted)"
            )
        try:
            plain = self.cipher.decrypt(token.encode()).decode()
        except InvalidToken:
            raise ConfigError(
                f"erasure request {rid}: its address cannot be decrypted with the configured request key "
                "(RETENTION_REQUEST_KEY changed? keep the old key after the new one, comma-separated, until it is done)"
            ) from None
        return normalise_email(plain)

    def exists(self, request_id: str) -> bool:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(request_inbox.c.request_id).where(request_inbox.c.request_id == request_id)).first() is not None

    def forget(self, request_id: str) -> bool:
        """Delete the request's address; whether there was one."""
        with self.engine.begin() as conn:
            return conn.execute(request_inbox.delete().where(request_inbox.c.request_id == request_id)).rowcount > 0
