"""Replay erasures after a restore: erase again what the ledger says was erased.

A system restored from a backup brings back records that were erased after the backup was
taken. The ledger remembers every erasure by pseudonymous key, so the replay can find them:

1. **find** (per system): extract the system's current records (the nightly extract step,
   staged as Parquet; it takes the system's lock in the ledger, so a replay never runs
   alongside a nightly run on the same system, until verify releases it), pseudonymise their ids, and join them with the ledger's erased entries
   (``erased`` / ``already_gone``, one query per system, the latest erasure of each key).
   Which of them are restored copies, new records or held is the domain's decision
   (``domain.replay``).
2. **erase**: the original decision again (``erase``, or ``minimise`` for a CRM contact that
   was minimised around an invoice hold), rule ``replay:<original rule>`` under the original
   policy version, handed to the one erasure engine (write-ahead ledger under this replay's run
   id, resumable, a record already gone is success). Dry run: find and count, write no ledger
   entry, erase nothing.
3. **verify**: every record this replay erased is gone.
4. **report**: counts per system and record type (found, replayed, left alone as new,
   undated, held, other outcomes); no ids, keys or personal data.

``retention replay [--systems newsletter crm ticketing] [--dry-run]`` runs the same steps in one
process; the DAG ``replay_erasures`` runs them as tasks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import pandas as pd
import sqlalchemy as sa

from retention.config import ConfigError
from retention.domain.holds import Holds
from retention.domain.records import SOURCE_HOLDS, SYSTEMS
from retention.domain.replay import HELD, NEW, REPLAY, UNDATED, empty, latest_erasures, restored_copies
from retention.domain.statuses import GONE
from retention.runs.context import RunInfo, pseudonymizer, task_ledger
from retention.runs.context import open_run as open_pipeline_run
from retention.runs.erasing import ErasureEngine
from retention.runs.nightly import extract as extract_step
from retention.runs.nightly import index as index_step
from retention.runs.nightly import refuse_an_old_plan
from retention.store.ledger import Ledger, erasure_ledger
from retention.store.reports import write_report
from retention.systems.base import SourceSystem

log = logging.getLogger("retention")

DAG_ID = "replay_erasures"
RUN_PREFIX = "replay__"

AdapterFactory = Callable[[str], SourceSystem]


def new_run_id(now: datetime | None = None) -> str:
    return f"{RUN_PREFIX}{(now or datetime.now(UTC)).strftime('%Y-%m-%dT%H:%M:%S.%fZ')}"


def open_run(run_id: str, *, dry_run: bool, dag_id: str = DAG_ID) -> dict:
    """Check the policy and the pseudonym key and record the replay run in the ledger."""
    if not run_id.startswith(RUN_PREFIX):
        run_id = RUN_PREFIX + run_id
    return open_pipeline_run(dag_id, run_id, None, dry_run=dry_run, max_plan_share=None)


# -- find -----------------------------------------------------------------------------------
def erased_entries(ledger: Ledger, system: str, exclude_run: str | None = None) -> pd.DataFrame:
    """The latest erasure of every key of ``system`` (one query): key, rule, action, when."""
    t = erasure_ledger
    q = sa.select(
        t.c.record_type, t.c.record_key, t.c.rule_id, t.c.action, t.c.policy_version, t.c.completed_at
    ).where(t.c.system == system, t.c.status.in_([str(s) for s in GONE]))
    if exclude_run:
        q = q.where(t.c.run_id != exclude_run)
    with ledger.engine.connect() as conn:
        rows = conn.execute(q).all()
    frame = pd.DataFrame(rows, columns=["record_type", "record_key", "rule_id", "action", "policy_version", "completed_at"])
    return latest_erasures(frame)


def find(run: RunInfo, system: str, adapter: SourceSystem) -> dict:
    """Extract the system and find the records the ledger marks erased; stage what to replay."""
    staging = run.staging
    # A full read, whatever the record index holds or the policy selects: a copy restored from a
    # backup carries its old clocks, a change feed never lists it, and it need not be due.
    extracted = extract_step(run, system, adapter, reconcile=True)
    # A full read through a change feed rebuilds the record index, as the nightly run's index step.
    index_step(run, system)
    now = pd.Timestamp(datetime.now(UTC))
    with task_ledger() as ledger:
        erased = erased_entries(ledger, system, exclude_run=run.run_id)
        holds = Holds.at(now, source=staging.read_extract(system, SOURCE_HOLDS), ledger=ledger.holds())
    pseudo = pseudonymizer()
    parts, per_type = [], {}
    for record_type in adapter.record_types:
        matched = restored_copies(staging.read_extract(system, record_type), record_type, erased, pseudo, holds)
        counts = matched["decision"].value_counts()
        per_type[record_type] = {
            "found": len(matched),
            "to_replay": int(counts.get(REPLAY, 0)),
            "held": int(counts.get(HELD, 0)),
            "left_alone_new": int(counts.get(NEW, 0)),
            "left_alone_undated": int(counts.get(UNDATED, 0)),
        }
        if len(matched):
            parts.append(matched)
    plan = pd.concat(parts, ignore_index=True) if parts else empty()
    staging.write_frame(system, "replay_plan", plan.astype({"hold": "object"}))
    summary = {
        "extracted": extracted["extracted"],
        "erased_in_ledger": len(erased),
        "found": sum(c["found"] for c in per_type.values()),
        "record_types": per_type,
    }
    staging.write_json(system, "replay_find", summary)
    log.info(
        "%s: found %d erased records back (ledger knows %d erased keys): %s",
        system, summary["found"], len(erased),
        {t: c for t, c in per_type.items() if c["found"]} or "none",
    )
    return summary


# -- erase and verify -------------------------------------------------------------------------
def _to_erase(run: RunInfo, system: str) -> pd.DataFrame:
    """The restored copies to erase again and the held ones (recorded as held)."""
    if run.staging.read_json(system, "replay_find") is None:
        raise RuntimeError(f"{system}: no find step in replay {run.run_id}; refusing to erase")
    plan = run.staging.read_frame(system, "replay_plan")
    return plan[plan["decision"].isin([REPLAY, HELD]).to_numpy()]


def erase(run: RunInfo, system: str, adapter: SourceSystem) -> dict:
    """The restored copies to the erasure engine, under this replay's run. Resumable."""
    plan = _to_erase(run, system)
    extracted = run.staging.read_json(system, "extract") or {}
    if extracted.get("extracted_at"):
        refuse_an_old_plan(system, pd.Timestamp(extracted["extracted_at"]))
    with task_ledger() as ledger:
        engine = ErasureEngine(ledger, run.run_id, system, adapter, run.policy_version)
        if run.dry_run:
            would = engine.count(plan[(plan["decision"] == REPLAY).to_numpy()]).would_by_type
            summary = {"dry_run": True, "would": would}
            run.staging.write_json(system, "replay_erase", summary)
            log.info("%s: dry run, nothing erased; would replay %s", system, would or "nothing")
            return summary
        result = engine.erase(plan)
    outcomes = {rt: dict(sorted(c.items())) for rt, c in result.statuses.items()}
    summary = {"dry_run": False, "outcomes": outcomes, "seconds": result.seconds}
    run.staging.write_json(system, "replay_erase", summary)
    log.info("%s: replay outcomes %s", system, outcomes or "nothing to replay")
    if result.failed:
        raise RuntimeError(f"{system}: {result.failed} replayed erasures failed (see the ledger); retry the task to resume")
    return summary


