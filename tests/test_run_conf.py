"""A run's conf is refused unless every key is one of the DAG's params and every value is one its
param accepts: a typo (``{"dryrun": true}``) must never turn a dry run into a real one.

Real Airflow runs (``dag.test``) of all four DAGs, against the Mailchimp stand-in where something
could be erased, and a real api-server + scheduler on PostgreSQL for the REST API and
``airflow dags trigger``. Airflow itself validates each param's value against its JSON schema
before it creates a run, but accepts conf keys that are no param at all: those are refused by the
first task of every DAG, before anything is read, planned, recorded or erased.
"""

from __future__ import annotations

import json
import math
import time

import pytest
import requests
import sqlalchemy as sa

from airflow_run import load_dag, run_dag, task_states
from retention_dev.standins.process import StandIn

MEMBERS = 1500
SEED = 11
NOW = "2026-11-20T12:00:00+00:00"
KEY = "standin-key-us0"
FIRST_TASK = {"retention_nightly": "open_run", "erasure_request": "check_request", "replay_erasures": "open_run", "policy_preview": "prepare"}
LAST_TASK = {"retention_nightly": "report", "erasure_request": "report", "replay_erasures": "report", "policy_preview": "summary"}


# --- the Mailchimp stand-in: what a run could erase --------------------------------------------


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


def a_member_address(standin) -> str:
    page = requests.get(
        f"{standin.base_url}/3.0/lists/demo-list/members",
        params={"count": 1, "status": "subscribed", "fields": "members.email_address"}, auth=("x", KEY), timeout=30,
    ).json()
    return page["members"][0]["email_address"]


def ledger(home) -> dict[str, list]:
    """The ledger's runs and entries (none when the ledger was never opened)."""
    path = home / "ledger.db"
    if not path.exists():
        return {"runs": [], "entries": []}
    engine = sa.create_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            tables = set(sa.inspect(conn).get_table_names())
            return {
                "runs": conn.execute(sa.text("select run_id from erasure_run")).all() if "erasure_run" in tables else [],
                "entries": conn.execute(sa.text("select run_id from erasure_ledger")).all() if "erasure_ledger" in tables else [],
            }
    finally:
        engine.dispose()


def written(home, folder: str) -> list:
    return sorted((home / folder).iterdir()) if (home / folder).exists() else []


def assert_refused_in_first_task(dr, dag_id: str) -> None:
    """The first task failed, nothing downstream of it ran, and the run failed."""
    states = task_states(dr)
    first, last = FIRST_TASK[dag_id], LAST_TASK[dag_id]
    assert states[first] == "failed", states
    between = {t: s for t, s in states.items() if t not in (first, last)}
    assert between and set(between.values()) == {"upstream_failed"}, states
    assert states[last] == "failed", states
    assert dr.state == "failed", states


def assert_one_line_naming(text: str, unknown: list[str], known: list[str]) -> None:
    lines = [line for line in text.splitlines() if "unknown conf key" in line]
    assert lines, "no line names the unknown conf keys"
    line = lines[0]
    asked, _, known_part = line.partition("the known keys are")
    assert all(f"'{k}'" in asked for k in unknown), line
    assert known_part and all(k in known_part for k in known), line


# --- a key that is no param: the first task refuses it, nothing is erased -----------------------

NIGHTLY_PARAMS = ["dry_run", "max_plan_share", "reconcile", "systems"]


@pytest.mark.airflow
@pytest.mark.parametrize(
    "conf, unknown",
    [
        ({"dryrun": True, "systems": ["newsletter"]}, ["dryrun"]),
        ({"dry-run": True, "max_plan_shares": 0.9, "system": ["crm"], "systems": ["newsletter"]}, ["dry-run", "max_plan_shares", "system"]),
    ],
    ids=["dryrun", "misspelt-every-param"],
)
def test_nightly_refuses_an_unknown_key_and_erases_nothing(mailchimp, retention_home, capfd, conf, unknown):
    before = all_members(mailchimp)
    dr = run_dag(conf)
    assert all_members(mailchimp) == before, "the run erased members: its conf had a typo"
    assert stats(mailchimp)["permanent_deletes"] == 0
    assert ledger(retention_home) == {"runs": [], "entries": []}
    assert written(retention_home, "reports") == [] and written(retention_home, "staging") == []
    assert_refused_in_first_task(dr, "retention_nightly")
    out, err = capfd.readouterr()
    assert_one_line_naming(out + err, unknown, NIGHTLY_PARAMS)
    if "dryrun" in unknown:
        assert "did you mean 'dry_run'" in out + err


