"""Reading the Zendesk stand-in's request parameters and paging its answers: integer and id-list
parameters, opaque cursors, the cursor/offset listings (``deleted_tickets``, ``deleted_users``,
a user's requested tickets) and the incremental exports (``/incremental/{tickets,users}/cursor``)."""

from __future__ import annotations

import base64
import binascii
import itertools
import time

import numpy as np
from sortedcontainers import SortedList

from retention_dev.standins.zendesk_common import LOW, SHIFT, ApiError
from retention_dev.standins.zendesk_state import State

MAX_IDS = 100
MAX_EXPORT_PAGE = 1000


def encode_cursor(key: int) -> str:
    return base64.urlsafe_b64encode(str(key).encode()).decode().rstrip("=")


def decode_cursor(value: str) -> int:
    padded = value + "=" * (-len(value) % 4)
    return int(base64.urlsafe_b64decode(padded.encode()).decode())


def int_param(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ApiError(400, "InvalidValue", f"{name} must be an integer") from None


def ids_param(query: dict) -> list[int]:
    raw = ",".join(query.get("ids", []))
    parts = [p for p in raw.split(",") if p.strip()]
    if not parts:
        raise ApiError(400, "InvalidValue", "ids is required")
    if len(parts) > MAX_IDS:
        raise ApiError(400, "TooManyValues", f"at most {MAX_IDS} ids per request")
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise ApiError(400, "InvalidValue", "ids must be integers") from None


def job_ids_param(query: dict) -> list[str]:
    raw = ",".join(query.get("ids", []))
    parts = [p.strip() for p in raw.split(",") if p.strip()]
    if not parts:
        raise ApiError(400, "InvalidValue", "ids is required")
    if len(parts) > MAX_IDS:
        raise ApiError(400, "TooManyValues", f"at most {MAX_IDS} ids per request")
    return list(dict.fromkeys(parts))


def list_soft(ids: SortedList, key: str, query: dict, base: str, render, *, path: str | None = None) -> dict:
    """Cursor (``page[size]``/``page[after]``) or offset (``page``/``per_page``) listing;
    ``path`` (under ``/api/v2/``, default ``key``) is where the page links point."""
    path = path or key
    if "page[size]" in query or "page[after]" in query:
        size = int_param(query.get("page[size]", ["100"])[0], "page[size]")
        if not 1 <= size <= 100:
            raise ApiError(400, "InvalidPaginationParameter", "page[size] must be within 1..100")
        after = query.get("page[after]", [""])[0]
        start = 0
        if after:
            try:
                start = ids.bisect_right(decode_cursor(after))
            except (ValueError, binascii.Error):
                raise ApiError(400, "InvalidPaginationParameter", "bad cursor") from None
        page = list(ids[start : start + size])
        has_more = start + size < len(ids)
        after_cursor = encode_cursor(page[-1]) if page else None
        return {
            key: [render(r, base) for r in page],
            "meta": {"has_more": has_more, "after_cursor": after_cursor,
                     "before_cursor": encode_cursor(page[0]) if page else None},
            "links": {"next": f"{base}/api/v2/{path}.json?page[size]={size}&page[after]={after_cursor}"
                      if has_more else None, "prev": None},
        }
    page_no = int_param(query.get("page", ["1"])[0], "page")
    per_page = min(100, int_param(query.get("per_page", ["100"])[0], "per_page"))
    start = (max(1, page_no) - 1) * per_page
    page = list(ids[start : start + per_page])
    more = start + per_page < len(ids)
    return {
        key: [render(r, base) for r in page],
        "next_page": f"{base}/api/v2/{path}.json?page={page_no + 1}&per_page={per_page}" if more else None,
        "previous_page": f"{base}/api/v2/{path}.json?page={page_no - 1}&per_page={per_page}" if page_no > 1 else None,
        "count": len(ids),
    }


def export(st: State, query: dict, base: str, *, tickets: bool, lag_seconds: int) -> dict:
    index = st.t_index if tickets else st.u_index
    per_page = int_param(query.get("per_page", [str(MAX_EXPORT_PAGE)])[0], "per_page")
    per_page = max(1, min(per_page, MAX_EXPORT_PAGE))
    if query.get("cursor", [""])[0]:
        try:
            lower = decode_cursor(query["cursor"][0])
        except (ValueError, binascii.Error):
            raise ApiError(422, "InvalidPaginationParameter", "Invalid cursor") from None
    elif "start_time" in query:
        start = int_param(query["start_time"][0], "start_time")
        if start > time.time():
            raise ApiError(422, "InvalidPaginationParameter", "start_time is in the future")
        lower = (max(start, 0) << SHIFT) - 1
    else:
        raise ApiError(422, "InvalidPaginationParameter", "start_time or cursor required")
    upper = ((int(time.time()) - lag_seconds) << SHIFT) | LOW
    keys = list(itertools.islice(index.irange(lower, upper, inclusive=(False, True)), per_page + 1))
    more = len(keys) > per_page
    keys = keys[:per_page]
    rows = np.array([(k & LOW) - 1 for k in keys], dtype=np.int64)
    after = keys[-1] if keys else lower
    name = "tickets" if tickets else "users"
    body = {
        name: st.tickets_page(rows, base) if tickets else st.users_page(rows, base),
        "after_cursor": encode_cursor(after),
        "after_url": f"{base}/api/v2/incremental/{name}/cursor.json?cursor={encode_cursor(after)}",
        "before_cursor": None,
        "before_url": None,
        "end_of_stream": not more,
    }
    includes = ",".join(query.get("include", [])).split(",")
    if tickets and "metric_sets" in includes:
        body["metric_sets"] = st.metric_sets_page(rows)
    return body

