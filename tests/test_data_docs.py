"""Great Expectations as its users expect it: each run's suites and validation results kept in a
GX project per run and system, with Data Docs the report names, nothing personal in any of it,
older runs' pruned, and GX's start-up noise kept out of the task log."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from retention import config
from retention.checks import data_docs, validation
from retention.domain.policy import load_policy

ROOT = Path(__file__).resolve().parents[1]
NOW = pd.Timestamp("2026-06-01", tz="UTC")
STEM = "retention_nightly__manual__2026-06-01T00:00:00+00:00"

# Bad rows carrying identifiers and addresses a careless result would list as unexpected values.
EMAILS = ["anna.svensson@example.org", "bo.ek+news@example.net", "chen.li@example.com"]
IDS = ["zq-crm-4711", "zq-crm-4712", "zq-tkt-0042"]


def failing_outcomes() -> list[validation.ValidationOutcome]:
    """Every suite fails on rows whose values are the ids and addresses above."""
    # Not ASCII ids: record_id itself is checked, not its fingerprints.
    ids = [f"é-{i}" for i in range(200)] + [f"é-{e}" for e in EMAILS] * 2
    n = len(ids)
    members = pd.DataFrame({
        "record_id": pd.Series(ids, dtype="string"),
        "status": pd.Series(["unsubscribed"] * n, dtype="string"),
        "last_changed": pd.Series([pd.Timestamp("2025-01-01", tz="UTC")] * n),
        "timestamp_signup": pd.Series([pd.Timestamp("2024-01-01", tz="UTC")] * n),
        "has_email": [True] * (n - 3) + [False] * 3,
    })
    extract = validation.validate_extract(members, "newsletter_member", NOW)

    policy = load_policy(config.DEFAULT_POLICY)
    plan_ids = [f"ok-{i}" for i in range(100)] + IDS * 2 + EMAILS
    m = len(plan_ids)
    check = pd.DataFrame({
        "record_id": pd.Series(plan_ids, dtype="string"),
        "record_key": pd.Series([f"k{i}" for i in range(m)], dtype="string"),
        "action": pd.Series(["erase"] * (m - 3) + [f"purge {e}" for e in EMAILS], dtype="string"),
        "rule_id": pd.Series(["newsletter-unsubscribed"] * (m - 3) + [f"rule of {e}" for e in EMAILS], dtype="string"),
        "deadline": pd.Series([pd.Timestamp("2026-01-01", tz="UTC")] * m),
        "status": pd.Series(["unsubscribed"] * (m - 2) + ["subscribed", "transactional"], dtype="string"),
        "erases_held_record": [False] * (m - 1) + [True],
    })
    plan = validation.validate_plan(check, "newsletter_member", policy, NOW.to_pydatetime())
    guard = validation.run_guard(90, 100, 0.25)
    return [extract, plan, guard]


def all_text(root: Path) -> str:
    return "\n".join(p.read_bytes().decode("utf-8", "replace") for p in root.rglob("*") if p.is_file()).lower()


def test_kept_suites_results_and_data_docs_hold_no_record_id_or_address(tmp_path):
    outcomes = failing_outcomes()
    assert not any(o.success for o in outcomes)
    failed = {(c["expectation"], c["column"]) for o in outcomes for c in o.failures()}
    # The bad rows are what fails: an unexpected-value list would name them.
    assert ("expect_column_values_to_be_unique", "record_id") in failed
    assert ("expect_column_values_to_be_in_set", "rule_id") in failed
    assert ("expect_column_values_to_not_be_in_set", "status") in failed

    index = data_docs.keep(outcomes, tmp_path, STEM, "newsletter")

    assert index == "retention_nightly__manual__2026-06-01T00_00_00_00_00/newsletter/gx/uncommitted/data_docs/local_site/index.html"
    project = tmp_path / index.split("/gx/")[0] / "gx"
    page = (tmp_path / index).read_text()
    for suite in ("extract_newsletter_member_suite", "plan_newsletter_member_suite", "plan_size_guard_suite"):
        assert suite in page
        assert (project / "expectations" / f"{suite}.json").is_file()
    results = [json.loads(p.read_text()) for p in (project / "uncommitted" / "validations").rglob("*.json")]
    assert len(results) == 3 and not any(r["success"] for r in results)
    counts = {
        (res["suite_name"], r["expectation_config"]["type"], r["expectation_config"]["kwargs"].get("column")):
            r["result"].get("unexpected_count")
        for res in results for r in res["results"] if not r["success"]
    }
    # The counts are kept: three addresses twice in the extract, three ids twice in the plan.
    assert counts[("extract_newsletter_member_suite", "expect_column_values_to_be_unique", "record_id")] == 6
    assert counts[("plan_newsletter_member_suite", "expect_column_values_to_be_unique", "record_id")] == 6
    assert counts[("plan_newsletter_member_suite", "expect_column_values_to_be_in_set", "rule_id")] == 3
    assert len(list((project / "uncommitted" / "data_docs" / "local_site" / "validations").rglob("*.html"))) == 3

    text = all_text(tmp_path)
    leaked = [v for v in (*EMAILS, *IDS) if v.lower() in text]
    assert not leaked, f"kept GX files name {leaked}"


def test_the_static_files_are_shared_and_a_second_run_builds_only_its_own_pages(tmp_path):
    outcomes = [validation.run_guard(10, 100, 0.25)]
    first = data_docs.keep(outcomes, tmp_path, "dag__run_1", "crm")
    first_pages = {p: p.stat().st_mtime_ns for p in tmp_path.joinpath("dag__run_1").rglob("*.html")}
    time.sleep(0.05)
    second = data_docs.keep(outcomes, tmp_path, "dag__run_2", "crm")
    assert first != second and (tmp_path / second).is_file()
    # The earlier run's pages are not rebuilt.
    assert {p: p.stat().st_mtime_ns for p in tmp_path.joinpath("dag__run_1").rglob("*.html")} == first_pages
    css = "gx/uncommitted/data_docs/local_site/static/styles/data_docs_default_styles.css"
    a, b = (tmp_path / run / "crm" / css for run in ("dag__run_1", "dag__run_2"))
    assert a.is_file() and os.path.samefile(a, b), "every site links the one copy of GX's static files"


def test_prune_removes_old_runs_only(tmp_path):
    outcomes = [validation.run_guard(10, 100, 0.25)]
    for run in ("dag__old", "dag__young", "dag__current_but_old"):
        data_docs.keep(outcomes, tmp_path, run, "newsletter")
    old = time.time() - 10 * 86400
    for run in ("dag__old", "dag__current_but_old"):
        for p in [*tmp_path.joinpath(run).rglob("*"), tmp_path / run]:
            os.utime(p, (old, old), follow_symlinks=False)
    assert data_docs.prune(tmp_path, 7, keep="dag__current_but_old") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_static", "dag__current_but_old", "dag__young"]
    assert data_docs.prune(tmp_path / "nothing_here", 7) == 0


@pytest.mark.parametrize("value", ["soon", "0", "0.5", "5000", "nan"])
def test_a_bad_data_docs_keep_days_is_one_clear_error(monkeypatch, value):
    monkeypatch.setenv("RETENTION_DATA_DOCS_KEEP_DAYS", value)
    with pytest.raises(config.ConfigError, match=r"^RETENTION_DATA_DOCS_KEEP_DAYS '.*': give "):
        config.data_docs_keep_days()


def test_the_data_docs_keep_days_default(monkeypatch):
    monkeypatch.delenv("RETENTION_DATA_DOCS_KEEP_DAYS", raising=False)
    assert config.data_docs_keep_days() == config.DEFAULT_DATA_DOCS_KEEP_DAYS == 90
    monkeypatch.setenv("RETENTION_DATA_DOCS_KEEP_DAYS", "30")
    assert config.data_docs_keep_days() == 30


# --- the validate step's log, in a fresh process (as Airflow runs a task: GX not yet loaded) ----

GUARD_TRIPPED = """
import logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(levelname)s %(name)s %(message)s")
logging.captureWarnings(True)
import warnings; warnings.simplefilter("default")
import pandas as pd
from retention.runs import nightly
run = nightly.RunInfo.from_dict(nightly.open_run("retention_nightly", "manual__guard", None, dry_run=False, max_plan_share=0.01))
n = 400
ids = pd.Series([f"{i:032x}" for i in range(n)], dtype="string")
frame = pd.DataFrame({
    "record_id": ids,
    "status": pd.Series(["unsubscribed"] * n, dtype="string"),
    "last_changed": pd.Series([pd.Timestamp("2020-01-01", tz="UTC")] * n),
    "timestamp_signup": pd.Series([pd.Timestamp("2019-01-01", tz="UTC")] * n),
    "has_email": [True] * n,
})
writer = run.staging.extract_writer("newsletter")
writer.declare("newsletter_member")
writer.write("newsletter_member", frame)
run.staging.write_json("newsletter", "extract", {"extracted": writer.close(), "extracted_at": pd.Timestamp.now(tz="UTC").isoformat()})
print("--- plan")
nightly.plan(run, "newsletter")
print("--- validate")
try:
    nightly.validate(run, "newsletter")
