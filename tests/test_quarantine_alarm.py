"""Stuck-quarantine alarm (issue 10, item 6): the ledger keeps, per system, record type and
pseudonym, the first and last night a record was seen quarantined; a record quarantined on more
than ``quarantine_alarm_after`` nights fails the nightly run's quality gate after its erasures.

Ledger tests on SQLite and PostgreSQL; the alarm through real Airflow runs over several nights
against the Mailchimp stand-in."""

from __future__ import annotations

import json
import time
from datetime import UTC, date, datetime

import pytest
import sqlalchemy as sa
from test_ledger import fresh_pg, ledger, reset_schema, schema_diff  # noqa: F401 - fixtures

from retention.store import migrations
from retention.store.ledger import Ledger

NOW = datetime(2026, 11, 25, tzinfo=UTC)
REASON = "missing or invalid last_changed"


def rows(*keys, record_type="newsletter_member", reason=REASON):
    return [(record_type, k, reason) for k in keys]


def test_nights_are_counted_per_record_and_a_record_that_left_drops_out(ledger):  # noqa: F811
    ledger.observe_quarantine("newsletter", "r1", date(2026, 11, 1), rows("a", "b"))
    ledger.observe_quarantine("crm", "c1", date(2026, 11, 1), rows("x", record_type="crm_invoice", reason="no clock for the rule that applies"))
    ledger.observe_quarantine("newsletter", "r2", date(2026, 11, 2), rows("a"))
    ledger.observe_quarantine("newsletter", "r2", date(2026, 11, 2), rows("a"))  # a retried plan task
    ledger.observe_quarantine("newsletter", "r3", date(2026, 11, 3), rows("a", "c"))
    seen = {r["record_key"]: r for r in ledger.quarantined("newsletter")}
    assert set(seen) == {"a", "c"}, "b left quarantine (fixed or erased) and drops out"
    assert (seen["a"]["nights"], seen["a"]["first_night"], seen["a"]["last_night"]) == (3, date(2026, 11, 1), date(2026, 11, 3))
    assert (seen["a"]["first_run_id"], seen["a"]["last_run_id"]) == ("r1", "r3")
    assert seen["c"]["nights"] == 1
    assert ledger.stuck_in_quarantine(("newsletter",), more_than=2) == {"newsletter": {"newsletter_member": {REASON: 1}}}
    assert ledger.stuck_in_quarantine(("newsletter",), more_than=3) == {}
    # The CRM's records are another system's: the newsletter's nights neither count nor drop them.
    assert ledger.stuck_in_quarantine(("crm", "newsletter"), more_than=0) == {
        "crm": {"crm_invoice": {"no clock for the rule that applies": 1}},
        "newsletter": {"newsletter_member": {REASON: 2}},
    }
    # A backfill night before the first one counts too; one inside the range seen does not again.
    ledger.observe_quarantine("newsletter", "b0", date(2026, 10, 31), rows("a", "c"))
    seen = {r["record_key"]: r for r in ledger.quarantined("newsletter")}
    assert (seen["a"]["nights"], seen["a"]["first_night"], seen["a"]["first_run_id"]) == (4, date(2026, 10, 31), "b0")
    # Nothing quarantined any more: the system's rows go.
    ledger.observe_quarantine("newsletter", "r4", date(2026, 11, 4), [])
    assert ledger.quarantined("newsletter") == []
    assert len(ledger.quarantined("crm")) == 1


def test_duplicate_keys_in_one_night_are_one_record(ledger):  # noqa: F811
    ledger.observe_quarantine("newsletter", "r1", date(2026, 11, 1), rows("d", "d", reason="duplicate key"))
    assert [(r["record_key"], r["nights"]) for r in ledger.quarantined("newsletter")] == [("d", 1)]


def test_a_ledger_at_0004_gets_the_quarantine_table_and_keeps_its_rows(empty_db):
    engine = sa.create_engine(empty_db)
    migrations.upgrade(engine, "0004")
    assert "quarantine_seen" not in sa.inspect(engine).get_table_names()
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO legal_hold (record_type, record_key, reason, created_at) VALUES ('crm_contact', 'k7', 'audit', :t)"), {"t": NOW})
    led = Ledger(engine)
    assert migrations.stored_versions(engine) == {migrations.head()}  # 0005 and every later revision
    assert "quarantine_seen" in sa.inspect(engine).get_table_names()
    assert schema_diff(engine) == []
    assert [h["record_key"] for h in led.holds()] == ["k7"]
    led.observe_quarantine("newsletter", "r1", date(2026, 11, 1), rows("a"))
    assert len(led.quarantined("newsletter")) == 1


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db(request, tmp_path, fresh_pg):  # noqa: F811
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return fresh_pg("retention_ledger_fresh_q")


