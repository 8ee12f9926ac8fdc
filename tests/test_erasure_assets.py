"""Assets (issue 11, item 6): every erasing task (retention_nightly, erasure_request,
replay_erasures) emits an Airflow asset event per system with the counts per rule and status of
its run, and the run's facts, never anything personal; a dry run emits none. A warehouse DAG
scheduled on these assets (retention_dev/example_dags/warehouse_erasures.py) is triggered by
them on a real scheduler and logs what it would erase, by rule and count.

The events are read back from Airflow's metadata database; the expected counts from the ledger
itself with plain SQL."""

from __future__ import annotations

import json
import re
import sqlite3
import time
from collections import Counter

import pytest
import sqlalchemy as sa
from test_crm_pipeline import Crm, generate, ledger_rows, snapshot
from test_erasure_request import Systems, assert_nothing_personal, by_type, systems  # noqa: F401 - fixture

from airflow_run import ROOT, run_dag, task_states

# What an event's extra holds: counts and run facts, nothing else.
EVENT_KEYS = {"schema", "system", "dag_id", "run_id", "ledger_run_id", "as_of", "policy_version", "dry_run", "gone", "by_rule", "by_record_type"}


def asset_events(dagrun) -> list[dict]:
    """The asset events the run's tasks emitted, as the metadata database holds them."""
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.execute(
            sa.select(AssetModel.name, AssetModel.uri, AssetEvent.source_task_id, AssetEvent.extra)
            .join(AssetModel, AssetEvent.asset_id == AssetModel.id)
            .where(AssetEvent.source_dag_id == dagrun.dag_id, AssetEvent.source_run_id == dagrun.run_id)
        ).all()
    return [{"name": n, "uri": u, "task_id": t, "extra": e} for n, u, t, e in rows]


def per(rows: list[dict], key: str) -> dict[str, dict[str, int]]:
    out: dict[str, Counter] = {}
    for r in rows:
        out.setdefault(r[key], Counter())[r["status"]] += 1
    return {k: dict(c) for k, c in out.items()}


def assert_counts_only(extra: dict) -> None:
    assert set(extra) == EVENT_KEYS, sorted(extra)
    for table in ("by_rule", "by_record_type"):
        for name, statuses in extra[table].items():
            assert isinstance(name, str) and all(isinstance(n, int) for n in statuses.values()), (table, name, statuses)


@pytest.fixture
def crm(tmp_path, retention_home, monkeypatch):
    url = f"sqlite:///{tmp_path / 'crm.db'}"
    engine = sa.create_engine(url)
    c = Crm("sqlite", url, engine)
    generate(c, contacts=800)
    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_CRM", json.dumps({"conn_type": "retention_crm", "extra": {"sqlalchemy_url": url}}))
    yield c
    engine.dispose()


def crm_secrets(before) -> list[str]:
    contacts = before["contact"].values()
    return [
        *(f"{c['first_name']} {c['last_name']}" for c in contacts),
        *(c["email"] for c in contacts if c["email"]),
        *(c["phone"] for c in contacts if c["phone"]),
    ]


