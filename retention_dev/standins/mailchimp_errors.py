"""The Mailchimp stand-in's error answers: :class:`ApiError` and the problem documents
``{"type", "title", "status", "detail", "instance"}`` Mailchimp answers errors with."""

from __future__ import annotations

import uuid

ERROR_DOC = "https://mailchimp.com/developer/marketing/docs/errors/"


class ApiError(Exception):
    def __init__(self, status: int, title: str, detail: str):
        super().__init__(title)
        self.status = status
        self.title = title
        self.detail = detail


def problem(status: int, title: str, detail: str) -> dict:
    return {"type": ERROR_DOC, "title": title, "status": status, "detail": detail, "instance": str(uuid.uuid4())}

