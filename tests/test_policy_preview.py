"""Policy-change preview: what a new policy would erase that the old one does not, and what it
would stop erasing, against the Zendesk stand-in over real HTTP (and, through Airflow, against
the Mailchimp stand-in and a SQLite CRM too), erasing nothing.

The expected tickets are computed here from the stand-in's own export with plain datetime,
zoneinfo and dateutil calendar arithmetic, and pseudonymised with a plain HMAC: nothing of
the engine or the pipeline decides what the test expects.
"""

from __future__ import annotations

import ast
import datetime as dt
import hashlib
import hmac
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from zoneinfo import ZoneInfo

import pandas as pd
import pytest
import requests
import sqlalchemy as sa
import yaml
from dateutil.relativedelta import relativedelta

from airflow_run import ROOT, run_dag, task_states, xcom_values
from retention.config import DEFAULT_POLICY
from retention.domain.policy import PolicyError
from retention_dev.standins.process import StandIn

NOW = "2026-11-20T12:00:00+00:00"
AS_OF = dt.datetime.fromisoformat(NOW)
TZ = ZoneInfo("Europe/Stockholm")
TICKETS = 1500
SEED = 31
AUTH = ("agent@example.org/token", "t")
KEY_RE = re.compile(r"^[0-9a-f]{32}$")
DELETIONS = ("soft_ticket_deletions", "permanent_ticket_deletions", "soft_user_deletions", "permanent_user_deletions")


# --- helpers ---------------------------------------------------------------------------------


def pseudonym(record_type: str, record_id) -> str:
    key = os.environ["RETENTION_PSEUDONYM_KEY"].encode()
    return hmac.new(key, f"{record_type}:{record_id}".encode(), hashlib.sha256).hexdigest()[:32]


def policy_with(path: Path, periods: dict[str, str], base: Path = DEFAULT_POLICY) -> Path:
    """A copy of ``base`` with some rules' periods changed."""
    data = yaml.safe_load(base.read_text())
    for rule in data["rules"]:
        if rule["id"] in periods:
            rule["period"] = periods[rule["id"]]
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
    return path


def zendesk_conn(base_url: str) -> str:
    return json.dumps({
        "conn_type": "retention_zendesk", "host": base_url, "login": "agent@example.org", "password": "t",
        "extra": {"incremental_per_minute": 600},
    })


def stats(standin) -> dict:
    return requests.get(f"{standin.base_url}/_standin/stats", timeout=30).json()


def export_tickets(base_url: str) -> list[dict]:
    """Every ticket as the stand-in's own incremental export says (last occurrence wins)."""
    tickets, params = {}, {"start_time": 0, "include": "metric_sets"}
    while True:
        body = requests.get(f"{base_url}/api/v2/incremental/tickets/cursor.json", params=params, auth=AUTH, timeout=30).json()
        solved = {m["ticket_id"]: m["solved_at"] for m in body["metric_sets"]}
        for t in body["tickets"]:
            tickets[t["id"]] = {"id": t["id"], "status": t["status"], "requester_id": t["requester_id"], "solved_at": solved.get(t["id"]),
                                "parties": {t["requester_id"], *t["collaborator_ids"]}}
        if body["end_of_stream"]:
            return list(tickets.values())
        params = {"include": "metric_sets", "cursor": body["after_cursor"]}


def due(solved_at: str, months: int) -> bool:
    """Would a ticket solved at ``solved_at`` be due as of AS_OF after ``months`` calendar
    months, counted in Stockholm wall-clock time (31 Aug + 6 months = 28/29 Feb)?"""
    local = dt.datetime.fromisoformat(solved_at.replace("Z", "+00:00")).astimezone(TZ).replace(tzinfo=None)
    return local + relativedelta(months=months) <= AS_OF.astimezone(TZ).replace(tzinfo=None)


def solved_between(tickets: list[dict], newer: int, older: int) -> list[dict]:
    """Solved/closed tickets due after ``newer`` months but not after ``older`` months."""
    return [t for t in tickets if t["status"] in ("solved", "closed") and t["solved_at"] and due(t["solved_at"], newer) and not due(t["solved_at"], older)]


