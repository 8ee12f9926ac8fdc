"""retention_nightly end to end for the newsletter: real Airflow runs (dag.test) against the
Mailchimp stand-in over real HTTP, with faults, dry run, the plan guard, and no personal data
in logs, XComs, the ledger or the report."""

from __future__ import annotations

import json
from datetime import datetime

import pandas as pd
import pytest
import requests

from airflow_run import run_dag, task_states, xcom_values
from retention.store.ledger import Ledger
from retention_dev.standins.mailchimp_data import generate_members
from retention_dev.standins.process import StandIn

SEED = 11
MEMBERS = 1500
NOW = "2026-11-20T12:00:00+00:00"
KEY = "standin-key-us0"
GONE = ("unsubscribed", "cleaned", "archived")


@pytest.fixture
def mailchimp(tmp_path, monkeypatch, retention_home):
    standin = StandIn(
        "mailchimp", "--port", "0", "--state-file", str(tmp_path / "mc.state"), "--members", str(MEMBERS),
        "--seed", str(SEED), "--now", NOW, "--api-key", KEY,
    ).start()
    monkeypatch.setenv(
        "AIRFLOW_CONN_RETENTION_MAILCHIMP",
        json.dumps({"conn_type": "retention_mailchimp", "host": f"{standin.base_url}/3.0", "password": KEY, "extra": {"list_id": "demo-list"}}),
    )
    yield standin
    standin.stop()


def stats(standin) -> dict:
    return requests.get(f"{standin.base_url}/_standin/stats", timeout=10).json()


def faults(standin, **spec) -> None:
    requests.post(f"{standin.base_url}/_standin/faults", json=spec, timeout=10).raise_for_status()


def all_members(standin) -> dict[str, str]:
    out, offset = {}, 0
    while True:
        page = requests.get(
            f"{standin.base_url}/3.0/lists/demo-list/members",
            params={"count": 1000, "offset": offset, "fields": "members.id,members.status,total_items"},
            auth=("x", KEY), timeout=30,
        ).json()
        out.update({m["id"]: m["status"] for m in page["members"]})
        offset += 1000
        if offset >= page["total_items"]:
            return out


def ledger_rows(home) -> list[dict]:
    """The entries as the ledger reads them (a batch handed over without its outcomes booked: ``submitted``)."""
    ledger = Ledger(f"sqlite:///{home / 'ledger.db'}")
    try:
        return ledger.entries()
    finally:
        ledger.engine.dispose()


def expected_due(members_before: dict[str, str]) -> set[str]:
    return {h for h, s in members_before.items() if s in GONE}


def assert_only_due_erased(before: dict[str, str], after: dict[str, str]) -> None:
    assert not {s for s in after.values()} & set(GONE), "an unsubscribed/cleaned/archived member survived"
    for h, status in before.items():
        if status in ("subscribed", "transactional"):
            assert after.get(h) == status, "a subscribed member was touched"
    # Nothing disappeared that was not due: everything gone was unsubscribed/cleaned/archived or old pending.
    vanished = set(before) - set(after)
    assert {before[h] for h in vanished} <= {*GONE, "pending"}


