"""The runs' reports as the report view and the DAG run notes read them.

Every DAG writes its own report (``store/reports.py`` for the nightly run, the erasure request and
the replay; ``runs/preview.py`` for the policy preview); this module reads them from
``RETENTION_HOME/reports`` and ``RETENTION_HOME/previews`` and puts each into one shape
(``RunReport``): the run's facts, one row per system and rule (or record type) with the counts
per outcome, each system's validation (the failed expectations' numbers, the plan guard's
planned against allowed) and, when the report has them, carried-over work and Data Docs. Reports
hold counts and pseudonyms only; so does everything here.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from retention import config
from retention.domain.statuses import WOULD

log = logging.getLogger("retention")

#: The columns of the counts table, in the order shown, and which report words count in each.
#: A dry run's "would" counts go in their own columns (nothing was erased).
COLUMNS: dict[str, tuple[str, ...]] = {
    "erased": ("erased", "replayed"),
    "already gone": ("already_gone",),
    "minimised": ("minimised",),
    "would erase": ("would_erase", "would_replay"),
    "halted": ("halted",),
    "held": ("held", "would_keep"),
    "deferred": ("deferred", "would_defer"),
    "quarantined": ("quarantined",),
    "kept": ("kept", "left_alone_new", "left_alone_undated"),
    "not done": ("planned", "submitted", "failed"),
}
_COLUMN_OF = {word: column for column, words in COLUMNS.items() for word in words}
# Why a count is in its column, in words (the reason column of the table).
_REASONS = {
    "held": "a legal hold (manual or the law's) keeps it",
    "would_keep": "a legal hold (manual or the law's) keeps it",
    "deferred": "not yet: a record it depends on is still there (e.g. an unsolved ticket)",
    "would_defer": "not yet: a record it depends on is still there (e.g. an unsolved ticket)",
    "quarantined": "cannot be judged (a missing or invalid date or flag): never erased",
    "left_alone_new": "created after the erasure: a new record, left alone",
    "left_alone_undated": "no creation date to compare: left alone",
    "failed": "the system refused or failed: a retry resumes it",
    "planned": "not reached: the run stopped before it",
    "halted": "planned, not erased: validation rejected the plan",
    "submitted": "handed to the system, answer not booked",
}


class Kind(StrEnum):
    NIGHTLY = "nightly"
    REQUEST = "erasure request"
    REPLAY = "replay"
    PREVIEW = "policy preview"


@dataclass
class Row:
    system: str
    rule: str  # a rule id, or a record type where the report counts by record type
    counts: dict[str, int] = field(default_factory=dict)  # column -> n
    reasons: list[str] = field(default_factory=list)


@dataclass
class Validation:
    system: str
    outcome: str  # passed / failed / not run
    failed: list[dict] = field(default_factory=list)  # suite, expectation, column, unexpected_count
    guard: dict | None = None  # planned, allowed, extracted, max_share, success


@dataclass
class RunReport:
    dag_id: str
    run_id: str
    kind: Kind
    state: str
    dry_run: bool
    as_of: str | None
    policy: str | None
    rows: list[Row]
    validations: list[Validation]
    due: int | None  # records due this run (planned to be erased or minimised)
    carried_over: object = None
    data_docs: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    written: float = 0.0  # the file's mtime: the order of runs

    def totals(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for row in self.rows:
            for column, n in row.counts.items():
                out[column] = out.get(column, 0) + n
        return {c: out[c] for c in COLUMNS if out.get(c)}

    def erased_by_rule(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for row in self.rows:
            n = row.counts.get("erased", 0) + row.counts.get("minimised", 0)
            if n:
                out[row.rule] = out.get(row.rule, 0) + n
        return out


def _int(v) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return 0


def _row(system: str, rule: str, statuses: Mapping[str, object]) -> Row:
    row = Row(system, rule)
    for word, n in statuses.items():
        column = _COLUMN_OF.get(word)
        if column is None or not _int(n):
            continue
        row.counts[column] = row.counts.get(column, 0) + _int(n)
        if word in _REASONS and _REASONS[word] not in row.reasons:
            row.reasons.append(_REASONS[word])
    return row


def _merge(rows: list[Row]) -> list[Row]:
    merged: dict[tuple[str, str], Row] = {}
    for r in rows:
        m = merged.setdefault((r.system, r.rule), Row(r.system, r.rule))
        for c, n in r.counts.items():
            m.counts[c] = m.counts.get(c, 0) + n
        m.reasons += [x for x in r.reasons if x not in m.reasons]
    return [merged[k] for k in sorted(merged)]


def _validation(system: str, s: Mapping) -> Validation:
    outcome = s.get("validation") or "not run"
    v = Validation(system, str(outcome))
    detail = s.get("validation_checks") or {}
    v.failed = [dict(c) for c in detail.get("failed") or []]
    v.guard = detail.get("guard")
    return v


def _nightly(rep: Mapping) -> tuple[list[Row], list[Validation], int | None]:
    rows, validations, due = [], [], 0
    ledger = rep.get("ledger") or {}
    for system, s in (rep.get("systems") or {}).items():
        for rule, statuses in (ledger.get(system) or {}).items():
            rows.append(_row(system, rule, statuses))
        # A dry run's plan: "rule/action" -> n, what a real run would have done.
        for key, n in ((s.get("erase") or {}).get("would") or {}).items():
            rule, _, action = str(key).partition("/")
            rows.append(_row(system, rule, {WOULD.get(action, "would_erase"): n}))
        # A plan validation rejected: what it would have erased, none of it erased.
        if s.get("validation") == "failed" and not rep.get("dry_run"):
            for key, n in (s.get("planned") or {}).items():
                rule, _, action = str(key).partition("/")
                if action in ("erase", "minimise"):
                    rows.append(_row(system, rule, {"halted": n}))
        # Quarantined records have no rule: they are counted by record type and reason.
        for record_type, reasons in (s.get("quarantined") or {}).items():
            for reason, n in (reasons.items() if isinstance(reasons, Mapping) else [("", reasons)]):
                row = _row(system, f"({record_type})", {"quarantined": n})
                row.reasons = [f"quarantined: {reason}"] if reason else row.reasons
                rows.append(row)
        # The due backlog: what the plan would erase or minimise ("rule/action" -> n).
        due += sum(_int(n) for key, n in (s.get("planned") or {}).items() if str(key).rpartition("/")[2] in ("erase", "minimise"))
        validations.append(_validation(system, s))
    return _merge(rows), validations, due


def _request(rep: Mapping) -> tuple[list[Row], list[Validation], int | None]:
    rows = [
        _row(system, record_type, statuses)
        for system, s in (rep.get("systems") or {}).items()
        for record_type, statuses in (s.get("records") or {}).items()
    ]
    return _merge(rows), [], None


def _replay(rep: Mapping) -> tuple[list[Row], list[Validation], int | None]:
    rows = [
        _row(system, record_type, {k: v for k, v in counts.items() if k != "found"})
        for system, s in (rep.get("systems") or {}).items()
        for record_type, counts in (s.get("record_types") or {}).items()
    ]
    return _merge(rows), [], None


def _preview(rep: Mapping) -> tuple[list[Row], list[Validation], int | None]:
    rows, validations = [], []
    for system, s in (rep.get("systems") or {}).items():
        for change, groups in s.items():
            if not isinstance(groups, list):
                continue
            for g in groups:
                if not isinstance(g, Mapping):
                    continue
                rule = g.get("rule") or f"{g.get('old_rule')} -> {g.get('new_rule')}"
                row = Row(system, f"{rule} [{change.replace('_', ' ')}]", {"would erase": _int(g.get("count"))})
                rows.append(row)
        guard = s.get("guard") or {}
        if guard:
            validations.append(Validation(system, "would halt" if guard.get("would_halt") else "within the guard", guard={
                "new_share": guard.get("new_share"), "max_share": guard.get("max_share"), "success": not guard.get("would_halt"),
            }))
    return _merge(rows), validations, None


def _kind(dag_id: str, rep: Mapping) -> Kind:
    if "preview_id" in rep:
        return Kind.PREVIEW
    if rep.get("kind") == "replay":
        return Kind.REPLAY
    if "request_key" in rep:
        return Kind.REQUEST
    return Kind.NIGHTLY


_READERS = {Kind.NIGHTLY: _nightly, Kind.REQUEST: _request, Kind.REPLAY: _replay, Kind.PREVIEW: _preview}


def from_report(rep: Mapping, written: float = 0.0) -> RunReport:
    """One report (as written, a dict) in the view's shape."""
    if "preview_id" in rep:
        dag_id, _, run_id = str(rep["preview_id"]).partition("__")
        if not run_id:
            dag_id, run_id = "policy_preview", str(rep["preview_id"])
    else:
        dag_id, run_id = str(rep.get("dag_id") or "?"), str(rep.get("run_id") or "?")
    kind = _kind(dag_id, rep)
    rows, validations, due = _READERS[kind](rep)
    if kind is Kind.PREVIEW:
        old, new = rep.get("old") or {}, rep.get("new") or {}
        policy = f"{old.get('version')} → {new.get('version')}"
        state, dry_run = "success", True
    else:
        label = rep.get("policy_label")
        policy = None if rep.get("policy_version") is None else f"{rep['policy_version']}" + (f" ({label})" if label else "")
        state, dry_run = str(rep.get("state") or "?"), bool(rep.get("dry_run"))
    notes = []
    if kind is Kind.REQUEST:
        notes.append(f"request key {rep.get('request_key')}")
        if rep.get("outstanding"):
            notes.append(f"{rep['outstanding']} deferred: trigger the request again once they can go")
    alarm = rep.get("quarantine_alarm")
    if isinstance(alarm, Mapping) and alarm.get("message"):
        notes.append(f"quality gate failed: {alarm['message']}")
    return RunReport(
        dag_id=dag_id, run_id=run_id, kind=kind, state=state, dry_run=dry_run,
        as_of=str(rep.get("as_of") or rep.get("started") or "") or None, policy=policy, rows=rows,
        validations=validations, due=due, carried_over=rep.get("carried_over"),
        data_docs={str(k): str(v) for k, v in (rep.get("data_docs") or {}).items()}, notes=notes, written=written,
    )


