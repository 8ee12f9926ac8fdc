"""Replay erasures after a restore: erase again what the ledger says was erased.

A system restored from a backup brings back records that were erased after the backup was
taken. The ledger remembers every erasure by pseudonymous key, so the replay can find them:

1. **find** (per system): extract the system's current records (the nightly extract step,
   staged as Parquet; it takes the system's lock in the ledger, so a replay never runs
   alongside a nightly run on the same system, until verify releases it), pseudonymise their ids, and join them with the ledger's erased entries
   (``erased`` / ``already_gone``, one query per system, the latest erasure of each key).
   A record found there is replayed only when it is a *restored copy*: its own clocks
   (``OWN_CLOCKS``: when it was created or last changed in its system) are all no later than
   the ``completed_at`` of that erasure. A record changed since (a person who subscribed again
   has the same subscriber hash, but a newer ``last_changed``) came back as a *new* record and
   is left alone, and so is a record without any own clock (``undated``: it cannot be told
   apart from a new one). A restored copy under a live manual hold (the ledger's hold list or
   the system's own, e.g. the CRM's ``legal_hold`` table) is ``held``.
2. **erase**: the original decision again (``erase``, or ``minimise`` for a CRM contact that
   was minimised around an invoice hold) through the system's adapter, with the nightly run's
   write-ahead discipline: a ``planned`` ledger entry per record under this replay's run id
   (rule ``replay:<original rule>``, the original policy version) before the system is
   touched, completed after. A retried task resumes from the ledger; a record already gone is
   success. Dry run: find and count, write no ledger entry, erase nothing.
3. **verify**: every record this replay erased is gone.
4. **report**: counts per system and record type (found, replayed, left alone as new,
   undated, held, other outcomes); no ids, keys or personal data.

``python -m retention.runs.replay [--systems newsletter crm ticketing] [--dry-run]`` runs the
same steps in one process; the DAG ``replay_erasures`` runs them as tasks.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import sqlalchemy as sa

from retention import config
from retention.domain.engine import active_holds
from retention.store.ledger import DONE, Ledger, erasure_ledger
from retention.runs.nightly import RunInfo, _live_ledger_holds, count_still_present
from retention.runs.nightly import extract as extract_step
from retention.runs.nightly import open_run as open_pipeline_run
from retention.progress import Progress
from retention.domain.pseudonyms import Pseudonymizer
from retention.systems.base import SourceSystem, batch_size

log = logging.getLogger("retention")

DAG_ID = "replay_erasures"
RUN_PREFIX = "replay__"
RULE_PREFIX = "replay:"
SYSTEMS = ("newsletter", "crm", "ticketing")
ERASED = ("erased", "already_gone")

# The clocks a record carries of its own: when it was created or last changed in its system.
# A restored copy has none later than the erasure it survived; a record created or changed
# since then is a new record that happens to have the same key.
OWN_CLOCKS: dict[str, tuple[str, ...]] = {
    "newsletter_member": ("last_changed", "timestamp_signup"),
    "crm_contact": ("created_at", "last_interaction_at"),
    "crm_event_participation": ("event_date",),
    "crm_course_registration": ("course_end",),
    "crm_survey_response": ("survey_closed_at",),
    "crm_invoice": ("financial_year_end",),
    "support_ticket": ("created_at", "updated_at", "solved_at"),
    "ticket_user": ("created_at", "updated_at"),
}

# What find decides for a record it found.
REPLAY, HELD, NEW, UNDATED = "replay", "held", "new", "undated"

PLAN_COLUMNS = ("record_type", "record_id", "record_key", "rule_id", "action", "hold", "policy_version", "decision")

AdapterFactory = Callable[[str], SourceSystem]


def _ledger() -> Ledger:
    return Ledger(config.ledger_url())


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
    ).where(t.c.system == system, t.c.status.in_(ERASED))
    if exclude_run:
        q = q.where(t.c.run_id != exclude_run)
    with ledger.engine.connect() as conn:
        rows = conn.execute(q).all()
    frame = pd.DataFrame(rows, columns=["record_type", "record_key", "rule_id", "action", "policy_version", "completed_at"])
    frame["completed_at"] = pd.to_datetime(frame["completed_at"], utc=True)  # SQLite hands back naive UTC
    frame = frame.sort_values("completed_at", kind="stable").drop_duplicates(["record_type", "record_key"], keep="last")
    # A replayed entry names its original rule: replay it under that rule again.
    frame["rule_id"] = frame["rule_id"].astype(str).str.removeprefix(RULE_PREFIX)
    return frame.reset_index(drop=True)


def own_time(frame: pd.DataFrame, record_type: str) -> pd.Series:
    """The latest of a record's own clocks (NaT when it has none)."""
    cols = [pd.to_datetime(frame[c], utc=True, errors="coerce") for c in OWN_CLOCKS.get(record_type, ()) if c in frame]
    if not cols:
        return pd.Series(pd.NaT, index=frame.index, dtype="datetime64[ns, UTC]")
    return pd.concat(cols, axis=1).max(axis=1)


