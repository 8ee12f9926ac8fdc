"""The Zendesk stand-in's ticket endpoints: ``/api/v2/tickets`` (``show_many``, ``destroy_many``,
``{id}`` GET/PUT/DELETE), ``/api/v2/deleted_tickets`` (list, ``destroy_many``, ``{id}``) and
``/api/v2/job_statuses`` (``{id}``, ``show_many``)."""

from __future__ import annotations

import json

import numpy as np

from retention_dev.standins import zendesk_data as zd
from retention_dev.standins.zendesk_common import CLOSED, DELETED, ApiError, iso
from retention_dev.standins.zendesk_limits import Limits
from retention_dev.standins.zendesk_paging import ids_param, job_ids_param, list_soft
from retention_dev.standins.zendesk_state import State


class TicketRoutes:
    """The ticket endpoints of :class:`~retention_dev.standins.zendesk_api.App` (which provides
    ``state`` and ``limits``); called with the lock held."""

    state: State
    limits: Limits

    def route_tickets(self, method: str, seg: list[str], query: dict, base: str, fault_match: bool,
                      body: bytes) -> tuple[int, dict | None] | None:
        """The answer to ``seg`` (the path under ``/api/v2/``), or None when no ticket endpoint
        matches."""
        st = self.state
        head = seg[0]
        if head == "tickets":
            if seg[1:] == ["show_many"] and method == "GET":
                ids = ids_param(query)
                rows = [r for r in (st.ticket_row(i) for i in ids) if r is not None and st.t_status[r] < DELETED]
                body = {"tickets": [st.ticket_json(r, base) for r in rows]}
                # Sideloads, as on Zendesk's other ticket endpoints: the metric sets carry solved_at.
                if "metric_sets" in ",".join(query.get("include", [])).split(","):
                    body["metric_sets"] = st.metric_sets_page(np.asarray(rows, dtype=np.int64))
                return 200, body
            if seg[1:] == ["destroy_many"] and method == "DELETE":
                return 200, {"job_status": st.job_json(self.submit_job("ticket_deletion", ids_param(query), base, fault_match))}
            if len(seg) == 2 and seg[1].isdigit():
                row = st.ticket_row(int(seg[1]))
                if row is None or st.t_status[row] >= DELETED:
                    raise ApiError(404, "RecordNotFound", "Not found")
                if method == "GET":
                    return 200, {"ticket": st.ticket_json(row, base)}
                if method == "PUT":
                    return 200, {"ticket": self.update_ticket(row, base, body)}
                if method == "DELETE":  # single soft delete: synchronous, 204
                    st.execute(st.new_job("ticket_deletion", [row + 1], base, None))
                    return 204, None
        if head == "deleted_tickets":
            if len(seg) == 1 and method == "GET":
                return 200, list_soft(st.soft_tickets, "deleted_tickets", query, base, self.deleted_ticket_json)
            if seg[1:] == ["destroy_many"] and method == "DELETE":
                job = self.submit_job("permanent_ticket_deletion", ids_param(query), base, fault_match)
                return 200, {"job_status": st.job_json(job)}
            if len(seg) == 2 and seg[1].isdigit() and method == "DELETE":
                job = self.submit_job("permanent_ticket_deletion", [int(seg[1])], base, fault_match)
                return 200, {"job_status": st.job_json(job)}
        if head == "job_statuses" and seg[1:] == ["show_many"] and method == "GET":
            wanted = job_ids_param(query)
            return 200, {"job_statuses": [st.job_json(st.jobs[j]) for j in wanted if j in st.jobs]}
        if head == "job_statuses" and len(seg) == 2 and method == "GET":
            job = st.jobs.get(seg[1])
            if job is None:
                raise ApiError(404, "RecordNotFound", "Not found")
            return 200, {"job_status": st.job_json(job)}
        return None

    def submit_job(self, job_type: str, ids: list[int], base: str, fault_match: bool) -> dict:
        fail_after = self.limits.job_slot(fault_match)
        return self.state.new_job(job_type, ids, base, fail_after)

    def update_ticket(self, row: int, base: str, body: bytes) -> dict:
        """``PUT /api/v2/tickets/{id}`` with ``{"ticket": {"status": ...}}`` or ``{"ticket":
        {"email_cc_ids": [...]}}`` (the ticket's CCs, replaced)."""
        st = self.state
        try:
            change = json.loads(body or b"{}")["ticket"]
        except (ValueError, KeyError, TypeError):
            change = {}
        if isinstance(change, dict) and "email_cc_ids" in change and "status" not in change:
            ccs = change["email_cc_ids"]
            if not isinstance(ccs, list) or not all(isinstance(u, int) and st.user_row(u) is not None for u in ccs):
                raise ApiError(422, "RecordInvalid", "email_cc_ids must be ids of users")
            st.cc_set[row] = list(ccs)
            st.touch_ticket(row, st.clock())
            return st.ticket_json(row, base)
        new_status = change.get("status") if isinstance(change, dict) else None
        if new_status not in zd.TICKET_STATUSES[:DELETED]:
            raise ApiError(422, "RecordInvalid", "status must be one of new/open/pending/hold/solved/closed")
        now = st.clock()
        code = zd.STATUS_CODE[new_status]
        if code in (zd.STATUS_CODE["solved"], CLOSED) and st.t_solved[row] < 0:
            st.t_solved[row] = now
        if code in zd.OPEN_CODES:
            st.t_solved[row] = zd.NO_TIME
        st.t_status[row] = code
        st.touch_ticket(row, now)
        return st.ticket_json(row, base)

    def deleted_ticket_json(self, tid: int, base: str) -> dict:
        st = self.state
        row = tid - 1
        return {
            "id": tid,
            "subject": f"Synthetic ticket {tid}",
            "actor": {"id": zd.USER_ID_BASE + st.n_users, "name": "Example Admin"},
            "deleted_at": iso(st.t_deleted_at[row]),
            "previous_state": zd.TICKET_STATUSES[int(st.t_prev[row])],
        }