def groups(system: dict, change: str, record_type: str) -> dict[str, set[str]]:
    """rule (or old->new rule) -> keys, for one record type."""
    out = {}
    for g in system[change]:
        if g["record_type"] == record_type:
            rule = g.get("rule") or f"{g['old_rule']}->{g['new_rule']}"
            assert g["count"] == len(g["keys"]) == len(set(g["keys"]))
            out[rule] = set(g["keys"])
    return out


def load(summary: dict) -> dict:
    return json.loads(Path(summary["json"]).read_text())


def assert_nothing_left(home: Path) -> None:
    assert not (home / "staging").exists(), "the preview left staging behind"
    assert not (home / "ledger.db").exists(), "the preview created a ledger"
    leftovers = [p.name for p in (home / "previews").iterdir() if p.is_dir()]
    assert not leftovers, f"working directories left: {leftovers}"


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zendesk_standin(tmp_path_factory):
    state = tmp_path_factory.mktemp("zendesk") / "zendesk.npz"
    standin = StandIn(
        "zendesk", "--port", "0", "--state-file", str(state), "--tickets", str(TICKETS), "--seed", str(SEED), "--now", NOW,
        "--job-seconds", "0.2", "--incremental-per-minute", "600",
    ).start()
    yield standin
    standin.stop()


@pytest.fixture(scope="module")
def tickets(zendesk_standin) -> list[dict]:
    found = export_tickets(zendesk_standin.base_url)
    assert len(found) == TICKETS and not [t for t in found if t["status"] == "deleted"]
    return found


@pytest.fixture
def zendesk(zendesk_standin, monkeypatch, retention_home):
    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_ZENDESK", zendesk_conn(zendesk_standin.base_url))
    yield zendesk_standin
    after = stats(zendesk_standin)
    assert {k: after[k] for k in DELETIONS} == dict.fromkeys(DELETIONS, 0), "the preview erased something"
    assert after["tickets_live"] == TICKETS and not after["jobs"]


# --- the done-when, and its mirror image ------------------------------------------------------


def test_shortened_ticket_period_lists_exactly_the_tickets_that_become_due(zendesk, tickets, tmp_path, retention_home):
    from retention.runs.preview import run_preview

    new = policy_with(tmp_path / "short.yaml", {"support-ticket": "P6M"})
    summary = run_preview(str(DEFAULT_POLICY), str(new), systems=["ticketing"], as_of=NOW)
    after = stats(zendesk)
    assert {k: after[k] for k in DELETIONS} == dict.fromkeys(DELETIONS, 0) and after["tickets_live"] == TICKETS
    result = load(summary)
    ticketing = result["systems"]["ticketing"]

    expected = solved_between(tickets, 6, 12)
    assert len(expected) > 100
    assert groups(ticketing, "newly_erased", "support_ticket") == {"support-ticket": {pseudonym("support_ticket", t["id"]) for t in expected}}
    assert ticketing["no_longer_erased"] == [] and ticketing["changed_rule"] == []
    # Requesters (and CCs) whose last remaining tickets become due go too, and only such users.
    users = groups(ticketing, "newly_erased", "ticket_user")
    assert set(users) == {"ticket-requester"}
    assert users["ticket-requester"] <= {pseudonym("ticket_user", u) for t in expected for u in t["parties"]}

    assert result["erased"] == 0 and result["as_of"] == AS_OF.isoformat()
    assert result["policy_changes"] == ["rule support-ticket: period 'P1Y' -> 'P6M'"]
    assert summary["totals"]["newly_erased"] == len(expected) + len(users["ticket-requester"])
    assert summary["would_halt"] == ["ticketing"]  # 6 months of tickets at once: the first run would hit the guard
    text = Path(summary["text"]).read_text()
    assert "support-ticket" in text and f"{len(expected):>7}" in text
    keys = [k for change in ("newly_erased", "no_longer_erased", "changed_rule") for g in ticketing[change] for k in g["keys"]]
    assert all(KEY_RE.match(k) for k in keys)
    assert not {str(t["id"]) for t in tickets} & set(keys)
    assert_nothing_left(retention_home)


