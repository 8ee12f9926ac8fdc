"""Alerts through Airflow's notifiers, tested against a real SMTP server on 127.0.0.1: a failing
nightly run and a tripped plan guard each deliver an e-mail naming the DAG, the run and the task,
with counts and ids only. Every task of every DAG has an execution timeout; the nightly run has a
run timeout (its deadline), alerted on as past its deadline."""

from __future__ import annotations

import json
import re
from datetime import timedelta

import pytest
from smtp_server import SmtpServer
from test_quarantine_alarm import audience, run_night  # noqa: F401 - a fixture and a night's run

from airflow_run import load_dag, run_dag, task_states
from retention_dev.standins.process import StandIn

ALERTS_TO = "retention-alerts@ops.example"
NOW = "2026-11-20T12:00:00+00:00"
KEY = "standin-key-us0"
ADDRESS = re.compile(r"[\w.+-]+@[\w-]+(\.[\w-]+)+")


@pytest.fixture
def smtp(monkeypatch):
    with SmtpServer() as server:
        monkeypatch.setenv("AIRFLOW_CONN_RETENTION_ALERTS", json.dumps({
            "conn_type": "smtp", "host": "127.0.0.1", "port": server.port,
            "extra": {"disable_tls": True, "disable_ssl": True, "from_email": "airflow@ops.example", "to": ALERTS_TO,
                      "retry_limit": 0, "timeout": 5},
        }))
        yield server


@pytest.fixture
def mailchimp(tmp_path, monkeypatch, retention_home):
    standin = StandIn(
        "mailchimp", "--port", "0", "--state-file", str(tmp_path / "mc.state"), "--members", "300",
        "--seed", "11", "--now", NOW, "--api-key", KEY,
    ).start()
    monkeypatch.setenv(
        "AIRFLOW_CONN_RETENTION_MAILCHIMP",
        json.dumps({"conn_type": "retention_mailchimp", "host": f"{standin.base_url}/3.0", "password": KEY, "extra": {"list_id": "demo-list"}}),
    )
    yield standin
    standin.stop()


def text_of(message) -> str:
    body = message.get_body(preferencelist=("plain", "html"))
    return body.get_content() if body is not None else ""


def alerts(server, dagrun) -> list[tuple[str, str]]:
    """(subject, body) of every alert about ``dagrun``; none of them holds an e-mail address."""
    out = []
    for message in server.messages():
        subject, body = str(message["Subject"]), text_of(message)
        assert message["To"] == ALERTS_TO
        assert not ADDRESS.search(subject) and not ADDRESS.search(body), (subject, body)
        if dagrun.run_id in subject:
            out.append((subject, body))
    return out


@pytest.mark.airflow
def test_a_failing_nightly_run_sends_an_alert_for_its_task_and_for_the_run(smtp, retention_home, tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_CRM", json.dumps(
        {"conn_type": "retention_crm", "extra": {"sqlalchemy_url": f"sqlite:///{tmp_path}/crm.db", "chunk_size": "lots"}}
    ))
    dr = run_dag({"systems": ["crm"]})
    assert dr.state == "failed", task_states(dr)
    assert task_states(dr)["crm.extract"] == "failed"
    got = alerts(smtp, dr)
    task_alerts = [(s, b) for s, b in got if "crm.extract" in s]
    assert len(task_alerts) == 1, got
    subject, body = task_alerts[0]
    assert "task failed" in subject and "retention_nightly" in subject
    for word in ("retention_nightly", dr.run_id, "crm.extract", "try 1"):
        assert word in body, body
    run_alerts = [(s, b) for s, b in got if "run failed" in s]
    assert len(run_alerts) == 1, got
    assert dr.run_id in run_alerts[0][1] and "reason: task_failure" in run_alerts[0][1], run_alerts[0][1]


@pytest.mark.airflow
def test_a_tripped_plan_guard_sends_an_alert_with_its_numbers(smtp, mailchimp, retention_home):
    dr = run_dag({"systems": ["newsletter"], "max_plan_share": 0.01})
    assert dr.state == "failed"
    assert task_states(dr)["newsletter.validate"] == "failed"
    guard = [(s, b) for s, b in alerts(smtp, dr) if "newsletter.validate" in s]
    assert len(guard) == 1, alerts(smtp, dr)
    subject, body = guard[0]
    assert "plan rejected" in subject, subject
    for word in ("retention_nightly", dr.run_id, "newsletter.validate", "nothing was erased"):
        assert word in body, body
    # The guard's numbers: planned against allowed of extracted.
    assert re.search(r"plan_size_guard: \d+ planned, 3 allowed of 300 extracted", body), body


