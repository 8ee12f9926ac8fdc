"""The nightly run, one function per DAG task: open, extract, index (beside plan, validate
and erase), plan, validate, erase, verify, report. Each reads its inputs from the run's staging
area and returns a small dict of counts (safe for XCom). Systems are reached only through the
``SourceSystem`` port; the plan goes to the one erasure engine (``runs.erasing``) and the one
report writer (``store.reports``).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator
from datetime import UTC, date, datetime
from enum import StrEnum

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from retention import config
from retention.checks import data_docs
from retention.checks.validation import PlanRejected, run_guard
from retention.domain import approval as approvals
from retention.domain.engine import empty_plan
from retention.domain.holds import Holds
from retention.domain.planning import PlanTally, erase_order, plan_parts
from retention.domain.quarantine import reason_category
from retention.domain.records import SOURCE_HOLDS, record_types_of
from retention.domain.statuses import DESTRUCTIVE, Status
from retention.runs.context import RunInfo, Stopwatch, lean_memory, open_run, pseudonymizer, task_ledger
from retention.runs.erasing import ErasureEngine, StateCheck
from retention.runs.plan_rows import layout
from retention.runs.validating import READ_ROWS, carried_over_rows, destructive_rows, validate_record_type
from retention.store.record_index import GONE_SUFFIX, RecordIndex
from retention.store.reports import ledger_counts, report_stem, status_line, write_report
from retention.store.staging import purge_older_than
from retention.systems.base import ChangeFeed, SourceSystem

log = logging.getLogger("retention")

__all__ = [
    "RunInfo", "erase", "extract", "index", "open_run", "plan", "quarantine_alarm", "render_report", "report", "validate", "verify",
]


def _extracted_at(run: RunInfo, system: str) -> pd.Timestamp:
    extracted = run.staging.read_json(system, "extract") or {}
    return pd.Timestamp(extracted.get("extracted_at") or datetime.now(UTC))


def extract(
    run: RunInfo, system: str, adapter: SourceSystem, *, lock_wait_seconds: float = 6 * 3600, reconcile: bool = False,
) -> dict:
    """Take the system for this run (raises ``LockTimeout`` after ``lock_wait_seconds``), then
    stream the records to staging. An adapter with a change feed whose record index has a cursor
    and no reconciliation due (``RETENTION_RECONCILE_EVERY``) or asked (``reconcile``) reads what
    changed, applies it to the index and stages the whole index; otherwise it is read in full and
    staged, and the ``index`` step builds the index from staging and stores the new cursor. An
    adapter that ``narrows_extract`` (the CRM) stages only the candidates of this run's plan, selected by the
    policy's conditions, with ``extracted`` still counting every record. Otherwise, and whenever
    ``reconcile`` is asked (the replay asks: it looks for restored copies, not for what is due),
    every record is read."""
    lean_memory()
    last_note = [0.0]

    def waiting(holder: str) -> None:
        if time.monotonic() - last_note[0] > 60:
            last_note[0] = time.monotonic()
            log.info("%s: waiting for run %s to finish with this system", system, holder)

    with task_ledger() as ledger:
        ledger.acquire_system(system, run.run_id, wait_seconds=lock_wait_seconds, on_wait=waiting)
    staging = run.staging
    staging.reset_extract(system)
    started = time.monotonic()
    now = datetime.now(UTC)
    totals = None
    with staging.extract_writer(system) as writer:  # an error leaves no part half written
        for record_type in adapter.record_types:
            writer.declare(record_type)
        if isinstance(adapter, ChangeFeed):
            feed = _extract_through_index(system, adapter, writer, now, reconcile=reconcile)
        elif getattr(adapter, "narrows_extract", False) and not reconcile:
            # Only the records a plan as of this run could touch; ``totals``: every record type's
            # size, what the guard weighs.
            totals = adapter.extract(writer.write, now, policy=run.policy(), as_of=run.as_of_ts)
            feed = {"mode": str(ExtractMode.CANDIDATES)}
        else:
            adapter.extract(writer.write, now)
            feed = {"mode": str(ExtractMode.FULL)}
    counts = writer.close()
    summary = {
        "extracted": {**counts, **(totals or {})}, "read": counts,
        "extracted_at": now.isoformat(), "seconds": round(time.monotonic() - started, 2), **feed,
    }
    staging.write_json(system, "extract", summary)
    log.info("%s: extracted %s (read %s) in %.1fs (%s)", system, summary["extracted"], counts, summary["seconds"], summary["mode"])
    if "index" in summary:  # the feed's cursor stays in staging, for the index step; not in XCom
        summary = {**summary, "index": {k: v for k, v in summary["index"].items() if k != "cursor"}}
    return summary


class ExtractMode(StrEnum):
    FULL = "full"  # no record index yet (or an adapter without a change feed)
    INCREMENTAL = "incremental"  # what changed since the stored cursor, planned with the whole index
    RECONCILIATION = "reconciliation"  # a full read rebuilding an existing index, its drift counted
    CANDIDATES = "candidates"  # only the records the policy's conditions select (the CRM, in SQL)


def _extract_through_index(system: str, adapter: ChangeFeed, writer, now: datetime, *, reconcile: bool) -> dict:
    """Read through the adapter's change feed (see ``extract``). An incremental night applies the
    changes to the record index here, with the new cursor in the same transaction, and stages the
    whole index. A full read only stages the records: the ``index`` step builds the index from
    the staged extract and stores the cursor the feed returned (``pending``), off this step's
    critical path. Until then the stored cursor is the old one: a failed run reads again from it."""
    with task_ledger() as ledger:
        index = RecordIndex(ledger.engine, system)
        state = index.state()
        every = config.reconcile_every()
        due = state is None or state.cursor is None or reconcile or now - state.reconciled_at >= every
        if not due:
            with index.update(full=False) as update:
                cursor = adapter.extract_changes(update.write, now, state.cursor)
                applied = update.finish(cursor, now)
            # The staged extract is the whole index, in the frames a full read gives: planning,
            # validation and the guard see every record, as after a full read.
            for record_type in adapter.record_types:
                for frame in index.frames(record_type):
                    writer.write(record_type, frame)
            changed, gone = applied["changed"], applied["gone"]
            log.info(
                "%s: incremental extract from the stored cursor: %d changed, %d gone (%s)",
                system, sum(changed.values()), sum(gone.values()), _per_type_text({**changed, **gone}) or "nothing",
            )
            return {"mode": str(ExtractMode.INCREMENTAL), "changed": changed, "gone": gone}

    def staged(record_type: str, frame: pd.DataFrame) -> None:
        # The index becomes what is staged: a record a full read reports gone is simply not in it.
        if not record_type.endswith(GONE_SUFFIX):
            writer.write(record_type, frame)

    mode = ExtractMode.FULL if state is None else ExtractMode.RECONCILIATION
    cursor = adapter.extract_changes(staged, now, None)
    if mode is ExtractMode.FULL:
        why = "no record index yet"
    elif reconcile:
        why = "asked for"
    elif state.cursor is None:
        why = "no cursor stored"
    else:
        why = f"due, the last on {state.reconciled_at:%Y-%m-%d %H:%M} UTC"
    # What the index step must do. The cursor is the feed's opaque position (no personal data).
    pending = {"mode": str(mode), "cursor": cursor, "read_at": now.isoformat(), "why": why}
    return {"mode": str(mode), "gone": {}, "index": pending}


class IndexStep(StrEnum):
    BUILT = "built"  # a full read's records written into the index, its cursor stored
    NOTHING_TO_DO = "nothing to do"  # an incremental night (applied in extract), or no change feed


def index(run: RunInfo, system: str) -> dict:
    """After a full read of a system with a change feed (the first night, a reconciliation):
    build or rebuild its record index from the staged extract, a staged part at a time, count the
    drift (a reconciliation), and store the cursor the feed returned, in one transaction: a
    failure leaves index and cursor as they were. Otherwise nothing to do: an incremental night
    applied its changes in ``extract``; a system without a change feed keeps no index. Runs
    beside plan, validate and erase; before verify, which forgets confirmed erasures."""
    staging = run.staging
    extracted = staging.read_json(system, "extract")
    if extracted is None:
        raise FileNotFoundError(f"staging has no extract for {system}: did the earlier task of this run succeed?")
    pending = extracted.get("index")
    if not pending:
        summary = {"mode": extracted.get("mode"), "index": str(IndexStep.NOTHING_TO_DO)}
        staging.write_json(system, "index", summary)
        log.info("%s: record index: nothing to do (%s read)", system, extracted.get("mode"))
        return summary
    started = time.monotonic()
    mode = ExtractMode(pending["mode"])
    with task_ledger() as ledger:
        record_index = RecordIndex(ledger.engine, system)
        with record_index.update(full=True) as update:
            for record_type in record_types_of(system):
                for frame in staging.iter_extract(system, record_type):
                    update.write(record_type, frame)
            applied = update.finish(pending["cursor"], datetime.fromisoformat(pending["read_at"]))
    drift = applied["drift"] if mode is ExtractMode.RECONCILIATION else {}
    if mode is ExtractMode.RECONCILIATION:
        log.info("%s: reconciliation (%s): record index drift %s", system, pending.get("why"), _drift_text(drift))
    summary = {
        "mode": str(mode), "index": str(IndexStep.BUILT), "changed": applied["records"], "drift": drift,
        "seconds": round(time.monotonic() - started, 2),
    }
    staging.write_json(system, "index", summary)
    built = "rebuilt" if mode is ExtractMode.RECONCILIATION else "built"
    log.info("%s: record index %s from the staged %s read in %.1fs", system, built, mode, summary["seconds"])
    return summary


def _per_type_text(counts: dict[str, int]) -> str:
    return ", ".join(f"{rt} {n}" for rt, n in sorted(counts.items()))


def _drift_text(drift: dict[str, dict[str, int]]) -> str:
    """Counts only: per record type, index rows missing, extra and different."""
    if not drift:
        return "none"
    return "; ".join(
        f"{rt}: {d['missing']} missing, {d['extra']} extra, {d['different']} different" for rt, d in sorted(drift.items())
    )


# The rows planned at a time. The same at any size of extract (the extract's own parts are
# 200,000 rows, more than a small extract's record type has), so the plan step's memory is flat.
PLAN_PART_ROWS = 50_000
# Larger parts where they were measured to pay. Each part has a fixed cost (a rule's columns,
# its deadlines, the quarantine's checks): at a million newsletter members, parts of 100,000
# rows took 0.54-0.62 s to judge against 0.75 s, for 5 MB more at the peak (200,000: 0.51-0.55 s
# for 25 MB more). The tickets' judging took as long either way (4.9-5.5 s at a million) and
# their peak grew from 326-330 to 345-348 MB (1.09x the 250,000 figure, against 1.05x).
PLAN_PART_ROWS_BY_SYSTEM = {"newsletter": 100_000}


class StagedExtract:
    """The run's staged extract of ``system`` as planning's ``ExtractParts``: ids read alone,
    rows a staged part at a time."""

    def __init__(self, staging, system: str):
        self.staging, self.system = staging, system
        self.part_rows = PLAN_PART_ROWS_BY_SYSTEM.get(system, PLAN_PART_ROWS)

    def has(self, record_type: str) -> bool:
        return self.staging.has_extract(self.system, record_type)

    def ids(self, record_type: str) -> Iterator[pd.Series]:
        for frame in self.staging.iter_extract(self.system, record_type, columns=["record_id"], rows=self.part_rows):
            yield frame["record_id"]
            del frame
            pa.default_memory_pool().release_unused()  # see ``plan``

    def parts(self, record_type: str) -> Iterator[pd.DataFrame]:
        return self.staging.iter_extract(self.system, record_type, rows=self.part_rows)

    def whole(self, record_type: str) -> pd.DataFrame | None:
        return self.staging.read_extract(self.system, record_type)


class _PlanWriter:
    """Stages the plan in erase order (``erase_order``) a part at a time, an external merge sort
    a record type at a time (the types come in the system's order, so each type sorted on its
    own is the whole plan sorted):
    - each part's plan is sorted on its own and staged as a run (``plan_runs``);
    - once a type's last part is in, the order of the whole type is found from its sort columns
      alone (record type and action as codes, record id), a few bytes a row;
    - the plan is then written a slice of that order at a time. The runs being sorted, a slice's
      rows are one range of rows in each run: those ranges are read, and the slice taken from them.
      (Actions outside ``ERASE_ACTIONS`` are ranked as they first appear, so two runs could rank
      two such actions apart: a range then holds rows of other slices too, read and not taken.)
    So the step holds a part, a slice and the sort columns, never a type's whole plan."""

    RUNS = "plan_runs"
    # A slice is converted and written as one row group of the plan: the Parquet writer's
    # buffers follow its size (the ticketing plan step at a million tickets: 377 MB with slices
    # of 50,000 rows, 361 with 20,000; the 250,000-ticket step's peak is elsewhere, 338 and 346).
    SLICE = 20_000
    # A slice reads a range of rows from each run, and Arrow decodes a whole row group for it:
    # small row groups keep that near the rows read.
    RUN_ROW_GROUP = 8_192

    def __init__(self, staging, system: str, writer, record_types: list[str]):
        self.staging, self.system, self.writer, self.record_types = staging, system, writer, record_types
        self._record_type: str | None = None
        self._runs = None
        self._starts = [0]

    def add(self, record_type: str, plan: pd.DataFrame) -> None:
        if record_type != self._record_type:
            self.flush()
            self._record_type = record_type
        if not len(plan):
            return
        if self._runs is None:
            self._runs = self.staging.frame_writer(self.system, self.RUNS, row_group_rows=self.RUN_ROW_GROUP)
        self._runs.write(plan.iloc[erase_order(plan, self.record_types)])
        self._starts.append(self._starts[-1] + len(plan))

    def abandon(self) -> None:
        """Leave no runs behind (the plan step failed)."""
        if self._runs is not None:
            self._runs.abandon()
            self._runs = None

    def flush(self) -> None:
        if self._runs is None:
            return
        self._runs.close()
        self._runs, starts, self._starts = None, np.asarray(self._starts, dtype=np.int64), [0]
        rows = self.staging.rows(self.system, self.RUNS)
        keys = rows.whole(["record_type", "action", "record_id"], categories=["record_type", "action"])
        order = erase_order(keys, self.record_types)
        del keys
        runs = len(starts) - 1
        for at in range(0, len(order), self.SLICE):
            positions = order[at : at + self.SLICE]
            run = np.searchsorted(starts, positions, side="right") - 1
            low = np.full(runs, np.iinfo(np.int64).max, dtype=np.int64)
            high = np.full(runs, -1, dtype=np.int64)
            np.minimum.at(low, run, positions)
            np.maximum.at(high, run, positions)
            base = np.zeros(runs, dtype=np.int64)
            frames, read = [], 0
            for r in np.flatnonzero(high >= 0):
                base[r] = read
                frames.extend(rows.chunks(rows.columns, int(low[r]), int(high[r]) + 1, rows=self.SLICE))
                read += int(high[r] - low[r] + 1)
            taken = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
            self.writer.write(taken.iloc[base[run] + positions - low[run]])
            del frames, taken
        (self.staging.system_dir(self.system) / f"{self.RUNS}.parquet").unlink()


