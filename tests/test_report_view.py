"""The report view's pages through a test client (issue 11, item 1): each DAG's report shape read
and shown, everything escaped, only readable DAGs shown, Data Docs served read-only and no
further, no page without Airflow's authentication. The real api-server and a real browser:
tests/test_report_view_browser.py."""

from __future__ import annotations

import json
import os
import time

import pytest
from fastapi.testclient import TestClient

NIGHTLY = "retention_nightly"


def nightly(run_id: str, *, dry_run=False, erased=None, held=None, due=None, guard=None, validation="passed", **extra) -> dict:
    erased = erased or {}
    ledger = {rule: {"erased": n} for rule, n in erased.items()}
    for rule, n in (held or {}).items():
        ledger.setdefault(rule, {})["held"] = n
    planned = due if due is not None else {f"{rule}/erase": n for rule, n in erased.items()}
    system = {
        "completed": validation == "passed", "extracted": {"newsletter_member": 300}, "quarantined": {"newsletter_member": {"missing or invalid last_changed": 2}},
        "planned": planned, "fallback_clock": {}, "validation": validation,
        "validation_checks": {"failed": [], "guard": guard}, "erase": {"dry_run": dry_run, "would": planned} if dry_run else {"dry_run": False, "outcomes": {}},
        "verify": None,
    }
    return {
        "run_id": run_id, "dag_id": NIGHTLY, "as_of": "2026-11-20T00:00:00+00:00", "dry_run": dry_run,
        "policy_version": "0c5627a73aa5f7e5", "policy_label": "2026-11-25", "state": "success" if validation == "passed" else "failed",
        "seconds": 3.1, "systems": {"newsletter": system}, "ledger": {} if dry_run else {"newsletter": ledger},
        "quality_gate": "passed", "quarantine_alarm": None, **extra,
    }


def request_report(run_id: str) -> dict:
    return {
        "dag_id": "erasure_request", "run_id": run_id, "request_key": "rk_5f1e2d", "as_of": "2026-11-21T09:00:00+00:00",
        "policy_version": "0c5627a73aa5f7e5", "policy_label": "2026-11-25", "dry_run": False, "rule_id": "erasure-request",
        "state": "failed", "outstanding": 2, "totals": {"erased": 5, "held": 1, "deferred": 2},
        "systems": {
            "crm": {"completed": True, "records": {"crm_contact": {"erased": 1}, "crm_invoice": {"held": 1}, "crm_note": {"erased": 3}}, "verified_gone": 4},
            "ticketing": {"completed": True, "records": {"zendesk_ticket": {"deferred": 1}, "zendesk_user": {"deferred": 1}}, "verified_gone": 0},
            "newsletter": {"completed": True, "records": {"newsletter_member": {"erased": 1}}, "verified_gone": 1},
        },
    }


def write(home, report: dict, folder: str = "reports") -> None:
    out = home / folder
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{report.get('dag_id', 'policy_preview')}__{report.get('run_id', report.get('preview_id'))}".replace(":", "_").replace("+", "_")
    path = out / f"{stem}.json"
    path.write_text(json.dumps(report))
    write.clock = getattr(write, "clock", time.time() - 1000) + 10  # written in the order given
    os.utime(path, (write.clock, write.clock))


@pytest.fixture
def client(retention_home):
    from airflow.api_fastapi.core_api.security import get_user

    from retention.airflow import report_view

    app = report_view.create_app()
    allowed = {NIGHTLY, "erasure_request", "policy_preview", "replay_erasures"}
    app.dependency_overrides[get_user] = lambda: object()
    app.dependency_overrides[report_view.dag_filter] = lambda: (lambda dag_id: dag_id in allowed)
    with TestClient(app, root_path="/retention/reports") as c:
        c.allowed = allowed
        yield c