@pytest.mark.airflow
def test_nightly_erase_emits_counts_per_rule_and_a_dry_run_none(crm, retention_home):
    before = snapshot(crm.engine)

    dry = run_dag({"systems": ["crm"], "dry_run": True})
    assert dry.state == "success", task_states(dry)
    assert asset_events(dry) == [], "a dry run erases nothing and tells no warehouse to erase"

    dr = run_dag({"systems": ["crm"]})
    assert dr.state == "success", task_states(dr)
    events = asset_events(dr)
    # Only the system that ran: newsletter and ticketing were skipped and emit nothing.
    assert [(e["name"], e["uri"], e["task_id"]) for e in events] == [("retention_erasures_crm", "retention://crm/erasures", "crm.erase")]
    extra = events[0]["extra"]
    assert_counts_only(extra)
    rows = ledger_rows(retention_home, dr.run_id)
    assert any(r["status"] == "erased" for r in rows), "the fixture has records due"
    assert extra["by_rule"] == per(rows, "rule_id")
    assert extra["by_record_type"] == per(rows, "record_type")
    assert extra["gone"] == sum(r["status"] in ("erased", "already_gone") for r in rows)
    assert (extra["system"], extra["dag_id"], extra["run_id"], extra["ledger_run_id"], extra["dry_run"]) == (
        "crm", "retention_nightly", dr.run_id, dr.run_id, False)
    report = json.loads((retention_home / "reports" / "latest.json").read_text())
    assert (extra["as_of"], extra["policy_version"]) == (report["as_of"], report["policy_version"])
    assert_nothing_personal({"asset event": json.dumps(events)}, crm_secrets(before))

    # The next night: nothing due, still an event (the warehouse learns the source is enforced):
    # nothing gone, only what legal holds keep.
    again = run_dag({"systems": ["crm"]})
    assert again.state == "success", task_states(again)
    (quiet,) = asset_events(again)
    assert quiet["extra"]["gone"] == 0 and quiet["extra"]["by_rule"] == per(ledger_rows(retention_home, again.run_id), "rule_id")
    assert {status for statuses in quiet["extra"]["by_rule"].values() for status in statuses} <= {"held"}


@pytest.mark.airflow
def test_replay_after_a_restore_emits_the_replayed_counts(crm, retention_home, tmp_path):
    backup = tmp_path / "crm-backup.db"
    with sqlite3.connect(tmp_path / "crm.db") as src, sqlite3.connect(backup) as dst:
        src.backup(dst)
    nightly = run_dag({"systems": ["crm"]})
    assert nightly.state == "success", task_states(nightly)
    crm.engine.dispose()
    with sqlite3.connect(backup) as src, sqlite3.connect(tmp_path / "crm.db") as dst:
        src.backup(dst)  # the restore: what the night erased is back

    dr = run_dag({"systems": ["crm"]}, dag_id="replay_erasures")
    assert dr.state == "success", task_states(dr)
    (event,) = asset_events(dr)
    assert (event["name"], event["task_id"]) == ("retention_erasures_crm", "crm.erase")
    extra = event["extra"]
    assert_counts_only(extra)
    rows = ledger_rows(retention_home, extra["ledger_run_id"])
    assert rows and extra["ledger_run_id"] != dr.run_id  # the replay's own ledger run
    assert extra["by_rule"] == per(rows, "rule_id")
    assert all(rule.startswith("replay:") for rule in extra["by_rule"])
    assert extra["gone"] > 0 and extra["dag_id"] == "replay_erasures"


@pytest.mark.airflow
def test_erasure_request_emits_per_system_counts_without_the_address(systems, retention_home, capfd):  # noqa: F811
    s = systems
    dry = run_dag({"email": s.a_email, "dry_run": True}, dag_id="erasure_request")
    assert dry.state == "success", task_states(dry)
    assert asset_events(dry) == []

    dr = run_dag({"email": s.a_email}, dag_id="erasure_request")
    assert dr.state == "success", task_states(dr)
    events = {e["name"]: e for e in asset_events(dr)}
    assert set(events) == {"retention_erasures_crm", "retention_erasures_newsletter", "retention_erasures_ticketing"}
    rows = ledger_rows(retention_home, dr.run_id)
    for system, event in events.items():
        extra = event["extra"]
        assert_counts_only(extra)
        assert event["task_id"] == extra["system"] == system.removeprefix("retention_erasures_")
        mine = [r for r in rows if r["system"] == extra["system"]]
        assert extra["by_rule"] == {"erasure-request": dict(Counter(r["status"] for r in mine))}
        assert extra["by_record_type"] == by_type(mine)
    assert events["retention_erasures_crm"]["extra"]["by_record_type"]["crm_invoice"] == {"erased": 1, "held": 1}
    assert_nothing_personal({"asset event": json.dumps(list(events.values()))}, [s.a_email, s.a_email.split("@")[0], *s.mc_names.values()])


# --- a real scheduler: the warehouse consumer is triggered by the producer's event ----------------

