"""
### Example consumer: a warehouse erases its copies downstream

Scheduled on the erasure assets of the three systems (`retention://crm/erasures`,
`retention://newsletter/erasures`, `retention://ticketing/erasures`): the scheduler starts a run
whenever any of them gets an event, that is after an erasing task of `retention_nightly`,
`erasure_request` or `replay_erasures` has erased (a dry run emits no event). The run reads the
triggering events' `extra` (counts per rule and record type, the run's facts; nothing personal)
and logs what a warehouse holding copies would erase, by rule and count.

An example in the development tooling, not part of a production install: a real warehouse DAG
would look the records up in the ledger under the event's `ledger_run_id` (pseudonyms) and
delete its copies, rule by rule.
"""

from __future__ import annotations

import logging
from datetime import timedelta

import pendulum
from airflow.sdk import dag, task

from retention.airflow.assets import ASSETS, event_lines

log = logging.getLogger("retention.warehouse")

# The one version of the event's layout this consumer understands (retention.runs.events.SCHEMA).
SCHEMA = 1


@task(doc_md="Logs, per triggering erasure event, what the warehouse would erase: system, rule, status, count.")
def erase_copies(triggering_asset_events=None) -> dict:
    """Counts per system and rule of the records gone at the source (``erased`` or
    ``already_gone``): what the warehouse erases. XCom-safe, counts only."""
    to_erase: dict[str, dict[str, int]] = {}
    for system, asset in ASSETS.items():
        # By asset, not by every key: an event that came through the producers' alias is listed
        # under the alias too, and would be counted twice.
        for event in (triggering_asset_events or {}).get(asset, []):
            extra = dict(event.extra or {})
            if extra.get("schema") != SCHEMA or extra.get("dry_run"):
                log.warning("%s: event of %s run %s skipped (schema %s, dry_run %s)", system, event.source_dag_id,
                            event.source_run_id, extra.get("schema"), extra.get("dry_run"))
                continue
            for line in event_lines(extra):
                log.info("%s", line)
            mine = to_erase.setdefault(system, {})
            for rule, statuses in (extra.get("by_rule") or {}).items():
                gone = int(statuses.get("erased", 0)) + int(statuses.get("already_gone", 0))
                if gone:
                    mine[rule] = mine.get(rule, 0) + gone
    for system, rules in sorted(to_erase.items()):
        for rule, n in sorted(rules.items()):
            log.info("warehouse: would erase %d copies in %s for rule %s", n, system, rule)
    if not to_erase:
        log.info("warehouse: nothing to erase")
    return to_erase


@dag(
    schedule=ASSETS["crm"] | ASSETS["newsletter"] | ASSETS["ticketing"],
    start_date=pendulum.datetime(2026, 1, 1, tz="Europe/Stockholm"),
    catchup=False,
    max_active_runs=1,  # events arriving while a run works are queued for the next run, none lost
    default_args={"retries": 2, "retry_delay": timedelta(seconds=20)},
    doc_md=__doc__,
    tags=["privacy", "example"],
)
def warehouse_erasures():
    erase_copies()


warehouse_erasures()