def test_the_list_shows_every_dags_runs_and_a_chart_of_erasures_and_backlog(client, retention_home):
    write(retention_home, nightly("scheduled__2026-11-18", dry_run=True, due={"newsletter-pending/erase": 15, "newsletter-unsubscribed/erase": 26}))
    write(retention_home, nightly("scheduled__2026-11-19", erased={"newsletter-pending": 15, "newsletter-unsubscribed": 26}, held={"crm-invoice": 1}))
    write(retention_home, nightly("scheduled__2026-11-20", erased={"newsletter-pending": 2}))
    write(retention_home, request_report("manual__2026-11-21"))
    page = client.get("/")
    assert page.status_code == 200, page.text
    assert page.headers["content-security-policy"].startswith("default-src 'none'")
    html = page.text
    for run in ("scheduled__2026-11-18", "scheduled__2026-11-19", "scheduled__2026-11-20", "manual__2026-11-21"):
        assert run in html
    assert "DRY RUN" in html and "would erase 41" in html
    assert "erased 41, held 1" in html
    # The chart: one bar per rule and run that erased, the backlog line through every nightly run.
    assert html.count("<svg") == 1
    assert html.count("class='bar'") == 3
    assert "newsletter-pending erased 15" in html and "newsletter-pending erased 2" in html
    assert html.count("<circle") == 3 and ": due 41</title>" in html and ": due 2</title>" in html
    # Runs newest first; a link to each run's own page.
    table = html[html.index("<table class='runs'"):]
    assert table.index("manual__2026-11-21") < table.index("scheduled__2026-11-20") < table.index("scheduled__2026-11-18")
    assert "/retention/reports/runs/erasure_request/manual__2026-11-21" in html


def test_a_run_page_has_its_facts_counts_reasons_and_validation_numbers(client, retention_home):
    guard = {"planned": 41, "allowed": 3, "extracted": 300, "max_share": 0.01, "success": False}
    write(retention_home, nightly("manual__guard", due={"newsletter-pending/erase": 41}, guard=guard, validation="failed",
                                  carried_over={"newsletter": 12}, data_docs={"newsletter": "manual__guard/newsletter/index.html"}))
    html = client.get("/runs/retention_nightly/manual__guard").text
    for text in ("0c5627a73aa5f7e5 (2026-11-25)", "2026-11-20 00:00:00 UTC", "erasing", "failed",
                 "41 planned, 3 allowed of 300 extracted", "Carried-over work", "newsletter_member", "quarantined",
                 "missing or invalid last_changed", "newsletter: plan guard 41 planned, 3 allowed"):
        assert text in html, text
    assert "/retention/reports/data_docs/manual__guard/newsletter/index.html" in html
    assert "guard-failed" in html


def test_an_erasure_request_shows_counts_per_record_type_with_reasons(client, retention_home):
    write(retention_home, request_report("manual__req"))
    html = client.get("/runs/erasure_request/manual__req").text
    assert "record type" in html and "crm_invoice" in html and "zendesk_ticket" in html
    assert "a legal hold" in html and "not yet: a record it depends on" in html
    assert "rk_5f1e2d" in html and "2 deferred" in html
    assert "erased 5, held 1, deferred 2" in html  # the note's line


def test_a_preview_and_a_replay_are_shown_too(client, retention_home):
    write(retention_home, {
        "preview_id": "policy_preview__manual__p1", "created_at": "2026-11-22T10:00:00+00:00", "as_of": "2026-11-22T00:00:00+00:00",
        "erased": 0, "old": {"version": "aaa"}, "new": {"version": "bbb"}, "policy_changes": ["x"],
        "systems": {"crm": {"newly_erased": [{"rule": "crm-contact", "record_type": "crm_contact", "action": "erase", "count": 7, "keys": ["k1"]}],
                            "totals": {}, "guard": {"would_halt": True, "new_share": 0.2, "max_share": 0.05}}},
        "totals": {},
    }, folder="previews")
    write(retention_home, {
        "run_id": "manual__r1", "dag_id": "replay_erasures", "kind": "replay", "dry_run": False, "started": "2026-11-23T00:00:00+00:00",
        "finished": "2026-11-23T00:01:00+00:00", "state": "success",
        "systems": {"newsletter": {"completed": True, "extracted": {}, "totals": {}, "verify": None,
                                   "record_types": {"newsletter_member": {"found": 4, "replayed": 3, "left_alone_new": 1, "left_alone_undated": 0, "held": 0}}}},
    })
    html = client.get("/").text
    assert "policy_preview" in html and "manual__p1" in html and "replay_erasures" in html
    preview = client.get("/runs/policy_preview/manual__p1").text
    assert "PREVIEW" in preview and "aaa → bbb" in preview and "would halt" in preview and "20.0%" in preview
    replay = client.get("/runs/replay_erasures/manual__r1").text
    assert "created after the erasure" in replay and ">3<" in replay