def plan(run: RunInfo, system: str) -> dict:
    """Quarantine malformed records, evaluate the rules, pseudonymise, apply every hold: a part
    of the staged extract at a time (``planning.plan_parts``), so the step's memory is that of a
    part and the compact plan of one record type, whatever the size of the extract."""
    lean_memory()
    policy = run.policy()
    staging = run.staging
    clock = Stopwatch()
    with task_ledger() as ledger:
        ledger_holds = ledger.holds()
    clock.lap("read")
    record_types = record_types_of(system)
    tally = PlanTally()
    quarantined: list[pd.DataFrame] = []
    with staging.frame_writer(system, "plan") as plan_file:
        plan_out = _PlanWriter(staging, system, plan_file, record_types)
        clean_file, clean_type = None, None
        try:
            parts = plan_parts(
                system, StagedExtract(staging, system), policy, run.as_of_ts, now=_extracted_at(run, system),
                ledger_holds=ledger_holds, pseudonymizer=pseudonymizer(),
            )
            for part in parts:  # each part read from staging, then judged
                clock.lap("read")
                tally.add(part)
                if part.record_type != clean_type:  # the frames the engine judged, for validation
                    if clean_file is not None:
                        clean_file.close()
                    # Row groups of what the validate step reads at a time (not a part's rows,
                    # 100,000 for the newsletter): its reads take whole row groups of every
                    # column they read.
                    clean_file = staging.frame_writer(system, f"clean_{part.record_type}", row_group_rows=READ_ROWS)
                    clean_type = part.record_type
                clean_file.write(part.clean)
                plan_out.add(part.record_type, part.plan)
                if len(part.quarantined):
                    quarantined.append(part.quarantined)
                del part
                # What a part's Arrow buffers took goes back now, not when jemalloc's decay
                # comes round: else each part takes fresh pages and the step's peak grows with
                # the number of parts.
                pa.default_memory_pool().release_unused()
                clock.lap("write")
            plan_out.flush()
            if clean_file is not None:
                clean_file.close()
            clock.lap("write")
        except BaseException:
            if clean_file is not None:
                clean_file.abandon()
            plan_out.abandon()
            raise
        if not plan_file.rows:
            plan_file.write(_empty_plan())
    clock.lap("write")
    # The parts' judging was timed on its own (``PlanPart.seconds``): the rules' lap, apart
    # from the staging reads it came between.
    judged = round(sum(tally.seconds.values()), 3)
    clock.laps["read"] = round(max(clock.laps.get("read", 0.0) - judged, 0.0), 3)
    clock.laps["rules"] = judged
    quarantine = pd.concat(quarantined, ignore_index=True) if quarantined else pd.DataFrame()
    # Which records sit in quarantine tonight, by pseudonym: the stuck-quarantine alarm's count.
    with task_ledger() as ledger:
        ledger.observe_quarantine(system, run.run_id, night_of(run, policy), quarantined_keys(quarantine))
    clock.lap("quarantine_ledger")
    if len(quarantine):
        staging.write_frame(system, "quarantine", quarantine)
    clock.lap("write")
    summary = {**tally.summary(), "as_of": run.as_of, "seconds": clock.laps, "rules_seconds": tally.seconds}
    staging.write_json(system, "plan", summary)
    log.info(
        "%s: plan %s; quarantined %s (%s)",
        system, summary["planned"] or "empty", summary["quarantined"] or "none", clock,
    )
    return summary


