"""Alerts through Airflow's notifiers, and the time limits of runs and tasks.

One Connection decides where alerts go (``retention_alerts``, or the id in
``RETENTION_ALERTS_CONN_ID``): conn_type ``smtp`` sends e-mail with the SMTP provider's
``SmtpNotifier`` (recipients in its extra ``to``), ``slack`` or ``slackwebhook`` posts with the
Slack provider's notifier when that provider is installed. The Connection is read when an alert
is sent, never when a DAG is parsed. An alert names the DAG, the run, the task, its try and what
happened, with counts only: never a conf, a param or an exception text other than this project's
own one-line messages (which hold counts and ids), so no personal data reaches a mailbox.
"""

from __future__ import annotations

import html
import logging
import os
from datetime import timedelta
from enum import StrEnum
from typing import Any

from airflow.sdk.exceptions import AirflowFailException

log = logging.getLogger("retention")

DEFAULT_ALERTS_CONN_ID = "retention_alerts"
# Time limits, ISO 8601 durations (as RETENTION_MAX_PLAN_AGE). A task is stopped after its
# timeout (a hung extract must not keep its system's lock for hours); a nightly run still going
# at its deadline is failed by Airflow (``dagrun_timeout``, before the next night is due) and
# alerted on as past its deadline. Not a ``DeadlineAlert``: in Airflow 3.3.2 ``dag.test()``
# crashes when a run of a DAG with one succeeds (``DeadlineAlertModel.get_by_id`` is handed the
# serialized alert instead of its id), and the tests run every DAG through ``dag.test()``.
TIMEOUTS = {"RETENTION_TASK_TIMEOUT": "PT3H", "RETENTION_RUN_DEADLINE": "PT20H"}


class AlertKind(StrEnum):
    TASK_FAILED = "task failed"
    PLAN_REJECTED = "plan rejected"
    APPROVAL_AWAITED = "plan awaits approval"
    QUARANTINE_ALARM = "stuck-quarantine alarm"
    RUN_FAILED = "run failed"
    PAST_DEADLINE = "run past its deadline"


class PlanRejectedAlert(AirflowFailException):
    """The plan guard or another validation stopped a system's erasure (no retry helps)."""

    kind = AlertKind.PLAN_REJECTED


class QuarantineAlarmAlert(AirflowFailException):
    """Records stuck in quarantine for more nights than the policy allows."""

    kind = AlertKind.QUARANTINE_ALARM


# The exceptions whose text this project writes itself, one line of counts and ids: an alert
# may quote them. Anything else (a driver's or an HTTP library's message) is named by its class.
_QUOTABLE = (PlanRejectedAlert, QuarantineAlarmAlert)


def _duration(name: str) -> timedelta:
    from retention.config import ConfigError
    from retention.domain.periods import Duration

    text = os.environ.get(name) or TIMEOUTS[name]
    try:
        value = Duration.parse(text)
    except ValueError as exc:
        raise ConfigError(f"{name}: {exc}") from None
    if value.months or not (value.days or value.seconds):
        raise ConfigError(f"{name} {text!r}: give a positive number of days, hours or minutes (e.g. PT3H)")
    return timedelta(days=value.days, seconds=value.seconds)


def task_timeout() -> timedelta:
    return _duration("RETENTION_TASK_TIMEOUT")


def run_deadline() -> timedelta:
    return _duration("RETENTION_RUN_DEADLINE")


def alerts_conn_id() -> str:
    return os.environ.get("RETENTION_ALERTS_CONN_ID") or DEFAULT_ALERTS_CONN_ID


def notifier_for(subject: str, body: str, conn: Any = None):
    """The notifier the alerts Connection asks for, or None (logged in one line) when there is no
    such Connection. A Connection that cannot send raises a one-line ``ConfigError``."""
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    conn_id = alerts_conn_id()
    if conn is None:
        try:
            conn = BaseHook.get_connection(conn_id)
        except AirflowNotFoundException:
            log.warning("alert not sent: no Connection %r (set one of conn_type smtp or slack to be alerted)", conn_id)
            return None
    return _notifier(conn, conn_id, subject, body)


