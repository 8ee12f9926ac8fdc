"""What Airflow's UI shows of each DAG: every param of the trigger form has a title, a section
and a description; every task has its own doc; and the nightly DAG, the one with a schedule,
starts paused, so the first run can be a dry run triggered without unpausing it."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from airflow_run import ensure_metadata_db, load_dag

ROOT = Path(__file__).resolve().parents[1]
DAG_IDS = sorted(p.stem for p in (ROOT / "dags").glob("*.py"))


@pytest.fixture(scope="module", autouse=True)
def _metadata_db():
    ensure_metadata_db()  # the DagBag reads the DAG's row (is it paused?) from the session's own database


def test_every_dag_file_is_covered():
    assert DAG_IDS == ["erasure_request", "policy_preview", "replay_erasures", "retention_nightly"]


@pytest.mark.parametrize("dag_id", DAG_IDS)
def test_every_param_has_title_section_and_description(dag_id):
    dag = load_dag(dag_id)
    assert dag.params, f"{dag_id} has no params"
    missing = []
    for name, param in dag.params.items():
        # What the trigger form reads: the schema's title and section, the param's description.
        for field, value in (("title", param.schema.get("title")), ("section", param.schema.get("section")), ("description", param.description)):
            if not (isinstance(value, str) and value.strip()):
                missing.append(f"{name}.{field}")
    assert not missing, f"{dag_id}: params without {', '.join(missing)}"


@pytest.mark.parametrize("dag_id", DAG_IDS)
def test_every_task_has_doc_md(dag_id):
    dag = load_dag(dag_id)
    undocumented = [t.task_id for t in dag.tasks if not (t.doc_md or "").strip()]
    assert not undocumented, f"{dag_id}: tasks without doc_md: {undocumented}"


def test_nightly_dag_is_paused_on_creation():
    # Whatever [core] dags_are_paused_at_creation says: a scheduled run erases, so the first run
    # must be one somebody chose (a dry run triggered with `airflow dags trigger`, which does not
    # unpause), never the scheduler's.
    assert load_dag("retention_nightly").is_paused_upon_creation is True


def test_nightly_doc_gives_a_first_dry_run_that_runs_while_paused():
    # `airflow dags test` runs the DAG in one process whether it is paused or not; a run
    # triggered on a paused DAG (the form with "unpause" unticked, `airflow dags trigger`) waits
    # queued until the DAG is unpaused, and unpausing starts the scheduler's erasing runs.
    doc = load_dag("retention_nightly").doc_md
    assert "airflow dags test retention_nightly --conf '{\"dry_run\": true}'" in doc
    assert "Unpause on trigger" in doc


def test_airflow_stores_the_nightly_dag_paused_and_the_others_as_configured(tmp_path):
    """Through Airflow itself: a fresh metadata database, the DAG files serialised by `airflow
    dags reserialize` (what the dag-processor does), with [core] dags_are_paused_at_creation off."""
    home = tmp_path / "airflow"
    env = {
        **os.environ, "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
    }
    for args in (["db", "migrate"], ["dags", "reserialize"]):
        out = subprocess.run([sys.executable, "-m", "airflow", *args], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    with sqlite3.connect(home / "airflow.db") as db:
        paused = dict(db.execute("select dag_id, is_paused from dag").fetchall())
    assert paused == {"retention_nightly": 1, "erasure_request": 0, "policy_preview": 0, "replay_erasures": 0}