@pytest.mark.airflow
def test_nightly_run_erases_due_members_once_and_second_run_nothing(mailchimp, retention_home, capfd):
    before = all_members(mailchimp)
    dr = run_dag({"systems": ["newsletter"]})
    assert dr.state == "success", task_states(dr)
    after = all_members(mailchimp)
    assert_only_due_erased(before, after)
    erased = set(before) - set(after)
    assert expected_due(before) <= erased
    s = stats(mailchimp)
    assert s["permanent_deletes"] == len(erased)
    assert s["archives"] == 0, "the archiving DELETE must never be used"
    assert s["max_in_flight"] <= 10

    rows = ledger_rows(retention_home)
    assert len(rows) == len(erased)
    assert {r["status"] for r in rows} == {"erased"}
    assert all(r["completed_at"] and r["policy_version"] and len(r["record_key"]) == 32 for r in rows)
    assert not {r["record_key"] for r in rows} & set(before), "the ledger must hold pseudonyms, not subscriber hashes"

    report = json.loads((retention_home / "reports" / "latest.json").read_text())
    assert report["state"] == "success"
    per_rule = report["ledger"]["newsletter"]
    assert sum(v.get("erased", 0) for v in per_rule.values()) == len(erased)

    # No seeded e-mail address or name anywhere we leave text behind.
    members = generate_members(MEMBERS, seed=SEED, now=datetime.fromisoformat(NOW))
    emails = {m["email_address"].lower() for m in members}
    names = {m["full_name"].lower() for m in members}
    out, err = capfd.readouterr()
    texts = {
        "task output": (out + err).lower(),
        "xcom": " ".join(xcom_values(dr)).lower(),
        "ledger": json.dumps(rows, default=str).lower(),
        "report": "\n".join(p.read_text() for p in (retention_home / "reports").iterdir()).lower(),
    }
    for where, text in texts.items():
        assert not [e for e in emails if e in text], f"an e-mail address leaked into the {where}"
        assert not [n for n in names if n in text], f"a name leaked into the {where}"
        assert not [h for h in erased if h in text], f"a subscriber hash leaked into the {where}"

    dr2 = run_dag({"systems": ["newsletter"]})
    assert dr2.state == "success", task_states(dr2)
    assert stats(mailchimp)["permanent_deletes"] == len(erased), "the second run erased something"
    assert len(ledger_rows(retention_home)) == len(erased)


@pytest.mark.airflow
def test_faults_still_erase_every_planned_member_exactly_once(mailchimp, retention_home):
    before = all_members(mailchimp)
    faults(mailchimp, throttle_next=40, error_next=25, drop_next=15, match="delete-permanent")
    dr = run_dag({"systems": ["newsletter"]})
    assert dr.state == "success", task_states(dr)
    after = all_members(mailchimp)
    assert_only_due_erased(before, after)
    erased = set(before) - set(after)
    s = stats(mailchimp)
    assert s["throttled_injected"] == 40 and s["errors_injected"] == 25 and s["drops"] == 15
    assert s["permanent_deletes"] == len(erased), "a member was deleted twice or a deletion was lost"
    rows = ledger_rows(retention_home)
    assert len(rows) == len(erased)
    assert {r["status"] for r in rows} <= {"erased", "already_gone"}


@pytest.mark.airflow
def test_dry_run_erases_nothing(mailchimp, retention_home):
    before = all_members(mailchimp)
    dr = run_dag({"systems": ["newsletter"], "dry_run": True})
    assert dr.state == "success", task_states(dr)
    assert all_members(mailchimp) == before
    assert stats(mailchimp)["permanent_deletes"] == 0
    assert ledger_rows(retention_home) == []
    report = json.loads((retention_home / "reports" / "latest.json").read_text())
    assert report["dry_run"] is True
    assert sum(report["systems"]["newsletter"]["erase"]["would"].values()) >= len(expected_due(before))


@pytest.mark.airflow
def test_plan_guard_halts_the_run_before_any_erasure(mailchimp, retention_home):
    before = all_members(mailchimp)
    dr = run_dag({"systems": ["newsletter"], "max_plan_share": 0.01})
    assert dr.state == "failed"
    states = task_states(dr)
    assert states["newsletter.validate"] == "failed"
    assert states["newsletter.erase"] == "upstream_failed"
    assert all_members(mailchimp) == before
    assert stats(mailchimp)["permanent_deletes"] == 0
    assert ledger_rows(retention_home) == []
    validation = json.loads((retention_home / "reports" / "latest.json").read_text())
    assert validation["systems"]["newsletter"]["validation"] == "failed"