def test_lengthened_ticket_period_lists_what_is_no_longer_erased(zendesk, tickets, tmp_path):
    from retention import config
    from retention.runs.preview import run_preview
    from retention.store.ledger import Ledger

    expected = solved_between(tickets, 12, 24)
    assert len(expected) > 20
    # A manual hold (kept in the ledger by pseudonym) makes a ticket no erasure under either
    # policy, so it is no change either.
    held = pseudonym("support_ticket", expected[0]["id"])
    Ledger(config.ledger_url()).add_hold("support_ticket", held, "dispute", None)

    new = policy_with(tmp_path / "long.yaml", {"support-ticket": "P2Y"})
    ticketing = load(run_preview(str(DEFAULT_POLICY), str(new), systems=["ticketing"], as_of=NOW))["systems"]["ticketing"]
    keys = {pseudonym("support_ticket", t["id"]) for t in expected} - {held}
    assert groups(ticketing, "no_longer_erased", "support_ticket") == {"support-ticket": keys}
    assert ticketing["old"]["planned"]["support-ticket/hold"] == 1
    assert groups(ticketing, "newly_erased", "support_ticket") == {} and ticketing["changed_rule"] == []
    assert ticketing["totals"]["newly_erased"] == 0


def test_identical_policies_give_an_empty_diff(zendesk, tmp_path):
    from retention.runs.preview import run_preview

    same = tmp_path / "same.yaml"
    shutil.copy(DEFAULT_POLICY, same)
    result = load(run_preview(str(DEFAULT_POLICY), str(same), systems=["ticketing"], as_of=NOW))
    ticketing = result["systems"]["ticketing"]
    assert result["totals"] == {"newly_erased": 0, "no_longer_erased": 0, "changed_rule": 0}
    assert ticketing["newly_erased"] == ticketing["no_longer_erased"] == ticketing["changed_rule"] == []
    assert result["policy_changes"] == [] and result["old"]["version"] == result["new"]["version"]
    assert ticketing["old"]["destructive"] > 0  # the same records are due under both, and that is no change


# --- policies from git, broken policies ---------------------------------------------------------


def _git(repo: Path, *args: str) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.org", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.org", GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM="1")
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True, env=env).stdout.strip()


