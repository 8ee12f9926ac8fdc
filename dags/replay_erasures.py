"""
### Replay erasures after a restore

Run this after restoring a system from a backup. Records erased after the backup was taken
come back with the restore; the erasure ledger knows them by pseudonymous key. Per system:
**find** (extract, pseudonymise, join with the ledger's erased keys; a record is replayed only
when none of its own clocks is later than the erasure it survived, so a person who subscribed
again is left alone; live manual holds are respected) → **erase** (the original decision again,
`replay:<rule>` under a new ledger run, write-ahead, resumable) → **verify**; then one
**report** with counts per system and record type: found, replayed, left alone, held.

Not scheduled: trigger it by hand. Params: `systems` (the restored systems, at least one),
`dry_run` (find and count, erase nothing, write no ledger entry). Any other conf key (`dryrun`)
fails `open_run` at once, naming the key and the known ones: nothing runs, nothing is erased.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import dag, get_current_context, task, task_group
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from retention.airflow.alerts import run_failed, task_defaults
from retention.airflow.assets import emit_erasures, erasure_outlets
from retention.airflow.params import checked_context, dry_run_param, systems_param
from retention.airflow.pools import provider_pool
from retention.airflow.tasks import fail_without_retry, run_info, system_adapter, user_errors_in_one_line
from retention.domain.records import SYSTEMS


@task(doc_md="Checks the conf and the policy and opens the replay's ledger run. Nothing else runs when it fails.")
def open_run() -> dict:
    from retention.runs.replay import open_run as open_

    ctx = checked_context()  # a conf key that is no param (`dryrun`) fails here: nothing else runs
    with fail_without_retry():  # a broken policy will not fix itself on retry
        # The ledger run id follows the Airflow run: a retried task resumes the same replay.
        return open_(f"replay__{ctx['run_id']}", dry_run=ctx["params"]["dry_run"], dag_id=ctx["dag"].dag_id)


@task_group
def system_replay(system: str, run: dict):
    # The tasks that talk to the system take slots of its provider's pool (retention.systems.pools).
    @task(task_id="find", doc_md=f"Extracts {system} and joins it with the ledger's erased keys: what the restore brought back.", **provider_pool(system))
    def find_(run: dict) -> dict:
        from retention.runs.replay import find

        if system not in get_current_context()["params"]["systems"]:
            raise AirflowSkipException(f"{system} is not among this replay's systems")
        with system_adapter(system) as adapter:
            return find(run_info(run), system, adapter)

    @task(
        task_id="erase",
        doc_md=f"Erases again in {system} what was found, under `replay:<rule>` (dry run: nothing). "
        f"Then updates the asset `retention_erasures_{system}` with the counts per rule (no event in a dry run).",
        **provider_pool(system), **erasure_outlets(system),
    )
    def erase_(run: dict, _found: dict) -> dict:
        from retention.checks.validation import PlanRejected
        from retention.runs.replay import erase

        # A plan without a successful validation, or older than RETENTION_MAX_PLAN_AGE: no retry helps.
        with system_adapter(system) as adapter, fail_without_retry(PlanRejected):
            result = erase(run_info(run), system, adapter)
        # The replay's ledger run is its own (replay__<Airflow run>): the event names both.
        emit_erasures(run_info(run), system, airflow_run_id=get_current_context()["run_id"])
        return result

    @task(task_id="verify", doc_md=f"Checks in {system} that the replayed records are gone.", **provider_pool(system))
    def verify_(run: dict, _erased: dict) -> dict:
        from retention.runs.replay import verify

        with system_adapter(system) as adapter:
            return verify(run_info(run), system, adapter)

    return verify_(run, erase_(run, find_(run)))


@task(
    trigger_rule="all_done",
    doc_md="Counts per system and record type: found, replayed, left alone, held. Fails when anything is not done.",
)
def report(run: dict) -> dict:
    from retention.runs.replay import report as report_

    if not run:  # open_run failed (a refused conf or as-of, a broken policy): nothing ran, no report
        raise AirflowFailException("the replay did not open (see open_run): nothing ran, no report")
    systems = tuple(checked_context()["params"]["systems"])
    with user_errors_in_one_line():
        result = report_(run_info(run), systems)
    if result["state"] != "success":
        raise AirflowFailException(f"replay incomplete, see report {result['report']}")
    return result


@dag(
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="Europe/Stockholm"),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": timedelta(seconds=30), **task_defaults()},
    on_failure_callback=run_failed,
    params={
        "systems": systems_param("The systems restored from a backup (at least one)."),
        "dry_run": dry_run_param("Find and count, erase nothing, write no ledger entry."),
    },
    tags=["privacy", "retention"],
)
def replay_erasures():
    run = open_run()
    groups = [system_replay.override(group_id=system)(system, run) for system in SYSTEMS]
    groups >> report(run)


replay_erasures()
