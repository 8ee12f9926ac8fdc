"""The DAG run's note in Airflow's grid: "DRY RUN, nothing erased: ..." or "erased N, held M, ...".

Set by an Airflow listener (``plugins/retention_reports.py`` registers this module) when a run
of a retention DAG succeeds or fails. Listeners on DAG runs are called where the run's state is
decided: in the scheduler, which has the metadata database (a task or a DAG callback in Airflow
3 has none: the callbacks run in the dag-processor, whose ORM access is blocked), and in the
same process under ``dag.test()``. The note is the run's report in one line (counts only) and is
written in the scheduler's own transaction; a note somebody wrote by hand is left alone.
"""

from __future__ import annotations

import logging

from airflow.listeners import hookimpl

from retention.airflow.run_reports import find_run, note_for

log = logging.getLogger("retention")

#: The DAGs whose runs get a note (their reports are in RETENTION_HOME).
DAGS = frozenset({"retention_nightly", "erasure_request", "replay_erasures", "policy_preview"})
# Each note this listener writes starts with one of these; another note is a person's.
_OURS = ("DRY RUN", "PREVIEW", "erased ", "no report")
NOTE_MAX = 1000  # Airflow's dag_run_note.content


def note_text(dag_id: str, run_id: str) -> str:
    return note_for(find_run(dag_id, run_id))[:NOTE_MAX]


def _write(dag_run) -> None:
    current = dag_run.note
    if current and not str(current).startswith(_OURS):
        return  # a person's note stays
    dag_run.note = note_text(dag_run.dag_id, dag_run.run_id)


def set_note(dag_run) -> None:
    if dag_run.dag_id not in DAGS:
        return
    try:
        from sqlalchemy.orm import object_session

        if object_session(dag_run) is not None:
            # The scheduler: the run is in its session, which holds the run's row locked; the
            # note is committed with the run's new state.
            _write(dag_run)
            return
        # dag.test() hands over a run no session holds any more: the note in a session of its own.
        import sqlalchemy as sa
        from airflow.models.dagrun import DagRun
        from airflow.utils.session import create_session

        with create_session() as session:
            run = session.scalar(sa.select(DagRun).where(DagRun.dag_id == dag_run.dag_id, DagRun.run_id == dag_run.run_id))
            if run is not None:
                _write(run)
    except Exception:  # noqa: BLE001 - a note must never fail the scheduler's loop
        log.warning("run %s of %s: could not set its note", dag_run.run_id, dag_run.dag_id, exc_info=True)


@hookimpl
def on_dag_run_success(dag_run, msg: str) -> None:
    set_note(dag_run)


@hookimpl
def on_dag_run_failed(dag_run, msg: str) -> None:
    set_note(dag_run)
