"""The e-mail address an erasure request names: checked and normalised before anything runs.

The address is only ever used to look records up. Messages about a bad address never repeat it.
(No heavy imports: the DAG's param reads ``EMAIL_PATTERN`` at parse time.)
"""

from __future__ import annotations

import re

EMAIL_MAX_LENGTH = 254
# One address, local@domain.tld: no spaces, exactly one @, a dotted domain without empty labels.
# The same text is the DAG param's JSON-schema pattern (validated by Airflow before a run is
# created) and, with ``fullmatch`` (no trailing newline either), the first task's re-check.
EMAIL_PATTERN = r'^[^@\s"(),:;<>\[\]\\]+@[^@\s"(),:;<>\[\]\\.]+(?:\.[^@\s"(),:;<>\[\]\\.]+)+$'
_EMAIL = re.compile(EMAIL_PATTERN)
#: A filed request's id (store/inbox.py): a random UUID (version 4) in its canonical form; the
#: DAG's ``request_id`` param has this pattern, so Airflow refuses anything else before a run.
REQUEST_ID_PATTERN = r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$"


class InvalidRequest(ValueError):
    """The request cannot be carried out as given (the message never repeats the address)."""


def normalise_email(value: object) -> str:
    """The address, checked and lower-cased (every system compares addresses case-insensitively).

    Raises :class:`InvalidRequest` with a message that does not repeat the value.
    """
    if not isinstance(value, str) or not value:
        raise InvalidRequest("erasure request: the email parameter is missing (expected one e-mail address)")
    if len(value) > EMAIL_MAX_LENGTH or not _EMAIL.fullmatch(value):
        raise InvalidRequest(
            "erasure request: not an e-mail address (expected exactly one address such as "
            "someone@example.se, without spaces or surrounding text); nothing was looked up or erased"
        )
    return value.lower()
