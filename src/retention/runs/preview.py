"""Policy-change preview: what a new version of the policy would erase that the old one does
not, and what it would stop erasing. A dry run: it reads each system once, erases nothing,
writes no ledger entries and leaves no staging behind.

Both policies are applied to the same extract as of the same time, through the same planning
code as the nightly run (``retention.domain.planning.plan_system``). Per system, rule and record type
the result lists, as counts and keyed pseudonyms (never source ids):

* ``newly_erased``: planned for erasure (or minimisation) under the new policy, not under the old;
* ``no_longer_erased``: the reverse;
* ``changed_rule``: planned under both, under a different rule or action.

The result is written to ``<RETENTION_HOME>/previews/<id>.json`` (every key) and ``<id>.txt``
(a short table). A policy is a file path, or ``REV:PATH`` read with git from a repository
(default: the project's checkout; ``--repo`` or ``RETENTION_POLICY_REPO`` to change it)::

    python -m retention.runs.preview --old HEAD:include/policies/retention.yaml --new include/policies/retention.yaml
    python -m retention.runs.preview --old-rev HEAD~3 --new my-policy.yaml --systems ticketing --as-of 2026-12-01T00:00:00Z

Exit status 2 when a policy is unusable (the message names the file, rule and field) or the
configuration is incomplete; nothing is extracted then.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd

from retention import config
from retention.domain.planning import SystemPlan, plan_system
from retention.domain.policy import Policy, PolicyError, parse_policy
from retention.domain.records import SYSTEMS
from retention.domain.statuses import DESTRUCTIVE
from retention.runs.context import extract_in_memory
from retention.runs.policy_sources import (  # noqa: F401 - the preview's policy sources, re-exported
    DEFAULT_POLICY_PATH,
    PolicySource,
    load_policies,
    old_rev_spec,
    policy_changes,
    read_git_policy,
    read_policy,
)

log = logging.getLogger("retention")

CHANGES = ("newly_erased", "no_longer_erased", "changed_rule")
_LABELS = {"newly_erased": "newly erased", "no_longer_erased": "no longer erased", "changed_rule": "changed rule"}


class PreviewError(ValueError):
    """A preview request that cannot be run as given (unknown system, bad time, unreachable system)."""


# --- one system ------------------------------------------------------------------------------


def read_ledger_holds() -> list[dict]:
    """The ledger's manual holds in force, read only: no ledger file or table is created."""
    import sqlalchemy as sa

    from retention.store.ledger import read_holds

    url = config.ledger_url()
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///").split("?")[0]
        if path and not Path(path).exists():
            return []
    engine = sa.create_engine(url)
    try:
        return read_holds(engine)
    finally:
        engine.dispose()


def _groups(frame: pd.DataFrame, by: list[str], names: dict[str, str]) -> list[dict]:
    out = []
    if frame.empty:
        return out
    for values, part in frame.groupby(by, sort=True):
        values = values if isinstance(values, tuple) else (values,)
        out.append({**{names[c]: str(v) for c, v in zip(by, values)}, "count": len(part), "keys": sorted(part["record_key"].astype(str))})
    return out


def diff_plans(old: pd.DataFrame, new: pd.DataFrame) -> dict[str, list[dict]]:
    """Compare two plans of the same records (with ``record_key``), destructive actions only."""
    cols = ["record_type", "record_key", "rule_id", "action"]
    a = old.loc[old["action"].isin(DESTRUCTIVE).to_numpy(), cols]
    b = new.loc[new["action"].isin(DESTRUCTIVE).to_numpy(), cols]
    both = a.merge(b, on=["record_type", "record_key"], how="outer", suffixes=("_old", "_new"), indicator=True)
    newly = both[both["_merge"] == "right_only"].rename(columns={"rule_id_new": "rule_id", "action_new": "action"})
    gone = both[both["_merge"] == "left_only"].rename(columns={"rule_id_old": "rule_id", "action_old": "action"})
    kept = both[both["_merge"] == "both"]
    changed = kept[(kept["rule_id_old"] != kept["rule_id_new"]) | (kept["action_old"] != kept["action_new"])]
    plain = {"rule_id": "rule", "record_type": "record_type", "action": "action"}
    return {
        "newly_erased": _groups(newly, ["rule_id", "record_type", "action"], plain),
        "no_longer_erased": _groups(gone, ["rule_id", "record_type", "action"], plain),
        "changed_rule": _groups(
            changed,
            ["record_type", "rule_id_old", "action_old", "rule_id_new", "action_new"],
            {"record_type": "record_type", "rule_id_old": "old_rule", "action_old": "old_action",
             "rule_id_new": "new_rule", "action_new": "new_action"},
        ),
    }


