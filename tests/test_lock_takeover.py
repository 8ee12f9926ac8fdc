"""A crashed run must not block the next ones: real ``retention_nightly`` runs (dag.test) on a
small SQLite CRM.

A run killed between extract and report (the worker SIGKILLed, the machine gone) leaves its
system lock in the ledger and its ledger run ``running``: nothing of that run will ever release
it. Airflow knows better: the killed run's DagRun is failed. The next run asks Airflow, through
the Task SDK, whether the lock's run is still running, takes the lock over at once when it is
not (logging which run held it and since when), and erases what is due; while the holder's
DagRun is still running, it waits.

Each killed run is made from a real one: a first run succeeds, then its traces are put back the
way a SIGKILL during its erase step leaves them (DagRun failed in Airflow's metadata database,
ledger run running, lock held).
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from datetime import UTC

import pytest
import sqlalchemy as sa

from airflow_run import run_dag, task_states
from retention.store.ledger import erasure_run, system_lock

pytestmark = pytest.mark.airflow

CONF = {"systems": ["crm"], "max_plan_share": 1.0}


@pytest.fixture
def crm(tmp_path, retention_home, monkeypatch):
    """A CRM of ten leads, none due yet."""
    from retention.systems.crm import schema

    url = f"sqlite:///{tmp_path / 'crm.db'}"
    engine = sa.create_engine(url)
    schema.create_schema(engine)
    now = dt.datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(schema.contact.insert(), [
            {"id": i, "kind": "lead", "first_name": "Lås", "last_name": f"Testsson {i}", "email": f"lock{i}@example.org",
             "opted_out": False, "created_at": now - dt.timedelta(days=30), "last_interaction_at": now - dt.timedelta(days=10)}
            for i in range(1, 11)
        ])
    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_CRM", json.dumps({"conn_type": "retention_crm", "extra": {"sqlalchemy_url": url}}))
    yield engine
    engine.dispose()


def make_due(engine: sa.Engine, contact_id: int) -> None:
    """A lead whose last interaction was two years ago: due under the policy's rule ``lead``."""
    from retention.systems.crm import schema

    with engine.begin() as conn:
        conn.execute(
            schema.contact.update().where(schema.contact.c.id == contact_id)
            .values(last_interaction_at=dt.datetime.now(UTC) - dt.timedelta(days=800))
        )


def contacts(engine: sa.Engine) -> set[int]:
    with engine.connect() as conn:
        return {int(i) for i in conn.exec_driver_sql("SELECT id FROM contact").scalars()}


def ledger(home) -> sa.Engine:
    return sa.create_engine(f"sqlite:///{home / 'ledger.db'}")


def lock_holder(home, system: str) -> tuple[str, dt.datetime] | None:
    engine = ledger(home)
    try:
        with engine.connect() as conn:
            row = conn.execute(sa.select(system_lock.c.run_id, system_lock.c.acquired_at).where(system_lock.c.system == system)).first()
    finally:
        engine.dispose()
    return (row[0], row[1]) if row else None


def set_dagrun_state(dagrun, state: str) -> None:
    """The DagRun's state in Airflow's metadata database (what the scheduler writes when a
    run's worker is killed and its task fails, or an operator marks the run failed)."""
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        session.execute(
            sa.update(DagRun).where(DagRun.dag_id == dagrun.dag_id, DagRun.run_id == dagrun.run_id).values(state=state)
        )


def killed_during_erase(home, dagrun, system: str, held_since: dt.datetime, *, airflow_state: str = "failed") -> None:
    """Put a finished run back the way a SIGKILL during its erase step leaves it: its report
    never ran, so its ledger run is still ``running`` and it still holds the system's lock."""
    set_dagrun_state(dagrun, airflow_state)
    engine = ledger(home)
    try:
        with engine.begin() as conn:
            conn.execute(erasure_run.update().where(erasure_run.c.run_id == dagrun.run_id).values(state="running", finished_at=None))
            conn.execute(system_lock.insert().values(system=system, run_id=dagrun.run_id, acquired_at=held_since))
    finally:
        engine.dispose()


def erased(home, run_id: str) -> set[str]:
    engine = ledger(home)
    try:
        with engine.connect() as conn:
            return set(conn.exec_driver_sql(
                "SELECT record_type FROM erasure_ledger WHERE run_id = ? AND status = 'erased'", (run_id,)
            ).scalars())
    finally:
        engine.dispose()