# --------------------------------------------------------------------------- reading the files
def _files() -> Iterable[Path]:
    home = config.retention_home()
    for folder in (home / "reports", home / "previews"):
        if folder.is_dir():
            yield from (p for p in folder.glob("*.json") if p.name != "latest.json")


def _read(path: Path) -> RunReport | None:
    try:
        return from_report(json.loads(path.read_text()), path.stat().st_mtime)
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        log.warning("report %s unreadable: %s", path.name, type(exc).__name__)
        return None


def all_runs(dag_id: str | None = None) -> list[RunReport]:
    """Every run's report, newest first (optionally one DAG's)."""
    runs = [r for p in _files() if (r := _read(p)) is not None and (dag_id is None or r.dag_id == dag_id)]
    return sorted(runs, key=lambda r: r.written, reverse=True)


def _stem(dag_id: str, run_id: str) -> str:
    # store/reports.report_stem and runs/preview.safe_id, without importing the writers.
    return f"{dag_id}__{run_id}".replace(":", "_").replace("+", "_")


def find_run(dag_id: str, run_id: str) -> RunReport | None:
    """The report of one DAG run, or None."""
    home = config.retention_home()
    for path in (home / "reports" / f"{_stem(dag_id, run_id)}.json", home / "previews" / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', f'{dag_id}__{run_id}')}.json"):
        if path.is_file() and (r := _read(path)) is not None and r.run_id in (run_id, _stem("", run_id)[2:]):
            return r
    return next((r for r in all_runs(dag_id) if r.run_id == run_id), None)


# --------------------------------------------------------------------------- the DAG run's note
def note_for(report: RunReport | None) -> str:
    """The one line a DAG run's note says: ``DRY RUN ...`` or ``erased N, held M, ...``."""
    if report is None:
        return "no report: the run ended before its report was written"
    totals = report.totals()
    parts = [f"{column} {n}" for column, n in totals.items()]
    failed = [v for v in report.validations if v.outcome == "failed"]
    for v in failed:
        g = v.guard or {}
        if g and not g.get("success", True):
            parts.append(f"{v.system}: plan guard {g.get('planned')} planned, {g.get('allowed')} allowed")
        else:
            parts.append(f"{v.system}: validation failed")
    body = ", ".join(parts) or "nothing due"
    if report.kind is Kind.PREVIEW:
        return f"PREVIEW, nothing erased: {body}"
    if report.dry_run:
        return f"DRY RUN, nothing erased: {body}"
    if "erased" not in totals:
        body = f"erased 0, {body}" if parts else "erased 0, nothing due"
    return body
