"""Airflow assets of the erasures: one asset per system, ``retention://<system>/erasures``, that
every erasing task (retention_nightly's, erasure_request's and replay_erasures' per system)
updates with an asset event when it has erased: a DAG that holds copies of the system's data (a
warehouse) is scheduled on the asset and erases its copies downstream.

The event's ``extra`` is ``retention.runs.events.erasure_counts``: counts per rule and per record
type and status, and the run's facts (DAG, run, ledger run, as-of, policy version). Nothing
personal.

**A dry run emits no event.** An asset event says the asset changed, and a dry run changes
nothing: a consumer that forgot to check a flag would erase copies of records the source still
keeps. The tasks therefore declare an ``AssetAlias`` as their outlet, not the asset itself (Airflow
emits an event for every declared asset of a task that succeeds), and add the asset's event
through the alias only when the run erases. An erasing run with nothing due still emits its
event, all zero: the consumer learns the source was enforced as of that time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow.sdk import Asset, AssetAlias

from retention.domain.records import SYSTEMS

if TYPE_CHECKING:
    from retention.runs.context import RunInfo

GROUP = "retention_erasures"


def erasures_asset(system: str) -> Asset:
    """The asset a consumer schedules on: ``schedule=[erasures_asset("crm")]``, or ``|`` of several."""
    return Asset(
        name=f"retention_erasures_{system}",
        uri=f"retention://{system}/erasures",
        group=GROUP,
        extra={"system": system, "events": "counts per rule and record type of erased, held and deferred records; no personal data"},
    )


def erasures_alias(system: str) -> AssetAlias:
    """The erasing tasks' outlet: the event goes through it to the asset, and only when erasing."""
    return AssetAlias(name=f"retention_erasures_{system}_events", group=GROUP)


ASSETS = {system: erasures_asset(system) for system in SYSTEMS}


def erasure_outlets(system: str) -> dict:
    """The task arguments that make a task an erasing task of ``system``: ``@task(**erasure_outlets(system))``."""
    return {"outlets": [erasures_alias(system)]}


def emit_erasures(run: RunInfo, system: str, *, airflow_run_id: str | None = None) -> dict | None:
    """Add the system's erasure event (the counts of the run's ledger entries) to the running
    task's outlet events; a dry run adds none. Returns the event's extra, or ``None``."""
    from airflow.sdk import get_current_context

    from retention.airflow.tasks import user_errors_in_one_line
    from retention.runs.events import erasure_counts

    if run.dry_run:
        return None
    with user_errors_in_one_line():  # a ledger gone since the erase: its one line, not a traceback
        extra = erasure_counts(run, system, airflow_run_id=airflow_run_id)
    get_current_context()["outlet_events"][erasures_alias(system)].add(ASSETS[system], extra=extra)
    return extra


def event_lines(extra: dict) -> list[str]:
    """An erasure event as lines a consumer may log: ``<system>  <rule>  <status>  <n>``."""
    head = (
        f"{extra.get('system')}: {extra.get('gone', 0)} gone in {extra.get('dag_id')} run {extra.get('run_id')} "
        f"(as of {extra.get('as_of')}, policy {extra.get('policy_version')}, ledger run {extra.get('ledger_run_id')})"
    )
    lines = [head]
    for rule, statuses in sorted((extra.get("by_rule") or {}).items()):
        for status, n in sorted(statuses.items()):
            lines.append(f"  {extra.get('system')}  {rule}  {status}  {n}")
    if len(lines) == 1:
        lines.append(f"  {extra.get('system')}: nothing erased")
    return lines
