"""Approval instead of a dead end: a plan over the plan-size guard asks a person.

``PlanApproval`` is Airflow's ``ApprovalOperator`` (human-in-the-loop, Airflow 3.3: the task
waits in ``awaiting_input``) for one system of a nightly run. Within the guard it is skipped and
nothing waits. Over it, the approver sees the counts per rule, a few pseudonymous keys, the
plan's content hash and the policy version, and answers in the UI (Required Actions) or the REST
API (``PATCH .../taskInstances/<system>.approve/-1/hitlDetails``). Every decision goes to the
ledger (who, when, which plan hash, which policy version); an approval lets the erase step
proceed, which erases only a plan whose hash and policy version an approval names. Rejected or
not answered within ``RETENTION_APPROVAL_TIMEOUT`` (the default option is Reject): the erase and
verify steps are skipped, nothing is erased, and the report says so.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk.exceptions import AirflowSkipException

log = logging.getLogger("retention")


def approval_timeout():
    """``RETENTION_APPROVAL_TIMEOUT`` for the operator; zero (nobody asked) still needs a value
    here, though such a task never waits (validation halts the run instead)."""
    from retention.airflow.alerts import task_timeout
    from retention.config import approval_timeout as configured

    return configured() or task_timeout()


class PlanApproval(ApprovalOperator):
    """Asks for approval of one system's plan when validation found it over the guard."""

    # ``run`` and ``validated`` are XComs of open_run and validate, resolved at run time.
    template_fields = (*ApprovalOperator.template_fields, "run", "validated")

    def __init__(self, *, system: str, run: Any, validated: Any, **kwargs) -> None:
        kwargs.setdefault("response_timeout", approval_timeout())
        super().__init__(
            subject=f"Approve {system}'s plan over the plan-size guard?",
            body=None,
            defaults=[self.REJECT],  # no answer in time: rejected, nothing erased
            **kwargs,
        )
        self.system = system
        self.run = run
        self.validated = validated

    def execute(self, context):
        from retention.airflow.alerts import approval_awaited
        from retention.airflow.tasks import run_info, user_errors_in_one_line
        from retention.runs.nightly import approval_request

        if not (self.validated or {}).get("needs_approval"):
            raise AirflowSkipException(f"{self.system}: the plan is within the plan-size guard; no approval needed")
        with user_errors_in_one_line():
            request = approval_request(run_info(self.run), self.system)
        self.subject, self.body = request["subject"], request["body"]
        # The tripped guard's alert, now a notification that approval is awaited.
        self.notifiers = [approval_awaited(request["line"])]
        return super().execute(context)

    def execute_complete(self, context, event: dict[str, Any]):
        from retention.airflow.tasks import run_info, user_errors_in_one_line
        from retention.domain.approval import decision_of
        from retention.runs.nightly import record_approval

        timed_out = bool(event.get("timedout")) or event.get("error_type") == "timeout"
        decision = decision_of(event.get("chosen_options") or [], approve=self.APPROVE, timed_out=timed_out)
        user = event.get("responded_by_user") or {}
        by = (user.get("name") or user.get("id")) if isinstance(user, dict) else getattr(user, "name", None)
        at = event.get("responded_at") or datetime.now(UTC)
        if isinstance(at, str):
            at = datetime.fromisoformat(at)
        with user_errors_in_one_line():
            record_approval(run_info(self.run), self.system, decision, by, at)
        if decision != "approved":
            log.warning("%s: the plan was %s: nothing is erased in this run", self.system, str(decision).replace("_", " "))
        # Approve: the erase step runs; Reject (or the timeout's default): erase and verify are skipped.
        return super().execute_complete(context, event)