def verify(run: RunInfo, system: str, adapter: SourceSystem) -> dict:
    """Every record this replay erased is gone from the system; the system is free again."""
    with task_ledger() as ledger:
        if run.dry_run:
            summary = {"dry_run": True, "checked": 0, "still_present": 0}
        else:
            plan = _to_erase(run, system)
            engine = ErasureEngine(ledger, run.run_id, system, adapter, run.policy_version)
            checked, still = engine.verify(plan[(plan["decision"] == REPLAY).to_numpy()])
            summary = {"dry_run": False, "checked": checked, "still_present": still}
        run.staging.write_json(system, "replay_verify", summary)
        ledger.release_system(system, run.run_id)
    if summary["still_present"]:
        raise RuntimeError(f"{system}: verification failed: {summary['still_present']} replayed records are still present")
    if not run.dry_run:
        log.info("%s: verified %d replayed erasures, none present", system, summary["checked"])
    return summary


# -- report ---------------------------------------------------------------------------------
def _system_report(find_: dict | None, erase_: dict | None, verify_: dict | None, dry_run: bool) -> dict:
    per_type = {}
    for record_type, c in ((find_ or {}).get("record_types") or {}).items():
        out = (((erase_ or {}).get("outcomes") or {}).get(record_type)) or {}
        row = {
            "found": c["found"],
            "replayed": int(out.get("erased", 0)),
            "left_alone_new": c["left_alone_new"],
            "left_alone_undated": c["left_alone_undated"],
            # Held when found (a live hold), plus any the system itself refused at erasure time
            # (the CRM connector re-checks its hold list inside the erasing transaction).
            "held": int(out["held"]) if "held" in out else c["held"],
        }
        if dry_run:
            row["would_replay"] = c["to_replay"]
        for status in ("already_gone", "deferred", "failed"):
            if out.get(status):
                row[status] = int(out[status])
        per_type[record_type] = row
    totals: dict[str, int] = {}
    for row in per_type.values():
        for k, v in row.items():
            totals[k] = totals.get(k, 0) + v
    return {
        "completed": find_ is not None and erase_ is not None and verify_ is not None,
        "extracted": (find_ or {}).get("extracted"),
        "totals": totals,
        "record_types": per_type,
        "verify": verify_,
    }