def _side(sp: SystemPlan) -> dict:
    return {
        "planned": sp.planned_counts(),
        "destructive": len(sp.destructive),
        "quarantined": {rt: sum(c.values()) for rt, c in sp.quarantine_counts.items()},
    }


def preview_frames(
    system: str,
    frames: dict[str, pd.DataFrame],
    old: Policy,
    new: Policy,
    as_of: datetime,
    *,
    now: datetime,
    pseudonymizer,
    ledger_holds: list | None = None,
) -> dict:
    """Plan one system's extract under both policies and compare. Pure."""
    plans = {
        name: plan_system(system, frames, policy, as_of, now=now, ledger_holds=ledger_holds, pseudonymizer=pseudonymizer)
        for name, policy in (("old", old), ("new", new))
    }
    extracted = {rt: len(f) for rt, f in frames.items()}
    total = sum(extracted.values())
    share = plans["new"].destructive.shape[0] / total if total else 0.0
    result = {
        "system": system,
        "extracted": extracted,
        "old": _side(plans["old"]),
        "new": _side(plans["new"]),
        **diff_plans(plans["old"].plan, plans["new"].plan),
        "guard": {
            "new_share": round(share, 4), "max_share": new.plan_guard.max_share,
            "would_halt": bool(share > new.plan_guard.max_share),
        },
    }
    result["totals"] = {c: sum(g["count"] for g in result[c]) for c in CHANGES}
    return result


def preview_system(system: str, adapter, old: Policy, new: Policy, as_of: datetime, *, pseudonymizer, ledger_holds=None) -> dict:
    """Extract ``system`` once through ``adapter`` (read only) and compare the two policies' plans."""
    started = time.monotonic()
    now = datetime.now(UTC)
    frames = extract_in_memory(adapter, now)
    result = preview_frames(system, frames, old, new, as_of, now=now, pseudonymizer=pseudonymizer, ledger_holds=ledger_holds)
    result["seconds"] = round(time.monotonic() - started, 2)
    log.info(
        "%s: preview: %s", system, ", ".join(f"{_LABELS[c]} {n}" for c, n in result["totals"].items()),
    )
    return result


def run_system(system: str, old: Policy, new: Policy, as_of: datetime, adapter_factory: Callable | None = None) -> dict:
    """Build the system's adapter from its Connection, preview it, close the adapter."""
    from retention.domain.pseudonyms import Pseudonymizer

    if adapter_factory is None:
        from retention.systems import adapter_for as adapter_factory
    pseudonymizer = Pseudonymizer(config.pseudonym_key())
    holds = read_ledger_holds()
    try:
        adapter = adapter_factory(system)
    except Exception as exc:  # no Connection, bad credentials format: say which system
        raise PreviewError(f"{system}: cannot open the system through its Connection: {type(exc).__name__}: {exc}") from exc
    try:
        return preview_system(system, adapter, old, new, as_of, pseudonymizer=pseudonymizer, ledger_holds=holds)
    finally:
        adapter.close()


# --- the whole preview ---------------------------------------------------------------------


def previews_dir() -> Path:
    path = config.retention_home() / "previews"
    path.mkdir(parents=True, exist_ok=True)
    return path


def new_preview_id() -> str:
    return f"preview_{datetime.now(UTC):%Y%m%dT%H%M%SZ}_{secrets.token_hex(3)}"


def safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def parse_as_of(value: str | datetime | None) -> pd.Timestamp:
    """ISO 8601 (UTC when no offset is given); default now."""
    try:
        ts = pd.Timestamp(value) if value else pd.Timestamp(datetime.now(UTC))
    except ValueError as exc:
        raise PreviewError(f"as_of {value!r} is not an ISO 8601 time: {exc}") from None
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def check_systems(systems: Iterable[str]) -> list[str]:
    systems = list(dict.fromkeys(systems))
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        raise PreviewError(f"systems must be some of {', '.join(SYSTEMS)}, got {systems}")
    return systems