def _empty_plan() -> pd.DataFrame:
    plan = empty_plan()
    plan["record_key"] = pd.Series(dtype="string")
    return plan


def night_of(run: RunInfo, policy) -> date:
    """The night a run enforces: its as-of date in the policy's time zone."""
    return run.as_of_ts.tz_convert(policy.timezone).date()


def quarantined_keys(quarantined: pd.DataFrame) -> Iterator[tuple[str, str, str]]:
    """(record type, pseudonym, reason category) of planning's quarantined records."""
    if not len(quarantined):
        return iter(())
    reasons = quarantined["reason"].astype(str).map(reason_category)
    return zip(quarantined["record_type"].astype(str), quarantined["record_key"].astype(str), reasons)


def quarantine_alarm(ledger, policy, systems: tuple[str, ...]) -> dict | None:
    """The records of ``systems`` quarantined on more than the policy's
    ``quarantine_alarm_after`` nights: counts per system, record type and reason, no keys."""
    after = policy.quarantine_alarm_after
    stuck = ledger.stuck_in_quarantine(systems, more_than=after)
    if not stuck:
        return None
    total = sum(n for types in stuck.values() for reasons in types.values() for n in reasons.values())
    per_type: dict[str, int] = {}
    for types in stuck.values():
        for record_type, reasons in types.items():
            per_type[record_type] = per_type.get(record_type, 0) + sum(reasons.values())
    which = ", ".join(f"{n} {record_type}" for record_type, n in sorted(per_type.items()))
    line = (
        f"quarantine alarm: {total} record{'s' if total != 1 else ''} stuck in quarantine for more than {after} nights "
        f"({which}); fix them in their systems (retention explain names why)"
    )
    return {"after_nights": after, "total": total, "stuck": stuck, "message": line}