def test_a_hundred_thousand_quarantined_records_are_set_based(postgres_url_for):
    engine = sa.create_engine(postgres_url_for("retention_ledger_test"))
    reset_schema(engine)
    led = Ledger(engine)
    many = rows(*(f"k{i:06d}" for i in range(100_000)))
    statements: list[str] = []
    sa.event.listen(engine, "before_cursor_execute", lambda conn, cursor, sql, *rest: statements.append(sql))
    started = time.monotonic()
    led.observe_quarantine("newsletter", "r1", date(2026, 11, 1), many)
    led.observe_quarantine("newsletter", "r2", date(2026, 11, 2), many[:50_000])
    took = time.monotonic() - started
    assert led.stuck_in_quarantine(("newsletter",), more_than=1) == {"newsletter": {"newsletter_member": {REASON: 50_000}}}
    assert len(statements) < 40, f"{len(statements)} statements: not set-based; {took:.1f}s"


# --- through real Airflow runs against the Mailchimp stand-in ---------------------------------

STANDIN_NOW = datetime(2026, 11, 20, 12, tzinfo=UTC)
KEY = "standin-key-us0"
DAY = 86400


def _epoch(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp())


@pytest.fixture
def audience(tmp_path, monkeypatch, retention_home):
    """A small audience with: ``no_signup_old`` (pending, added by API: no signup, last changed
    60 days ago), ``no_signup_new`` (the same, 5 days ago), ``due_night_3`` (pending, signed up so
    that its 30 days end between the second and third night) and ``stuck`` (unsubscribed, but no
    ``last_changed``: quarantined, night after night)."""
    from retention_dev.standins.mailchimp_audience import Audience
    from retention_dev.standins.mailchimp_data import NO_TIME, STATUS_CODE, generate_columns
    from retention_dev.standins.process import StandIn

    cols = generate_columns(200, seed=5, now=STANDIN_NOW)
    subscribed = [i for i in range(len(cols)) if cols.status[i] == STATUS_CODE["subscribed"]]
    picks = dict(zip(("no_signup_old", "no_signup_new", "due_night_3", "stuck"), subscribed[:4]))
    now_s = int(STANDIN_NOW.timestamp())
    for name, status, signup, changed in (
        ("no_signup_old", "pending", NO_TIME, now_s - 60 * DAY),
        ("no_signup_new", "pending", NO_TIME, now_s - 5 * DAY),
        ("due_night_3", "pending", _epoch("2026-10-23T12:00:00+00:00"), _epoch("2026-10-23T12:00:00+00:00")),
        ("stuck", "unsubscribed", now_s - 400 * DAY, NO_TIME),
    ):
        row = picks[name]
        cols.status[row], cols.timestamp_signup[row], cols.last_changed[row] = STATUS_CODE[status], signup, changed
    state = tmp_path / "mc.state.npz"
    Audience(cols, "demo-list").save(state)
    standin = StandIn("mailchimp", "--port", "0", "--state-file", str(state), "--api-key", KEY).start()
    monkeypatch.setenv(
        "AIRFLOW_CONN_RETENTION_MAILCHIMP",
        json.dumps({"conn_type": "retention_mailchimp", "host": f"{standin.base_url}/3.0", "password": KEY,
                    "extra": {"list_id": "demo-list"}}),
    )
    standin.ids = {name: cols.ids[row].decode() for name, row in picks.items()}
    yield standin
    standin.stop()


def member_statuses(standin) -> dict[str, str]:
    import requests

    page = requests.get(
        f"{standin.base_url}/3.0/lists/demo-list/members", params={"count": 1000, "fields": "members.id,members.status"},
        auth=("x", KEY), timeout=30,
    ).json()
    return {m["id"]: m["status"] for m in page["members"]}


