"""What a task can learn from Airflow about another DAG run, and the system lock that uses it.

A system lock in the ledger (``Ledger.acquire_system``) names the run that holds it. When that
run was killed (its worker SIGKILLed, its machine gone), nothing of it will ever release the
lock; the ledger cannot tell a killed run from a slow one, but Airflow can: the killed run's
DagRun is failed (or success, once cleared and marked). A task asks through the Task SDK, the
same way ``TriggerDagRunOperator`` waits for the run it triggered: the task instance's
``get_dagrun_state(dag_id, run_id)`` is a ``GetDagRunState`` message to the task's supervisor,
which asks the API server's execution API (``GET /execution/dag-runs/{dag_id}/{run_id}/state``).
No REST credentials are needed, and it works under ``dag.test()`` (an in-process supervisor)
as under a scheduler and workers.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from retention.runs.context import RunInfo

log = logging.getLogger("retention")

#: DagRun states in which a run may still hold a system: it runs, or is about to (cleared, queued).
RUNNING_STATES = frozenset({"queued", "running"})


def dag_run_is_running(dag_id: str | None, run_id: str) -> bool | None:
    """Whether Airflow still runs the DagRun ``dag_id``/``run_id``: ``True`` (queued or running),
    ``False`` (success or failed), or ``None`` when it cannot tell: not called from a task, no
    DAG id, no such DagRun (a run of the ``retention`` command, which Airflow does not know, or
    one deleted from Airflow), or the API server did not answer. ``None`` leaves the decision to
    the ledger's own rule (a lock is stale after 12 hours)."""
    if not dag_id:
        return None
    try:
        from airflow.sdk import get_current_context
        from airflow.sdk.exceptions import AirflowRuntimeError

        ti = get_current_context()["ti"]
    except Exception:  # noqa: BLE001 - outside a task (the command line, a test): cannot tell
        return None
    try:
        state = ti.get_dagrun_state(dag_id, run_id)
    except AirflowRuntimeError as exc:  # e.g. 404: Airflow has no such run
        log.info("run %s of %s: Airflow cannot say whether it still runs (%s)", run_id, dag_id, exc.error.error.value)
        return None
    except Exception:  # noqa: BLE001 - the supervisor or the API server did not answer
        log.warning("run %s of %s: Airflow could not be asked whether it still runs", run_id, dag_id, exc_info=True)
        return None
    state = str(getattr(state, "value", state))
    return state in RUNNING_STATES


def take_system(run: RunInfo, system: str, *, wait_seconds: float = 0) -> None:
    """Take ``system`` for this run, at once when its lock belongs to a run Airflow no longer
    runs (the takeover is logged: which run held it, since when). Raises ``LockTimeout`` when a
    running run holds it after ``wait_seconds``. Re-entrant, like ``Ledger.acquire_system``."""
    from retention.runs.context import task_ledger

    with task_ledger() as ledger:
        ledger.acquire_system(system, run.run_id, wait_seconds=wait_seconds, is_running=dag_run_is_running)