def validate(run: RunInfo, system: str) -> dict:
    """Great Expectations on the extract and the plan, and the plan-size guard."""
    lean_memory(fixed_malloc=False)
    policy = run.policy()
    staging = run.staging
    clock = Stopwatch()
    # The plan and the clean extracts are read a slice at a time, only what the checks read: a
    # record type is checked a partition at a time (``runs.validating``). The whole plan is read
    # only for a plan that needs an approval (its hash).
    plan_rows = staging.rows(system, "plan")
    shape = layout(plan_rows)  # None: staged out of erase order (an older version): every row read per type
    extracted = staging.read_json(system, "extract") or {}
    now = _extracted_at(run, system)
    with task_ledger() as ledger:
        holds = Holds.at(run.as_of_ts, source=staging.read_extract(system, SOURCE_HOLDS), ledger=ledger.holds())
    outcomes = []
    total_extracted = sum(extracted.get("extracted", {}).values())
    clock.lap("read")
    for record_type in record_types_of(system):
        try:
            clean_rows = staging.rows(system, f"clean_{record_type}")
        except FileNotFoundError:
            continue
        if shape is None:
            ranges, count = [(0, plan_rows.num_rows)], plan_rows.num_rows
        else:
            ranges, count = [(r.start, r.stop) for r in shape.of(record_type)], shape.rows(record_type)
        outcomes.extend(validate_record_type(
            clean_rows, plan_rows, ranges, count, record_type, now, policy, run.as_of_ts, holds, clock, (staging, system),
        ))
    destructive, by_type = destructive_rows(plan_rows, shape)
    # Work an earlier run validated and started but carried over for lack of time is not new:
    # the guard weighs only the rest, so a backlog does not trip it night after night.
    with task_ledger() as ledger:
        carried = carried_over_rows(plan_rows, {t: ledger.carried_over(system, t) for t in by_type})
    guard = run_guard(destructive - carried, total_extracted, run.max_plan_share)
    outcomes.append(guard)
    clock.lap("checks")
    success = all(o.success for o in outcomes)
    # Only the guard failed (Great Expectations passed): a person may approve this very plan.
    # Not in a dry run, which erases nothing anyway, nor when RETENTION_APPROVAL_TIMEOUT is zero.
    ask = not success and all(o.success for o in outcomes if o is not guard) and not run.dry_run and bool(config.approval_timeout())
    for o in outcomes:
        for c in o.failures():
            log.error("%s: validation %s failed: %s", system, o.name, json.dumps(c, default=str))
    docs = keep_data_docs(run, system, outcomes)
    clock.lap("data_docs")
    summary = {"success": success, "suites": [o.as_dict() for o in outcomes], "seconds": clock.laps, "data_docs": docs}
    if ask:
        numbers = guard.checks[0]
        summary.update(
            needs_approval=True, plan_hash=approvals.plan_hash(staging.read_frame(system, "plan")), guard_line=_failed_suite(guard),
            planned=int(numbers["planned"]), allowed=int(numbers["allowed"]), extracted=int(numbers["extracted"]),
        )
    staging.write_json(system, "validation", summary)
    if ask:
        log.warning("%s: %s; nothing is erased unless a person approves this plan", system, summary["guard_line"])
        return {
            "success": False, "needs_approval": True, "suites": len(outcomes), "destructive": destructive,
            "carried_over": carried, "extracted": total_extracted, "seconds": clock.laps, "data_docs": docs,
            **{k: summary[k] for k in ("plan_hash", "guard_line", "planned", "allowed")},
        }
    if not success:
        if docs:
            log.info("%s: Data Docs of the failed validation: %s", system, docs)
        failed = [_failed_suite(o) for o in sorted((o for o in outcomes if not o.success), key=lambda o: o.name)]
        raise PlanRejected(f"{system}: validation failed ({'; '.join(dict.fromkeys(failed))}); nothing was erased")
    log.info("%s: validation passed (%d suites; %s); Data Docs: %s", system, len(outcomes), clock, docs or "none")
    return {
        "success": True, "suites": len(outcomes), "destructive": destructive, "carried_over": carried,
        "extracted": total_extracted, "seconds": clock.laps, "data_docs": docs,
    }


