"""What an erasing task tells those who hold copies of a system's data (a warehouse, a backup
index): the counts of its run's ledger entries in that system, per rule and per record type and
status, and the run's facts. Counts only: no id, no pseudonym, no address. Whoever needs the
records themselves reads the ledger under ``ledger_run_id`` (pseudonyms, with the key holder's
consent), never the event.

The nightly run, an erasure request and a replay all write their entries through the one
erasure engine, so one function serves them all (``retention.airflow.assets`` turns the result
into an Airflow asset event).
"""

from __future__ import annotations

from retention.domain.statuses import GONE
from retention.runs.context import RunInfo, task_ledger
from retention.store.reports import ledger_counts

# Bump when a key changes meaning: consumers check it.
SCHEMA = 1


def erasure_counts(run: RunInfo, system: str, *, airflow_run_id: str | None = None) -> dict:
    """The event's content for ``system`` in ``run`` (the ledger's run; ``airflow_run_id`` the
    Airflow DAG run, when its id differs, as a replay's does)."""
    with task_ledger() as ledger:
        by_rule = ledger_counts(ledger, run.run_id).get(system, {})
        by_type = ledger_counts(ledger, run.run_id, by="record_type").get(system, {})
    gone = sum(n for statuses in by_rule.values() for status, n in statuses.items() if status in GONE)
    return {
        "schema": SCHEMA,
        "system": system,
        "dag_id": run.dag_id,
        "run_id": airflow_run_id or run.run_id,
        "ledger_run_id": run.run_id,
        "as_of": run.as_of,
        "policy_version": run.policy_version,
        "dry_run": run.dry_run,
        "gone": gone,
        "by_rule": by_rule,
        "by_record_type": by_type,
    }