def test_no_alerts_connection_sends_nothing_and_says_so_in_one_line(monkeypatch, caplog):
    from retention.airflow import alerts as alerts_

    monkeypatch.delenv("AIRFLOW_CONN_RETENTION_ALERTS", raising=False)
    assert alerts_.notifier_for("subject", "body") is None
    assert "retention_alerts" in caplog.text


def test_the_connection_decides_the_notifier(monkeypatch):
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier

    from retention.airflow import alerts as alerts_
    from retention.config import ConfigError

    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_ALERTS", json.dumps({"conn_type": "smtp", "host": "h", "extra": {"to": "a@b.example, c@d.example"}}))
    notifier = alerts_.notifier_for("s", "b")
    assert isinstance(notifier, SmtpNotifier) and notifier.to == ["a@b.example", "c@d.example"]
    assert notifier.smtp_conn_id == "retention_alerts"
    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_ALERTS", json.dumps({"conn_type": "smtp", "host": "h"}))
    with pytest.raises(ConfigError, match="connection 'retention_alerts': extra 'to'"):
        alerts_.notifier_for("s", "b")
    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_ALERTS", json.dumps({"conn_type": "http", "host": "h"}))
    with pytest.raises(ConfigError, match="connection 'retention_alerts': conn_type 'http'"):
        alerts_.notifier_for("s", "b")
    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_ALERTS", json.dumps({"conn_type": "slackwebhook", "password": "x"}))
    try:
        import airflow.providers.slack  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="apache-airflow-providers-slack"):
            alerts_.notifier_for("s", "b")
    else:
        assert type(alerts_.notifier_for("s", "b")).__name__ == "SlackWebhookNotifier"


def test_a_run_past_its_deadline_sends_an_alert(smtp):
    """The DAG's failure callback as Airflow calls it when a run outlives its dagrun_timeout
    (the scheduler's reason ``timed_out``)."""
    from retention.airflow.alerts import run_failed

    run_failed({"dag": load_dag(), "run_id": "scheduled__2026-11-20", "reason": "timed_out"})
    [message] = smtp.messages()
    assert message["Subject"] == "[retention] run past its deadline: retention_nightly scheduled__2026-11-20"
    assert "reason: timed_out" in text_of(message)


@pytest.mark.parametrize("dag_id", ["retention_nightly", "erasure_request", "replay_erasures", "policy_preview"])
def test_every_task_has_a_timeout_and_alerts_on_failure(dag_id):
    dag = load_dag(dag_id)
    for task in dag.tasks:
        assert task.execution_timeout is not None and task.execution_timeout <= timedelta(hours=6), task.task_id
        assert task.on_failure_callback, task.task_id
    # erasure_request alerts per task only: a run-level callback re-validates its address param.
    assert dag.on_failure_callback or dag_id == "erasure_request"
    if dag_id == "retention_nightly":
        assert timedelta(hours=1) <= dag.dagrun_timeout < timedelta(days=1)  # before the next night is due


def test_timeouts_are_configurable_and_a_bad_one_is_named(monkeypatch):
    from retention.airflow import alerts as alerts_
    from retention.config import ConfigError

    monkeypatch.setenv("RETENTION_TASK_TIMEOUT", "PT90M")
    assert alerts_.task_timeout() == timedelta(minutes=90)
    monkeypatch.setenv("RETENTION_TASK_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match="RETENTION_TASK_TIMEOUT"):
        alerts_.task_timeout()


@pytest.mark.airflow
def test_a_stuck_quarantine_alarm_sends_an_alert_with_its_count(smtp, audience, retention_home, tmp_path, monkeypatch):  # noqa: F811
    from retention.config import DEFAULT_POLICY

    policy = tmp_path / "policy.yaml"
    policy.write_text(DEFAULT_POLICY.read_text().replace("quarantine_alarm_after: 7", "quarantine_alarm_after: 1"))
    monkeypatch.setenv("RETENTION_POLICY_FILE", str(policy))
    assert run_night(21).state == "success"  # night 1: quarantined, not yet stuck
    dr = run_night(22)
    assert dr.state == "failed" and task_states(dr)["report"] == "failed", task_states(dr)
    alarm = [(s, b) for s, b in alerts(smtp, dr) if "stuck-quarantine alarm" in s]
    assert len(alarm) == 1, alerts(smtp, dr)
    subject, body = alarm[0]
    assert "retention_nightly" in subject and "report" in subject
    assert "quarantine alarm: 1 record stuck in quarantine for more than 1 night" in body, body
    assert audience.ids["stuck"] not in body
