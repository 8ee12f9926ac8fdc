"""The steps of a retention run, one function per DAG task: open, extract, plan, validate,
erase, verify, report. Each reads its inputs from the run's staging area and returns a small
dict of counts (safe for XCom). Systems are reached only through the ``SourceSystem``
interface; which adapter serves a system is the caller's choice (``adapter_factory``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pyarrow as pa

from retention import config
from retention.domain.engine import active_holds
from retention.store.ledger import DONE, Ledger
from retention.domain.policy import Policy, PolicyError, load_policy
from retention.progress import Progress
from retention.domain.pseudonyms import Pseudonymizer
from retention.store.staging import RunStaging
from retention.systems.base import SourceSystem, batch_size
from retention.checks.validation import PlanRejected, plan_check_frame, validate_extract, validate_plan

log = logging.getLogger("retention")

AdapterFactory = Callable[[str], SourceSystem]


@dataclass(frozen=True)
class RunInfo:
    """What every task of a run needs to know; travels through XCom as a small dict."""

    dag_id: str
    run_id: str
    as_of: str
    policy_file: str
    policy_version: str
    policy_label: str
    dry_run: bool
    max_plan_share: float

    @classmethod
    def from_dict(cls, d: dict) -> RunInfo:
        return cls(**d)

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def as_of_ts(self) -> pd.Timestamp:
        return pd.Timestamp(self.as_of)

    @property
    def staging(self) -> RunStaging:
        return RunStaging(self.dag_id, self.run_id)

    def policy(self) -> Policy:
        """The run's policy, refusing a file that changed since the run began."""
        policy = load_policy(self.policy_file)
        if policy.version != self.policy_version:
            raise PolicyError(
                f"{self.policy_file}: policy changed during run {self.run_id} "
                f"(was {self.policy_version}, now {policy.version}); start a new run"
            )
        return policy


class _Stopwatch:
    """Seconds spent per phase of a step (``lap(name)`` adds the time since the last lap)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(self.laps.get(name, 0.0) + now - self._last, 3)
        self._last = now

    def __str__(self) -> str:
        return ", ".join(f"{k} {v:.2f}s" for k, v in self.laps.items())


def _ledger() -> Ledger:
    return Ledger(config.ledger_url())


def open_run(dag_id: str, run_id: str, as_of: datetime | None, *, dry_run: bool, max_plan_share: float | None) -> dict:
    """Load and check the policy, fix the run's as-of time, record the run in the ledger."""
    policy_path = config.policy_file()
    policy = load_policy(policy_path)
    config.pseudonym_key()  # fail now, not after extracting, when the key is missing
    now = datetime.now(UTC)
    # A run never enforces at a time that has not come yet.
    as_of_ts = min(pd.Timestamp(as_of or now), pd.Timestamp(now)).tz_convert("UTC")
    share = policy.plan_guard.max_share if max_plan_share is None else float(max_plan_share)
    if not 0 < share <= 1:
        raise ValueError(f"max_plan_share must be in (0, 1], got {share}")
    info = RunInfo(
        dag_id=dag_id, run_id=run_id, as_of=as_of_ts.isoformat(), policy_file=str(policy_path),
        policy_version=policy.version, policy_label=policy.version_label, dry_run=bool(dry_run), max_plan_share=share,
    )
    _ledger().open_run(run_id, dag_id, as_of_ts.to_pydatetime(), policy.version, policy.version_label, bool(dry_run))
    log.info(
        "run %s: policy %s (%s, %d rules), as of %s, dry_run=%s, plan guard %.0f%%",
        run_id, policy.version, policy.version_label, len(policy.rules), info.as_of, info.dry_run, 100 * share,
    )
    return info.as_dict()


def extract(run: RunInfo, system: str, adapter: SourceSystem, *, lock_wait_seconds: float = 6 * 3600) -> dict:
    """Take the system for this run (raises ``LockTimeout`` after ``lock_wait_seconds``), then
    stream every record to staging."""
    last_note = [0.0]

    def waiting(holder: str) -> None:
        if time.monotonic() - last_note[0] > 60:
            last_note[0] = time.monotonic()
            log.info("%s: waiting for run %s to finish with this system", system, holder)

    _ledger().acquire_system(system, run.run_id, wait_seconds=lock_wait_seconds, on_wait=waiting)
    staging = run.staging
    staging.reset_extract(system)
    writer = staging.extract_writer(system)
    started = time.monotonic()
    now = datetime.now(UTC)
    for record_type in adapter.record_types:
        writer.declare(record_type)
    adapter.extract(writer.write, now)
    counts = writer.close()
    summary = {"extracted": counts, "extracted_at": now.isoformat(), "seconds": round(time.monotonic() - started, 2)}
    staging.write_json(system, "extract", summary)
    log.info("%s: extracted %s in %.1fs", system, counts, summary["seconds"])
    return summary