def match_record_type(
    frame: pd.DataFrame,
    record_type: str,
    erased: pd.DataFrame,
    pseudo: Pseudonymizer,
    held_keys: dict[str, str],
    held_ids: dict[str, str],
) -> pd.DataFrame:
    """The records of ``frame`` the ledger marks erased, each with its decision (PLAN_COLUMNS)."""
    gone = erased[erased["record_type"] == record_type]
    if frame is None or frame.empty or gone.empty:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in PLAN_COLUMNS})
    frame = frame[frame["record_id"].notna()].drop_duplicates("record_id", keep="last")  # Zendesk exports repeat
    ids = frame["record_id"].astype(str)
    keys = pd.Series(pseudo.keys_for(record_type, ids.tolist()), index=frame.index)
    entry = gone.set_index("record_key")
    hit = keys.isin(entry.index).to_numpy()
    found = frame.loc[hit]
    found_keys = keys[hit]
    if found.empty:
        return pd.DataFrame({c: pd.Series(dtype="object") for c in PLAN_COLUMNS})
    e = entry.loc[found_keys.to_numpy()]
    when = own_time(found, record_type).reset_index(drop=True)
    completed = e["completed_at"].reset_index(drop=True)
    undated = when.isna().to_numpy()
    restored = ~undated & (when <= completed).to_numpy()
    key_list, id_list = found_keys.tolist(), ids[hit].tolist()
    hold = [held_keys.get(k) or held_ids.get(i) for k, i in zip(key_list, id_list)]
    is_held = restored & pd.notna(pd.Series(hold, dtype="object")).to_numpy()
    decision = pd.Series(NEW, index=range(len(found)), dtype="object")
    decision[undated] = UNDATED
    decision[restored] = REPLAY
    decision[is_held] = HELD
    action = e["action"].astype(str).to_numpy().copy()
    action[is_held] = "hold"
    return pd.DataFrame(
        {
            "record_type": record_type,
            "record_id": id_list,
            "record_key": key_list,
            "rule_id": [RULE_PREFIX + r for r in e["rule_id"].astype(str)],
            "action": action,
            "hold": [h if held else None for h, held in zip(hold, is_held)],
            "policy_version": e["policy_version"].astype(str).to_numpy(),
            "decision": decision.to_numpy(),
        }
    )


