"""Which records a restored backup brought back: the replay's decision, record by record.

The ledger remembers every erasure by pseudonymous key. A current record whose key the ledger
marks erased is a *restored copy* when none of its own clocks (the schema's ``own_clocks``: when
it was created or last changed in its system) is later than that erasure: it is erased again
(``replay``), under its original decision (erase, or minimise), unless a hold in force keeps it
(``held``). A record changed since (a person who subscribed again has the same subscriber hash
but a newer ``last_changed``) came back as a *new* record and is left alone (``new``), and so is
a record without any own clock (``undated``: it cannot be told apart from a new one).

Pure: frames, the ledger's erased entries and the holds in force in, decisions out.
"""

from __future__ import annotations

import pandas as pd

from retention.domain.holds import Holds
from retention.domain.pseudonyms import Pseudonymizer
from retention.domain.records import RECORD_TYPES
from retention.domain.statuses import Action

RULE_PREFIX = "replay:"
# What the replay decides for a record it found.
REPLAY, HELD, NEW, UNDATED = "replay", "held", "new", "undated"
PLAN_COLUMNS = ("record_type", "record_id", "record_key", "rule_id", "action", "hold", "policy_version", "decision")


def empty() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="object") for c in PLAN_COLUMNS})


def latest_erasures(entries: pd.DataFrame) -> pd.DataFrame:
    """The latest erasure of every key (record_type, record_key, rule_id, action, policy_version,
    completed_at), naming its original rule (a replayed entry's rule is ``replay:<rule>``)."""
    frame = entries.assign(completed_at=pd.to_datetime(entries["completed_at"], utc=True))  # SQLite hands back naive UTC
    frame = frame.sort_values("completed_at", kind="stable").drop_duplicates(["record_type", "record_key"], keep="last")
    frame["rule_id"] = frame["rule_id"].astype(str).str.removeprefix(RULE_PREFIX)
    return frame.reset_index(drop=True)


def own_time(frame: pd.DataFrame, record_type: str) -> pd.Series:
    """The latest of a record's own clocks (NaT when it has none)."""
    cols = [pd.to_datetime(frame[c], utc=True, errors="coerce") for c in RECORD_TYPES[record_type].own_clocks if c in frame]
    if not cols:
        return pd.Series(pd.NaT, index=frame.index, dtype="datetime64[ns, UTC]")
    return pd.concat(cols, axis=1).max(axis=1)


def restored_copies(
    frame: pd.DataFrame | None, record_type: str, erased: pd.DataFrame, pseudonymizer: Pseudonymizer, holds: Holds
) -> pd.DataFrame:
    """The records of ``frame`` the ledger marks erased (``latest_erasures``), each with its
    decision (``PLAN_COLUMNS``)."""
    gone = erased[erased["record_type"] == record_type]
    if frame is None or frame.empty or gone.empty:
        return empty()
    frame = frame[frame["record_id"].notna()].drop_duplicates("record_id", keep="last")  # Zendesk exports repeat
    ids = frame["record_id"].astype(str)
    keys = pd.Series(pseudonymizer.keys_for(record_type, ids.tolist()), index=frame.index)
    entry = gone.set_index("record_key")
    hit = keys.isin(entry.index).to_numpy()
    found = frame.loc[hit]
    found_keys = keys[hit]
    if found.empty:
        return empty()
    e = entry.loc[found_keys.to_numpy()]
    when = own_time(found, record_type).reset_index(drop=True)
    completed = e["completed_at"].reset_index(drop=True)
    undated = when.isna().to_numpy()
    restored = ~undated & (when <= completed).to_numpy()
    key_list, id_list = found_keys.tolist(), ids[hit].tolist()
    hold = [holds.reason(record_type, i, k) for i, k in zip(id_list, key_list)]
    is_held = restored & pd.notna(pd.Series(hold, dtype="object")).to_numpy()
    decision = pd.Series(NEW, index=range(len(found)), dtype="object")
    decision[undated] = UNDATED
    decision[restored] = REPLAY
    decision[is_held] = HELD
    action = e["action"].astype(str).to_numpy().copy()
    action[is_held] = str(Action.HOLD)
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