CONSUMER = "warehouse_erasures"


def _bundles() -> str:
    local = "airflow.dag_processing.bundles.local.LocalDagBundle"
    return json.dumps([
        {"name": "dags-folder", "classpath": local, "kwargs": {"path": str(ROOT / "dags")}},
        {"name": "retention-examples", "classpath": local, "kwargs": {"path": str(ROOT / "retention_dev" / "example_dags")}},
    ])


def _runs(af, dag_id: str) -> list[dict]:
    out = af.airflow("dags", "list-runs", dag_id, "-o", "json", check=False).stdout
    listed = [line for line in out.splitlines() if line.startswith("[")]
    return json.loads(listed[-1]) if listed else []


@pytest.mark.airflow
@pytest.mark.postgres
@pytest.mark.timeout(1800)  # four Airflow processes: slow on a loaded machine
def test_the_warehouse_consumer_is_triggered_by_the_erasure_event(tmp_path, postgres_url_for, crm, retention_home):
    from test_backfill import fresh_database

    from airflow_services import AirflowServices

    before = snapshot(crm.engine)
    meta = fresh_database(postgres_url_for("retention_airflow_assets"))
    env = {
        "AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST": _bundles(),
        # A loaded machine (parallel test runs) answers a task's first call late: wait, not fail.
        "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "120",
    }
    af = AirflowServices(tmp_path / "airflow", meta, env).start()
    try:
        af.wait_for_dag(CONSUMER)
        af.wait_for_dag("retention_nightly")
        af.airflow("dags", "unpause", CONSUMER)
        # The producer in one process against the same metadata database (the README's first run;
        # unpausing retention_nightly would start its schedule over all systems).
        produced = af.airflow("dags", "test", "retention_nightly", "--conf", json.dumps({"systems": ["crm"]}), timeout=600)
        assert [r["state"] for r in _runs(af, "retention_nightly")] == ["success"], produced.stdout[-3000:]
        deadline = time.monotonic() + 480
        while time.monotonic() < deadline:
            runs = _runs(af, CONSUMER)
            if runs and runs[0]["state"] in ("success", "failed"):
                break
            time.sleep(3)
        else:
            pytest.fail(f"{CONSUMER} was never triggered or never finished: {_runs(af, CONSUMER)}\n{af.tail()}")
        logs = "\n".join(p.read_text(errors="replace") for p in (tmp_path / "airflow" / "logs").rglob("*") if p.is_file() and CONSUMER in str(p))
    finally:
        af.stop()
    (run,) = runs
    assert run["state"] == "success", (run, [line for line in logs.splitlines() if '"level":"error"' in line or "Error" in line][-20:])
    assert run["run_id"].startswith("asset_triggered__"), run  # started by the scheduler on the event, not by hand
    rows = ledger_rows(retention_home)
    erased = per([r for r in rows if r["system"] == "crm"], "rule_id")
    assert erased
    for rule, statuses in erased.items():
        for status, n in statuses.items():
            assert re.search(rf"crm\s+{re.escape(rule)}\s+{status}\s+{n}\b", logs), (rule, status, n, logs[-3000:])
    assert_nothing_personal({"consumer log": logs}, crm_secrets(before))


def test_a_ledger_gone_after_the_erase_fails_the_event_in_one_line(monkeypatch, retention_home):
    """The event is counted from the ledger after the erase: a ledger that cannot be reached then
    fails the task with the ledger's one line (retryable), never a driver's traceback."""
    from airflow.sdk.exceptions import AirflowException

    from retention.airflow.assets import emit_erasures
    from retention.runs.context import RunInfo

    monkeypatch.setenv("RETENTION_LEDGER_URL", "postgresql://retention@127.0.0.1:9/ledger")
    run = RunInfo("retention_nightly", "r1", "2026-12-01T00:00:00+00:00", "p.yaml", "v1", "label", False, 0.25)
    with pytest.raises(AirflowException) as err:
        emit_erasures(run, "crm")
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert "\n" not in str(err.value) and "127.0.0.1" not in str(err.value), str(err.value)
