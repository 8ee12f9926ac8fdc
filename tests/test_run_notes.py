"""Each retention DAG run gets a note in Airflow's grid, written by the plugin's listener when
the run ends (issue 11, item 1): "DRY RUN, nothing erased: ..." or "erased N, held M, ...".
Real runs with dag.test() against the stand-ins; the note read back from Airflow's metadata
database."""

from __future__ import annotations

import re

import pytest
from test_alerts import mailchimp  # noqa: F401 - the Mailchimp stand-in with 300 members
from test_erasure_request import systems  # noqa: F401 - the three systems with one person in all

from airflow_run import run_dag, task_states


def note_of(dagrun) -> str | None:
    import sqlalchemy as sa
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session

    with create_session() as session:
        run = session.scalar(sa.select(DagRun).where(DagRun.dag_id == dagrun.dag_id, DagRun.run_id == dagrun.run_id))
        return run.note


def report_note(dag_id: str, run_id: str) -> str:
    from retention.airflow.run_reports import find_run, note_for

    return note_for(find_run(dag_id, run_id))


@pytest.mark.airflow
def test_a_nightly_dry_run_and_an_erasing_run_say_so_in_their_notes(mailchimp, retention_home):  # noqa: F811
    dry = run_dag({"systems": ["newsletter"], "dry_run": True})
    assert dry.state == "success", task_states(dry)
    note = note_of(dry)
    assert note is not None and note.startswith("DRY RUN, nothing erased: would erase "), note
    due = int(re.search(r"would erase (\d+)", note).group(1))
    assert due > 0

    real = run_dag({"systems": ["newsletter"]})
    assert real.state == "success", task_states(real)
    assert note_of(real) == f"erased {due}", note_of(real)

    halted = run_dag({"systems": ["newsletter"], "max_plan_share": 0.01, "dry_run": True})  # nothing due now: passes
    assert note_of(halted) == "DRY RUN, nothing erased: nothing due"


@pytest.mark.airflow
def test_a_tripped_plan_guard_is_in_the_failed_runs_note(mailchimp, retention_home):  # noqa: F811
    dr = run_dag({"systems": ["newsletter"], "max_plan_share": 0.01})
    assert dr.state == "failed"
    note = note_of(dr)
    assert re.fullmatch(r"erased 0, halted (\d+), newsletter: plan guard \1 planned, 3 allowed", note), note


@pytest.mark.airflow
def test_an_erasure_request_with_deferred_records_says_what_it_erased_held_and_deferred(systems, retention_home):  # noqa: F811
    dr = run_dag({"email": systems.b_email}, dag_id="erasure_request")
    assert dr.state == "success", task_states(dr)
    note = note_of(dr)
    assert note == report_note("erasure_request", dr.run_id), note
    assert note.startswith("erased ") and "deferred 2" in note and "held" in note, note
    assert systems.b_email not in note
