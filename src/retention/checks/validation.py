"""Great Expectations checks on the extract and on the erasure plan, run inside tasks.

GX is imported lazily (it takes seconds) and never at DAG parse time. Results are reduced to
counts and aggregate values. GX's result objects would list unexpected values, which can be
record identifiers: the suites run with result formats that keep none (pass or fail for a
passing suite, counts for a failing one), so the results ``data_docs`` keeps carry none either.

GX's start-up is quiet: its loggers log warnings and errors only, and its import's deprecation
warnings are dropped, so a task log shows our own lines (the plan guard's numbers among them),
not the few hundred lines GX writes while it registers its classes.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import pandas as pd

from retention.domain.keys import fingerprints, positions_in
from retention.domain.policy import Policy
from retention.domain.quarantine import FUTURE_TOLERANCE
from retention.domain.records import RECORD_TYPES
from retention.domain.statuses import DESTRUCTIVE, Action

log = logging.getLogger(__name__)


class PlanRejected(RuntimeError):
    """Validation failed: nothing may be erased in this run."""


@dataclass
class ValidationOutcome:
    name: str
    success: bool
    checks: list[dict] = field(default_factory=list)
    # GX's suite and result, for ``data_docs`` to keep (the result holds no unexpected values).
    suite: object = field(default=None, repr=False, compare=False)
    result: object = field(default=None, repr=False, compare=False)

    def failures(self) -> list[dict]:
        return [c for c in self.checks if not c["success"]]

    def as_dict(self) -> dict:
        return {"name": self.name, "success": self.success, "checks": self.checks}


#: What a failing suite is run again with: its counts and observed aggregates, no values.
#: GX's BASIC would list up to 20 unexpected values (record ids, addresses) per expectation.
COUNTS_ONLY = {
    "result_format": "BASIC",
    "partial_unexpected_count": 0,
    "exclude_unexpected_values": True,
    "include_unexpected_rows": False,
    "return_unexpected_index_query": False,
}

_context = None


def hush_gx() -> None:
    """GX's loggers log warnings and errors only. Set before the import for the hundreds of
    INFO lines it logs as it loads (``_docs_decorators``, the registries), and again after a
    load for its modules that set their own logger's level (``data_context.types.base``)."""
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.startswith("great_expectations.") and isinstance(logger, logging.Logger):
            if logger.level and logger.level < logging.WARNING:
                logger.setLevel(logging.NOTSET)  # the parent's WARNING, then


def _gx():
    global _context
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    if _context is None:
        hush_gx()
        with warnings.catch_warnings():
            # The import's own DeprecationWarnings (GX's modules, not ours), once per task.
            warnings.simplefilter("ignore", DeprecationWarning)
            import great_expectations as gx
            from great_expectations.data_context.types import base  # noqa: F401 - sets its logger's level
            from great_expectations.execution_engine import pandas_execution_engine

            hush_gx()
            # GX fingerprints every pandas batch under 1 GB with an MD5 over all its rows, twice
            # per suite, only to label the batch: 1.5 s per million records, for nothing we use.
            pandas_execution_engine.HASH_THRESHOLD = 0
            _context = gx.get_context(mode="ephemeral")
        try:
            from great_expectations.data_context.types.base import ProgressBarsConfig

            _context.variables.progress_bars = ProgressBarsConfig(globally=False)
        except Exception:  # progress bars are cosmetic
            pass
    import great_expectations as gx

    return gx, _context


def gx_context():
    """The process's one ephemeral GX context, the suites' (``data_docs`` hands it back as
    GX's current project after opening a run's file-backed one)."""
    return _gx()[1]


def start_up() -> None:
    """Pay GX's one-time costs now: the import, the context and a first, trivial suite (GX
    sets up its expectation and metric registries on first use). Benchmarks time it apart."""
    gx, _ = _gx()
    _run_suite("start_up", pd.DataFrame({"x": [1]}), [gx.expectations.ExpectColumnValuesToNotBeNull(column="x")])


_batch_definition = None