except nightly.PlanRejected as exc:
    print("PlanRejected:", exc)
"""


def test_the_validate_log_shows_our_lines_and_the_guards_numbers_not_gx_noise(retention_home):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", GUARD_TRIPPED], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout.split("--- validate\n", 1)[1]
    lines = log.splitlines()
    assert any("newsletter: validation failed (plan_size_guard: 400 planned, 4 allowed of 400 extracted)" in line for line in lines), log
    assert any("Data Docs of the failed validation: retention_nightly__manual__guard/newsletter/gx/" in line for line in lines), log
    noise = [line for line in lines + out.stderr.splitlines() if "great_expectations" in line or "Warning" in line]
    assert not noise, "GX noise in the validate log:\n" + "\n".join(noise[:20])
    assert len(lines) < 15, log  # our lines only: GX's start-up logs some 200

    (rel,) = [re.search(r"Data Docs of the failed validation: (\S+)", line)[1] for line in lines if "Data Docs of" in line]
    assert (retention_home / "data_docs" / rel).is_file()


# --- a real run: the report names the Data Docs, and the task log holds our lines, not GX's ----

MEMBERS = 600
KEY = "standin-key-us0"
RUN_DRY = """
import json, sys
from airflow_run import load_dag, task_states
dr = load_dag().test(run_conf={"systems": ["newsletter"], "dry_run": True})
print("STATE", dr.state, json.dumps(task_states(dr)))
"""


@pytest.fixture
def mailchimp(tmp_path, monkeypatch, retention_home):
    from retention_dev.standins.process import StandIn

    standin = StandIn(
        "mailchimp", "--port", "0", "--state-file", str(tmp_path / "mc.state"), "--members", str(MEMBERS),
        "--seed", "5", "--now", "2026-11-20T12:00:00+00:00", "--api-key", KEY,
    ).start()
    monkeypatch.setenv(
        "AIRFLOW_CONN_RETENTION_MAILCHIMP",
        json.dumps({"conn_type": "retention_mailchimp", "host": f"{standin.base_url}/3.0", "password": KEY, "extra": {"list_id": "demo-list"}}),
    )
    yield standin
    standin.stop()


@pytest.mark.airflow
def test_a_real_runs_report_names_its_data_docs_and_its_log_has_no_gx_noise(mailchimp, retention_home):
    from airflow_run import ensure_metadata_db
    from retention_dev.standins.mailchimp_data import generate_members

    ensure_metadata_db()
    # Its own process, as a task's: GX is loaded there for the first time, start-up and all.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ["PYTHONPATH"]])}
    out = subprocess.run([sys.executable, "-c", RUN_DRY], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    log = out.stdout + out.stderr
    assert out.returncode == 0 and "STATE success" in out.stdout, log[-4000:]

    report = json.loads((retention_home / "reports" / "latest.json").read_text())
    rel = report["data_docs"]["newsletter"]
    assert rel.startswith(f"retention_nightly__{report['run_id']}".replace(":", "_").replace("+", "_") + "/newsletter/")
    index = retention_home / "data_docs" / rel
    assert index.is_file() and "plan_newsletter_member_suite" in index.read_text()
    txt = (retention_home / "reports").glob("retention_nightly__*.txt")
    assert f"Data Docs: data_docs/{rel}" in next(txt).read_text()
    # Kept after the run succeeded, when its staging is gone.
    assert not [p for p in (retention_home / "staging").glob("*/*") if p.is_dir()]

    assert "newsletter: validation passed (3 suites;" in log
    noise = [line for line in log.splitlines() if "great_expectations" in line]  # its loggers, its files' warnings
    assert not noise, "GX noise in the task log:\n" + "\n".join(noise[:20])

    members = generate_members(MEMBERS, seed=5, now=pd.Timestamp("2026-11-20T12:00:00+00:00").to_pydatetime())
    text = all_text(retention_home / "data_docs")
    assert not [m for m in members if m["email_address"].lower() in text or m["id"] in text]
