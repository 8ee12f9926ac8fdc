"""The audiences (lists) one Mailchimp Connection names, and how their members' record ids are spelt.

A person subscribed to two audiences is two members, so two records: erasing one leaves the
other, and holds and ledger pseudonyms stay apart. The record id of a member of the **first**
audience is its bare subscriber hash, that of a member of any further audience
``<list_id>:<subscriber_hash>``. The first audience is the one a single-audience Connection
names, so a deployment that adds audiences after it keeps every record id it had: every hold
(stored as the pseudonym of the bare hash) and every erased record's pseudonym (which the
replay matches) still match. Put new audiences after the first, never before it: reordering
would give the first audience's members other ids (and so other pseudonyms).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from retention.config import SettingError

SEPARATOR = ":"  # between the audience and the subscriber hash; never in a list id


def checked_list_ids(value: object, where: str) -> tuple[str, ...]:
    """Extra ``list_ids`` as a tuple of audience ids, or one line naming ``where`` and the field."""
    if not isinstance(value, list) or not value:
        raise SettingError(f"{where}: extra 'list_ids' must be a non-empty list of audience ids, e.g. [\"a1b2c3d4e5\"]")
    ids: list[str] = []
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise SettingError(f"{where}: extra 'list_ids' holds something that is not an audience id (a non-empty string)")
        item = item.strip()
        if SEPARATOR in item:
            raise SettingError(f"{where}: extra 'list_ids': an audience id never holds '{SEPARATOR}' (it separates audience and member)")
        if item in ids:
            raise SettingError(f"{where}: extra 'list_ids' names audience {item!r} twice")
        ids.append(item)
    return tuple(ids)


def hash_bytes(subscriber_hash: str) -> bytes:
    """A hash as ``Audiences.sorted_hashes`` holds it: its UTF-8 with one byte after it, since
    numpy's fixed-width bytes drop trailing NULs (``"a\\0"`` would be ``"a"``)."""
    return subscriber_hash.encode() + b"."


def hash_text(held: bytes) -> str:
    """The hash ``hash_bytes`` holds."""
    return held[:-1].decode()


class Audiences:
    """The Connection's audiences, in its order, and the record ids of their members."""

    def __init__(self, list_ids: Iterable[str]):
        self.list_ids = tuple(list_ids)
        if not self.list_ids:
            raise ValueError("no audience to enforce")
        self.first = self.list_ids[0]

    def __len__(self) -> int:
        return len(self.list_ids)

    def record_ids(self, list_id: str, hashes: list) -> list:
        """The record ids of these members of ``list_id`` (a missing hash stays missing)."""
        if list_id == self.first:
            return hashes
        prefix = f"{list_id}{SEPARATOR}"
        return [None if h is None else prefix + str(h) for h in hashes]

    def record_id_array(self, list_id: str, hashes: pa.Array) -> pa.Array:
        """``record_ids`` for an Arrow text array of hashes."""
        if list_id == self.first:
            return hashes
        return pc.binary_join_element_wise(pa.scalar(f"{list_id}{SEPARATOR}"), hashes, "")

    def record_id(self, list_id: str, subscriber_hash: str) -> str:
        return self.record_ids(list_id, [subscriber_hash])[0]

    def _member(self, record_id: str) -> tuple[str, str] | None:
        """(audience, subscriber hash) a record id names, or None for an id of no audience
        configured now. The one place the spelling is read back (``by_audience`` and
        ``sorted_hashes`` must never disagree about a member's audience): split at the last
        separator; a bare hash is a member of the first audience, which is never spelt with
        its prefix."""
        list_id, sep, subscriber_hash = str(record_id).rpartition(SEPARATOR)
        if not sep:
            return self.first, subscriber_hash
        if list_id not in self.list_ids or list_id == self.first:
            return None
        return list_id, subscriber_hash

    def by_audience(self, record_ids: Iterable[str]) -> tuple[dict[str, dict[str, str]], list[str]]:
        """({list_id: {subscriber hash: record id}} in the audiences' order, record ids of no audience
        configured now, e.g. from a plan made under another Connection)."""
        groups: dict[str, dict[str, str]] = {}
        unknown: list[str] = []
        for rid in record_ids:
            member = self._member(rid)
            if member is None:
                unknown.append(rid)
                continue
            list_id, subscriber_hash = member
            groups.setdefault(list_id, {})[subscriber_hash] = rid
        return {a: groups[a] for a in self.list_ids if a in groups}, unknown

    def sorted_hashes(self, record_ids: Sequence[str], slice_rows: int = 20_000) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{list_id: (the subscriber hashes of its members among ``record_ids``, sorted, as
        fixed-width bytes (``hash_bytes``); each one's position in ``record_ids``)} in the audiences' order; ids of
        no audience configured now are left out, as ``by_audience`` leaves them. For a large
        batch (a verify of 200,000 erasures): a few bytes an id where ``by_audience`` keeps a
        dictionary of Python texts, and the ids read a slice at a time."""
        parts: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
        for start in range(0, len(record_ids), slice_rows):
            found: dict[str, tuple[list[bytes], list[int]]] = {}
            for at, rid in enumerate(record_ids[start : start + slice_rows], start):
                member = self._member(rid)
                if member is None:
                    continue
                list_id, subscriber_hash = member
                hashes, positions = found.setdefault(list_id, ([], []))
                hashes.append(hash_bytes(subscriber_hash))
                positions.append(at)
            for list_id, (hashes, positions) in found.items():
                all_hashes, all_positions = parts.setdefault(list_id, ([], []))
                all_hashes.append(np.array(hashes, dtype=bytes))
                all_positions.append(np.array(positions, dtype=np.int64))
            del found
        out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for list_id in self.list_ids:
            if list_id in parts:
                hashes, positions = (np.concatenate(a) for a in parts.pop(list_id))
                order = np.argsort(hashes, kind="stable")
                out[list_id] = (hashes[order], positions[order])
        return out

    def named(self, list_id: str | None, subscriber_hash: str) -> str:
        """The record id an operator means by ``[<list_id>:]<subscriber hash>``: with several
        audiences the audience must be named; a ``ValueError`` (one line, listing them) otherwise."""
        choices = ", ".join(self.list_ids)
        if list_id is None:
            if len(self.list_ids) > 1:
                raise ValueError(
                    f"the Connection names several audiences ({choices}): name the member as "
                    f"<list_id>{SEPARATOR}<subscriber hash or e-mail address>"
                )
            return subscriber_hash
        if list_id not in self.list_ids:
            raise ValueError(f"audience {list_id!r} is not one the Connection names ({choices})")
        return self.record_id(list_id, subscriber_hash)


__all__ = ["SEPARATOR", "Audiences", "checked_list_ids", "hash_bytes", "hash_text"]