@pytest.mark.airflow
@pytest.mark.parametrize("typo", [{"dryrun": True}, {"dry_rn": True, "Email": "x@example.org"}], ids=["dryrun", "misspelt"])
def test_erasure_request_refuses_an_unknown_key_and_erases_nothing(mailchimp, retention_home, capfd, typo):
    email = a_member_address(mailchimp)
    before = all_members(mailchimp)
    dr = run_dag({"email": email, **typo}, dag_id="erasure_request")
    assert all_members(mailchimp) == before, "the request erased the member: its conf had a typo"
    assert stats(mailchimp)["permanent_deletes"] == 0
    assert ledger(retention_home) == {"runs": [], "entries": []}
    assert written(retention_home, "reports") == []
    assert_refused_in_first_task(dr, "erasure_request")
    out, err = capfd.readouterr()
    assert_one_line_naming(out + err, sorted(typo), ["dry_run", "email"])
    assert email.lower() not in (out + err).lower(), "the refusal must not echo the address"


@pytest.mark.airflow
@pytest.mark.parametrize(
    "conf, unknown",
    [({"dryrun": True, "systems": ["newsletter"]}, ["dryrun"]), ({"system": ["crm"], "dry_run": True}, ["system"])],
    ids=["dryrun", "misspelt"],
)
def test_replay_refuses_an_unknown_key_and_erases_nothing(mailchimp, retention_home, capfd, conf, unknown):
    before = all_members(mailchimp)
    dr = run_dag(conf, dag_id="replay_erasures")
    assert all_members(mailchimp) == before and stats(mailchimp)["permanent_deletes"] == 0
    assert ledger(retention_home) == {"runs": [], "entries": []}
    assert written(retention_home, "reports") == [] and written(retention_home, "staging") == []
    assert_refused_in_first_task(dr, "replay_erasures")
    out, err = capfd.readouterr()
    assert_one_line_naming(out + err, unknown, ["dry_run", "systems"])


@pytest.mark.airflow
@pytest.mark.parametrize(
    "conf, unknown",
    [
        ({"dryrun": True, "systems": ["newsletter"]}, ["dryrun"]),
        ({"old_polcy": "HEAD:include/policies/retention.yaml", "new-policy": "x.yaml", "system": ["crm"], "asof": "2026-01-01"},
         ["asof", "new-policy", "old_polcy", "system"]),
    ],
    ids=["dryrun", "misspelt-every-param"],
)
def test_preview_refuses_an_unknown_key_before_reading_anything(mailchimp, retention_home, capfd, conf, unknown):
    requests_before = stats(mailchimp)["requests"]
    dr = run_dag(conf, dag_id="policy_preview")
    assert stats(mailchimp)["requests"] == requests_before, "the preview read a system"
    assert written(retention_home, "previews") == []
    assert_refused_in_first_task(dr, "policy_preview")
    out, err = capfd.readouterr()
    assert_one_line_naming(out + err, unknown, ["as_of", "new_policy", "old_policy", "systems"])


# --- values a param does not accept: refused before the run is created ------------------------------

NAN = float("nan")
REFUSED_VALUES = [
    ("retention_nightly", {"systems": []}),
    ("retention_nightly", {"systems": ["newsletter", "newsletter"]}),
    ("retention_nightly", {"systems": ["mailchimp"]}),
    ("retention_nightly", {"systems": "newsletter"}),
    ("retention_nightly", {"max_plan_share": NAN}),
    ("retention_nightly", {"max_plan_share": "0.5"}),
    ("retention_nightly", {"max_plan_share": 2}),
    ("retention_nightly", {"max_plan_share": 0}),
    ("retention_nightly", {"max_plan_share": -0.5}),
    ("retention_nightly", {"dry_run": "true"}),
    ("replay_erasures", {"systems": []}),
    ("replay_erasures", {"systems": ["zendesk"]}),
    ("replay_erasures", {"systems": ["crm", "crm"]}),
    ("replay_erasures", {"dry_run": 1}),
    ("policy_preview", {"systems": []}),
    ("policy_preview", {"systems": ["CRM"]}),
    ("policy_preview", {"systems": ["crm", "crm"]}),
    ("erasure_request", {"email": "person@example.org", "dry_run": "yes"}),
]


@pytest.mark.airflow
@pytest.mark.parametrize("dag_id, conf", REFUSED_VALUES, ids=[f"{d}-{json.dumps(c)}" for d, c in REFUSED_VALUES])
def test_a_value_no_param_accepts_is_refused_before_the_run_is_created(retention_home, dag_id, conf):
    with pytest.raises(Exception) as info:
        run_dag(conf, dag_id=dag_id)
    assert type(info.value).__name__ == "ParamValidationError", info.value
    assert f"param {list(conf)[-1]}" in str(info.value)
    assert ledger(retention_home) == {"runs": [], "entries": []}


def test_every_param_has_a_title_and_a_description():
    for dag_id in FIRST_TASK:
        dag = load_dag(dag_id)
        for name in dag.params:
            param = dag.params.get_param(name)
            assert param.schema.get("title"), f"{dag_id}: param {name} has no title"
            assert param.description, f"{dag_id}: param {name} has no description"