def _whole_frame():
    # One data source, asset and batch definition serve every suite (the frame comes with each
    # batch), made once per process: adding one writes the context's whole configuration
    # (YAML), a growing cost per suite otherwise.
    global _batch_definition
    if _batch_definition is None:
        _, ctx = _gx()
        asset = ctx.data_sources.add_or_update_pandas("retention").add_dataframe_asset("frame")
        _batch_definition = asset.add_batch_definition_whole_dataframe("whole")
    return _batch_definition


def _release(batch) -> None:
    """Drop the frame GX's execution engine keeps after a suite. Its batch cache holds the last
    batch's frame until the next suite loads another: in the validate step, the partition just
    checked stayed alive while the next was read (18 MB of Arrow's at a million newsletter
    members), and a record type's last partition while the next type's first was read."""
    try:
        manager = batch.data.execution_engine.batch_manager  # not the datasource's: it compares its whole config
        manager.batch_data_cache.clear()
        manager.reset_batch_cache()
    except AttributeError:  # another GX's internals: the frame is kept until the next suite
        log.debug("GX's batch cache not found: the last frame checked is kept until the next suite")


def _run_suite(name: str, frame: pd.DataFrame, expectations: list) -> ValidationOutcome:
    gx, _ = _gx()
    batch = _whole_frame().get_batch(batch_parameters={"dataframe": frame})
    suite = gx.ExpectationSuite(name=f"{name}_suite")
    for exp in expectations:
        suite.add_expectation(exp)
    try:
        result = batch.validate(suite, result_format="BOOLEAN_ONLY")
        if not result.success:
            # Counts and observed values only for a suite that failed: working them out costs a
            # pass over every row, and a passing suite has nothing to show in them.
            result = batch.validate(suite, result_format=COUNTS_ONLY)
    finally:
        _release(batch)
    checks = []
    for r in result.results:
        cfg = r.expectation_config
        observed = r.result.get("observed_value")
        check = {
            "expectation": cfg.type,
            "column": cfg.kwargs.get("column"),
            "success": bool(r.success),
            "unexpected_count": r.result.get("unexpected_count"),
            "observed": observed.isoformat() if isinstance(observed, (pd.Timestamp, datetime)) else observed,
        }
        if r.exception_info and r.exception_info.get("raised_exception"):
            check["error"] = str(r.exception_info.get("exception_message"))[:200]
        checks.append(check)
    return ValidationOutcome(name, bool(result.success), checks, suite=suite, result=result)


# -- a suite over parts -------------------------------------------------------------------------

def _slot(check: dict) -> tuple[str, str | None]:
    """What a check is across parts: its expectation and column (the uniqueness of ids, however
    a part checked it: fingerprints or text, is one check)."""
    column = check["column"]
    return check["expectation"], "record_id" if column == "record_id_fingerprint" else column


def _total(values: list) -> int | None:
    counted = [v for v in values if v is not None]
    return sum(counted) if counted else None