def _live_ledger_holds(ledger: Ledger, as_of: pd.Timestamp) -> pd.DataFrame:
    """The ledger's manual holds (by pseudonym) in force at ``as_of``: one definition, planning's."""
    from retention.domain.planning import live_key_holds

    return live_key_holds(pd.DataFrame(ledger.holds()), as_of)


def plan(run: RunInfo, system: str) -> dict:
    """Quarantine malformed records, evaluate the rules, pseudonymise, apply every hold."""
    from retention.domain.planning import plan_system
    from retention.domain.records import record_types_of

    policy = run.policy()
    staging = run.staging
    clock = _Stopwatch()
    extracted = staging.read_json(system, "extract") or {}
    now = pd.Timestamp(extracted.get("extracted_at") or datetime.now(UTC))
    frames = {rt: f for rt in (*record_types_of(system), "legal_hold") if (f := staging.read_extract(system, rt)) is not None}
    ledger_holds = pd.DataFrame(_ledger().holds())
    clock.lap("read")
    sp = plan_system(
        system, frames, policy, run.as_of_ts, now=now,
        ledger_holds=ledger_holds, pseudonymizer=Pseudonymizer(config.pseudonym_key()),
    )
    clock.lap("rules")
    for record_type, clean in sp.clean.items():
        staging.write_frame(system, f"clean_{record_type}", clean)
    staging.write_frame(system, "plan", sp.plan)
    if len(sp.quarantined):
        staging.write_frame(system, "quarantine", sp.quarantined)
    clock.lap("write")
    summary = {**sp.summary(), "as_of": run.as_of, "seconds": clock.laps, "rules_seconds": sp.seconds}
    staging.write_json(system, "plan", summary)
    log.info(
        "%s: plan %s; quarantined %s (%s)",
        system, summary["planned"] or "empty", summary["quarantined"] or "none", clock,
    )
    return summary


def validate(run: RunInfo, system: str) -> dict:
    """Great Expectations on the extract and the plan, and the plan-size guard."""
    from retention.domain.records import record_types_of
    from retention.checks.validation import run_guard

    policy = run.policy()
    staging = run.staging
    clock = _Stopwatch()
    plan_frame = staging.read_frame(system, "plan")
    extracted = staging.read_json(system, "extract") or {}
    now = pd.Timestamp(extracted.get("extracted_at") or datetime.now(UTC))
    source_holds = staging.read_extract(system, "legal_hold")
    hold_pairs: set[tuple[str, str]] = set()
    if source_holds is not None:
        live = active_holds(source_holds, run.as_of_ts)
        hold_pairs = set(zip(live["record_type"].astype(str), live["record_id"].astype(str)))
    ledger_holds = _live_ledger_holds(_ledger(), run.as_of_ts)
    held_keys = set(ledger_holds["record_key"]) if len(ledger_holds) else set()
    outcomes = []
    total_extracted = sum(extracted.get("extracted", {}).values())
    clock.lap("read")
    for record_type in record_types_of(system):
        try:
            clean = staging.read_frame(system, f"clean_{record_type}")
        except FileNotFoundError:
            continue
        clock.lap("read")
        outcomes.append(validate_extract(clean, record_type, now))
        hold_ids = {rid for rt, rid in hold_pairs if rt == record_type}
        check = plan_check_frame(plan_frame, clean, record_type, hold_ids)
        if held_keys:
            destructive = check["action"].isin(["erase", "minimise"]).to_numpy()
            check["erases_held_record"] |= destructive & check["record_key"].isin(held_keys).to_numpy()
        outcomes.append(validate_plan(check, record_type, policy, run.as_of_ts))
        clock.lap("checks")
        # One record type's frames at a time: let go of these before reading the next, and
        # hand Arrow's freed buffers back, so peak memory is that of the largest type.
        del clean, check
        pa.default_memory_pool().release_unused()
    destructive = int(plan_frame["action"].isin(["erase", "minimise"]).sum())
    guard = run_guard(destructive, total_extracted, run.max_plan_share)
    outcomes.append(guard)
    clock.lap("checks")
    success = all(o.success for o in outcomes)
    summary = {"success": success, "suites": [o.as_dict() for o in outcomes], "seconds": clock.laps}
    staging.write_json(system, "validation", summary)
    for o in outcomes:
        for c in o.failures():
            log.error("%s: validation %s failed: %s", system, o.name, json.dumps(c, default=str))
    if not success:
        failed = sorted({o.name for o in outcomes if not o.success})
        raise PlanRejected(f"{system}: validation failed ({', '.join(failed)}); nothing was erased")
    log.info("%s: validation passed (%d suites; %s)", system, len(outcomes), clock)
    return {
        "success": True, "suites": len(outcomes), "destructive": destructive, "extracted": total_extracted,
        "seconds": clock.laps,
    }


