"""Incremental extraction for ticketing (issue 12, item 1): the nightly extract reads Zendesk's
incremental exports from the cursor stored with the record index, and its plan is the plan a full
read gives. Against the Zendesk stand-in over real HTTP; the DAG runs are real ``dag.test`` runs.

What the stand-in holds is changed through its own API (the changes a feed sees) or, for drift,
in its state file while it is stopped (a record gone for good without a word to any feed)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
import uuid
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest
import requests
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_ticketing_pipeline import STANDIN_LIMITS, Zendesk, adapter_for, as_of_of

from airflow_run import ensure_metadata_db, load_dag, run_dag, task_states
from retention.domain.approval import plan_hash
from retention.runs import nightly as pipeline
from retention.runs.context import task_ledger
from retention.store.record_index import RecordIndex
from retention.systems.base import ChangeFeed
from retention_dev.standins import zendesk as zs
from retention_dev.standins.process import StandIn


class FullReadOnly:
    """The ticketing adapter without its change feed: ``extract`` reads everything, as before
    the record index existed, and leaves the index alone."""

    def __init__(self, inner):
        self.inner = inner
        self.system, self.record_types, self.erase_batch = inner.system, inner.record_types, inner.erase_batch

    def extract(self, write, now):
        self.inner.extract(write, now)

    def close(self):
        self.inner.close()


def plan_of(z: Zendesk, as_of, *, feed: bool, reconcile: bool = False) -> tuple[pd.DataFrame, dict]:
    """open_run (as of ``as_of``), extract and plan in-process: through the change feed and the
    record index (``feed``), or by a plain full read that leaves the index alone. Returns the plan
    frame in a fixed order and the extract summary; the system is released afterwards."""
    run = pipeline.RunInfo.from_dict(
        pipeline.open_run("retention_nightly", f"inproc__{uuid.uuid4().hex}", as_of, dry_run=True, max_plan_share=1.0)
    )
    adapter = adapter_for(z)
    try:
        summary = pipeline.extract(run, "ticketing", adapter if feed else FullReadOnly(adapter), reconcile=reconcile)
    finally:
        adapter.close()
    planned = pipeline.plan(run, "ticketing")["planned"]
    # As in the DAG: the index step after extract (a full read's index and cursor are its work).
    summary = {**summary, **pipeline.index(run, "ticketing")}
    with task_ledger() as ledger:
        ledger.release_system("ticketing", run.run_id)
    frame = run.staging.read_frame("ticketing", "plan")
    run.staging.remove()
    return frame.sort_values(["record_type", "record_id"]).reset_index(drop=True), {**summary, "planned": planned}


def assert_same_plan(a: pd.DataFrame, b: pd.DataFrame) -> None:
    if len(a) != len(b):  # say which rows (synthetic ids) before the frames' own message
        rows = lambda f: set(zip(f["record_type"], f["record_id"].astype(str), f["rule_id"], f["action"].astype(str)))  # noqa: E731
        assert rows(a) == rows(b), f"only from the index: {sorted(rows(a) - rows(b))}; only from a full read: {sorted(rows(b) - rows(a))}"
    pd.testing.assert_frame_equal(a, b)
    assert plan_hash(a) == plan_hash(b)


def incremental_requests(z: Zendesk) -> int:
    by = z.stats()["requests_by_endpoint"]
    return sum(n for k, n in by.items() if k.startswith("incremental"))


def restart_with(z: Zendesk, tmp_path, monkeypatch, change) -> None:
    """Stop the stand-in (it saves its state), change the state file with ``change(state)``, start
    it again on that file and point the connection at it."""
    z.standin.stop()
    path = tmp_path / "zendesk.npz"
    state = zs.State.load(path, job_seconds=0.1)
    change(state)
    state.save(path)
    z.standin = StandIn("zendesk", "--port", "0", "--state-file", str(path), *STANDIN_LIMITS).start()
    z.base_url = z.standin.base_url
    conn = json.loads(os.environ["AIRFLOW_CONN_RETENTION_ZENDESK"])
    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_ZENDESK", json.dumps({**conn, "host": z.base_url}))


def failed_run_id(ledger) -> str:
    with ledger.engine.connect() as conn:
        return conn.execute(sa.text("select run_id from system_lock where system = 'ticketing'")).scalar_one()


def task_logs(run_id: str) -> str:
    logs = Path(os.environ["AIRFLOW_HOME"]) / "logs"
    return "".join(p.read_text(errors="replace") for p in logs.rglob("*") if p.is_file() and run_id in str(p))


def report(home) -> dict:
    return json.loads((home / "reports" / "latest.json").read_text())


@pytest.fixture
def zendesk(tmp_path, monkeypatch, retention_home):
    z = Zendesk(tmp_path, monkeypatch)
    yield z
    z.stop()


def test_the_ticketing_adapter_is_a_change_feed():
    from retention.systems.ticketing.adapter import TicketingAdapter

    assert issubclass(TicketingAdapter, ChangeFeed)


@pytest.mark.airflow
def test_a_second_night_reads_only_the_change_and_plans_as_a_full_read(zendesk, retention_home, tmp_path, monkeypatch, capfd, caplog):
    z = zendesk
    # Night 1: no index yet, a full read. (Dry runs: the plans stay full of due records; that
    # erased records leave the index is test_ticketing_pipeline's second night, which plans nothing.)
    t0, u0 = z.tickets(), z.users()
    dr1 = run_dag({"systems": ["ticketing"], "dry_run": True})
    assert dr1.state == "success", task_states(dr1)
    read1 = report(retention_home)["systems"]["ticketing"]["read"]
    assert read1 == {
        "mode": "full", "changed": {"support_ticket": len(t0), "ticket_user": len(u0)}, "gone": {}, "drift": {},
        "records": {"support_ticket": len(t0), "ticket_user": len(u0)},
    }
    tickets = z.tickets()
    full_requests = incremental_requests(z)

    # A few changes through the API: a solved ticket reopened, an open one solved, one
    # soft-deleted, a user without tickets soft-deleted.
    solved = tickets.index[tickets["status"] == "solved"]
    opened = tickets.index[tickets["status"] == "open"]
    z.set_status(int(solved[0]), "open")
    z.set_status(int(opened[0]), "solved")
    z.api("DELETE", f"/api/v2/tickets/{int(opened[1])}.json")
    # (Not a role change: the stand-in derives its tickets' followers from the agents it has when
    # it starts, and it is restarted below.)
    z.api("DELETE", f"/api/v2/users/{int(z.edge['users_without_tickets'][-1])}.json")
    before = incremental_requests(z)

    # Night 2: from the stored cursor, only those records, in one request per export.
    dr2 = run_dag({"systems": ["ticketing"], "dry_run": True})
    assert dr2.state == "success", task_states(dr2)
    read2 = report(retention_home)["systems"]["ticketing"]["read"]
    assert read2["mode"] == "incremental"
    assert read2["changed"] == {"support_ticket": 3, "ticket_user": 1} and read2["gone"] == {}
    assert incremental_requests(z) - before == 2, "an incremental night asks each export once for a few changes"
    assert full_requests >= 3
    # Night 2 staged the whole index, as many records as the system holds.
    assert report(retention_home)["systems"]["ticketing"]["extracted"] == {
        "support_ticket": len(z.tickets()), "ticket_user": len(z.users())}
    as_of = as_of_of(retention_home)

    # Its plan is the full read's: planned again from the index (nothing changed since) and by a
    # plain full read, as of the same time.
    from_index, summary = plan_of(z, as_of.to_pydatetime(), feed=True)
    assert summary["mode"] == "incremental" and summary["changed"] == {}
    from_full, full_summary = plan_of(z, as_of.to_pydatetime(), feed=False)
    assert len(from_full) > 150
    assert_same_plan(from_index, from_full)
    assert report(retention_home)["systems"]["ticketing"]["planned"] == full_summary["planned"]
    # A ticket gone for good behind the feed's back: the next incremental night cannot see it,
    # a reconciliation (asked for with the param) finds it as drift, counts only in the log.
    now_tickets = z.tickets()
    victim = int(now_tickets.index[(now_tickets["status"] == "closed") & (now_tickets.index > 100)][0])

    def purge(state):
        state.t_status[victim - 1] = zs.GONE  # the export index is rebuilt from the statuses on load

    restart_with(z, tmp_path, monkeypatch, purge)
    assert victim not in z.tickets().index
    capfd.readouterr()
    caplog.clear()
    dr3 = run_dag({"systems": ["ticketing"], "dry_run": True, "reconcile": True})
    assert dr3.state == "success", task_states(dr3)
    read3 = report(retention_home)["systems"]["ticketing"]["read"]
    assert read3["mode"] == "reconciliation"
    assert read3["drift"] == {"support_ticket": {"missing": 0, "extra": 1, "different": 0}}
    # The task's log: on the terminal, or (once another test has set up logging in this process)
    # in pytest's log capture or the run's task log files.
    out = "".join(capfd.readouterr()) + caplog.text + task_logs(dr3.run_id)
    lines = sorted({line.split("] ", 1)[-1] for line in out.splitlines() if "ticketing: reconciliation (" in line})
    assert len(lines) == 1, lines
    assert "ticketing: reconciliation (asked for): record index drift support_ticket: 0 missing, 1 extra, 0 different" in lines[0]
    assert not re.search(rf"\b{victim}\b", lines[0])
    # After it, index and full read agree again.
    assert_same_plan(plan_of(z, as_of.to_pydatetime(), feed=True)[0], plan_of(z, as_of.to_pydatetime(), feed=False)[0])


def test_a_reconciliation_comes_when_due_and_a_failed_feed_keeps_the_old_cursor(zendesk, retention_home, monkeypatch):
    z = zendesk
    as_of = z.now
    assert plan_of(z, as_of, feed=True)[1]["mode"] == "full"
    assert plan_of(z, as_of, feed=True)[1]["mode"] == "incremental"
    monkeypatch.setenv("RETENTION_RECONCILE_EVERY", "PT0S")
    summary = plan_of(z, as_of, feed=True)[1]
    assert summary["mode"] == "reconciliation" and summary["drift"] == {}
    monkeypatch.setenv("RETENTION_RECONCILE_EVERY", "P7D")
    with task_ledger() as ledger:
        cursor = RecordIndex(ledger.engine, "ticketing").state().cursor
    tickets = z.tickets()
    z.set_status(int(tickets.index[tickets["status"] == "open"][0]), "solved")
    z.faults(error_next=1, error_status=400, match="incremental/users")
    with pytest.raises(Exception):  # noqa: B017 - whatever the client raises after its retries
        plan_of(z, as_of, feed=True)
    z.faults()
    with task_ledger() as ledger:
        assert RecordIndex(ledger.engine, "ticketing").state().cursor == cursor, "a failed read moved the cursor"
        ledger.release_run(failed_run_id(ledger))
    assert plan_of(z, as_of, feed=True)[1]["changed"] == {"support_ticket": 1}


def test_a_change_inside_the_export_lag_is_read_the_night_after(zendesk, tmp_path, monkeypatch):
    """Zendesk leaves the last minute out of its incremental exports (here the stand-in's lag is
    3 s, the same rule): a change made just before a night's read is not in that night's read,
    and it is not lost behind the cursor that night stores either: the next night reads it, and
    then plans exactly as a full read does."""
    z, lag = zendesk, 3
    z.standin.stop()  # it saves its state; started again with the lag on the same state
    z.standin = StandIn("zendesk", "--port", "0", "--state-file", str(tmp_path / "zendesk.npz"), *STANDIN_LIMITS,
                        "--export-lag-seconds", str(lag)).start()
    z.base_url = z.standin.base_url
    conn = json.loads(os.environ["AIRFLOW_CONN_RETENTION_ZENDESK"])
    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_ZENDESK", json.dumps({**conn, "host": z.base_url}))
    time.sleep(lag + 1)  # the seeded records are older than the lag
    as_of = z.now
    assert plan_of(z, as_of, feed=True)[1]["mode"] == "full"
    tickets = z.tickets()
    z.set_status(int(tickets.index[tickets["status"] == "open"][0]), "solved")
    inside = plan_of(z, as_of, feed=True)[1]
    assert inside["mode"] == "incremental" and not inside.get("changed"), inside  # younger than the lag
    time.sleep(lag + 1)
    after, summary = plan_of(z, as_of, feed=True)
    assert summary["mode"] == "incremental" and summary["changed"] == {"support_ticket": 1}, summary
    assert_same_plan(after, plan_of(z, as_of, feed=False)[0])


# --- the index step: a full read's index and cursor off the extract's critical path ----------


def _open(as_of) -> pipeline.RunInfo:
    return pipeline.RunInfo.from_dict(
        pipeline.open_run("retention_nightly", f"inproc__{uuid.uuid4().hex}", as_of, dry_run=True, max_plan_share=1.0)
    )


def _extract(z: Zendesk, run: pipeline.RunInfo, **kw) -> dict:
    adapter = adapter_for(z)
    try:
        return pipeline.extract(run, "ticketing", adapter, **kw)
    finally:
        adapter.close()


def _state_and_counts():
    with task_ledger() as ledger:
        index = RecordIndex(ledger.engine, "ticketing")
        return index.state(), index.counts()


def test_a_full_read_stages_only_and_the_index_step_builds_the_index_and_stores_the_cursor(zendesk, monkeypatch):
    z = zendesk
    # Night 1, a first full read: extract stages the records and leaves the index and the cursor
    # alone; what the index step must do is in the staged summary, the cursor not in the XCom.
    run = _open(z.now)
    summary = _extract(z, run)
    assert summary["mode"] == "full" and "changed" not in summary and summary["index"]["mode"] == "full"
    assert "cursor" not in summary["index"]
    pending = run.staging.read_json("ticketing", "extract")["index"]
    assert pending["mode"] == "full" and pending["cursor"] and pending["read_at"] == summary["extracted_at"]
    assert _state_and_counts() == (None, {})
    built = pipeline.index(run, "ticketing")
    assert built["index"] == "built" and built["mode"] == "full" and built["drift"] == {}
    assert built["changed"] == summary["read"]  # every record read is indexed (no record twice here)
    state, counts = _state_and_counts()
    assert state.cursor == pending["cursor"] and state.reconciled_at == datetime.fromisoformat(pending["read_at"])
    assert counts == summary["read"]
    assert run.staging.read_json("ticketing", "index") == built
    with task_ledger() as ledger:
        ledger.release_system("ticketing", run.run_id)

    # Night 2, incremental: the changes went into the index in extract; nothing left to do.
    tickets = z.tickets()
    z.set_status(int(tickets.index[tickets["status"] == "open"][0]), "solved")
    run2 = _open(z.now)
    summary2 = _extract(z, run2)
    assert summary2["mode"] == "incremental" and summary2["changed"] == {"support_ticket": 1} and "index" not in summary2
    moved, _ = _state_and_counts()
    assert moved.cursor != state.cursor, "an incremental extract stores its cursor itself"
    assert pipeline.index(run2, "ticketing") == {"mode": "incremental", "index": "nothing to do"}
    assert _state_and_counts() == (moved, counts)
    with task_ledger() as ledger:
        ledger.release_system("ticketing", run2.run_id)

    # A reconciliation: the extract leaves the old cursor; the index step stores the new one
    # with the rebuilt index and the drift; the report reads the drift from it.
    run3 = _open(z.now)
    summary3 = _extract(z, run3, reconcile=True)
    assert summary3["mode"] == "reconciliation" and summary3["index"]["why"] == "asked for"
    assert _state_and_counts()[0] == moved
    rebuilt = pipeline.index(run3, "ticketing")
    assert rebuilt["mode"] == "reconciliation" and rebuilt["drift"] == {}
    after, _ = _state_and_counts()
    assert after.cursor == run3.staging.read_json("ticketing", "extract")["index"]["cursor"]
    assert after.reconciled_at > moved.reconciled_at
    read = pipeline._read_of(run3.staging.read_json("ticketing", "extract"), run3.staging.read_json("ticketing", "index"))
    assert read == {"mode": "reconciliation", "changed": rebuilt["changed"], "gone": {}, "drift": {}, "records": summary3["read"]}
    # Before the index step finished, the report says so rather than show no drift.
    unbuilt = pipeline._read_of(run3.staging.read_json("ticketing", "extract"), None)
    assert unbuilt["drift"] is None and unbuilt["changed"] is None
    assert "the record index was not rebuilt" in pipeline.render_report({
        "run_id": "r", "dry_run": True, "as_of": "a", "policy_version": "v", "policy_label": "l", "state": "failed",
        "seconds": 1, "ledger": {}, "systems": {"ticketing": {
            "extracted": {}, "validation": None, "read": unbuilt, "quarantined": None, "planned": None, "erase": None,
        }},
    })
    with task_ledger() as ledger:
        ledger.release_system("ticketing", run3.run_id)


def test_a_failed_index_step_leaves_the_old_index_and_cursor(zendesk, monkeypatch):
    z = zendesk
    plan_of(z, z.now, feed=True)  # a first night, index built
    before = _state_and_counts()
    tickets = z.tickets()
    z.set_status(int(tickets.index[tickets["status"] == "open"][0]), "solved")
    run = _open(z.now)
    _extract(z, run, reconcile=True)
    real = RecordIndex.update

    def failing(self, *, full):
        @contextlib.contextmanager
        def broken():
            with real(self, full=full) as update:
                update.write("support_ticket", run.staging.read_extract("ticketing", "support_ticket").head(3))
                raise RuntimeError("the ledger database went away")
                yield update
        return broken()

    monkeypatch.setattr(RecordIndex, "update", failing)
    with pytest.raises(RuntimeError, match="went away"):
        pipeline.index(run, "ticketing")
    assert _state_and_counts() == before
    monkeypatch.setattr(RecordIndex, "update", real)
    # Retried, the step finishes the work: the index follows the read, the cursor moves.
    assert pipeline.index(run, "ticketing")["drift"] == {"support_ticket": {"missing": 0, "extra": 0, "different": 1}}
    assert _state_and_counts()[0].cursor != before[0].cursor


def test_the_nightly_dag_runs_index_beside_plan_and_before_verify():
    ensure_metadata_db()
    dag = load_dag("retention_nightly")
    for system in ("crm", "newsletter", "ticketing"):
        index = dag.get_task(f"{system}.index")
        assert index.upstream_task_ids == {"open_run", f"{system}.extract"}
        assert index.downstream_task_ids == {f"{system}.verify"}
        assert index.trigger_rule == "all_success"  # skipped with extract (a system not selected)
        assert dag.get_task(f"{system}.verify").upstream_task_ids == {"open_run", f"{system}.erase", f"{system}.index"}
        assert dag.get_task(f"{system}.plan").upstream_task_ids == {"open_run", f"{system}.extract"}


# --- the property: for any changes a feed sees, the index's plan is the full read's ------------

CHANGES = st.lists(
    st.tuples(st.sampled_from(["status", "soft_delete", "role", "cc", "user_delete"]), st.integers(0, 10**6),
              st.sampled_from(["new", "open", "pending", "hold", "solved", "closed"])),
    min_size=0, max_size=8,
)


@pytest.fixture(scope="module")
def module_zendesk(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("home")
    mp.setenv("RETENTION_HOME", str(home))
    mp.delenv("RETENTION_LEDGER_URL", raising=False)
    z = Zendesk(tmp_path_factory.mktemp("zendesk"), mp, n_tickets=400)
    yield z
    z.stop()
    mp.undo()


def apply(z: Zendesk, change: tuple, tickets: pd.DataFrame, users: pd.DataFrame) -> None:
    kind, n, status = change
    live = tickets.index[tickets["status"] != "deleted"]
    if kind == "status" and len(live):
        z.set_status(int(live[n % len(live)]), status)
    elif kind == "soft_delete" and len(live):
        z.api("DELETE", f"/api/v2/tickets/{int(live[n % len(live)])}.json")
    elif kind == "role":
        people = users.index[(users["role"] != "admin") & users["active"]]
        z.api("PUT", f"/api/v2/users/{int(people[n % len(people)])}.json",
              json={"user": {"role": ["end-user", "agent"][n % 2]}})
    elif kind == "cc" and len(live):
        ends = users.index[(users["role"] == "end-user") & users["active"]]
        z.api("PUT", f"/api/v2/tickets/{int(live[n % len(live)])}.json",
              json={"ticket": {"email_cc_ids": [int(ends[n % len(ends)])]}})
    elif kind == "user_delete":
        ends = users.index[(users["role"] == "end-user") & users["active"]]
        uid = int(ends[n % len(ends)])
        r = requests.delete(f"{z.base_url}/api/v2/users/{uid}.json", auth=("agent@example.org/token", "token"), timeout=30)
        assert r.status_code in (200, 422), r.status_code  # 422: requester of a ticket not closed


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=CHANGES)
def test_planning_from_the_index_gives_the_full_reads_plan_whatever_changed(module_zendesk, changes):
    z = module_zendesk
    # Zendesk leaves the last minute out of its exports, so a change never lands behind a cursor
    # in the second the cursor was taken; the stand-in here leaves nothing out (no export lag, to
    # keep the test fast), so the changes wait for the next second instead.
    time.sleep(1.05 - time.time() % 1)
    for change in changes:
        # The systems as they are now: an earlier change may have deleted the record a snapshot
        # taken before it would pick.
        apply(z, change, z.tickets(), z.users())
    as_of = z.now
    from_index, summary = plan_of(z, as_of, feed=True)
    assert summary["mode"] in ("full", "incremental")
    from_full, _ = plan_of(z, as_of, feed=False)
    assert_same_plan(from_index, from_full)
