"""The Mailchimp stand-in's audience: one list's members as numpy columns (``MemberColumns``),
thread-safe lookups, paging and rendering (straight to JSON on the fast path), archiving and
permanent deletion, and persistence to a state file (``.npz``)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import numpy as np
from sortedcontainers import SortedList

from retention_dev.standins.mailchimp_data import NO_TIME, STATUS_CODE, STATUSES, MemberColumns, iso_column

MEMBER_FIELDS = (
    "id",
    "email_address",
    "unique_email_id",
    "contact_id",
    "full_name",
    "merge_fields",
    "status",
    "timestamp_signup",
    "timestamp_opt",
    "last_changed",
    "list_id",
)
ARCHIVED = STATUS_CODE["archived"]
_NOT_ARCHIVABLE = frozenset(STATUS_CODE[s] for s in ("cleaned", "pending", "archived"))
_STATUS_BYTES = [name.encode() for name in STATUSES]
_BYTE_COLUMNS = {
    "id": "ids",
    "email_address": "emails",
    "unique_email_id": "unique_email_ids",
    "contact_id": "contact_ids",
}
_TEXT_COLUMNS = ("ids", "emails", "unique_email_ids", "contact_ids", "first_names", "last_names")


def check_json_safe(cols: MemberColumns) -> None:
    """Refuse text that would need JSON escaping (quotes, backslashes, control characters)."""
    for name in _TEXT_COLUMNS:
        raw = getattr(cols, name).view(np.uint8)
        if ((raw == 34) | (raw == 92) | ((raw < 32) & (raw != 0))).any():
            raise ValueError(f"column {name} holds characters that need JSON escaping")


def list_state_file(state_file: Path | None, list_id: str, first: str) -> Path | None:
    """The state file of one list: ``--state-file`` for the first, one beside it for each other."""
    if state_file is None or list_id == first:
        return state_file
    return state_file.with_name(f"{state_file.stem}.{list_id}{state_file.suffix}")


class Audience:
    """One list's members, thread-safe. Rows keep insertion order; erased rows are blanked."""

    def __init__(self, cols: MemberColumns, list_id: str, deleted: set[bytes] | None = None):
        check_json_safe(cols)
        self.lock = threading.Lock()
        self.cols = cols
        self.list_id = list_id
        n = len(cols)
        self.alive = np.ones(n, dtype=bool)
        self.all = SortedList(range(n))
        self.by_status = {
            code: SortedList(np.flatnonzero(cols.status == code).tolist()) for code in range(len(STATUSES))
        }
        order = np.argsort(cols.ids, kind="stable")
        self.hash_order = order
        self.sorted_ids = cols.ids[order]
        self.deleted: set[bytes] = set(deleted or ())
        self.version = 0
        self._since_cache: dict[tuple, tuple[int, np.ndarray]] = {}

    # -- lookups -----------------------------------------------------------------------------
    def row_of(self, subscriber_hash: str) -> int | None:
        """The live row of a member, or None (unknown or erased). Caller holds the lock."""
        key = subscriber_hash.strip().lower()
        if "@" in key:
            key = hashlib.md5(key.encode()).hexdigest()
        try:
            needle = key.encode("ascii")
        except UnicodeEncodeError:
            return None
        if len(needle) != 32:
            return None
        i = int(np.searchsorted(self.sorted_ids, needle))
        if i >= len(self.sorted_ids) or self.sorted_ids[i] != needle:
            return None
        row = int(self.hash_order[i])
        return row if self.alive[row] else None

    def page(self, status: int | None, since: int | None, offset: int, count: int) -> tuple[list[int], int]:
        with self.lock:
            if since is None:
                rows = self.all if status is None else self.by_status[status]
                return rows[offset : offset + count], len(rows)
            key = (status, since)
            cached = self._since_cache.get(key)
            if cached is None or cached[0] != self.version:
                mask = self.alive & (self.cols.last_changed > since)
                if status is not None:
                    mask &= self.cols.status == status
                if len(self._since_cache) > 16:
                    self._since_cache.clear()
                cached = (self.version, np.flatnonzero(mask))
                self._since_cache[key] = cached
            positions = cached[1]
            return positions[offset : offset + count].tolist(), len(positions)

    def _values(self, rows: list[int], wanted: tuple[str, ...]) -> dict[str, list[bytes]]:
        """The raw (ASCII / UTF-8, JSON-safe) values of ``wanted`` fields for ``rows``."""
        c = self.cols
        taken: dict[str, np.ndarray] = {}
        with self.lock:
            for f in wanted:
                if f in ("full_name", "merge_fields"):
                    taken["first"] = c.first_names[rows]
                    taken["last"] = c.last_names[rows]
                elif f in _BYTE_COLUMNS:
                    taken[f] = getattr(c, _BYTE_COLUMNS[f])[rows]
                elif f in ("status", "timestamp_signup", "timestamp_opt", "last_changed"):
                    taken[f] = getattr(c, f)[rows]
        values: dict[str, list[bytes]] = {}
        for f, arr in taken.items():
            if f == "status":
                values[f] = [_STATUS_BYTES[code] for code in arr.tolist()]
            elif f in ("timestamp_signup", "timestamp_opt", "last_changed"):
                values[f] = iso_column(arr).tolist()
            else:
                values[f] = arr.tolist()
        return values

    def render(self, rows: list[int], wanted: tuple[str, ...]) -> list[dict]:
        """Members ``rows`` as dicts with only the top-level ``wanted`` fields, in that order."""
        if not rows:
            return []
        values = {f: [b.decode() for b in v] for f, v in self._values(rows, wanted).items()}
        columns: list[list] = []
        for f in wanted:
            if f == "full_name":
                columns.append([f"{a} {b}" for a, b in zip(values["first"], values["last"])])
            elif f == "merge_fields":
                columns.append([{"FNAME": a, "LNAME": b} for a, b in zip(values["first"], values["last"])])
            elif f == "list_id":
                columns.append([self.list_id] * len(rows))
            else:
                columns.append(values[f])
        return [dict(zip(wanted, vals)) for vals in zip(*columns)]

    def render_json(self, rows: list[int], wanted: tuple[str, ...]) -> bytes:
        """Members ``rows`` as comma-separated JSON objects, built straight from the columns.

        The columns hold JSON-safe text (checked when the audience is built), so values are
        placed between quotes without escaping: several times faster than ``json.dumps``.
        """
        if not rows:
            return b""
        values = self._values(rows, wanted)
        parts: list[bytes] = []
        args: list[list[bytes]] = []
        for f in wanted:
            if f == "full_name":
                parts.append(b'"full_name":"%s %s"')
                args += [values["first"], values["last"]]
            elif f == "merge_fields":
                parts.append(b'"merge_fields":{"FNAME":"%s","LNAME":"%s"}')
                args += [values["first"], values["last"]]
            elif f == "list_id":
                parts.append(b'"list_id":' + json.dumps(self.list_id).encode().replace(b"%", b"%%"))
            else:
                parts.append(b'"' + f.encode() + b'":"%s"')
                args.append(values[f])
        template = b"{" + b",".join(parts) + b"}"
        if not args:
            return b",".join([template.replace(b"%%", b"%")] * len(rows))
        return b",".join([template % vals for vals in zip(*args)])

    def member(self, subscriber_hash: str) -> dict | None:
        with self.lock:
            row = self.row_of(subscriber_hash)
        if row is None:
            return None
        return self.render([row], MEMBER_FIELDS)[0]

    # -- mutations ---------------------------------------------------------------------------
    def archive(self, subscriber_hash: str, now: int) -> bool | None:
        """Archive a member: True, False when unknown, None when its status forbids it (the real
        API refuses to archive a cleaned ("bounced"), pending or already archived contact)."""
        with self.lock:
            row = self.row_of(subscriber_hash)
            if row is None:
                return False
            if int(self.cols.status[row]) in _NOT_ARCHIVABLE:
                return None
        return self.set_status(subscriber_hash, ARCHIVED, now)

    def set_status(self, subscriber_hash: str, status: int, now: int) -> bool:
        """A member's status changes (archived, or subscribed again...): ``last_changed`` moves."""
        with self.lock:
            row = self.row_of(subscriber_hash)
            if row is None:
                return False
            old = int(self.cols.status[row])
            if old != status:
                self.by_status[old].remove(row)
                self.by_status[status].add(row)
                self.cols.status[row] = status
                self.cols.last_changed[row] = now
                self.version += 1
            return True

    def add(self, email: str, status: int, now: int, first: str = "", last: str = "") -> str | None:
        """A new member (``POST /lists/{id}/members``): its subscriber hash, or None when the
        address is already a member. Like members added through the real API it has no signup
        time (``timestamp_signup`` is empty); its opt-in is now when it is subscribed.
        Raises ``ValueError`` for an address Mailchimp would refuse: one erased for good (it
        cannot be re-imported, only sign up again itself) or one needing JSON escaping."""
        subscriber_hash = hashlib.md5(email.strip().lower().encode("utf-8")).hexdigest()
        needle = subscriber_hash.encode("ascii")
        row_values = {
            "ids": needle,
            "emails": email.strip().encode("utf-8"),
            "unique_email_ids": needle[:10],
            "contact_ids": hashlib.md5(needle).hexdigest().encode("ascii"),
            "first_names": first.encode("utf-8"),
            "last_names": last.encode("utf-8"),
        }
        check_json_safe(MemberColumns(**{k: np.array([v]) for k, v in row_values.items()}, status=np.zeros(1, np.int8),
                                      timestamp_signup=np.zeros(1, np.int64), timestamp_opt=np.zeros(1, np.int64),
                                      last_changed=np.zeros(1, np.int64)))
        with self.lock:
            if needle in self.deleted:
                raise ValueError("was permanently deleted and cannot be re-imported")
            i = int(np.searchsorted(self.sorted_ids, needle))
            if i < len(self.sorted_ids) and self.sorted_ids[i] == needle:
                if self.alive[self.hash_order[i]]:
                    return None
            c = self.cols
            row = len(c)
            for name, value in row_values.items():
                setattr(c, name, np.append(getattr(c, name), np.array([value])))
            c.status = np.append(c.status, np.int8(status))
            c.timestamp_signup = np.append(c.timestamp_signup, np.int64(NO_TIME))
            c.timestamp_opt = np.append(c.timestamp_opt, np.int64(now if status == STATUS_CODE["subscribed"] else NO_TIME))
            c.last_changed = np.append(c.last_changed, np.int64(now))
            self.alive = np.append(self.alive, True)
            self.all.add(row)
            self.by_status[status].add(row)
            self.sorted_ids = np.insert(self.sorted_ids, i, needle)
            self.hash_order = np.insert(self.hash_order, i, row)
            self.version += 1
        return subscriber_hash

    def delete_permanent(self, subscriber_hash: str) -> bool:
        with self.lock:
            row = self.row_of(subscriber_hash)
            if row is None:
                return False
            c = self.cols
            self.alive[row] = False
            self.all.remove(row)
            self.by_status[int(c.status[row])].remove(row)
            self.deleted.add(bytes(c.ids[row]))
            # Gone for good: blank the personal data now, keep only the hash (re-import block).
            c.emails[row] = b""
            c.first_names[row] = b""
            c.last_names[row] = b""
            c.unique_email_ids[row] = b""
            c.contact_ids[row] = b""
            self.version += 1
            return True

    # -- summaries and persistence -----------------------------------------------------------
    def counts(self) -> dict[str, int]:
        with self.lock:
            return {STATUSES[code]: len(rows) for code, rows in self.by_status.items()}

    def snapshot(self) -> dict[str, np.ndarray]:
        with self.lock:
            keep = self.alive
            arrays = {name: arr[keep].copy() for name, arr in self.cols.as_dict().items()}
            arrays["deleted"] = np.array(sorted(self.deleted), dtype="S32")
        return arrays

    def save(self, path: Path) -> int:
        arrays = self.snapshot()
        arrays["meta"] = np.array(json.dumps({"list_id": self.list_id, "format": 1}).encode())
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return len(arrays["ids"])

    @classmethod
    def load(cls, path: Path, list_id: str) -> Audience:
        with np.load(path, allow_pickle=False) as data:
            fields = {name: data[name].copy() for name in MemberColumns.__dataclass_fields__}
            deleted = set(data["deleted"].tolist())
        return cls(MemberColumns(**fields), list_id, deleted)