def keep_data_docs(run: RunInfo, system: str, outcomes) -> str | None:
    """The run's GX suites and results for ``system``, kept with their Data Docs under
    ``RETENTION_HOME/data_docs``; the index page's path relative to it. Documents, not a check:
    when they cannot be written the validation still stands, and the log says why."""
    try:
        return data_docs.keep(outcomes, config.data_docs_dir(), report_stem(run.dag_id, run.run_id), system)
    except Exception as exc:  # noqa: BLE001 - any failure of GX's renderers or the disk
        log.warning("%s: Data Docs not written (%s: %s)", system, type(exc).__name__, str(exc)[:200])
        return None


# --- approval of a plan over the guard ----------------------------------------------------------

PREVIEW_KEYS = 5  # pseudonymous keys shown per rule


def approval_request(run: RunInfo, system: str) -> dict:
    """What the approver of a plan over the guard sees: the guard's numbers, the counts per rule
    and a few pseudonymous keys per rule (never an id or a value), the plan's content hash and
    the policy version the approval will be bound to. Markdown, as Airflow's UI shows it."""
    staging = run.staging
    validation = staging.read_json(system, "validation") or {}
    if not validation.get("needs_approval"):
        raise PlanRejected(f"{system}: the plan needs no approval in this run")
    plan_frame = staging.read_frame(system, "plan")
    counts = approvals.destructive_by_rule(plan_frame)
    preview = approvals.key_preview(plan_frame, PREVIEW_KEYS)
    lines = [
        f"**{system}**: the plan-size guard tripped: {validation['guard_line']}.",
        "Nothing is erased in this system unless you approve this very plan. Rejecting, or no answer in time, "
        "erases nothing; the next run plans again.",
        "",
        f"- run `{run.run_id}`, as of {run.as_of}",
        f"- plan hash `{validation['plan_hash']}`",
        f"- policy version `{run.policy_version}` ({run.policy_label})",
        "",
        "| rule | records to erase or minimise |",
        "|---|---|",
        *(f"| `{rule}` | {n} |" for rule, n in counts.items()),
        "",
        f"Preview of keys (pseudonyms, the first {PREVIEW_KEYS} per rule; `retention explain` tells why a record is due):",
        "",
        *(f"- `{rule}`: " + ", ".join(f"`{k}`" for k in keys) for rule, keys in preview.items()),
    ]
    return {
        "subject": f"Approve erasing {validation['planned']} records in {system}? (over the plan-size guard)",
        "body": "\n".join(lines),
        "line": f"{system}: {validation['guard_line']}; nothing is erased unless approved",
        "plan_hash": validation["plan_hash"],
    }