@pytest.mark.airflow
def test_a_halted_runs_staging_is_owner_only_and_purged_after_the_configured_days(mailchimp, retention_home, monkeypatch):
    """A run halted by the plan guard leaves its staging (subscriber hashes: MD5s of addresses)
    for diagnosis, readable by the owner only; a nightly run after RETENTION_STAGING_KEEP_DAYS
    purges it and says so in its report, and keeps a younger one."""
    import os
    import stat
    import time

    halted = run_dag({"systems": ["newsletter"], "max_plan_share": 0.01})
    assert halted.state == "failed"
    left = [p for p in (retention_home / "staging").glob("*/*") if p.is_dir()]
    assert len(left) == 1, left
    for path in [left[0], *left[0].rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path.relative_to(retention_home)} is readable by others ({oct(mode)})"
    young = left[0].parent / "a_younger_halted_run"
    (young / "newsletter").mkdir(parents=True)

    monkeypatch.setenv("RETENTION_STAGING_KEEP_DAYS", "7")
    old = time.time() - 8 * 86400
    for path in [*left[0].rglob("*"), left[0]]:
        os.utime(path, (old, old))
    dr = run_dag({"systems": ["newsletter"], "dry_run": True})
    assert dr.state == "success", task_states(dr)
    assert not left[0].exists() and young.exists()
    report = json.loads((retention_home / "reports" / "latest.json").read_text())
    assert report["staging_purged"] == 1


# --- pipeline steps called directly (no Airflow) ------------------------------------------

def _adapter(standin):
    from retention.systems.newsletter.adapter import NewsletterAdapter
    from retention.systems.newsletter.client import MailchimpClient

    return NewsletterAdapter(MailchimpClient(KEY, base_url=f"{standin.base_url}/3.0"), "demo-list")


def _prepare(standin, run_id: str, adapter=None):
    from retention.runs import nightly as pipeline

    run = pipeline.RunInfo.from_dict(pipeline.open_run("test", run_id, None, dry_run=False, max_plan_share=0.5))
    pipeline.extract(run, "newsletter", adapter or _adapter(standin))
    pipeline.plan(run, "newsletter")
    pipeline.validate(run, "newsletter")
    return run


class KilledAfter:
    """An adapter whose task 'dies' right after its n-th batch reached the provider."""

    def __init__(self, inner, batches: int):
        self.inner, self.left = inner, batches
        self.system, self.record_types, self.erase_batch = inner.system, inner.record_types, 40

    def erase(self, record_type, action, ids, *recheck):
        outcomes = list(self.inner.erase(record_type, action, ids, *recheck))  # the batch reached the provider
        self.left -= 1
        if self.left == 0:
            raise KeyboardInterrupt("task killed")  # before the engine heard of its outcomes
        yield from outcomes

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_killed_erase_resumes_without_repeating_or_losing_work(mailchimp, retention_home):
    from retention.runs import nightly as pipeline

    before = all_members(mailchimp)
    run = _prepare(mailchimp, "killed")
    planned = len(run.staging.read_frame("newsletter", "plan"))
    killer = KilledAfter(_adapter(mailchimp), batches=2)
    with pytest.raises(KeyboardInterrupt):
        pipeline.erase(run, "newsletter", killer)
    rows = ledger_rows(retention_home)
    assert len(rows) == planned, "the write-ahead entries must all be there before the kill"
    # The killed batch was handed to the provider: marked submitted before it went.
    assert {r["status"] for r in rows} == {"erased", "submitted", "planned"}
    assert sum(r["status"] == "submitted" for r in rows) == 40
    erased_before_kill = stats(mailchimp)["permanent_deletes"]
    assert erased_before_kill == 80  # two batches of 40 reached the provider

    resumed = _adapter(mailchimp)
    resumed.erase_batch = 40
    pipeline.erase(run, "newsletter", resumed)
    pipeline.verify(run, "newsletter", resumed)
    rows = ledger_rows(retention_home)
    assert len(rows) == planned
    assert {r["status"] for r in rows} <= {"erased", "already_gone"}
    # The killed batch went through before the kill: booked to this run as erased, not as
    # already gone, with a detail saying so.
    assert not any(r["status"] == "already_gone" for r in rows)
    by_killed = [r for r in rows if r["detail"] == "erased by an earlier attempt of this run, killed before it heard back"]
    assert len(by_killed) == 40 and {r["status"] for r in by_killed} == {"erased"}
    assert stats(mailchimp)["permanent_deletes"] == planned, "a member was deleted twice or not at all"
    assert_only_due_erased(before, all_members(mailchimp))


