"""The Mailchimp stand-in's error answers: :class:`ApiError` and the problem documents
``{"type", "title", "status", "detail", "instance"}`` Mailchimp answers errors with."""

from __future__ import annotations

import json
import uuid
from typing import Any

ERROR_DOC = "https://mailchimp.com/developer/marketing/docs/errors/"


class ApiError(Exception):
    def __init__(self, status: int, title: str, detail: str):
        super().__init__(title)
        self.status = status
        self.title = title
        self.detail = detail


def problem(status: int, title: str, detail: str) -> dict:
    return {"type": ERROR_DOC, "title": title, "status": status, "detail": detail, "instance": str(uuid.uuid4())}



def json_object(body: bytes | None, detail: str = "The request body must be a JSON object.") -> dict[str, Any]:
    """A request body that must be a JSON object, as Mailchimp answers one that is not: 400
    Invalid Resource with ``detail``. An empty body is an empty object."""
    try:
        spec = json.loads(body or b"{}")
    except ValueError:
        spec = None
    if not isinstance(spec, dict):
        raise ApiError(400, "Invalid Resource", detail)
    return spec