def find(run: RunInfo, system: str, adapter: SourceSystem) -> dict:
    """Extract the system and find the records the ledger marks erased; stage what to replay."""
    staging = run.staging
    extracted = extract_step(run, system, adapter)
    now = pd.Timestamp(datetime.now(UTC))
    ledger = _ledger()
    erased = erased_entries(ledger, system, exclude_run=run.run_id)
    # Live manual holds: the ledger's list (by key) and the system's own (by id).
    ledger_holds = _live_ledger_holds(ledger, now)
    source_holds = active_holds(staging.read_extract(system, "legal_hold"), now)
    pseudo = Pseudonymizer(config.pseudonym_key())
    parts, per_type = [], {}
    for record_type in adapter.record_types:
        lh = ledger_holds[ledger_holds["record_type"] == record_type]
        sh = source_holds[source_holds["record_type"].astype(str) == record_type]
        held_keys = dict(zip(lh["record_key"].astype(str), lh["reason"].astype(str)))
        held_ids = dict(zip(sh["record_id"].astype(str), sh["reason"].astype(str)))
        frame = staging.read_extract(system, record_type)
        matched = match_record_type(frame, record_type, erased, pseudo, held_keys, held_ids)
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
    plan = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame({c: pd.Series(dtype="object") for c in PLAN_COLUMNS})
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


# -- erase ----------------------------------------------------------------------------------
def _entries(frame: pd.DataFrame) -> dict[str, list[dict]]:
    """Ledger rows grouped by the policy version that decided the original erasure."""
    out: dict[str, list[dict]] = {}
    for t, k, r, a, h, v in zip(
        frame["record_type"], frame["record_key"], frame["rule_id"], frame["action"], frame["hold"], frame["policy_version"]
    ):
        hold = h[:200] if isinstance(h, str) else None  # the ledger's column width
        out.setdefault(v, []).append({"record_type": t, "record_key": k, "rule_id": r[:60], "action": a, "hold": hold})
    return out


def _rows(frame: pd.DataFrame, mask: list[bool]) -> pd.DataFrame:
    """The rows where ``mask`` holds (an empty list selects no rows, not no columns)."""
    return frame.loc[np.asarray(mask, dtype=bool)]


def _write_ahead(ledger: Ledger, run: RunInfo, system: str, frame: pd.DataFrame, status: str = "planned") -> None:
    for version, rows in _entries(frame).items():
        ledger.write_ahead(run.run_id, version, system, rows, status=status)


def erase(run: RunInfo, system: str, adapter: SourceSystem) -> dict:
    """Write-ahead, erase (or minimise) the restored copies again, complete. Resumable."""
    staging = run.staging
    if staging.read_json(system, "replay_find") is None:
        raise RuntimeError(f"{system}: no find step in replay {run.run_id}; refusing to erase")
    plan = staging.read_frame(system, "replay_plan")
    todo_all = plan[plan["decision"] == REPLAY]
    if run.dry_run:
        would = todo_all.groupby(["record_type", "action"]).size().to_dict() if len(todo_all) else {}
        summary = {"dry_run": True, "would": {f"{t}/{a}": int(n) for (t, a), n in would.items()}}
        staging.write_json(system, "replay_erase", summary)
        log.info("%s: dry run, nothing erased; would replay %s", system, summary["would"] or "nothing")
        return summary
    ledger = _ledger()
    done = ledger.statuses(run.run_id, system)
    progress = Progress(log, f"{system}: replaying erasures", total=len(todo_all))
    outcomes: dict[str, dict[str, int]] = {}
    for record_type in adapter.record_types:
        rows = plan[plan["record_type"] == record_type]
        if rows.empty:
            continue
        counts = outcomes.setdefault(record_type, {})
        held = rows[rows["decision"] == HELD]
        _write_ahead(ledger, run, system, _rows(held, [(record_type, k) not in done for k in held["record_key"]]), status="held")
        if len(held):
            counts["held"] = len(held)
        for action in ("minimise", "erase"):
            todo = rows[(rows["decision"] == REPLAY) & (rows["action"] == action)]
            status = [done.get((record_type, k)) for k in todo["record_key"]]
            finished = [s in DONE for s in status]
            for s in status:
                if s in DONE:
                    counts[s] = counts.get(s, 0) + 1
            progress.add(sum(finished))
            todo = _rows(todo, [not f for f in finished])
            _write_ahead(ledger, run, system, _rows(todo, [done.get((record_type, k)) is None for k in todo["record_key"]]))
            size = batch_size(adapter, record_type)
            for start in range(0, len(todo), size):
                batch = todo.iloc[start : start + size]
                ids = batch["record_id"].tolist()
                result = adapter.erase(record_type, action, ids)
                by_key = {k: result.get(i, "failed") for i, k in zip(ids, batch["record_key"])}
                ledger.complete(run.run_id, system, record_type, by_key)
                for s in by_key.values():
                    counts[s] = counts.get(s, 0) + 1
                progress.add(len(ids))
    seconds = progress.finish()
    summary = {"dry_run": False, "outcomes": outcomes, "seconds": round(seconds, 2)}
    staging.write_json(system, "replay_erase", summary)
    failed = sum(c.get("failed", 0) for c in outcomes.values())
    log.info("%s: replay outcomes %s", system, outcomes or "nothing to replay")
    if failed:
        raise RuntimeError(f"{system}: {failed} replayed erasures failed (see the ledger); retry the task to resume")
    return summary


