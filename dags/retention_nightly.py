"""
### Nightly retention enforcement

Enforces the privacy notice's retention rules (`include/policies/retention.yaml`) in the
newsletter provider, the CRM and the ticketing system, as of the end of the run's data
interval. Per system: **extract** → **plan** (quarantine, rules, holds) → **validate**
(Great Expectations, plan-size guard) → **approve** (only a plan over the guard: a person approves
or rejects exactly that plan, in Required Actions or the REST API; recorded in the ledger) →
**erase** (write-ahead ledger) → **verify**; beside plan, validate and erase, **index** builds the record
index of a system read in full through its change feed (before verify); then one
**report** with counts per rule and status. The report fails the run's quality gate when
records have been quarantined on more than the policy's `quarantine_alarm_after` nights (after
the run's erasures; a dry run too).

Params: `dry_run` plans and validates but erases nothing; `max_plan_share` overrides the
policy's plan-size guard for this run (more than 0, at most 1); `systems` limits the run to some
systems (at least one); `reconcile` reads the systems with a change feed in full, rebuilds their
record index and reports its drift (otherwise such a system is read in full only every
`RETENTION_RECONCILE_EVERY`, P7D, and in between only what changed). Any other conf key (`dryrun`) fails **open_run** at once, naming the key
and the known ones: nothing is read, planned or erased.

**The first run: a dry run while the DAG is paused.** The DAG is created paused: unpausing it
starts the schedule, and the scheduler's runs erase. Run the first one as a dry run from a
shell, in one process, without unpausing:

    airflow dags test retention_nightly --conf '{"dry_run": true}'

Read its report (`RETENTION_HOME/reports/`), then `airflow dags unpause retention_nightly`.
Not the trigger form for this: its **Unpause on trigger** box is ticked by default, so the
scheduler's erasing run follows the dry run at once; unticked, the run (like one from
`airflow dags trigger`) waits queued until the DAG is unpaused.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import dag, get_current_context, task, task_group
from airflow.sdk.exceptions import AirflowFailException, AirflowRescheduleException, AirflowSkipException

from retention.airflow.alerts import (
    PlanRejectedAlert,
    QuarantineAlarmAlert,
    run_deadline,
    run_failed,
    task_defaults,
)
from retention.airflow.approval import PlanApproval
from retention.airflow.assets import emit_erasures, erasure_outlets
from retention.airflow.params import checked_context, dry_run_param, reconcile_param, share_param, systems_param
from retention.airflow.pools import provider_pool
from retention.airflow.tasks import fail_without_retry, run_info, system_adapter, user_errors_in_one_line
from retention.domain.records import SYSTEMS

# When enforcement starts: a run or backfill as of an earlier time fails in open_run.
START_DATE = pendulum.datetime(2026, 1, 1, tz="Europe/Stockholm")
# The DAG's own start date: every run and backfill gets its tasks (catchup is off, so the
# schedule still only ever runs the latest interval).
EARLIEST = pendulum.datetime(1970, 1, 1, tz="UTC")


@task(doc_md="Checks the conf, the as-of time and the policy and opens the run in the ledger. Nothing else runs when it fails.")
def open_run() -> dict:
    from retention.runs.nightly import open_run as open_

    ctx = checked_context()  # a conf key that is no param (`dryrun`) fails here: nothing else runs
    params = ctx["params"]
    as_of = ctx.get("data_interval_end") or ctx.get("logical_date")
    # Enforcement starts at START_DATE. Airflow itself would create no task for a run before its
    # DAG's start date and call the run a success, and would clamp a backfill's range to it and
    # create no run at all: the DAG's own start date is therefore the epoch (see the end of the
    # file) and this task refuses such a run, saying so.
    if as_of is not None and as_of < START_DATE:
        raise AirflowFailException(
            f"as-of {as_of.isoformat()} is before the start date of {ctx['dag'].dag_id} ({START_DATE.isoformat()}): "
            "nothing was run; trigger or backfill with a logical date on or after the start date"
        )
    with fail_without_retry():  # a broken policy or param will not fix itself on retry
        return open_(ctx["dag"].dag_id, ctx["run_id"], as_of, dry_run=params["dry_run"], max_plan_share=params["max_plan_share"])


@task_group
def system_run(system: str, run: dict):
    # The tasks that talk to the system take slots of its provider's pool (retention.systems.pools).
    @task(
        task_id="extract",
        doc_md=f"Takes {system}'s lock and extracts its records into staging (skipped when {system} is not selected).",
        **provider_pool(system),
    )
    def extract_(run: dict) -> dict:
        from retention.airflow.dagruns import take_system
        from retention.runs.nightly import extract
        from retention.store.ledger import LockTimeout

        params = get_current_context()["params"]
        if system not in params["systems"]:
            raise AirflowSkipException(f"{system} is not among this run's systems")
        try:
            # The system's lock, taken over at once from a run Airflow no longer runs (killed);
            # extract() then finds it this run's already.
            take_system(run_info(run), system)
            with system_adapter(system) as adapter:
                return extract(run_info(run), system, adapter, lock_wait_seconds=0, reconcile=bool(params.get("reconcile")))
        except LockTimeout:
            # Another run (a backfill beside the schedule) holds the system: give the worker
            # slot back and try again in a minute rather than wait in it.
            raise AirflowRescheduleException(pendulum.now("UTC").add(seconds=60)) from None

    @task(
        task_id="index",
        doc_md=f"After a full read of {system} (the first night, a reconciliation): builds its record index from the "
        "staged extract, counts the drift and stores the change feed's cursor, in one transaction, beside plan, "
        "validate and erase. Otherwise nothing to do (an incremental night updated the index in extract; a system "
        "without a change feed keeps none).",
    )
    def index_(run: dict, _extracted: dict) -> dict:
        from retention.runs.nightly import index

        with user_errors_in_one_line():
            return index(run_info(run), system)

    @task(task_id="plan", doc_md=f"Plans {system}'s records: quarantine, the policy's rules, legal holds.")
    def plan_(run: dict, _extracted: dict) -> dict:
        from retention.runs.nightly import plan

        with user_errors_in_one_line():  # an unreachable ledger, a bad setting: one line
            return plan(run_info(run), system)

    @task(
        task_id="validate", retries=0,
        doc_md=f"Great Expectations on {system}'s plan and the plan-size guard; a failed expectation fails here and nothing "
        "is erased; a plan over the guard goes to **approve**.",
    )
    def validate_(run: dict, _planned: dict) -> dict:
        from retention.checks.validation import PlanRejected
        from retention.runs.nightly import validate

        try:
            return validate(run_info(run), system)
        except PlanRejected as exc:
            raise PlanRejectedAlert(str(exc)) from None  # alerted as a rejected plan, with its numbers

    # A plan within the guard skips approve and is erased; one over it only on an approval of
    # exactly that plan (checked again in erase against the ledger); rejected: erase is skipped.
    @task(
        task_id="erase", trigger_rule="none_failed_min_one_success",
        doc_md=f"Erases {system}'s validated (or approved) plan, write-ahead in the ledger; a retry resumes (dry run: nothing). "
        f"Then updates the asset `retention_erasures_{system}` with the counts per rule (no event in a dry run).",
        **provider_pool(system), **erasure_outlets(system),
    )
    def erase_(run: dict) -> dict:
        from retention.checks.validation import PlanRejected
        from retention.runs.nightly import erase

        # Its trigger rule lets it run after a skipped approve: not for a system not selected.
        if system not in get_current_context()["params"]["systems"]:
            raise AirflowSkipException(f"{system} is not among this run's systems")

        # A plan without a successful validation, or older than RETENTION_MAX_PLAN_AGE: no retry helps.
        with system_adapter(system) as adapter, fail_without_retry(PlanRejected):
            result = erase(run_info(run), system, adapter)
        emit_erasures(run_info(run), system)  # for the copies downstream: counts only
        return result

    @task(
        task_id="verify",
        doc_md=f"Checks in {system} that what the ledger says was erased is gone (and drops those records from the "
        "record index: after **index**).",
        **provider_pool(system),
    )
    def verify_(run: dict, _erased: dict) -> dict:
        from retention.runs.nightly import verify

        with system_adapter(system) as adapter:
            return verify(run_info(run), system, adapter)

    extracted = extract_(run)
    # Beside plan, validate, approve and erase (it touches neither the system nor their staging),
    # but before verify, which forgets confirmed erasures from the index this step rebuilds.
    indexed = index_(run, extracted)
    planned = plan_(run, extracted)
    validated = validate_(run, planned)
    approve = PlanApproval(
        task_id="approve", system=system, run=run, validated=validated, retries=0,
        doc_md=f"Skipped when {system}'s plan is within the plan-size guard. Over it, waits for a person to approve or "
        "reject exactly this plan (its hash and the policy version), recorded in the ledger; rejected or timed out "
        "(RETENTION_APPROVAL_TIMEOUT): nothing is erased.",
    )
    erased = erase_(run)
    validated >> approve >> erased
    validated >> erased
    verified = verify_(run, erased)
    indexed >> verified
    return verified


@task(
    trigger_rule="all_done",
    doc_md="Counts per rule and status in the report file. Fails when anything is not done or quarantine has lasted too long (the quality gate).",
)
def report(run: dict) -> dict:
    from retention.runs.nightly import report as report_

    if not run:  # open_run failed (a refused conf or as-of, a broken policy): nothing ran, no report
        raise AirflowFailException("the run did not open (see open_run): nothing ran, no report")
    systems = tuple(checked_context()["params"]["systems"])
    with user_errors_in_one_line():
        result = report_(run_info(run), systems)
    if result["not_approved"]:  # a plan over the guard rejected or not answered: the run says so
        raise AirflowFailException(
            f"run incomplete: the plan of {', '.join(result['not_approved'])} was over the plan-size guard and not "
            f"approved, nothing was erased there; see report {result['report']}"
        )
    if result["state"] != "success":
        raise AirflowFailException(f"run incomplete, see report {result['report']}")
    if result["alarm"]:  # the quality gate, after every erasure of the run
        raise QuarantineAlarmAlert(result["alarm"])
    return result


@dag(
    schedule="@daily",
    start_date=EARLIEST,
    catchup=False,
    max_active_runs=1,
    # New, it waits for somebody: its first run is a dry run (`airflow dags test`, see the doc),
    # never the scheduler's erasing run, whatever [core] dags_are_paused_at_creation says.
    is_paused_upon_creation=True,
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": timedelta(seconds=30), **task_defaults()},
    on_failure_callback=run_failed,
    dagrun_timeout=run_deadline(),  # failed and alerted as past its deadline
    params={
        "dry_run": dry_run_param("Plan and validate, erase nothing, write no ledger entry."),
        "max_plan_share": share_param(
            title="Plan-size guard",
            description="Override the policy's plan-size guard for this run: the largest share of a system's extracted "
            "records its plan may erase, more than 0 and at most 1. Empty: the policy's plan_guard.max_share.",
        ),
        "systems": systems_param("The systems this run reads and erases in (at least one)."),
        "reconcile": reconcile_param(
            "Read every record of the systems in full, rebuild their record index and report its drift, instead of "
            "reading only what changed since the last run (a full read comes by itself every RETENTION_RECONCILE_EVERY)."
        ),
    },
    tags=["privacy", "retention"],
)
def retention_nightly():
    run = open_run()
    groups = [system_run.override(group_id=system)(system, run) for system in SYSTEMS]
    groups >> report(run)


retention_nightly()
