"""The Zendesk stand-in's user endpoints: ``/api/v2/users`` (``me``, ``search``, ``show_many``,
``{id}`` GET/PUT (role)/DELETE, ``{id}/tickets/requested``) and ``/api/v2/deleted_users`` (list, ``{id}``
GET/DELETE, ``count``)."""

from __future__ import annotations

import json

import numpy as np
from sortedcontainers import SortedList

from retention_dev.standins import zendesk_data as zd
from retention_dev.standins.zendesk_common import ACTIVE, SHIFT, SOFT_DELETED, USER_GONE, ApiError, iso
from retention_dev.standins.zendesk_paging import ids_param, list_soft
from retention_dev.standins.zendesk_state import State

PERMANENTLY_DELETED = {"name": "Permanently Deleted User", "email": None}


class UserRoutes:
    """The user endpoints of :class:`~retention_dev.standins.zendesk_api.App` (which provides
    ``state``); called with the lock held."""

    state: State

    def route_users(self, method: str, seg: list[str], query: dict, base: str, body: bytes = b"") -> tuple[int, dict] | None:
        """The answer to ``seg`` (the path under ``/api/v2/``), or None when no user endpoint
        matches."""
        st = self.state
        head = seg[0]
        if head == "users" and seg[1:] == ["me"] and method == "GET":
            admin_row = int(np.flatnonzero(st.u_role == zd.ROLE_CODE["admin"])[0])
            return 200, {"user": st.user_json(admin_row, base)}
        if head == "users":
            if seg[1:] == ["search"] and method == "GET":
                return 200, self.search_users(query, base)
            if len(seg) == 4 and seg[1].isdigit() and seg[2:] == ["tickets", "requested"] and method == "GET":
                row = st.user_row(int(seg[1]))
                if row is None or st.u_state[row] != ACTIVE:
                    raise ApiError(404, "RecordNotFound", "Not found")
                ids = SortedList(st.requested_ticket_ids(row))
                return 200, list_soft(
                    ids, "tickets", query, base, lambda tid, b: st.ticket_json(tid - 1, b),
                    path=f"users/{seg[1]}/tickets/requested",
                )
            if len(seg) == 3 and seg[1].isdigit() and seg[2] == "related" and method == "GET":
                row = st.user_row(int(seg[1]))
                if row is None or st.u_state[row] != ACTIVE:
                    raise ApiError(404, "RecordNotFound", "Not found")
                return 200, st.related(row)
            if seg[1:] == ["show_many"] and method == "GET":
                rows = [st.user_row(i) for i in ids_param(query)]
                return 200, {"users": [st.user_json(r, base) for r in rows if r is not None and st.u_state[r] == ACTIVE]}
            if len(seg) == 2 and seg[1].isdigit():
                row = st.user_row(int(seg[1]))
                if row is None or st.u_state[row] != ACTIVE:
                    raise ApiError(404, "RecordNotFound", "Not found")
                if method == "GET":
                    return 200, {"user": st.user_json(row, base)}
                if method == "PUT":
                    return 200, {"user": self.update_user(row, base, body)}
                if method == "DELETE":
                    return 200, {"user": self.soft_delete_user(row, base)}
        if head == "deleted_users":
            if len(seg) == 1 and method == "GET":
                return 200, list_soft(st.deleted_users, "deleted_users", query, base, self.deleted_user_json)
            if seg[1:] == ["count"] and method == "GET":
                # Zendesk's count is approximate (refreshed daily past 100,000); here it is exact.
                return 200, {"count": {"value": len(st.deleted_users), "refreshed_at": iso(st.clock())}}
            if len(seg) == 2 and seg[1].isdigit():
                row = st.user_row(int(seg[1]))
                if row is None or st.u_state[row] != SOFT_DELETED:
                    raise ApiError(404, "RecordNotFound", "Not found")
                if method == "GET":
                    return 200, {"deleted_user": self.deleted_user_json(row + 1, base)}
                if method == "DELETE":
                    return 200, {"deleted_user": self.permanently_delete_user(row, base)}
        return None

    def update_user(self, row: int, base: str, body: bytes) -> dict:
        """``PUT /api/v2/users/{id}`` with ``{"user": {"role": ...}}`` (role only): an end user
        made an agent, say."""
        st = self.state
        try:
            role = json.loads(body or b"{}")["user"]["role"]
        except (ValueError, KeyError, TypeError):
            role = None
        if role not in zd.ROLE_CODE:
            raise ApiError(422, "RecordInvalid", f"role must be one of {'/'.join(zd.ROLE_CODE)}")
        st.u_role[row] = zd.ROLE_CODE[role]
        st.touch_user(row, st.clock())
        return st.user_json(row, base)

    def search_users(self, query: dict, base: str) -> dict:
        """``GET /api/v2/users/search``: only ``email:{address}`` (or a bare address) is modelled."""
        st = self.state
        text = query.get("query", [""])[0].strip()
        address = text[len("email:"):] if text.lower().startswith("email:") else text
        address = address.strip().strip('"')
        if "@" not in address or any(c.isspace() for c in address):
            raise ApiError(400, "InvalidValue", "the stand-in models only email:{address} user searches")
        rows = st.user_rows_with_email(address)
        return {"users": [st.user_json(r, base) for r in rows], "next_page": None, "previous_page": None,
                "count": len(rows)}

    def soft_delete_user(self, row: int, base: str) -> dict:
        st = self.state
        if st.u_role[row] == zd.ROLE_CODE["admin"]:
            raise ApiError(403, "Forbidden", "The account owner cannot be deleted")
        if st.open_tickets_of(row):
            raise ApiError(
                422, "RecordInvalid", "Record validation errors",
                details={"base": [{"error": "UserIsRequesterOfUnclosedTickets",
                                   "description": "The user is requester of tickets that are not closed"}]},
            )
        now = st.clock()
        st.u_state[row] = SOFT_DELETED
        st.u_deleted_at[row] = now
        st.touch_user(row, now)
        st.soft_users.add(row + 1)
        st.deleted_users.add(row + 1)
        st.counters["soft_user_deletions"] += 1
        return st.user_json(row, base)

    def permanently_delete_user(self, row: int, base: str) -> dict:
        st = self.state
        out = self.deleted_user_json(row + 1, base)
        st.u_index.discard((int(st.u_updated[row]) << SHIFT) | (row + 1))
        st.u_state[row] = USER_GONE
        st.soft_users.discard(row + 1)
        st.counters["permanent_user_deletions"] += 1
        out.update(PERMANENTLY_DELETED)
        return out

    def deleted_user_json(self, row1: int, base: str) -> dict:
        """A deleted user as ``/api/v2/deleted_users`` shows it; one deleted for good has its
        personal properties null and the name "Permanently Deleted User" (Zendesk's reference)."""
        st = self.state
        out = st.user_json(row1 - 1, base)
        out["id"] = zd.USER_ID_BASE + row1
        out["url"] = f"{base}/api/v2/deleted_users/{out['id']}.json"
        out["active"] = False
        if st.u_state[row1 - 1] == USER_GONE:
            out.update(PERMANENTLY_DELETED)
        return out
