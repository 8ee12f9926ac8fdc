"""
### Erasure on request

One person, named by an e-mail address, is found in the CRM, the newsletter provider (Mailchimp)
and the ticketing system (Zendesk), and everything of theirs that no legal hold keeps is erased.
Name the person in one of two ways, exactly one:

* **`{"request_id": "..."}`: the private way.** File the request in the **request form**
  (`/retention-requests/` on the api-server, "Erasure request" in the UI's menu) or its API
  (`POST /retention-requests/api/requests`, `{"email": ...}`): the address is kept encrypted in
  the ledger database's request inbox (key `RETENTION_REQUEST_KEY`) and the form triggers this DAG
  with the request id only. Airflow's metadata database (the run's conf, the audit log) never holds
  the address. The tasks read it back by id; the `report` task deletes it once the request is
  complete (success, nothing deferred, no dry run). A failed or incomplete request keeps it for
  its retry: clear the failed tasks, or trigger again with the same `request_id`.
* **`{"email": "name@example.org"}`: for automation, the less private way.** Airflow keeps the
  trigger conf, and so the address, with this DAG run in its metadata database (the run's conf
  and the audit `log` table), and its trigger form and API answer a malformed address with an
  error that quotes it. Delete the DAG run once the request is closed.

The request overrides retention periods (the person asked), never a legal hold:

* **CRM**: contacts with the address go with their notes, event participations, course
  registrations and survey responses. An invoice still under the bookkeeping period stays with its
  legal fields, detached from the person (contact minimised); an older invoice is erased. Records
  on a manual hold stay (a held contact keeps all its records).
* **Newsletter**: the member is deleted permanently, whatever its status.
* **Ticketing**: the end user's solved and closed tickets are erased, then the user. An unsolved
  ticket is never erased: it and its requester are reported **deferred**; trigger the request
  again once the ticket is solved.

Tasks: **check_request** (the address or the filed request, the policy, the pseudonym key;
nothing runs when it fails) → **crm**, **newsletter**, **ticketing** (write-ahead ledger under this run, rule
`erasure-request`; retried tasks resume) → **report** (counts per system and record type, in
`RETENTION_HOME/reports/erasure_request__<run id>.json` and in the ledger). The same request
again erases nothing and succeeds. `dry_run` finds and counts, erases nothing.

A malformed address is refused by the request form without repeating it; in `email`, by Airflow
before the run is created (the param's pattern) and again by `check_request`. Both `email` and
`request_id`, or neither, or an id not in the inbox, fail `check_request` in one line. A conf key
that is no param (`dryrun`, `Email`) fails `check_request` at once, naming the key and the known
ones: nothing runs, nothing is erased. The address never goes into a log line, an XCom, the
ledger or the report (they carry the request id and the request key, a keyed pseudonym of the
address).
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
from retention.domain.addresses import EMAIL_MAX_LENGTH, EMAIL_PATTERN, REQUEST_ID_PATTERN
from retention.domain.records import SYSTEMS


@task(retries=0, doc_md="Checks the address (or reads the filed request's from the request inbox), the policy and the pseudonym key and opens the request under its key. Nothing else runs when it fails; its log line says why.")
def check_request() -> dict:
    from retention.runs.request import open_request

    ctx = checked_context()  # a conf key that is no param (`dryrun`) fails here: nothing else runs
    params = ctx["params"]
    with fail_without_retry():  # a malformed address or a broken policy will not fix itself on retry
        return open_request(
            ctx["dag"].dag_id, ctx["run_id"], params.get("email"), request_id=params.get("request_id"), dry_run=params["dry_run"],
        )


def _address(params) -> str:
    """The person's address for this task, from the conf or the request inbox; never returned
    from a task (XCom), logged or put into an error."""
    from retention.runs.request import address_of

    with fail_without_retry():
        return address_of(params.get("email"), params.get("request_id"))


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
        address = _address(ctx["params"])
        with user_errors_in_one_line():  # a bad Connection: its one line, retried only if the host may come back
            result = erase_system(run, system, address)
        # The asset retention_erasures_<system>: counts only, never the address or the request key.
        emit_erasures(run, system)
        return result

    return erase_()


@task(
    trigger_rule="all_done", retries=0,
    doc_md="Writes the counts per system and record type to the report file and the ledger. Fails when the request was refused or any record is not done, so the run is not green unless the person is erased. A filed request (`request_id`) that is complete has its encrypted address deleted from the request inbox here; otherwise it stays for the retry.",
)
def report() -> dict:
    from retention.runs.request import report as report_

    ctx = checked_context()
    params = ctx["params"]
    with fail_without_retry():
        result = report_(ctx["dag"].dag_id, ctx["run_id"], params.get("email"), params.get("request_id"))
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
        # Exactly one of the two (check_request refuses both and neither): JSON schema per param
        # cannot say so, and the trigger form shows both as optional.
        "email": Param(
            None, type=["null", "string"], pattern=EMAIL_PATTERN, maxLength=EMAIL_MAX_LENGTH, title="E-mail address",
            section="Request",
            description=(
                "The e-mail address of the person who asked to be erased (one address). The less private way: "
                "Airflow keeps it with this run. Prefer the request form, which fills in a request id instead."
            ),
        ),
        "request_id": Param(
            None, type=["null", "string"], pattern=REQUEST_ID_PATTERN, title="Request id",
            section="Request",
            description=(
                "The id the request form (/retention-requests/) gave: the address is kept encrypted outside "
                "Airflow and deleted once the request is complete. Leave empty when giving an e-mail address."
            ),
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