def test_everything_from_a_report_is_escaped(client, retention_home):
    evil = "<script>alert(1)</script>"
    rep = nightly("manual__<b>x<i>", erased={evil: 1})
    rep["policy_label"] = "'\"><img src=x onerror=alert(1)>"
    write(retention_home, rep)
    for html in (client.get("/").text, client.get("/runs/retention_nightly/manual__<b>x<i>").text):
        assert "<script>" not in html and "<img" not in html and "<b>x<i>" not in html
        assert "&lt;script&gt;" in html


def test_runs_of_a_dag_the_user_may_not_read_are_not_shown(client, retention_home):
    client.allowed.discard("erasure_request")
    write(retention_home, request_report("manual__secret"))
    assert "manual__secret" not in client.get("/").text
    assert client.get("/runs/erasure_request/manual__secret").status_code == 403


def test_an_unknown_run_is_404_in_one_line(client, retention_home):
    page = client.get("/runs/retention_nightly/nope")
    assert page.status_code == 404 and "No report for run nope of retention_nightly" in page.text


def test_data_docs_are_served_and_nothing_outside_them(client, retention_home):
    docs = retention_home / "data_docs" / "run1" / "newsletter"
    docs.mkdir(parents=True)
    (docs / "index.html").write_text("<html>gx docs</html>")
    (retention_home / "ledger.db").write_text("secret")
    (retention_home / "data_docs" / "out").symlink_to(retention_home)
    assert client.get("/data_docs/run1/newsletter/index.html").text == "<html>gx docs</html>"
    for path in ("../ledger.db", "run1/../../ledger.db", "%2e%2e/ledger.db", "out/ledger.db", "run1", "/etc/passwd", "..%2fledger.db"):
        page = client.get(f"/data_docs/{path}")
        assert page.status_code == 404, (path, page.status_code)
        assert "secret" not in page.text


def test_without_a_login_every_page_is_refused(retention_home):
    from retention.airflow import report_view

    write(retention_home, nightly("manual__1", erased={"r": 1}))
    with TestClient(report_view.create_app()) as c:
        for path in ("/", "/runs/retention_nightly/manual__1", "/data_docs/x.html"):
            page = c.get(path)
            assert page.status_code == 401, path
            assert "manual__1" not in page.text and "Log in" in page.text


def test_the_note_says_dry_run_or_what_was_erased():
    from retention.airflow.run_reports import from_report, note_for

    assert note_for(from_report(nightly("a", dry_run=True, due={"r1/erase": 4}))) == "DRY RUN, nothing erased: would erase 4, quarantined 2"
    assert note_for(from_report(nightly("b", erased={"r1": 3}, held={"r2": 1}))) == "erased 3, held 1, quarantined 2"
    guard = {"planned": 41, "allowed": 3, "extracted": 300, "max_share": 0.01, "success": False}
    assert note_for(from_report(nightly("c", due={"r/erase": 41}, guard=guard, validation="failed"))) == (
        "erased 0, halted 41, quarantined 2, newsletter: plan guard 41 planned, 3 allowed"
    )
    assert note_for(None).startswith("no report")


def test_the_plugin_serves_the_app_links_it_from_the_menu_and_each_run_and_listens_for_run_ends():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "plugins" / "retention_reports.py"
    spec = importlib.util.spec_from_file_location("retention_reports_plugin", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    plugin = module.RetentionReportsPlugin
    [app] = plugin.fastapi_apps
    assert app["url_prefix"] == "/retention/reports"
    views = {v["destination"]: v for v in plugin.external_views}
    assert views["nav"]["href"] == "retention/reports/"
    assert views["dag_run"]["href"] == "retention/reports/runs/{DAG_ID}/{RUN_ID}"  # Airflow's UI fills these in
    from retention.airflow import run_notes

    assert plugin.listeners == [run_notes]