def assemble(preview_id: str, old: dict, new: dict, changes: list[str], as_of: pd.Timestamp, systems: dict[str, dict]) -> dict:
    """The preview document: both policies (``PolicySource.describe()``), their differences in
    words, and per system the comparison of the two plans."""
    totals = {c: sum(s["totals"][c] for s in systems.values()) for c in CHANGES}
    return {
        "preview_id": preview_id, "created_at": datetime.now(UTC).isoformat(), "as_of": as_of.isoformat(), "erased": 0,
        "old": old, "new": new, "policy_changes": changes, "systems": systems, "totals": totals,
    }


def write_result(result: dict, show_keys: int = 0) -> dict:
    """Write ``<id>.json`` and ``<id>.txt`` under the previews directory; return their paths."""
    out = previews_dir()
    stem = safe_id(result["preview_id"])
    paths = {"json": out / f"{stem}.json", "text": out / f"{stem}.txt"}
    for path, text in ((paths["json"], json.dumps(result, indent=2, default=str)), (paths["text"], render(result, show_keys))):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return {k: str(v) for k, v in paths.items()}


def summary_of(result: dict, paths: dict) -> dict:
    """Counts and paths only: safe for XCom and logs."""
    return {
        "preview_id": result["preview_id"],
        "as_of": result["as_of"],
        "old_version": result["old"]["version"],
        "new_version": result["new"]["version"],
        "totals": result["totals"],
        "per_system": {name: s["totals"] for name, s in result["systems"].items()},
        "would_halt": sorted(name for name, s in result["systems"].items() if s["guard"]["would_halt"]),
        **paths,
    }


def render(result: dict, show_keys: int = 0) -> str:
    def who(side: dict) -> str:
        commit = f", commit {side['commit'][:12]}" if side.get("commit") else ""
        return f"{side['source']} (version {side['version']}, {side['label']}{commit})"

    lines = [
        f"Policy-change preview {result['preview_id']}: nothing was erased",
        f"  old: {who(result['old'])}",
        f"  new: {who(result['new'])}",
        f"  as of {result['as_of']}",
    ]
    for change in result["policy_changes"] or ["no rule differs"]:
        lines.append(f"  {change}")
    header = f"  {'system':<11}{'change':<18}{'rule':<26}{'record type':<25}{'action':<10}{'count':>7}"
    lines += ["", header, "  " + "-" * (len(header) - 2)]
    for name, s in result["systems"].items():
        rows = 0
        for change in CHANGES:
            for g in s[change]:
                rule = g["rule"] if "rule" in g else f"{g['old_rule']} -> {g['new_rule']}"
                action = g["action"] if "action" in g else f"{g['old_action']}->{g['new_action']}"
                lines.append(f"  {name:<11}{_LABELS[change]:<18}{rule:<26}{g['record_type']:<25}{action:<10}{g['count']:>7}")
                for key in g["keys"][:show_keys]:
                    lines.append(f"  {'':<29}{key}")
                if 0 < show_keys < g["count"]:
                    lines.append(f"  {'':<29}... {g['count'] - show_keys} more in the JSON file")
                rows += 1
        if not rows:
            lines.append(f"  {name:<11}no difference")
        guard = s["guard"]
        if guard["would_halt"]:
            lines.append(
                f"  {name:<11}note: the new policy plans {100 * guard['new_share']:.1f}% of the extract, above the plan "
                f"guard ({100 * guard['max_share']:.0f}%): its first run halts unless max_plan_share is raised"
            )
    t = result["totals"]
    lines += ["", "  total: " + ", ".join(f"{_LABELS[c]} {t[c]}" for c in CHANGES)]
    return "\n".join(lines)


