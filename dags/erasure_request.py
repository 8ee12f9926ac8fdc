"""
### Erasure on request

Trigger with one e-mail address, `{"email": "name@example.org"}`: the person is found in the
CRM, the newsletter provider (Mailchimp) and the ticketing system (Zendesk), and everything of
theirs that no legal hold keeps is erased. The request overrides retention periods (the person
asked), never a legal hold:

* **CRM**: contacts with the address go with their notes, event participations, course
  registrations and survey responses. An invoice still under the bookkeeping period stays with its
  legal fields, detached from the person (contact minimised); an older invoice is erased. Records
  on a manual hold stay (a held contact keeps all its records).
* **Newsletter**: the member is deleted permanently, whatever its status.
* **Ticketing**: the end user's solved and closed tickets are erased, then the user. An unsolved
  ticket is never erased: it and its requester are reported **deferred**; trigger the request
  again once the ticket is solved.

Tasks: **check_request** (the address, the policy, the pseudonym key; nothing runs when it
fails) → **crm**, **newsletter**, **ticketing** (write-ahead ledger under this run, rule
`erasure-request`; retried tasks resume) → **report** (counts per system and record type, in
`RETENTION_HOME/reports/erasure_request__<run id>.json` and in the ledger). The same request
again erases nothing and succeeds. `dry_run` finds and counts, erases nothing.

A malformed address is refused by Airflow before the run is created (the `email` param's
pattern) and again by `check_request`. A conf key that is no param (`dryrun`, `Email`) fails
`check_request` at once, naming the key and the known ones: nothing runs, nothing is erased.
The address never goes into a log line, an XCom, the ledger or the report (they carry the
request key, a keyed pseudonym of the address). **Airflow keeps the trigger conf, and so the
address, with this DAG run in its metadata database**: delete the DAG run once the request is
closed.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException

from retention.airflow.alerts import task_defaults
from retention.airflow.assets import emit_erasures, erasure_outlets
from retention.airflow.params import checked_context, dry_run_param
from retention.airflow.pools import REQUEST_SLOTS, provider_pool
from retention.airflow.tasks import fail_without_retry, user_errors_in_one_line
from retention.domain.addresses import EMAIL_MAX_LENGTH, EMAIL_PATTERN
from retention.domain.records import SYSTEMS


@task(retries=0, doc_md="Checks the address, the policy and the pseudonym key and opens the request under its key. Nothing else runs when it fails; its log line says why.")
def check_request() -> dict:
    from retention.runs.request import open_request

    ctx = checked_context()  # a conf key that is no param (`dryrun`) fails here: nothing else runs
    params = ctx["params"]
    with fail_without_retry():  # a malformed address or a broken policy will not fix itself on retry
        return open_request(ctx["dag"].dag_id, ctx["run_id"], params.get("email"), dry_run=params["dry_run"])


def system_task(system: str):
    # A request's look-up and few erasures take a small share of the provider's pool: one fits
    # beside a nightly run's task (retention.systems.pools).
    @task(
        task_id=system,
        doc_md=f"Finds the person in {system} and erases what no legal hold keeps (dry run: counts only); write-ahead ledger, a retry resumes. Deferred records (an unsolved ticket) are counted, not erased.",
        **provider_pool(system, REQUEST_SLOTS), **erasure_outlets(system),
    )
    def erase_() -> dict:
        from retention.runs.request import erase_system, load_run

        ctx = get_current_context()
        run = load_run(ctx["dag"].dag_id, ctx["run_id"])
        with user_errors_in_one_line():  # a bad Connection: its one line, retried only if the host may come back
            result = erase_system(run, system, ctx["params"]["email"])
        # The asset retention_erasures_<system>: counts only, never the address or the request key.
        emit_erasures(run, system)
        return result

    return erase_()


@task(
    trigger_rule="all_done", retries=0,
    doc_md="Writes the counts per system and record type to the report file and the ledger. Fails when the request was refused or any record is not done, so the run is not green unless the person is erased.",
)
def report() -> dict:
    from retention.runs.request import report as report_

    ctx = checked_context()
    with user_errors_in_one_line():
        result = report_(ctx["dag"].dag_id, ctx["run_id"], ctx["params"].get("email"))
    if result is None:
        # Fail, not skip: a skipped last task would let a rejected request's run count as a success.
        raise AirflowFailException("the request was not accepted (see check_request): nothing ran, no report")
    if result["state"] != "success":
        raise AirflowFailException(f"erasure request incomplete ({result['failed']} records not done); see the report")
    return result


@dag(
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="Europe/Stockholm"),
    catchup=False,
    doc_md=__doc__,
    default_args={"retries": 2, "retry_delay": timedelta(seconds=30), **task_defaults()},
    # No run-level callback: Airflow validates the params again to build its context, and the
    # address param no longer holds what check_request took out of the run (or never held a
    # valid address), so the callback itself would fail. Every task alerts on its own failure.
    params={
        "email": Param(
            type="string", pattern=EMAIL_PATTERN, maxLength=EMAIL_MAX_LENGTH, title="E-mail address",
            section="Request",
            description="The e-mail address of the person who asked to be erased (one address).",
        ),
        "dry_run": dry_run_param("Find and count, erase nothing."),
    },
    tags=["privacy", "erasure"],
)
def erasure_request():
    checked = check_request()
    erased = [system_task(system) for system in SYSTEMS]
    checked >> erased
    erased >> report()


erasure_request()
