"""Run retention_nightly for real with ``dag.test()`` and return the finished DagRun."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_migrated: set[str] = set()


def ensure_metadata_db() -> None:
    import os

    home = os.environ["AIRFLOW_HOME"]
    if home in _migrated:
        return
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True)
    _migrated.add(home)


def load_dag(dag_id: str = "retention_nightly"):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags" / f"{dag_id}.py"))
    assert not bag.import_errors, bag.import_errors
    return bag.dags[dag_id]  # not get_dag(): that asks the metadata database, which may not exist yet


def run_dag(conf: dict, dag_id: str = "retention_nightly", logical_date=None):
    ensure_metadata_db()
    dag = load_dag(dag_id)
    if logical_date is not None:  # a run as of a given time (a backfill's logical date)
        return dag.test(run_conf=conf, logical_date=logical_date)
    return dag.test(run_conf=conf)


def task_states(dagrun) -> dict[str, str]:
    import sqlalchemy as sa
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.execute(
            sa.select(TaskInstance.task_id, TaskInstance.state).where(
                TaskInstance.dag_id == dagrun.dag_id, TaskInstance.run_id == dagrun.run_id
            )
        ).all()
    return {t: str(s.value if hasattr(s, "value") else s) for t, s in rows}


def xcom_values(dagrun) -> list[str]:
    import sqlalchemy as sa
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        rows = session.execute(
            sa.select(XComModel.value).where(XComModel.dag_id == dagrun.dag_id, XComModel.run_id == dagrun.run_id)
        ).all()
    return [str(r[0]) for r in rows]