def combine(name: str, parts: list[ValidationOutcome]) -> ValidationOutcome:
    """One suite's outcome over a record type checked a part at a time: each part the same
    suite over some of the rows, the rows split so that equal ids fall in one part
    (``keys.partitions``), so a part's uniqueness counts are the whole's.

    A check passes when it passes in every part that ran it; its counts are the parts' sums,
    an aggregate's observed value (a column's maximum) the largest of the parts' that report
    one. A part runs a check over a column with values only (``validate_extract``'s clocks, the
    plan's deadline) and the whole ran it when any part did. A passing part reports no counts
    (``_run_suite``): a passing check of a failing suite reports the failing parts' counts and
    observed values, theirs only, which for a count is the whole's (the passing parts had none).
    The GX result kept for Data Docs is the first part's, its expectation results those of the
    first part that failed each check (else that ran it), with the combined counts."""
    if len(parts) == 1:
        return parts[0]
    seen: dict[tuple, list[tuple[dict, object]]] = {}
    for part in parts:
        results = part.result.results if part.result is not None else [None] * len(part.checks)
        for check, result in zip(part.checks, results):
            seen.setdefault(_slot(check), []).append((check, result))
    checks, results = [], []
    for runs in seen.values():
        success = all(c["success"] for c, _ in runs)
        first = next(((c, r) for c, r in runs if not c["success"]), runs[0])
        check = dict(first[0], success=success, unexpected_count=_total([c["unexpected_count"] for c, _ in runs]))
        if any(c["column"] == "record_id" for c, _ in runs):
            check["column"] = "record_id"
        observed = [r.result.get("observed_value") for _, r in runs if r is not None and isinstance(r.result, dict)]
        observed = [o for o in observed if o is not None and not pd.isna(o)]
        comparable = observed and all(isinstance(o, (pd.Timestamp, datetime, int, float)) for o in observed)
        if comparable:
            top = max(observed)
            check["observed"] = top.isoformat() if isinstance(top, (pd.Timestamp, datetime)) else top
        checks.append(check)
        result = first[1]
        if result is not None:
            result.success = success
            if isinstance(result.result, dict) and result.result:
                totals = {
                    key: _total([r.result.get(key) for _, r in runs if r is not None and isinstance(r.result, dict)])
                    for key in ("element_count", "unexpected_count", "missing_count")
                    if key in result.result
                }
                merged = dict(result.result, **{k: v for k, v in totals.items() if v is not None})
                if comparable:
                    merged["observed_value"] = top
                elements, missing = merged.get("element_count"), merged.get("missing_count") or 0
                if elements and merged.get("unexpected_count") is not None:
                    unexpected = merged["unexpected_count"]
                    for key, share in (
                        ("unexpected_percent", unexpected / max(elements - missing, 1) * 100),
                        ("unexpected_percent_total", unexpected / elements * 100),
                        ("unexpected_percent_nonmissing", unexpected / max(elements - missing, 1) * 100),
                        ("missing_percent", missing / elements * 100),
                    ):
                        if key in merged:
                            merged[key] = share
                result.result = merged
            results.append(result)
    success = all(c["success"] for c in checks)
    widest = max(parts, key=lambda p: len(p.checks))
    result = parts[0].result
    if result is not None and len(results) == len(checks):
        result.results = results
        result.success = success
        passed = sum(1 for c in checks if c["success"])
        result.statistics = {
            "evaluated_expectations": len(checks), "successful_expectations": passed,
            "unsuccessful_expectations": len(checks) - passed,
            "success_percent": passed / len(checks) * 100 if checks else None,
        }
    return ValidationOutcome(name, success, checks, suite=widest.suite, result=result)


def validate_extract(frame: pd.DataFrame, record_type: str, now: datetime, prints: np.ndarray | None = None) -> ValidationOutcome:
    """The clean extract: unique keys, required values present, no past event in the future.
    ``prints``: the fingerprints of its ids, when already taken."""
    gx, _ = _gx()
    E = gx.expectations
    rt = RECORD_TYPES[record_type]
    exps = [E.ExpectColumnValuesToNotBeNull(column="record_id")]
    fp = fingerprints(frame["record_id"]) if prints is None else prints
    if fp is None:
        exps.append(E.ExpectColumnValuesToBeUnique(column="record_id"))
    else:
        # Equal keys have equal fingerprints, so unique fingerprints prove unique keys (and a
        # mere collision fails the check: the safe side). Five times cheaper than the strings.
        frame = frame.assign(record_id_fingerprint=fp)
        exps.append(E.ExpectColumnValuesToBeUnique(column="record_id_fingerprint"))
    exps += [E.ExpectColumnValuesToNotBeNull(column=c) for c in rt.required]
    limit = pd.Timestamp(now) + FUTURE_TOLERANCE
    for col in rt.past_only:
        if col in frame and frame[col].notna().any():
            exps.append(E.ExpectColumnMaxToBeBetween(column=col, max_value=limit))
    for col in rt.must_be_true:
        if col in frame:
            exps.append(E.ExpectColumnValuesToBeInSet(column=col, value_set=[True]))
    return _run_suite(f"extract_{record_type}", frame, exps)


# What :func:`validate_plan` and the validate step's hold check read of a plan row.
_PLAN_CHECK_COLUMNS = ("record_id", "record_key", "action", "rule_id", "deadline")


