"""Why one record is or is not planned, without erasing anything.

Reads the system's current state through its adapter (the same extract a run makes), then
reports for the record: quarantine, protections, each rule's clock, deadline and verdict,
holds, the decision and the policy version. Records can be named by their id in the source
system or by the pseudonymous key the ledger and reports show.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pandas as pd

from retention import config
from retention.domain.engine import active_holds, empty_holds, explain_record, plan_record_type
from retention.store.ledger import Ledger
from retention.domain.policy import Policy
from retention.domain.pseudonyms import Pseudonymizer
from retention.domain.quarantine import quarantine_reasons
from retention.domain.records import RECORD_TYPES, record_types_of
from retention.systems import derive_frame


def _collect(adapter, now: datetime) -> dict[str, pd.DataFrame]:
    parts: dict[str, list[pd.DataFrame]] = {}
    adapter.extract(lambda rt, frame: parts.setdefault(rt, []).append(frame), now)
    return {rt: pd.concat(frames, ignore_index=True) for rt, frames in parts.items()}


def explain(
    adapter,
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
    raw = _collect(adapter, now)
    pseudo = Pseudonymizer(config.pseudonym_key())

    plan_so_far = pd.DataFrame(columns=["record_type", "record_id", "action", "deadline"])
    frames: dict[str, pd.DataFrame] = {}
    source_holds = raw.get("legal_hold")
    source_holds = active_holds(source_holds, as_of_ts) if source_holds is not None else empty_holds()
    target = None
    for rt in record_types_of(system):
        if rt not in raw:
            continue
        frame = derive_frame(rt, raw[rt], plan_so_far, frames)
        frames[rt] = frame
        if rt == record_type:
            target = frame
            break
        reasons = quarantine_reasons(frame, rt, policy, now)
        p = plan_record_type(frame.loc[reasons.isna().to_numpy()], rt, policy, as_of_ts, source_holds)
        if len(p):
            cols = ["record_type", "record_id", "action", "deadline"]
            plan_so_far = p[cols] if plan_so_far.empty else pd.concat([plan_so_far, p[cols]], ignore_index=True)
    if target is None:
        return {"record_type": record_type, "found": False, "decision": f"{system} returned no {record_type} records"}
    if record_id is None:
        keys = pseudo.keys_for(record_type, target["record_id"].tolist())
        matches = [i for i, k in enumerate(keys) if k == record_key]
        if not matches:
            return {"record_type": record_type, "record_key": record_key, "found": False, "decision": "no current record has this key"}
        record_id = str(target["record_id"].iloc[matches[0]])
    key = pseudo.key_for(record_type, record_id)

    reasons = quarantine_reasons(target, record_type, policy, now)
    mine = (target["record_id"].astype("string") == str(record_id)).to_numpy()
    quarantined = reasons[mine].dropna().tolist()
    ledger_holds = [
        h for h in Ledger(config.ledger_url()).holds()
        if h["record_type"] == record_type and h["record_key"] == key
        and (h["expires_at"] is None or pd.Timestamp(h["expires_at"], tz="UTC") > as_of_ts)
    ]
    result = explain_record(target, record_type, str(record_id), policy, as_of_ts, source_holds)
    result["record_key"] = key
    result["quarantined"] = quarantined
    result["manual_holds"] = [h["reason"] for h in ledger_holds] + result.pop("holds", [])
    if quarantined:
        result["decision"] = f"quarantined ({quarantined[0]}): never erased until the data is fixed"
    elif ledger_holds and result["decision"].startswith("planned"):
        result["decision"] = f"planned: hold under manual hold ({ledger_holds[0]['reason']}), nothing erased"
    # The source id is what the engineer typed; the output names the record by its key only.
    result.pop("record_id", None)
    return result