def record_approval(run: RunInfo, system: str, decision: str, decided_by: str | None, decided_at: datetime) -> dict:
    """Record a decision on this run's plan over the guard, bound to the plan hash the approver
    was shown (validation's) and the run's policy version."""
    validation = run.staging.read_json(system, "validation") or {}
    if not validation.get("needs_approval"):
        raise PlanRejected(f"{system}: the plan needs no approval in this run; nothing recorded")
    row = {
        "dag_id": run.dag_id, "run_id": run.run_id, "system": system, "plan_hash": validation["plan_hash"],
        "policy_version": run.policy_version, "decision": str(decision), "decided_by": decided_by,
        "decided_at": decided_at, "planned": validation["planned"], "allowed": validation["allowed"],
        "extracted": validation["extracted"],
    }
    with task_ledger() as ledger:
        ledger.record_approval(**row)
    log.info("%s: plan %s… %s by %s", system, row["plan_hash"][:12], decision, decided_by or "nobody (timed out)")
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in row.items()}


def _approval_to_erase(run: RunInfo, system: str, plan_frame: pd.DataFrame) -> dict:
    """The approval of exactly this plan (its content hash now) under the run's policy version,
    or ``PlanRejected``: a plan over the guard is never erased on another plan's approval."""
    now_hash = approvals.plan_hash(plan_frame)
    with task_ledger() as ledger:
        granted = approvals.approved(ledger.approvals(system=system, plan_hash=now_hash, policy_version=run.policy_version))
        asked = ledger.approvals(system=system, run_id=run.run_id)
    if granted is None:
        why = "no approval of this plan"
        if asked and asked[-1]["plan_hash"] != now_hash:
            why = f"the plan changed after its {asked[-1]['decision']} (plan hash {asked[-1]['plan_hash'][:12]}…)"
        elif asked:
            why = f"the plan was {asked[-1]['decision']}"
        raise PlanRejected(
            f"{system}: the plan is over the plan-size guard and {why}: plan hash {now_hash[:12]}…, "
            f"policy version {run.policy_version}; nothing was erased"
        )
    return {
        "decision": str(granted["decision"]), "decided_by": granted["decided_by"], "plan_hash": now_hash,
        "policy_version": run.policy_version, "decided_at": str(granted["decided_at"]),
    }


def _failed_suite(outcome) -> str:
    """A failed suite's name; the plan-size guard's with its numbers (counts only), so the task's
    one line and its alert say by how much the plan was too large."""
    guard = next((c for c in outcome.checks if "allowed" in c), None)
    if guard is None:
        return outcome.name
    return f"{outcome.name}: {guard['planned']} planned, {guard['allowed']} allowed of {guard['extracted']} extracted"


def erase(run: RunInfo, system: str, adapter: SourceSystem) -> dict:
    """Hand the validated plan to the erasure engine. Resumable and idempotent."""
    lean_memory()
    staging = run.staging
    validation = staging.read_json(system, "validation")
    over_guard = bool(validation and validation.get("needs_approval"))
    if not validation or not (validation.get("success") or over_guard):
        raise PlanRejected(f"{system}: no successful validation in this run; refusing to erase")
    # The engine reads the staged plan a batch's rows at a time (staged in erase order by the
    # plan step): the step holds a batch, not the plan.
    plan_rows = staging.rows(system, "plan")
    extracted_at = _extracted_at(run, system)
    approval = None
    try:
        refuse_an_old_plan(system, extracted_at)
        if over_guard:  # an approval is of the whole plan: its hash over every column
            approval = _approval_to_erase(run, system, plan_rows.whole())
    except PlanRejected:
        # This run will erase nothing more in this system: free it for a run that plans afresh.
        with task_ledger() as ledger:
            ledger.release_system(system, run.run_id)
        raise
    # Each record's current state is judged again right before its erasure, by the run's policy.
    check = StateCheck(policy=run.policy(), as_of=run.as_of_ts, extracted_at=extracted_at)
    with task_ledger() as ledger:
        engine = ErasureEngine(ledger, run.run_id, system, adapter, run.policy_version, check)
        if run.dry_run:
            would = engine.count(plan_rows).would_by_rule
            summary = {"dry_run": True, "would": would}
            staging.write_json(system, "erase", summary)
            log.info("%s: dry run, nothing erased; would act on %s", system, would or "nothing")
            return summary
        budget = config.erase_budget()
        result = engine.erase(plan_rows, budget_seconds=budget.total_seconds())
    outcomes = dict(sorted(result.totals().items()))
    summary = {
        "dry_run": False, "outcomes": outcomes, "seconds": result.seconds, "waited_seconds": result.waited,
        "budget_seconds": int(budget.total_seconds()), **carry_over_summary(outcomes, result.seconds),
    }
    if approval is not None:
        summary["approval"] = approval
    if summary["carried_over"]:
        log.warning(
            "%s: %d erasures carried over to the next run (budget %s spent; about %s more night(s) at this rate)",
            system, summary["carried_over"], budget, summary["backlog_nights"] or "unknown",
        )
    staging.write_json(system, "erase", summary)
    if result.failed:
        raise RuntimeError(f"{system}: {result.failed} erasures failed (see the ledger); retry the task to resume")
    return summary


def carry_over_summary(outcomes: dict[str, int], seconds: float) -> dict:
    """What a spent budget left for the next run, and when the backlog is gone at this run's
    rate: the records the erase step settled per hour, and the nights that many more take."""
    carried = int(outcomes.get(str(Status.CARRIED_OVER), 0))
    done = sum(int(outcomes.get(str(s), 0)) for s in (Status.ERASED, Status.ALREADY_GONE))
    per_hour = round(done / seconds * 3600) if seconds and done else None
    nights = math.ceil(carried / done) if carried and done else None
    return {"carried_over": carried, "erased_per_hour": per_hour, "backlog_nights": nights}