def erase(run: RunInfo, system: str, adapter: SourceSystem) -> dict:
    """Write-ahead ledger, erase batch by batch, complete the ledger. Resumable and idempotent."""
    staging = run.staging
    validation = staging.read_json(system, "validation")
    if not validation or not validation.get("success"):
        raise PlanRejected(f"{system}: no successful validation in this run; refusing to erase")
    plan_frame = staging.read_frame(system, "plan")
    if run.dry_run:
        would = plan_frame.groupby(["rule_id", "action"]).size().to_dict() if len(plan_frame) else {}
        summary = {"dry_run": True, "would": {f"{k[0]}/{k[1]}": int(v) for k, v in would.items()}}
        staging.write_json(system, "erase", summary)
        log.info("%s: dry run, nothing erased; would act on %s", system, summary["would"] or "nothing")
        return summary
    ledger = _ledger()
    done = ledger.statuses(run.run_id, system)
    destructive_total = int(plan_frame["action"].isin(["erase", "minimise"]).sum())
    progress = Progress(log, f"{system}: erasing", total=destructive_total)
    outcome_counts: dict[str, int] = {}
    for record_type in adapter.record_types:
        rows = plan_frame[(plan_frame["record_type"] == record_type).to_numpy()]
        if rows.empty:
            continue
        held = rows[(rows["action"] == "hold").to_numpy()]
        new_held = held[np.array([(record_type, k) not in done for k in held["record_key"].tolist()], dtype=bool)]
        ledger.write_ahead(run.run_id, run.policy_version, system, _ledger_rows(new_held), status="held")
        outcome_counts["held"] = outcome_counts.get("held", 0) + len(held)
        for action in ("minimise", "erase"):
            todo = rows[(rows["action"] == action).to_numpy()]
            # Lists, not per-element Series access: a hundred thousand keys per record type.
            status = [done.get((record_type, k)) for k in todo["record_key"].tolist()] if done else [None] * len(todo)
            finished = np.array([s in DONE for s in status], dtype=bool)
            for s in status:
                if s in DONE:
                    outcome_counts[s] = outcome_counts.get(s, 0) + 1
            progress.add(int(finished.sum()))
            unseen = todo[np.array([s is None for s in status], dtype=bool)]
            todo = todo[~finished]
            ledger.write_ahead(run.run_id, run.policy_version, system, _ledger_rows(unseen))
            record_ids, record_keys = todo["record_id"].tolist(), todo["record_key"].tolist()
            size = batch_size(adapter, record_type)
            for start in range(0, len(record_ids), size):
                ids = record_ids[start : start + size]
                outcomes = adapter.erase(record_type, action, ids)
                by_key = {k: outcomes.get(i, "failed") for i, k in zip(ids, record_keys[start : start + size])}
                ledger.complete(run.run_id, system, record_type, by_key)
                for s in by_key.values():
                    outcome_counts[s] = outcome_counts.get(s, 0) + 1
                progress.add(len(ids))
    seconds = progress.finish()
    summary = {"dry_run": False, "outcomes": outcome_counts, "seconds": round(seconds, 2)}
    staging.write_json(system, "erase", summary)
    failed = outcome_counts.get("failed", 0)
    if failed:
        raise RuntimeError(f"{system}: {failed} erasures failed (see the ledger); retry the task to resume")
    return summary


def _ledger_rows(frame: pd.DataFrame) -> Iterator[dict]:
    """Ledger entries for plan rows, made as the ledger takes them (a generator)."""
    if frame.empty:
        return
    hold = frame["hold"].astype(object).where(frame["hold"].notna(), None).tolist()
    columns = [frame[c].tolist() for c in ("record_type", "record_key", "rule_id", "action")]
    for t, k, r, a, h in zip(*columns, hold):
        yield {"record_type": t, "record_key": k, "rule_id": r, "action": a, "hold": h}


def verify(run: RunInfo, system: str, adapter: SourceSystem) -> dict:
    """Every record this run erased is gone from the source."""
    staging = run.staging
    if run.dry_run:
        summary = {"dry_run": True, "checked": 0, "still_present": 0}
        staging.write_json(system, "verify", summary)
        _ledger().release_system(system, run.run_id)
        return summary
    plan_frame = staging.read_frame(system, "plan")
    destructive = plan_frame[plan_frame["action"].isin(["erase", "minimise"]).to_numpy()]
    checked, still = count_still_present(system, adapter, destructive, _ledger().statuses(run.run_id, system), "erased")
    summary = {"dry_run": False, "checked": checked, "still_present": still}
    staging.write_json(system, "verify", summary)
    _ledger().release_system(system, run.run_id)
    if still:
        raise RuntimeError(f"{system}: verification failed: {still} erased records are still present")
    log.info("%s: verified %d erasures, none present", system, checked)
    return summary