def verify(run: RunInfo, system: str, adapter: SourceSystem) -> dict:
    """Every record this replay erased is gone from the system."""
    staging = run.staging
    if run.dry_run:
        summary = {"dry_run": True, "checked": 0, "still_present": 0}
        staging.write_json(system, "replay_verify", summary)
        _ledger().release_system(system, run.run_id)
        return summary
    plan = staging.read_frame(system, "replay_plan")
    replayed = plan[(plan["decision"] == REPLAY).to_numpy()]
    checked, still = count_still_present(system, adapter, replayed, _ledger().statuses(run.run_id, system), "replayed")
    summary = {"dry_run": False, "checked": checked, "still_present": still}
    staging.write_json(system, "replay_verify", summary)
    _ledger().release_system(system, run.run_id)
    if still:
        raise RuntimeError(f"{system}: verification failed: {still} replayed records are still present")
    log.info("%s: verified %d replayed erasures, none present", system, checked)
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
    ledger = _ledger()
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
    out = config.reports_dir()
    stem = f"{run.dag_id}__{run.run_id}".replace(":", "_").replace("+", "_")
    path = out / f"{stem}.json"
    path.write_text(json.dumps(rep, indent=2, default=str))
    text = render_report(rep)
    (out / f"{stem}.txt").write_text(text)
    for line in text.splitlines():
        log.info("%s", line)
    ledger.close_run(run.run_id, state, rep)
    ledger.release_run(run.run_id)  # whatever failed on the way, the systems are free again
    if state == "success" and not os.environ.get("RETENTION_KEEP_STAGING"):
        staging.remove()
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
        from retention.systems import build_adapter as adapter_factory
    run = RunInfo.from_dict(open_run(run_id or new_run_id(), dry_run=dry_run))
    for system in systems:
        adapter = adapter_factory(system)
        try:
            find(run, system, adapter)
            erase(run, system, adapter)
            verify(run, system, adapter)
        except Exception:
            log.exception("%s: replay failed", system)
        finally:
            adapter.close()
    return report(run, systems)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m retention.runs.replay",
        description="Erase again what the ledger marks erased and a restored backup brought back.",
    )
    p.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS), help="systems to replay (default: all)")
    p.add_argument("--dry-run", action="store_true", help="find and count, erase nothing, write no ledger entry")
    p.add_argument("--run-id", help="resume this replay run (default: a new replay__<time>)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        result = run_replay(args.systems, dry_run=args.dry_run, run_id=args.run_id)
    except config.ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    print(render_report(json.loads(Path(result["report"]).read_text())))
    print(f"report: {result['report']}")
    return 0 if result["state"] == "success" else 1


if __name__ == "__main__":
    sys.exit(main())