def refuse_an_old_plan(system: str, extracted_at: datetime) -> None:
    """A plan made from an extract older than ``RETENTION_MAX_PLAN_AGE`` is not erased: the erase
    task was retried or cleared long after planning, and a new run plans afresh."""
    limit = config.max_plan_age()
    age = datetime.now(UTC) - pd.Timestamp(extracted_at).to_pydatetime()
    if age > limit:
        raise PlanRejected(
            f"{system}: the plan was made from an extract of {pd.Timestamp(extracted_at):%Y-%m-%d %H:%M} UTC, "
            f"{age.total_seconds() / 3600:.1f} hours ago, older than RETENTION_MAX_PLAN_AGE ({limit}): "
            "nothing was erased; start a new run"
        )


def verify(run: RunInfo, system: str, adapter: SourceSystem) -> dict:
    """Every record this run erased is gone from the source; the system is free again."""
    lean_memory()
    staging = run.staging
    with task_ledger() as ledger:
        if run.dry_run:
            summary = {"dry_run": True, "checked": 0, "still_present": 0}
        else:
            engine = ErasureEngine(ledger, run.run_id, system, adapter, run.policy_version)
            checked, still = engine.verify(_destructive_chunks(run, system, engine.verify_chunk))
            summary = {"dry_run": False, "checked": checked, "still_present": still}
        staging.write_json(system, "verify", summary)
        ledger.release_system(system, run.run_id)
    if summary["still_present"]:
        raise RuntimeError(f"{system}: verification failed: {summary['still_present']} erased records are still present")
    if not run.dry_run:
        log.info("%s: verified %d erasures, none present", system, summary["checked"])
    return summary


def _destructive_chunks(run: RunInfo, system: str, rows: int) -> Iterator[pa.RecordBatch]:
    """The plan's destructive rows, the columns verify needs, a chunk at a time: a plan of a
    million rows is never a whole frame of Python strings in the verify step."""
    destructive = pa.array([str(a) for a in DESTRUCTIVE])
    columns = ["record_type", "record_id", "record_key", "action"]
    for batch in run.staging.iter_batches(system, "plan", columns, batch_rows=rows):
        yield batch.filter(pc.is_in(pc.cast(batch.column("action"), pa.string()), value_set=destructive))


STEPS = ("extract", "plan", "validation", "erase", "verify")


def report(run: RunInfo, systems: tuple[str, ...]) -> dict:
    """Counts only: per system and rule, per status; validation outcome; policy version; time."""
    staging = run.staging
    with task_ledger() as ledger:
        started = (ledger.run(run.run_id) or {}).get("started_at")
        per_system = {}
        docs = {}
        complete = True
        not_approved = []
        for system in systems:
            parts = {step: staging.read_json(system, step) for step in STEPS}
            validation = parts["validation"]
            if (validation or {}).get("data_docs"):
                docs[system] = validation["data_docs"]
            # A plan over the guard counts as validated once erased on its approval.
            validated = bool(validation) and (validation.get("success") or bool((parts["erase"] or {}).get("approval")))
            ok = all(parts[s] is not None for s in STEPS) and validated
            complete &= bool(ok)
            decision = None
            if validation and validation.get("needs_approval"):
                asked = ledger.approvals(system=system, run_id=run.run_id)
                decision = _decision_shown(asked[-1]) if asked else {"decision": "awaited", "plan_hash": validation["plan_hash"]}
                if not ok and decision["decision"] != "approved":
                    not_approved.append(system)
            per_system[system] = {
                "completed": bool(ok),
                "extracted": (parts["extract"] or {}).get("extracted"),
                "read": _read_of(parts["extract"], staging.read_json(system, "index")),
                "quarantined": (parts["plan"] or {}).get("quarantined"),
                "planned": (parts["plan"] or {}).get("planned"),
                "fallback_clock": (parts["plan"] or {}).get("fallback_clock"),
                "validation": None if validation is None else (
                    "passed" if validation["success"] else "over the plan-size guard" if validation.get("needs_approval") else "failed"
                ),
                "validation_checks": validation_checks(validation),
                "guard": validation.get("guard_line") if validation and validation.get("needs_approval") else None,
                "approval": decision,
                "erase": parts["erase"],
                "verify": parts["verify"],
            }
        finished = datetime.now(UTC)
        seconds = None
        if started is not None:
            started = started if started.tzinfo else started.replace(tzinfo=UTC)
            seconds = round((finished - started).total_seconds(), 1)
        state = "success" if complete else "failed"
        # Counted after the run's erasures (the report runs last, whatever failed): the alarm
        # fails the quality gate, never the erasure of the other records.
        alarm = quarantine_alarm(ledger, run.policy(), systems)
        rep = {
            "run_id": run.run_id, "dag_id": run.dag_id, "as_of": run.as_of, "dry_run": run.dry_run,
            "policy_version": run.policy_version, "policy_label": run.policy_label,
            "state": state, "seconds": seconds, "systems": per_system, "ledger": ledger_counts(ledger, run.run_id),
            "quality_gate": "failed" if alarm else "passed", "quarantine_alarm": alarm,
            # Each system's Data Docs index page, relative to RETENTION_HOME/data_docs.
            "data_docs": docs,
        }
        # What failed or halted runs left behind is not kept for ever.
        rep["staging_purged"] = purge_older_than(config.staging_keep_days(), keep=staging)
        rep["data_docs_purged"] = data_docs.prune(
            config.data_docs_dir(), config.data_docs_keep_days(), keep=report_stem(run.dag_id, run.run_id)
        )
        path = write_report(ledger, staging, rep, render_report(rep), latest=True)
    return {"state": state, "report": str(path), "alarm": alarm["message"] if alarm else None, "not_approved": not_approved}