def test_old_policy_from_a_git_revision(zendesk, tickets, tmp_path, retention_home):
    from retention.runs.preview import read_policy

    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    shutil.copy(DEFAULT_POLICY, repo / "policy.yaml")
    _git(repo, "add", "policy.yaml")
    _git(repo, "commit", "-q", "-m", "policy as published")
    head = _git(repo, "rev-parse", "HEAD")
    policy_with(repo / "policy.yaml", {"support-ticket": "P6M"})  # the working copy: the proposal

    out = subprocess.run(
        [sys.executable, "-m", "retention.cli", "preview", "--old-rev", "HEAD", "--new", str(repo / "policy.yaml"), "--repo", str(repo),
         "--systems", "ticketing", "--as-of", NOW, "--show-keys", "3"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "nothing was erased" in out.stdout
    result = json.loads(Path(re.search(r"written: (\S+\.json)", out.stdout).group(1)).read_text())
    assert result["old"]["source"] == "HEAD:policy.yaml" and result["old"]["commit"] == head
    expected = {pseudonym("support_ticket", t["id"]) for t in solved_between(tickets, 6, 12)}
    assert groups(result["systems"]["ticketing"], "newly_erased", "support_ticket") == {"support-ticket": expected}
    shown = [k for k in expected if k in out.stdout]
    assert len(shown) == 3, "--show-keys 3 prints three keys of the row"

    # Errors name the revision, the path and the repository.
    with pytest.raises(PolicyError, match="'no-such-rev' is not a revision"):
        read_policy("no-such-rev:policy.yaml", repo)
    with pytest.raises(PolicyError, match="has no file 'missing.yaml'"):
        read_policy("HEAD:missing.yaml", repo)
    with pytest.raises(PolicyError, match="is not a revision"):
        read_policy("HEAD:policy.yaml", tmp_path / "not-a-repo")
    assert read_policy(f"{head[:10]}:policy.yaml", repo).policy.version == read_policy(str(DEFAULT_POLICY)).policy.version
    if (ROOT / ".git").exists():  # the DAG's default old policy: the project's policy as last committed
        assert read_policy("HEAD:include/policies/retention.yaml").commit
    assert_nothing_left(retention_home)


def test_broken_new_policy_fails_before_any_system_is_read(zendesk, tmp_path, retention_home):
    broken = policy_with(tmp_path / "broken.yaml", {"support-ticket": "one year"})
    before = stats(zendesk)["requests"]
    out = subprocess.run(
        [sys.executable, "-m", "retention.cli", "preview", "--old", str(DEFAULT_POLICY), "--new", str(broken), "--systems", "ticketing"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"{broken}: rule 'support-ticket' (rules[" in out.stderr and "field 'period'" in out.stderr
    assert "Traceback" not in out.stderr
    assert stats(zendesk)["requests"] == before, "a system was read although the policy is broken"
    assert not (retention_home / "previews").exists() or not any((retention_home / "previews").iterdir())


# --- the pipeline and the preview plan alike --------------------------------------------------------


@pytest.mark.parametrize("part_rows", [None, 7])
def test_plan_system_matches_the_pipeline_plan(zendesk, retention_home, monkeypatch, part_rows):
    """The pipeline plans the staged extract a part at a time and merges the parts' sorted plans
    (``nightly.plan``); the preview plans it whole (``planning.plan_system``): the same plan, row
    for row in erase order, and the same frames judged. With parts of 7 rows and slices of 5 the
    merge takes every path: many runs, a slice across them."""
    from retention import config
    from retention.domain.planning import erase_order, plan_system
    from retention.domain.policy import load_policy
    from retention.domain.pseudonyms import Pseudonymizer
    from retention.domain.records import record_types_of
    from retention.runs import nightly as pipeline
    from retention.systems import adapter_for

    if part_rows:
        monkeypatch.setattr(pipeline, "PLAN_PART_ROWS", part_rows)
        monkeypatch.setattr(pipeline._PlanWriter, "SLICE", 5)
    run = pipeline.RunInfo.from_dict(pipeline.open_run("parity", "parity_1", AS_OF, dry_run=True, max_plan_share=1.0))
    adapter = adapter_for("ticketing")
    try:
        pipeline.extract(run, "ticketing", adapter)
    finally:
        adapter.close()
    pipeline.plan(run, "ticketing")
    staged = run.staging.read_frame("ticketing", "plan")
    frames = {rt: run.staging.read_extract("ticketing", rt) for rt in record_types_of("ticketing")}
    now = pd.Timestamp(run.staging.read_json("ticketing", "extract")["extracted_at"])
    mine = plan_system("ticketing", frames, load_policy(DEFAULT_POLICY), AS_OF, now=now, pseudonymizer=Pseudonymizer(config.pseudonym_key())).plan
    in_order = mine.iloc[erase_order(mine, record_types_of("ticketing"))].reset_index(drop=True)
    assert len(staged) > 20
    pd.testing.assert_frame_equal(staged, in_order[staged.columns], check_dtype=False)
    assert list(erase_order(staged, record_types_of("ticketing"))) == list(range(len(staged)))
    sp = plan_system("ticketing", frames, load_policy(DEFAULT_POLICY), AS_OF, now=now, pseudonymizer=Pseudonymizer(config.pseudonym_key()))
    for record_type, clean in sp.clean.items():
        pd.testing.assert_frame_equal(run.staging.read_frame("ticketing", f"clean_{record_type}"), clean.reset_index(drop=True), check_dtype=False)
    assert run.staging.read_json("ticketing", "plan")["planned"] == sp.planned_counts()
    assert not (run.staging.system_dir("ticketing") / "plan_runs.parquet").exists()

    # The validate step over that staged plan: each record type whole, then in partitions of
    # about 7 rows (``runs.validating``): the same suites, the same verdicts.
    from retention.runs import validating

    def suites() -> list:
        return sorted(
            (s["name"], s["success"], sorted((c["expectation"], str(c["column"]), c["success"], c["unexpected_count"]) for c in s["checks"]))
            for s in run.staging.read_json("ticketing", "validation")["suites"]
        )

    assert pipeline.validate(run, "ticketing")["success"]
    whole = suites()
    monkeypatch.setattr(validating, "PART_ROWS", 7)
    assert pipeline.validate(run, "ticketing")["success"]
    assert suites() == whole and len(whole) == 5
    run.staging.remove()


# --- the DAG ---------------------------------------------------------------------------------


@pytest.fixture
def all_systems(zendesk, tmp_path, monkeypatch):
    from retention.systems.crm import schema
    from retention_dev.synthetic.crm import generate

    mailchimp = StandIn(
        "mailchimp", "--port", "0", "--state-file", str(tmp_path / "mc.state"), "--members", "800", "--seed", "5", "--now", NOW,
    ).start()
    monkeypatch.setenv(
        "AIRFLOW_CONN_RETENTION_MAILCHIMP",
        json.dumps({"conn_type": "retention_mailchimp", "host": f"{mailchimp.base_url}/3.0", "password": "standin-key-us0", "extra": {"list_id": "demo-list"}}),
    )
    crm = sa.create_engine(f"sqlite:///{tmp_path / 'crm.db'}")
    schema.create_schema(crm)
    generate(crm, contacts=400, seed=5, now=AS_OF)
    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_CRM", json.dumps({"conn_type": "retention_crm", "extra": {"sqlalchemy_url": str(crm.url)}}))
    yield {"mailchimp": mailchimp, "crm": crm}
    mailchimp.stop()
    crm.dispose()


def _crm_counts(engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {t: conn.execute(sa.text(f"select count(*) from {t}")).scalar() for t in sa.inspect(engine).get_table_names()}


def _members(base_url: str) -> dict[str, str]:
    page = requests.get(
        f"{base_url}/3.0/lists/demo-list/members", params={"count": 1000, "fields": "members.id,members.email_address"},
        auth=("x", "standin-key-us0"), timeout=30,
    ).json()
    return {m["id"]: m["email_address"] for m in page["members"]}


def test_dag_previews_every_system_and_keeps_ids_out_of_xcom(all_systems, tmp_path, retention_home):
    new = policy_with(tmp_path / "proposal.yaml", {"support-ticket": "P6M", "newsletter-pending": "P7D", "lead": "P6M"})
    crm_before = _crm_counts(all_systems["crm"])
    members = _members(all_systems["mailchimp"].base_url)
    mc_before = stats(all_systems["mailchimp"])

    dagrun = run_dag({"old_policy": str(DEFAULT_POLICY), "new_policy": str(new), "as_of": NOW}, dag_id="policy_preview")
    states = task_states(dagrun)
    assert states == dict.fromkeys(["prepare", "preview_newsletter", "preview_crm", "preview_ticketing", "summary"], "success"), states

    values = xcom_values(dagrun)
    blob = "\n".join(values)
    assert "@" not in blob
    assert not set(members) & set(re.findall(r"[0-9a-f]{32}", blob)), "a subscriber hash in XCom"
    assert not re.search(r"\b100000\d{4}\b", blob), "a Zendesk user id in XCom"
    print(values)
    summary = next(ast.literal_eval(v) for v in values if "'per_system'" in v and "'json'" in v)
    assert all(summary["per_system"][s]["newly_erased"] > 0 for s in ("newsletter", "crm", "ticketing")), summary

    result = json.loads(Path(summary["json"]).read_text())
    keys = {k for s in result["systems"].values() for c in ("newly_erased", "no_longer_erased", "changed_rule") for g in s[c] for k in g["keys"]}
    assert keys and all(KEY_RE.match(k) for k in keys) and not keys & set(members)
    text = Path(summary["json"]).read_text()
    assert not any(e in text for e in members.values())
    assert_nothing_left(retention_home)
    assert _crm_counts(all_systems["crm"]) == crm_before
    mc_after = stats(all_systems["mailchimp"])
    assert (mc_after["total"], mc_after["deleted_hashes_count"]) == (mc_before["total"], mc_before["deleted_hashes_count"])


def test_dag_fails_on_a_broken_policy_before_reading(zendesk, tmp_path, retention_home):
    broken = policy_with(tmp_path / "broken.yaml", {"support-ticket": "P1X"})
    before = stats(zendesk)["requests"]
    dagrun = run_dag({"old_policy": str(DEFAULT_POLICY), "new_policy": str(broken), "systems": ["ticketing"]}, dag_id="policy_preview")
    states = task_states(dagrun)
    assert states["prepare"] == "failed" and states["preview_ticketing"] == "upstream_failed", states
    assert stats(zendesk)["requests"] == before