def count_still_present(
    system: str, adapter: SourceSystem, rows: pd.DataFrame, statuses: dict[tuple[str, str], str], what: str
) -> tuple[int, int]:
    """Of ``rows`` (record_type, record_id, record_key), those the ledger marks erased or already
    gone: how many there are, and how many of them the system still holds."""
    checked = still = 0
    for record_type in adapter.record_types:
        mine = rows[(rows["record_type"] == record_type).to_numpy()]
        keys = zip(mine["record_id"].tolist(), mine["record_key"].tolist())
        gone = [rid for rid, key in keys if statuses.get((record_type, key)) in ("erased", "already_gone")]
        if not gone:
            continue
        present = adapter.still_present(record_type, gone)
        checked += len(gone)
        still += len(present)
        if present:
            log.error("%s: %d %s records the ledger marks %s are still present", system, len(present), record_type, what)
    return checked, still


STEPS = ("extract", "plan", "validation", "erase", "verify")


def report(run: RunInfo, systems: tuple[str, ...]) -> dict:
    """Counts only: per system and rule, per status; validation outcome; policy version; time."""
    staging = run.staging
    ledger = _ledger()
    started = (ledger.run(run.run_id) or {}).get("started_at")
    per_system = {}
    complete = True
    for system in systems:
        parts = {step: staging.read_json(system, step) for step in STEPS}
        ok = all(parts[s] is not None for s in STEPS) and parts["validation"].get("success")
        complete &= bool(ok)
        per_system[system] = {
            "completed": bool(ok),
            "extracted": (parts["extract"] or {}).get("extracted"),
            "quarantined": (parts["plan"] or {}).get("quarantined"),
            "planned": (parts["plan"] or {}).get("planned"),
            "validation": None if parts["validation"] is None else ("passed" if parts["validation"]["success"] else "failed"),
            "erase": parts["erase"],
            "verify": parts["verify"],
        }
    ledger_counts: dict = {}
    for row in ledger.counts(run.run_id):
        ledger_counts.setdefault(row["system"], {}).setdefault(row["rule_id"], {})[row["status"]] = row["n"]
    finished = datetime.now(UTC)
    seconds = None
    if started is not None:
        started = started if started.tzinfo else started.replace(tzinfo=UTC)
        seconds = round((finished - started).total_seconds(), 1)
    state = "success" if complete else "failed"
    rep = {
        "run_id": run.run_id, "dag_id": run.dag_id, "as_of": run.as_of, "dry_run": run.dry_run,
        "policy_version": run.policy_version, "policy_label": run.policy_label,
        "state": state, "seconds": seconds, "systems": per_system, "ledger": ledger_counts,
    }
    text = render_report(rep)
    out = config.reports_dir()
    stem = f"{run.dag_id}__{run.run_id}".replace(":", "_").replace("+", "_")
    (out / f"{stem}.json").write_text(json.dumps(rep, indent=2, default=str))
    (out / f"{stem}.txt").write_text(text)
    (out / "latest.json").write_text(json.dumps(rep, indent=2, default=str))
    for line in text.splitlines():
        log.info("%s", line)
    ledger.close_run(run.run_id, state, rep)
    ledger.release_run(run.run_id)  # whatever failed on the way, the systems are free again
    if complete and not os.environ.get("RETENTION_KEEP_STAGING"):
        staging.remove()
    return {"state": state, "report": str(out / f"{stem}.json")}


def render_report(rep: dict) -> str:
    lines = [
        f"Retention run {rep['run_id']} ({'DRY RUN, nothing erased' if rep['dry_run'] else 'erasing'})",
        f"  as of {rep['as_of']}, policy {rep['policy_version']} ({rep['policy_label']}), state {rep['state']}, {rep['seconds']}s",
    ]
    for system, s in rep["systems"].items():
        lines.append(f"  {system}: extracted {s['extracted']}, validation {s['validation']}")
        if s["quarantined"]:
            lines.append(f"    quarantined (never erased): {s['quarantined']}")
        for rule, statuses in sorted(rep["ledger"].get(system, {}).items()):
            lines.append(f"    {rule:<26} " + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())))
        if rep["dry_run"] and s["erase"]:
            for rule, n in sorted(s["erase"].get("would", {}).items()):
                lines.append(f"    would {rule:<32} {n}")
        if not s["planned"] and not rep["ledger"].get(system):
            lines.append("    nothing due")
    return "\n".join(lines)