def run_preview(
    old_spec: str,
    new_spec: str | None = None,
    *,
    systems: Iterable[str] = SYSTEMS,
    as_of: str | datetime | None = None,
    repo: str | Path | None = None,
    show_keys: int = 0,
    adapter_factory: Callable | None = None,
    preview_id: str | None = None,
) -> dict:
    """The whole preview in this process: load both policies (failing before any system is
    read), preview each system, write the result; return the summary (counts and paths)."""
    systems = check_systems(systems)
    as_of_ts = parse_as_of(as_of)
    old, new = load_policies(old_spec, new_spec or str(config.policy_file()), repo)
    config.pseudonym_key()  # fail now, not after extracting
    per_system = {s: run_system(s, old.policy, new.policy, as_of_ts.to_pydatetime(), adapter_factory) for s in systems}
    changes = policy_changes(old.policy, new.policy)
    result = assemble(preview_id or new_preview_id(), old.describe(), new.describe(), changes, as_of_ts, per_system)
    return summary_of(result, write_result(result, show_keys))


# --- the same in steps, for the DAG (one task per system; files between tasks, not XCom) ------


def _work_dir(preview_id: str) -> Path:
    return previews_dir() / safe_id(preview_id)


def prepare(preview_id: str, old_spec: str, new_spec: str | None, as_of: str | datetime | None, repo=None) -> dict:
    """Load and check both policies and fix the as-of time before any system is read. The
    policies' exact bytes are kept in the preview's working directory so that every system is
    planned with the same two versions, whatever happens to the files or the repository meanwhile."""
    as_of_ts = parse_as_of(as_of)
    old, new = load_policies(old_spec, new_spec or str(config.policy_file()), repo)
    config.pseudonym_key()
    work = _work_dir(preview_id)
    work.mkdir(parents=True, exist_ok=True)
    (work / "old.yaml").write_bytes(old.text)
    (work / "new.yaml").write_bytes(new.text)
    meta = {
        "preview_id": preview_id, "as_of": as_of_ts.isoformat(), "old": old.describe(), "new": new.describe(),
        "policy_changes": policy_changes(old.policy, new.policy),
    }
    (work / "meta.json").write_text(json.dumps(meta, indent=2))
    return {
        "preview_id": preview_id, "as_of": meta["as_of"], "old_version": old.policy.version,
        "new_version": new.policy.version, "policy_changes": len(meta["policy_changes"]),
    }


def _prepared(preview_id: str) -> tuple[dict, Policy, Policy]:
    work = _work_dir(preview_id)
    try:
        meta = json.loads((work / "meta.json").read_text())
    except FileNotFoundError:
        raise PreviewError(f"preview {preview_id} was not prepared (no {work / 'meta.json'})") from None
    policies = []
    for side in ("old", "new"):
        policy = parse_policy((work / f"{side}.yaml").read_bytes(), source=meta[side]["source"])
        if policy.version != meta[side]["version"]:
            raise PolicyError(f"{work / side}.yaml: changed since the preview was prepared")
        policies.append(policy)
    return meta, policies[0], policies[1]


def preview_one(preview_id: str, system: str, adapter_factory: Callable | None = None) -> dict:
    """Preview one system of a prepared preview; the comparison goes to a file, counts are returned."""
    meta, old, new = _prepared(preview_id)
    result = run_system(system, old, new, pd.Timestamp(meta["as_of"]).to_pydatetime(), adapter_factory)
    path = _work_dir(preview_id) / f"{system}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, default=str))
    tmp.replace(path)
    return {"system": system, **result["totals"], "would_halt": result["guard"]["would_halt"]}


def finish(preview_id: str, systems: Iterable[str], show_keys: int = 0) -> dict:
    """Put the systems' comparisons together, write the result, remove the working directory."""
    work = _work_dir(preview_id)
    try:
        meta, _, _ = _prepared(preview_id)
        per_system, missing = {}, []
        for system in systems:
            path = work / f"{system}.json"
            if path.exists():
                per_system[system] = json.loads(path.read_text())
            else:
                missing.append(system)
        if missing:
            raise PreviewError(f"preview {preview_id}: no result for {', '.join(missing)} (did its task fail?)")
        as_of = pd.Timestamp(meta["as_of"])
        result = assemble(preview_id, meta["old"], meta["new"], meta["policy_changes"], as_of, per_system)
        return summary_of(result, write_result(result, show_keys))
    finally:
        # The working files (policy copies, per-system parts) go whatever happened: a failed
        # preview is started afresh, not resumed.
        shutil.rmtree(work, ignore_errors=True)
