"""Keyed pseudonyms: what the ledger, reports and previews use instead of record identifiers.

``HMAC-SHA256(key, "<record_type>:<record_id>")``, 32 hex characters. Without the key nobody
can tell which record a pseudonym stands for (a plain hash of a subscriber hash or ticket id
could be recomputed by anyone); with it, the pipeline can find a record again, for example
when a restored backup brings an erased record back.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

import pandas as pd


class Pseudonymizer:
    def __init__(self, key: bytes):
        if len(key) < 32:
            raise ValueError("pseudonym key must be at least 32 bytes")
        self._key = key

    def key_for(self, record_type: str, record_id: object) -> str:
        msg = f"{record_type}:{record_id}".encode()
        return hmac.new(self._key, msg, hashlib.sha256).hexdigest()[:32]

    def keys_for(self, record_type: str, record_ids: Iterable[object]) -> list[str]:
        key = self._key
        prefix = f"{record_type}:"
        return [hmac.new(key, f"{prefix}{rid}".encode(), hashlib.sha256).hexdigest()[:32] for rid in record_ids]

    def column(self, record_type: pd.Series, record_id: pd.Series) -> pd.Series:
        values = [self.key_for(t, r) for t, r in zip(record_type.tolist(), record_id.tolist())]
        return pd.Series(values, index=record_id.index, dtype="string")

    def __repr__(self) -> str:  # never show the key
        return "Pseudonymizer(<key hidden>)"