def report(run: RunInfo, systems: Sequence[str]) -> dict:
    """Counts per system and record type; written to the reports directory and the ledger."""
    staging = run.staging
    per_system = {
        s: _system_report(
            staging.read_json(s, "replay_find"), staging.read_json(s, "replay_erase"), staging.read_json(s, "replay_verify"), run.dry_run
        )
        for s in systems
    }
    state = "success" if all(s["completed"] for s in per_system.values()) else "failed"
    rep = {
        "run_id": run.run_id, "dag_id": run.dag_id, "kind": "replay", "dry_run": run.dry_run,
        "started": run.as_of, "finished": datetime.now(UTC).isoformat(), "state": state, "systems": per_system,
    }
    with task_ledger() as ledger:
        path = write_report(ledger, staging, rep, render_report(rep))
    return {
        "state": state,
        "report": str(path),
        "found": {s: r["totals"].get("found", 0) for s, r in per_system.items()},
        "replayed": {s: r["totals"].get("replayed", 0) for s, r in per_system.items()},
    }


def render_report(rep: dict) -> str:
    mode = "DRY RUN, nothing erased" if rep["dry_run"] else "erasing"
    lines = [f"Replay of erasures {rep['run_id']} ({mode}), state {rep['state']}"]
    for system, s in rep["systems"].items():
        t = s["totals"]
        if not s["completed"]:
            lines.append(f"  {system}: incomplete (see the task logs)")
        lines.append(
            f"  {system}: found {t.get('found', 0)} erased records back; "
            + (f"would replay {t.get('would_replay', 0)}" if rep["dry_run"] else f"replayed {t.get('replayed', 0)}")
            + f", left alone as new records {t.get('left_alone_new', 0)}, undated {t.get('left_alone_undated', 0)}"
            + f", held {t.get('held', 0)}"
        )
        for record_type, row in s["record_types"].items():
            if row["found"]:
                lines.append(f"    {record_type:<26} " + ", ".join(f"{k} {v}" for k, v in row.items()))
    return "\n".join(lines)


# -- one process ----------------------------------------------------------------------------
def run_replay(
    systems: Sequence[str] = SYSTEMS,
    *,
    dry_run: bool = False,
    run_id: str | None = None,
    adapter_factory: AdapterFactory | None = None,
) -> dict:
    """All steps in this process (the CLI, tests): returns the report task's result."""
    if adapter_factory is None:
        from retention.systems import adapter_for as adapter_factory
    run = RunInfo.from_dict(open_run(run_id or new_run_id(), dry_run=dry_run))
    user_errors: list[str] = []
    for system in systems:
        adapter = None
        try:
            adapter = adapter_factory(system)
            find(run, system, adapter)
            erase(run, system, adapter)
            verify(run, system, adapter)
        except ConfigError as exc:  # the set-up is wrong (a Connection, a setting): its one line, no traceback
            log.error("%s: replay failed: %s", system, exc)
            user_errors.append(f"{system}: {exc}")
        except Exception:
            log.exception("%s: replay failed", system)
        finally:
            if adapter is not None:
                adapter.close()
    return {**report(run, systems), "user_errors": user_errors}