def plan_check_frame(
    plan: pd.DataFrame, clean: pd.DataFrame, record_type: str, live_hold_ids: set[str], clean_prints: np.ndarray | None = None,
) -> pd.DataFrame:
    """The plan rows of one record type, with the columns that protect records joined back in.
    ``clean_prints``: the fingerprints of the clean extract's ids, when already taken."""
    rt = RECORD_TYPES[record_type]
    # Only the plan columns the suite and the hold check read: the record type's rows are
    # copied here and again by the join below.
    wanted = [c for c in plan.columns if c in _PLAN_CHECK_COLUMNS]
    mine = plan.loc[(plan["record_type"] == record_type).to_numpy(dtype=bool), wanted]
    cols = [c for c in (*rt.protected, *rt.unprotected_when) if c in clean]
    if cols:
        # Each plan row's record in the clean extract, found by its id (``keys.positions_in``),
        # and its protecting values taken by position: a join of the frames (a left merge on the ids)
        # cost 128 MB more at its peak for the CRM's 504,000 planned event participations. A plan
        # row whose record is not in the extract gets no values (null), as the join gave it. An id
        # twice in the extract is found once here (the join gave the row twice); the extract's
        # own suite fails on it, and with it the validation.
        at = positions_in(mine["record_id"], clean["record_id"], clean_prints)
        found = pd.Series(at >= 0, index=mine.index)
        positions = np.maximum(at, 0)
        taken = {}
        for c in cols:
            if len(clean):
                column = clean[c].iloc[positions].set_axis(mine.index)
                taken[c] = column if found.all() else column.where(found)
            else:
                taken[c] = pd.Series(None, index=mine.index, dtype=object)
        mine = mine.assign(**taken)
    # A record the schema's exception uncovers (an active member who opted out) is not
    # protected: its protecting values are blanked, which the not-in-set checks pass over.
    lifted = np.zeros(len(mine), dtype=bool)
    for column, values in rt.unprotected_when.items():
        if column in mine:
            lifted |= mine[column].isin(list(values)).fillna(False).to_numpy(dtype=bool)
    if lifted.any():
        mine = mine.copy()
        for column in rt.protected:
            if column in mine:
                mine[column] = mine[column].astype(object).where(~lifted, None)
    destructive = mine["action"].isin(DESTRUCTIVE).to_numpy()
    held = mine["record_id"].isin(live_hold_ids).to_numpy()
    return mine.assign(erases_held_record=destructive & held).reset_index(drop=True)


def validate_plan(check: pd.DataFrame, record_type: str, policy: Policy, as_of: datetime) -> ValidationOutcome:
    """The plan: unique keys, known rules and actions, nothing protected, nothing held, nothing early."""
    gx, _ = _gx()
    E = gx.expectations
    rt = RECORD_TYPES[record_type]
    exps = [
        E.ExpectColumnValuesToNotBeNull(column="record_id"),
        E.ExpectColumnValuesToBeUnique(column="record_id"),
        E.ExpectColumnValuesToBeInSet(column="action", value_set=[str(a) for a in (*DESTRUCTIVE, Action.HOLD)]),
        E.ExpectColumnValuesToBeInSet(column="rule_id", value_set=[r.id for r in policy.rules_for(record_type)]),
        E.ExpectColumnValuesToBeInSet(column="erases_held_record", value_set=[False]),
    ]
    # Nothing early: every row has its deadline, and the latest is not after the as-of time. The
    # maximum is taken over a column with values only (GX fails it over none): over one
    # partition of a record type's rows as over the whole (``runs.validating``).
    exps.append(E.ExpectColumnValuesToNotBeNull(column="deadline"))
    if check["deadline"].notna().any():
        exps.append(E.ExpectColumnMaxToBeBetween(column="deadline", max_value=pd.Timestamp(as_of)))
    for column, values in rt.protected.items():
        if column in check:
            exps.append(E.ExpectColumnValuesToNotBeInSet(column=column, value_set=list(values)))
    return _run_suite(f"plan_{record_type}", check, exps)


def run_guard(planned: int, extracted: int, max_share: float) -> ValidationOutcome:
    """The guard as a GX suite: the number of destructive plan rows against the allowed share."""
    gx, _ = _gx()
    allowed = math.floor(max_share * extracted)
    frame = pd.DataFrame({"planned": [planned]})
    outcome = _run_suite(
        "plan_size_guard", frame, [gx.expectations.ExpectColumnMaxToBeBetween(column="planned", max_value=allowed)]
    )
    outcome.checks[0].update({"planned": planned, "extracted": extracted, "max_share": max_share, "allowed": allowed})
    return outcome