def run_night(day: int, **conf):
    """retention_nightly for the newsletter as of Stockholm midnight starting 2026-11-<day> (a
    manual run's logical date; its data interval is that instant)."""
    import pendulum

    from airflow_run import ensure_metadata_db, load_dag

    ensure_metadata_db()
    return load_dag().test(
        logical_date=pendulum.datetime(2026, 11, day, tz="Europe/Stockholm"), run_conf={"systems": ["newsletter"], **conf},
    )


def latest_report(home) -> dict:
    return json.loads((home / "reports" / "latest.json").read_text())


@pytest.mark.airflow
def test_a_member_added_by_api_is_erased_by_the_fallback_clock(audience, retention_home):
    from airflow_run import task_states

    dr = run_night(21)
    assert dr.state == "success", task_states(dr)
    after = member_statuses(audience)
    assert audience.ids["no_signup_old"] not in after, "a pending member without signup stayed for ever"
    assert after[audience.ids["no_signup_new"]] == "pending", "the fallback period runs from the last change"
    rep = latest_report(retention_home)
    news = rep["systems"]["newsletter"]
    assert news["fallback_clock"] == {"newsletter-pending": 1}
    assert news["quarantined"] == {"newsletter_member": {"missing or invalid last_changed": 1}}
    assert rep["quality_gate"] == "passed" and rep["quarantine_alarm"] is None
    txt = next((retention_home / "reports").glob("retention_nightly__*.txt")).read_text()
    assert "planned by a fallback clock (the organisation's decision): {'newsletter-pending': 1}" in txt


@pytest.mark.airflow
def test_a_record_stuck_in_quarantine_fails_the_quality_gate_after_the_erasures(audience, retention_home, tmp_path, monkeypatch):
    from airflow_run import task_states
    from retention.config import DEFAULT_POLICY

    policy = tmp_path / "policy.yaml"
    policy.write_text(DEFAULT_POLICY.read_text().replace("quarantine_alarm_after: 7", "quarantine_alarm_after: 2"))
    monkeypatch.setenv("RETENTION_POLICY_FILE", str(policy))
    ids = audience.ids

    for day in (21, 22):  # nights 1 and 2: quarantined, not yet stuck
        dr = run_night(day)
        assert dr.state == "success", (day, task_states(dr))
        assert latest_report(retention_home)["quality_gate"] == "passed"
    assert ids["due_night_3"] in member_statuses(audience)

    dr = run_night(23)  # night 3: more than 2 nights
    states = task_states(dr)
    assert dr.state == "failed"
    assert states["report"] == "failed"
    assert {states[f"newsletter.{t}"] for t in ("extract", "index", "plan", "validate", "erase", "verify")} == {"success"}
    after = member_statuses(audience)
    assert ids["due_night_3"] not in after, "the alarm stopped the erasure of another record"
    assert after[ids["stuck"]] == "unsubscribed", "a quarantined record was erased"
    rep = latest_report(retention_home)
    assert rep["quality_gate"] == "failed" and rep["state"] == "success"
    assert rep["quarantine_alarm"]["total"] == 1 and rep["quarantine_alarm"]["after_nights"] == 2
    assert rep["quarantine_alarm"]["stuck"] == {"newsletter": {"newsletter_member": {REASON: 1}}}
    assert rep["quarantine_alarm"]["message"].startswith(
        "quarantine alarm: 1 record stuck in quarantine for more than 2 nights (1 newsletter_member)"
    )
    assert rep["ledger"]["newsletter"]["newsletter-pending"] == {"erased": 1}

    dr = run_night(24, dry_run=True)  # a dry run reports the alarm too
    assert dr.state == "failed" and task_states(dr)["report"] == "failed"
    rep = latest_report(retention_home)
    assert rep["dry_run"] and rep["quarantine_alarm"]["total"] == 1

    # The record is fixed in its system (a status change sets last_changed): it leaves
    # quarantine, drops out of the count, and the next night passes.
    import requests

    resp = requests.patch(f"{audience.base_url}/3.0/lists/demo-list/members/{ids['stuck']}", json={"status": "subscribed"},
                          auth=("x", KEY), timeout=30)
    assert resp.status_code == 200
    dr = run_night(25)
    assert dr.state == "success", task_states(dr)
    rep = latest_report(retention_home)
    assert rep["quality_gate"] == "passed" and not rep["systems"]["newsletter"]["quarantined"]
    assert Ledger(f"sqlite:///{retention_home / 'ledger.db'}").quarantined("newsletter") == []