class Corrupting:
    """Hands the pipeline a few malformed records, as a misbehaving provider might."""

    def __init__(self, inner, victims: list[str]):
        self.inner, self.victims = inner, victims
        self.system, self.record_types, self.erase_batch = inner.system, inner.record_types, inner.erase_batch

    def _corrupting(self, write):
        def corrupt(record_type, frame):
            no_email, bad_time, duplicate = self.victims
            frame = frame.copy()
            frame.loc[frame["record_id"] == no_email, "has_email"] = False
            frame.loc[frame["record_id"] == bad_time, "last_changed"] = pd.NaT
            dup = frame[frame["record_id"] == duplicate]
            write(record_type, pd.concat([frame, dup], ignore_index=True))

        return corrupt

    def extract(self, write, now):
        self.inner.extract(self._corrupting(write), now)

    def extract_changes(self, write, now, cursor):
        # The nightly run reads the newsletter through its change feed (the first night: all).
        return self.inner.extract_changes(self._corrupting(write), now, cursor)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_malformed_records_are_quarantined_counted_and_never_erased(mailchimp, retention_home):
    from retention.runs import nightly as pipeline

    before = all_members(mailchimp)
    victims = sorted(h for h, s in before.items() if s == "unsubscribed")[:3]
    adapter = Corrupting(_adapter(mailchimp), victims)
    run = _prepare(mailchimp, "malformed", adapter)
    summary = run.staging.read_json("newsletter", "plan")
    assert summary["quarantined"]["newsletter_member"] == {
        "no e-mail address": 1,
        "missing or invalid last_changed": 1,
        "duplicate key": 2,
    }
    pipeline.erase(run, "newsletter", adapter)
    pipeline.verify(run, "newsletter", adapter)
    rep = pipeline.report(run, ("newsletter",))
    assert rep["state"] == "success"
    after = all_members(mailchimp)
    assert set(victims) <= set(after), "a quarantined record was erased"
    report = json.loads((retention_home / "reports" / "latest.json").read_text())
    assert report["systems"]["newsletter"]["quarantined"]["newsletter_member"]["duplicate key"] == 2
    assert not set(victims) & {r["record_key"] for r in ledger_rows(retention_home)}


def test_a_member_who_subscribes_again_between_plan_and_erase_is_kept(mailchimp, retention_home):
    """The plan is made; then two planned members subscribe again (Mailchimp's PATCH). Right
    before the batch the erase step lists what changed since the extract and the domain judges
    it: both are kept (deferred, with the reason), everyone else planned is erased."""
    from retention.runs import nightly as pipeline

    run = _prepare(mailchimp, "resubscribed")
    planned = run.staging.read_frame("newsletter", "plan")
    back = sorted(planned.loc[planned["rule_id"] == "newsletter-unsubscribed", "record_id"])[:2]
    for h in back:
        resp = requests.patch(f"{mailchimp.base_url}/3.0/lists/demo-list/members/{h}", json={"status": "subscribed"},
                              auth=("x", KEY), timeout=30)
        assert resp.status_code == 200 and resp.json()["status"] == "subscribed"
    pipeline.erase(run, "newsletter", _adapter(mailchimp))
    pipeline.verify(run, "newsletter", _adapter(mailchimp))
    after = all_members(mailchimp)
    assert {after.get(h) for h in back} == {"subscribed"}, "a member who subscribed again was erased"
    assert not set(planned["record_id"]) - set(back) & set(after), "a planned member who did not change was kept"
    rows = {r["record_key"]: r for r in ledger_rows(retention_home)}
    kept = [rows[k] for k in planned.loc[planned["record_id"].isin(back), "record_key"]]
    assert {(r["status"], r["detail"]) for r in kept} == {("deferred", "protected now (an active relationship since the plan)")}
    assert stats(mailchimp)["permanent_deletes"] == len(planned) - 2