def _notifier(conn: Any, conn_id: str, subject: str, body: str):
    from retention.config import ConfigError, connection_extras

    extra = connection_extras(conn, conn_id)
    kind = (conn.conn_type or "").lower()
    if kind in ("smtp", "email"):
        from airflow.providers.smtp.notifications.smtp import SmtpNotifier

        to = [a.strip() for a in str(extra.get("to") or "").replace(";", ",").split(",") if a.strip()]
        if not to:
            raise ConfigError(f"connection {conn_id!r}: extra 'to' must name the alerts' recipients (comma-separated)")
        return SmtpNotifier(
            to=to, from_email=extra.get("from_email"), subject=subject,
            html_content=f"<pre>{html.escape(body)}</pre>", smtp_conn_id=conn_id,
        )
    if kind in ("slack", "slackwebhook"):
        try:
            from airflow.providers.slack.notifications import slack, slack_webhook
        except ImportError:
            raise ConfigError(
                f"connection {conn_id!r}: conn_type {kind!r} needs apache-airflow-providers-slack, which is not installed"
            ) from None
        text = f"*{subject}*\n{body}"
        if kind == "slackwebhook":
            return slack_webhook.SlackWebhookNotifier(slack_webhook_conn_id=conn_id, text=text)
        channel = extra.get("channel")
        if not channel:
            raise ConfigError(f"connection {conn_id!r}: extra 'channel' must name the Slack channel for alerts")
        return slack.SlackNotifier(slack_conn_id=conn_id, channel=channel, text=text)
    raise ConfigError(f"connection {conn_id!r}: conn_type {kind!r} cannot send alerts: use smtp, slack or slackwebhook")


def _detail(exc: BaseException | None) -> str:
    if exc is None:
        return ""
    if isinstance(exc, _QUOTABLE):
        return str(exc).splitlines()[0] if str(exc) else ""
    return f"error: {type(exc).__name__} (the task's log has the message)"


def _ids(context: dict) -> tuple[str, str]:
    dag = context.get("dag")
    dag_id = getattr(dag, "dag_id", None) or getattr(context.get("dag_run"), "dag_id", None) or "?"
    return str(dag_id), str(context.get("run_id") or getattr(context.get("dag_run"), "run_id", "?"))


def _send(subject: str, lines: list[str], context: dict) -> None:
    from retention.config import ConfigError

    body = "\n".join(line for line in lines if line)
    try:
        notifier = notifier_for(subject, body)
        if notifier is not None:
            notifier.notify(context)
    except ConfigError as exc:
        log.error("alert not sent: %s", exc)
    except Exception as exc:  # a mail server down must not hide the run's own outcome
        log.error("alert not sent: %s", type(exc).__name__)


def task_failed(context: dict) -> None:
    """``on_failure_callback`` of every task (default_args): the task, its try and what failed."""
    dag_id, run_id = _ids(context)
    ti = context.get("ti") or context.get("task_instance")
    task_id = getattr(ti, "task_id", "?")
    exc = context.get("exception")
    kind = getattr(exc, "kind", AlertKind.TASK_FAILED)
    subject = f"[retention] {kind}: {dag_id} {run_id} {task_id}"
    _send(subject, [
        f"{kind}", f"DAG: {dag_id}", f"run: {run_id}", f"task: {task_id}",
        f"try {getattr(ti, 'try_number', '?')} of {getattr(ti, 'max_tries', 0) + 1}", _detail(exc),
    ], context)


def run_failed(context: dict) -> None:
    """The DAG's ``on_failure_callback``: the run failed, or was still going at its deadline
    (Airflow's reason ``timed_out``), and the task that ended it."""
    dag_id, run_id = _ids(context)
    ti = context.get("ti") or context.get("task_instance")
    kind = AlertKind.PAST_DEADLINE if context.get("reason") == "timed_out" else AlertKind.RUN_FAILED
    subject = f"[retention] {kind}: {dag_id} {run_id}"
    _send(subject, [
        f"{kind}", f"DAG: {dag_id}", f"run: {run_id}",
        f"reason: {context.get('reason') or 'failed'}",
        f"last failed task: {ti.task_id}" if ti is not None and kind is AlertKind.RUN_FAILED else "",
    ], context)


def approval_awaited(line: str):
    """The alert of a tripped plan guard when a person is asked to approve the plan: a notifier
    for the human-in-the-loop operator (``notifiers=``), called when the task starts waiting.
    ``line``: this project's one line of counts (the guard's numbers)."""
    from airflow.sdk.bases.notifier import BaseNotifier

    class ApprovalAwaited(BaseNotifier):
        template_fields = ()

        def notify(self, context: dict) -> None:
            dag_id, run_id = _ids(context)
            ti = context.get("ti") or context.get("task_instance")
            task_id = getattr(ti, "task_id", "?")
            kind = AlertKind.APPROVAL_AWAITED
            _send(f"[retention] {kind}: {dag_id} {run_id} {task_id}", [
                f"{kind}", f"DAG: {dag_id}", f"run: {run_id}", f"task: {task_id}", line,
                "Approve or reject it in Airflow (Browse > Required Actions) or through the REST API.",
            ], context)

    return ApprovalAwaited()


def task_defaults() -> dict:
    """default_args for every DAG: a timeout and the failure alert on every task."""
    return {"execution_timeout": task_timeout(), "on_failure_callback": task_failed}