def test_the_params_schemas_refuse_what_json_schema_can():
    """Checked on the schemas themselves too, without Airflow's run machinery."""
    import jsonschema

    nightly = load_dag("retention_nightly").params
    share = nightly.get_param("max_plan_share").schema
    for bad in (NAN, math.inf, -math.inf, 0, -0.1, 1.5, "0.5", True):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, share)
    for good in (None, 0.25, 1, 1.0, 0.0001):
        jsonschema.validate(good, share)
    for dag_id in ("retention_nightly", "replay_erasures", "policy_preview"):
        systems = load_dag(dag_id).params.get_param("systems").schema
        for bad in ([], ["crm", "crm"], ["mailchimp"], "crm", [None]):
            with pytest.raises(jsonschema.ValidationError):
                jsonschema.validate(bad, systems)
        jsonschema.validate(["newsletter", "crm", "ticketing"], systems)


# --- through a running api-server: the REST API and `airflow dags trigger` --------------------------


def fresh_database(url: str) -> str:
    """Drop and recreate the database of ``url``; return the URL."""
    u = sa.engine.make_url(url)
    admin = sa.create_engine(u.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{u.database}" WITH (FORCE)'))
        conn.execute(sa.text(f'CREATE DATABASE "{u.database}"'))
    admin.dispose()
    return url


def _wait_for_run(api: str, dag_id: str, run_id: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = requests.get(f"{api}/api/v2/dags/{dag_id}/dagRuns/{run_id}", timeout=10).json()
        if run["state"] in ("success", "failed"):
            return run
        time.sleep(2)
    raise AssertionError(f"run {run_id} did not finish")


@pytest.mark.airflow
@pytest.mark.postgres
@pytest.mark.timeout(1200)
def test_rest_api_and_cli_refuse_or_the_first_task_does(tmp_path, postgres_url_for, retention_home, mailchimp):
    from airflow_services import AirflowServices

    meta = fresh_database(postgres_url_for("retention_airflow_conf"))
    af = AirflowServices(tmp_path / "airflow", meta, {"AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True"}).start()
    try:
        for dag_id in ("retention_nightly", "erasure_request"):
            af.wait_for_dag(dag_id)
        api = af.api

        def trigger(dag_id: str, conf: dict) -> requests.Response:
            # json.dumps writes NaN as the token NaN, as a hand-written body would (requests' json= refuses it).
            body = json.dumps({"logical_date": None, "conf": conf})
            return requests.post(f"{api}/api/v2/dags/{dag_id}/dagRuns", data=body, headers={"Content-Type": "application/json"}, timeout=30)

        # An unknown key: refused by the API, or the run fails in its first task and erases nothing.
        email = a_member_address(mailchimp)
        before = all_members(mailchimp)
        af.airflow("dags", "unpause", "erasure_request")
        resp = trigger("erasure_request", {"email": email, "dryrun": True})
        print("REST trigger with an unknown conf key:", resp.status_code)
        assert resp.status_code in (200, 400), resp.text[:500]
        if resp.status_code == 200:  # Airflow 3.3 accepts the key: the run must fail in its first task
            run = _wait_for_run(api, "erasure_request", resp.json()["dag_run_id"])
            tis = requests.get(f"{api}/api/v2/dags/erasure_request/dagRuns/{run['dag_run_id']}/taskInstances", timeout=10).json()
            states = {ti["task_id"]: ti["state"] for ti in tis["task_instances"]}
        assert all_members(mailchimp) == before, "the request erased the member: its conf had a typo"
        assert stats(mailchimp)["permanent_deletes"] == 0
        assert ledger(retention_home)["entries"] == []
        if resp.status_code == 200:
            assert run["state"] == "failed", (states, af.tail())
            assert states["check_request"] == "failed", states
            assert {states[t] for t in ("crm", "newsletter", "ticketing")} == {"upstream_failed"}, states

        # Values the params refuse: 400, no run created (the DAG is paused, so nothing would run anyway).
        for conf in ({"systems": []}, {"systems": ["mailchimp"]}, {"systems": ["crm", "crm"]}, {"max_plan_share": NAN},
                     {"max_plan_share": "0.5"}, {"max_plan_share": 2}, {"max_plan_share": 0}):
            resp = trigger("retention_nightly", conf)
            assert resp.status_code == 400, (conf, resp.status_code, resp.text[:500])
            assert "Invalid input for param" in resp.text, resp.text[:500]
        runs = requests.get(f"{api}/api/v2/dags/retention_nightly/dagRuns", timeout=10).json()
        assert runs["total_entries"] == 0, runs
        cli = af.airflow("dags", "trigger", "retention_nightly", "--conf", json.dumps({"systems": []}), check=False)
        assert cli.returncode != 0 and "Invalid input for param systems" in cli.stdout + cli.stderr, cli
    finally:
        af.stop()