def test_a_plan_older_than_the_configured_age_is_not_erased(mailchimp, retention_home, monkeypatch):
    """An erase task retried or cleared long after its plan refuses the plan: here every plan is
    too old (RETENTION_MAX_PLAN_AGE of zero). Steps first, then a real Airflow run, whose erase
    task fails at once (no retry) and whose run fails, with nothing erased."""
    from retention.checks.validation import PlanRejected
    from retention.runs import nightly as pipeline

    before = all_members(mailchimp)
    run = _prepare(mailchimp, "too_old")
    monkeypatch.setenv("RETENTION_MAX_PLAN_AGE", "PT0S")
    with pytest.raises(PlanRejected, match="older than RETENTION_MAX_PLAN_AGE"):
        pipeline.erase(run, "newsletter", _adapter(mailchimp))
    assert ledger_rows(retention_home) == [] and all_members(mailchimp) == before
    # The refused run freed the system: the next run does not wait for it.

    dr = run_dag({"systems": ["newsletter"], "max_plan_share": 0.5})
    states = task_states(dr)
    assert dr.state == "failed" and states["newsletter.erase"] == "failed", states
    assert all_members(mailchimp) == before and stats(mailchimp)["permanent_deletes"] == 0


@pytest.mark.airflow
def test_a_backlog_over_the_erase_budget_is_carried_over_and_cleared_by_the_next_runs(mailchimp, retention_home, monkeypatch):
    """Issue 12, item 3: a first night over more than its erase budget (RETENTION_ERASE_BUDGET
    of 2 s, the stand-in slowed to half a second a deletion, batches of 20) stops erasing when
    the budget is spent and succeeds: the rest is booked carried_over, the report says so and
    when the backlog will be cleared. The next night (a real Airflow run, a tight plan guard)
    takes the backlog first, the guard not counting it as new, and clears it: each member
    deleted exactly once, none missed."""
    from retention.runs import nightly as pipeline

    before = all_members(mailchimp)
    due = expected_due(before)
    monkeypatch.setenv("RETENTION_ERASE_BUDGET", "PT2S")
    faults(mailchimp, slow_ms=500, match="delete-permanent")  # 20 a second over 10 connections
    run = _prepare(mailchimp, "night-1")
    adapter = _adapter(mailchimp)
    adapter.erase_batch = 20
    erase = pipeline.erase(run, "newsletter", adapter)
    pipeline.verify(run, "newsletter", adapter)
    assert pipeline.report(run, ("newsletter",))["state"] == "success"
    first = stats(mailchimp)["permanent_deletes"]
    assert 0 < first < len(due) and erase["carried_over"] > 0 and erase["outcomes"]["erased"] == first, (first, erase)
    assert erase["seconds"] < 2 + 3, f"the budget of 2 s was overrun: {erase}"
    assert erase["budget_seconds"] == 2 and erase["backlog_nights"] >= 1 and erase["erased_per_hour"] > 0
    report = json.loads((retention_home / "reports" / "latest.json").read_text())
    assert report["systems"]["newsletter"]["erase"]["carried_over"] == erase["carried_over"]
    text = next((retention_home / "reports").glob("test__night-1.txt")).read_text()
    assert f"carried over to the next run: {erase['carried_over']}" in text
    assert {r["status"] for r in ledger_rows(retention_home)} == {"erased", "carried_over"}

    faults(mailchimp)  # the next night is quick again; a tight guard passes: the backlog is not new
    monkeypatch.setenv("RETENTION_ERASE_BUDGET", "PT10M")
    dr2 = run_dag({"systems": ["newsletter"], "max_plan_share": 0.05})
    assert dr2.state == "success", task_states(dr2)
    after = all_members(mailchimp)
    assert_only_due_erased(before, after)
    assert due <= set(before) - set(after), "a due member was missed"
    assert stats(mailchimp)["permanent_deletes"] == len(set(before) - set(after)), "a member was deleted twice"
    rows = ledger_rows(retention_home)
    erased_keys = [r["record_key"] for r in rows if r["status"] == "erased"]
    assert len(erased_keys) == len(set(erased_keys)) == len(set(before) - set(after))
    latest = json.loads((retention_home / "reports" / "latest.json").read_text())
    assert latest["systems"]["newsletter"]["erase"]["carried_over"] == 0