def _read_of(extracted: dict | None, indexed: dict | None) -> dict | None:
    """How the system was read: in full, from its change feed, or a reconciliation (counts of
    changed and gone records and the index's drift; no ids); or only the candidates of the plan
    (the CRM: ``records`` counts what was read). After a full read through a change feed, the
    records and the drift are the index step's (None when it did not finish)."""
    if not (extracted or {}).get("mode"):
        return None
    read = {k: extracted.get(k) for k in ("mode", "changed", "gone", "drift")}
    if extracted.get("index"):
        built = indexed if (indexed or {}).get("index") == IndexStep.BUILT else {}
        read.update(changed=built.get("changed"), drift=built.get("drift"))
    return {**read, "records": extracted.get("read")}


def _decision_shown(row: dict) -> dict:
    """A decision as the report shows it: who, when, which plan and policy version."""
    return {
        "decision": str(row["decision"]), "decided_by": row["decided_by"], "decided_at": str(row["decided_at"]),
        "plan_hash": row["plan_hash"], "policy_version": row["policy_version"],
    }


def validation_checks(summary: dict | None) -> dict | None:
    """The numbers of a system's validation for the report: each failed expectation (suite,
    expectation, column, how many rows failed it) and the plan guard (planned against allowed of
    extracted). Counts only: an observed value (a date, a key) is left out."""
    if not summary:
        return None
    failed, guard = [], None
    for suite in summary.get("suites") or []:
        for c in suite.get("checks") or []:
            if "allowed" in c:
                guard = {k: c.get(k) for k in ("planned", "allowed", "extracted", "max_share")} | {"success": bool(c.get("success"))}
            elif not c.get("success"):
                failed.append({
                    "suite": suite.get("name"), "expectation": c.get("expectation"), "column": c.get("column"),
                    "unexpected_count": c.get("unexpected_count"),
                })
    return {"failed": failed, "guard": guard}


def render_report(rep: dict) -> str:
    lines = [
        f"Retention run {rep['run_id']} ({'DRY RUN, nothing erased' if rep['dry_run'] else 'erasing'})",
        f"  as of {rep['as_of']}, policy {rep['policy_version']} ({rep['policy_label']}), state {rep['state']}, {rep['seconds']}s",
    ]
    for system, s in rep["systems"].items():
        lines.append(f"  {system}: extracted {s['extracted']}, validation {s['validation']}")
        read = s.get("read")
        if read and read["mode"] == ExtractMode.CANDIDATES:
            lines.append(f"    read the plan's candidates only: {_per_type_text(read.get('records') or {}) or 'none'}")
        elif read and read["mode"] != "full":
            line = f"    read {read['mode']}: {_per_type_text(read.get('changed') or {}) or 'nothing'} changed"
            if read["mode"] == "incremental":
                line += f", {_per_type_text(read.get('gone') or {}) or 'nothing'} gone"
            elif read.get("drift") is None:  # the index step did not finish: no drift counted
                line = f"    read {read['mode']}: the record index was not rebuilt (see the index step)"
            else:
                line += f"; record index drift {_drift_text(read.get('drift') or {})}"
            lines.append(line)
        if rep.get("data_docs", {}).get(system):
            lines.append(f"    Data Docs: data_docs/{rep['data_docs'][system]}")
        if s["quarantined"]:
            lines.append(f"    quarantined (never erased): {s['quarantined']}")
        if s.get("approval"):
            a = s["approval"]
            who = f" by {a['decided_by']}" if a.get("decided_by") else ""
            erased = "erased on that approval" if a["decision"] == "approved" and s["completed"] else "nothing erased"
            lines.append(f"    {s['guard']}: plan {a['plan_hash'][:12]}… {a['decision'].replace('_', ' ')}{who}; {erased}")
        if s.get("fallback_clock"):
            lines.append(f"    planned by a fallback clock (the organisation's decision): {s['fallback_clock']}")
        for rule, statuses in sorted(rep["ledger"].get(system, {}).items()):
            lines.append(status_line(rule, statuses))
        if rep["dry_run"] and s["erase"]:
            for rule, n in sorted(s["erase"].get("would", {}).items()):
                lines.append(f"    would {rule:<32} {n}")
        carried = (s["erase"] or {}).get("carried_over")
        if carried:
            nights = s["erase"].get("backlog_nights")
            rate = s["erase"].get("erased_per_hour")
            lines.append(
                f"    carried over to the next run: {carried} (the erase budget of {s['erase'].get('budget_seconds')}s was spent"
                + (f"; at {rate} per hour, about {nights} more night(s)" if nights else "")
                + ")"
            )
        if not s["planned"] and not rep["ledger"].get(system):
            lines.append("    nothing due")
    if rep.get("staging_purged"):
        lines.append(f"  staging left by {rep['staging_purged']} earlier run(s) purged")
    if rep.get("data_docs_purged"):
        lines.append(f"  Data Docs of {rep['data_docs_purged']} run(s) older than RETENTION_DATA_DOCS_KEEP_DAYS purged")
    alarm = rep.get("quarantine_alarm")
    if alarm:
        lines.append(f"  QUALITY GATE FAILED: {alarm['message']}")
        for system, types in alarm["stuck"].items():
            for record_type, reasons in types.items():
                for reason, n in reasons.items():
                    lines.append(f"    stuck {system}/{record_type:<28} {reason}: {n}")
    return "\n".join(lines)

