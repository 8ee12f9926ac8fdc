"""Why one record is or is not planned, without erasing anything.

Reads the system's current state through its adapter (the same extract a run makes), plans it
with the nightly run's own planning (``domain.planning.plan_system``: derivations, quarantine,
rules, every hold), then reports for the record: quarantine, protections, each rule's clock
(and whether it was the rule's fallback clock, the organisation's decision), deadline and
verdict, holds, the decision and the policy version. Records can be named by their id in the
source system or by the pseudonymous key the ledger and reports show; the output names the
record by its key only.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pandas as pd

from retention.domain.engine import explain_record, fallback_note
from retention.domain.holds import Holds
from retention.domain.planning import plan_system
from retention.domain.policy import Policy
from retention.domain.records import RECORD_TYPES, SOURCE_HOLDS
from retention.runs.context import extract_in_memory, pseudonymizer, task_ledger
from retention.systems.base import SourceSystem


def explain(
    adapter: SourceSystem,
    policy: Policy,
    record_type: str,
    *,
    record_id: str | None = None,
    record_key: str | None = None,
    as_of: datetime | None = None,
) -> dict:
    if record_type not in RECORD_TYPES:
        raise ValueError(f"unknown record type {record_type!r}; known: {', '.join(RECORD_TYPES)}")
    now = datetime.now(UTC)
    as_of_ts = pd.Timestamp(as_of or now)
    if as_of_ts.tzinfo is None:
        as_of_ts = as_of_ts.tz_localize("UTC")
    system = RECORD_TYPES[record_type].system
    frames = extract_in_memory(adapter, now)
    pseudo = pseudonymizer()
    with task_ledger() as ledger:
        ledger_holds = ledger.holds()
    sp = plan_system(system, frames, policy, as_of_ts, now=now, ledger_holds=ledger_holds, pseudonymizer=pseudo)
    if record_type not in frames:
        return {"record_type": record_type, "found": False, "decision": f"{system} returned no {record_type} records"}

    # The record as planning judged it: among the clean records, or among the quarantined.
    clean = sp.clean.get(record_type, frames[record_type].iloc[0:0])
    quarantined = sp.quarantined[sp.quarantined["record_type"] == record_type] if len(sp.quarantined) else sp.quarantined
    if record_id is None:
        candidates = pd.concat([clean["record_id"], quarantined.get("record_id", pd.Series(dtype="string"))]).astype(str).unique()
        matches = [i for i, k in zip(candidates, pseudo.keys_for(record_type, list(candidates))) if k == record_key]
        if not matches:
            return {"record_type": record_type, "record_key": record_key, "found": False, "decision": "no current record has this key"}
        record_id = matches[0]
    record_id = str(record_id)
    key = pseudo.key_for(record_type, record_id)
    reasons = quarantined.loc[quarantined["record_id"].astype(str) == record_id, "reason"].tolist() if len(quarantined) else []

    if reasons:  # judge the record as extracted, to show its clocks; it is never erased
        judged = frames[record_type]
        judged = judged[judged["record_id"].astype(str) == record_id]
        judged = judged.assign(**{c: pd.NaT for c in RECORD_TYPES[record_type].derived if c not in judged})
    else:
        judged = clean
    holds = Holds.at(as_of_ts, source=frames.get(SOURCE_HOLDS), ledger=ledger_holds)
    result = explain_record(judged, record_type, record_id, policy, as_of_ts)
    result["record_key"] = key
    result["quarantined"] = reasons
    # The operator's own view of one record: the hold's reference and its reason.
    refs = [r for r in (holds.by_key.get((record_type, key)), holds.by_id.get((record_type, record_id))) if r]
    result["manual_holds"] = [f"{r}: {holds.reasons.get(r, '')}".rstrip(": ") for r in refs]
    planned = sp.plan[(sp.plan["record_type"] == record_type) & (sp.plan["record_id"].astype(str) == record_id)]
    if reasons:
        result["decision"] = f"quarantined ({reasons[0]}): never erased until the data is fixed"
    elif len(planned):
        p = planned.iloc[0]
        by_fallback = policy.rule(p["rule_id"]) if bool(p.get("fallback_clock", False)) else None
        row = judged[judged["record_id"].astype(str) == record_id]
        result["decision"] = f"planned: {p['action']} under rule {p['rule_id']}" + (
            f" (hold: {p['hold']})" if pd.notna(p["hold"]) else ""
        ) + fallback_note(row, by_fallback)
    # The source id is what the engineer typed; the output names the record by its key only.
    result.pop("record_id", None)
    result.pop("holds", None)
    return result
