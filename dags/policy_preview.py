"""
### Policy-change preview (dry run)

What would a new version of the retention policy erase that the current one does not, and what
would it stop erasing? Reads each selected system once, plans its records under both policies
as of the same time, and writes the difference per system and rule (counts and pseudonymous
keys, never source ids) to `RETENTION_HOME/previews/<run>.json` and `.txt`.
**Nothing is erased**, no ledger entry is written, no staging is left behind.

Params:
- `old_policy`: a file path, or `REV:PATH` read from the project's git repository
  (default `HEAD:include/policies/retention.yaml`, the policy as last committed);
- `new_policy`: a file path or `REV:PATH` (empty: the configured policy file,
  `RETENTION_POLICY_FILE` or `include/policies/retention.yaml`);
- `systems`: which systems to read (at least one); `as_of`: ISO 8601 time (empty: now).

Any other conf key (`new_polcy`) fails **prepare** at once, naming the key and the known ones.

Tasks: **prepare** (loads and validates both policies; a broken one fails here, before any
system is read) → one **preview** per system → **summary** (the written file's path and the
counts are its XCom).
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowSkipException

from retention.airflow.alerts import run_failed, task_defaults
from retention.airflow.params import SCOPE, checked_context, systems_param
from retention.airflow.pools import provider_pool
from retention.airflow.tasks import fail_without_retry, user_errors_in_one_line
from retention.domain.records import SYSTEMS


def _preview_id() -> str:
    from retention.runs.preview import safe_id

    ctx = get_current_context()
    return safe_id(f"{ctx['dag'].dag_id}__{ctx['run_id']}")


@task(retries=0, doc_md="Loads and validates both policies; a broken one fails here, before any system is read.")
def prepare() -> dict:
    from retention.runs.preview import check_systems
    from retention.runs.preview import prepare as prepare_

    params = checked_context()["params"]  # a conf key that is no param fails here: nothing is read
    with fail_without_retry():
        check_systems(params["systems"])
        return prepare_(_preview_id(), params["old_policy"], params.get("new_policy") or None, params.get("as_of") or None)


def _preview_task(system: str):
    @task(
        task_id=f"preview_{system}",
        doc_md=f"Reads {system} once and plans its records under both policies (skipped when {system} is not selected). Erases nothing.",
        **provider_pool(system),
    )
    def preview_(_prepared: dict) -> dict:
        from retention.runs.preview import preview_one

        if system not in get_current_context()["params"]["systems"]:
            raise AirflowSkipException(f"{system} is not among this preview's systems")
        with user_errors_in_one_line():  # a bad Connection or setting: its one line
            return preview_one(_preview_id(), system)

    return preview_


@task(
    trigger_rule="all_done", retries=0,
    doc_md="Writes the difference per system and rule to RETENTION_HOME/previews/ (its path and counts are the XCom).",
)
def summary() -> dict:
    from retention.runs.preview import finish

    params = checked_context()["params"]
    with fail_without_retry():
        return finish(_preview_id(), params["systems"])


@dag(
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="Europe/Stockholm"),
    catchup=False,
    doc_md=__doc__,
    default_args={"retries": 1, **task_defaults()},
    on_failure_callback=run_failed,
    params={
        "old_policy": Param(
            "HEAD:include/policies/retention.yaml", type="string", minLength=1, title="Current policy", section="Policies",
            description="The current policy: a file path, or REV:PATH from the project's git repository.",
        ),
        "new_policy": Param(
            None, type=["null", "string"], title="Proposed policy", section="Policies",
            description="The proposed policy: a file path or REV:PATH. Empty: the configured policy file.",
        ),
        "systems": systems_param("The systems to read and plan under both policies (at least one)."),
        "as_of": Param(
            None, type=["null", "string"], title="As of", section=SCOPE,
            description="ISO 8601 time to evaluate both policies at. Empty: now.",
        ),
    },
    tags=["privacy", "retention", "dry-run"],
)
def policy_preview():
    prepared = prepare()
    previews = [_preview_task(system)(prepared) for system in SYSTEMS]
    previews >> summary()


policy_preview()