def rescheduled_extracts(dag_id: str) -> set[str]:
    """The runs of the DAG whose crm.extract gave its worker slot back to wait for a lock."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        return set(session.scalars(
            sa.select(TaskInstance.run_id).where(
                TaskInstance.dag_id == dag_id, TaskInstance.task_id == "crm.extract", TaskInstance.state == "up_for_reschedule",
            )
        ))


def fail_task(dag_id: str, run_id: str, task_id: str) -> None:
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        session.execute(
            sa.update(TaskInstance)
            .where(TaskInstance.dag_id == dag_id, TaskInstance.run_id == run_id, TaskInstance.task_id == task_id)
            .values(state="failed")
        )


class Watcher:
    """In the background: as soon as another run's crm.extract waits (rescheduled) for the
    lock of ``first``, note that run and the lock's holder, and call ``act(waiting_run_id)``."""

    def __init__(self, first, home, act, seconds: float = 300):
        self.waiting: str | None = None
        self.holder: tuple | None = None
        self._done = threading.Event()
        earlier = rescheduled_extracts(first.dag_id)  # of other tests' runs in the same metadata database

        def run() -> None:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and not self._done.is_set():
                waiting = rescheduled_extracts(first.dag_id) - earlier
                if waiting:
                    self.waiting, self.holder = min(waiting), lock_holder(home, "crm")
                    act(self.waiting)
                    return
                time.sleep(0.5)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join(10)


def logged(capfd, caplog) -> list[str]:
    """Every line the runs' tasks logged (task output, and records the logging plugin caught)."""
    out, err = capfd.readouterr()
    return (out + err + caplog.text).splitlines()


def test_the_lock_of_a_killed_run_is_taken_over_at_once(crm, retention_home, capfd, caplog):
    first = run_dag(CONF)
    assert first.state == "success", task_states(first)
    held_since = dt.datetime.now(UTC).replace(microsecond=0) - dt.timedelta(hours=1)
    killed_during_erase(retention_home, first, "crm", held_since)
    make_due(crm, 3)
    capfd.readouterr()
    caplog.clear()

    # A run that waits for the lock instead (its extract rescheduled, a minute at a time, until
    # the 12 hours are up) is stopped here at once: its extract is failed, so the test ends.
    blocked: list[str] = []

    def stop(waiting: str) -> None:
        blocked.append(waiting)
        fail_task(first.dag_id, waiting, "crm.extract")

    stopper = Watcher(first, retention_home, stop)
    second = run_dag(CONF)
    stopper.stop()
    states = task_states(second)
    assert not blocked, "the next run waits for the lock of a run Airflow no longer runs (killed)"
    assert second.state == "success", states
    assert states["crm.extract"] == states["crm.erase"] == states["report"] == "success", states
    assert 3 not in contacts(crm), "the due lead was not erased: the killed run's lock blocked the run"
    assert erased(retention_home, second.run_id) == {"crm_contact"}
    assert lock_holder(retention_home, "crm") is None  # the second run's report released it
    takeover = [line for line in logged(capfd, caplog) if "taken over" in line]
    assert takeover, "the takeover is not logged"
    assert any(first.run_id in line and held_since.strftime("%Y-%m-%d %H:%M") in line and second.run_id in line for line in takeover), takeover


def test_a_lock_is_waited_for_while_its_run_is_running_in_airflow(crm, retention_home, capfd, caplog):
    """While Airflow still runs the holder, the next run waits (its extract is rescheduled,
    the lock stays the holder's, even past the 12 hours after which a lock counted as stale);
    once the holder's DagRun has failed, the next attempt takes it over."""
    first = run_dag(CONF)
    assert first.state == "success", task_states(first)
    held_since = dt.datetime.now(UTC).replace(microsecond=0) - dt.timedelta(hours=13)
    killed_during_erase(retention_home, first, "crm", held_since, airflow_state="running")
    make_due(crm, 4)

    # Once the second run waits, check that the lock is still the first run's, then fail the
    # first run in Airflow (as the scheduler does when its worker was killed).
    watcher = Watcher(first, retention_home, lambda waiting: set_dagrun_state(first, "failed"))
    second = run_dag(CONF)
    watcher.stop()
    states = task_states(second)
    assert watcher.waiting == second.run_id, "the second run did not wait for a run Airflow still runs"
    assert watcher.holder[0] == first.run_id, "a lock was taken from a run that Airflow still runs"
    assert second.state == "success", states
    assert 4 not in contacts(crm)
    assert lock_holder(retention_home, "crm") is None
    assert any("taken over" in line and first.run_id in line for line in logged(capfd, caplog))
