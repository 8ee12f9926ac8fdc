"""Synthetic Mailchimp audience members for the stand-in server and tests.

Everything is derived from a seed with numpy, so a million members take a couple of seconds
and the same seed always gives the same audience. Nobody real is in here: names are built
from syllables, addresses live under the reserved example.org/.com/.net domains.

Two forms:

* :func:`generate_columns` returns a :class:`MemberColumns` (numpy arrays, one row per member,
  in insertion order). The stand-in keeps its audience in this form.
* :func:`generate_members` returns Mailchimp-shaped member dicts (the same rows).

Status mix, as the privacy notice's newsletter rules see it (the generator's own view, see
:func:`due_under_policy`): about ``erase_share`` of the members are *due*, i.e. unsubscribed,
cleaned or archived (any age), or ``pending`` with a signup more than 30 days before ``now``.
The rest are subscribed, transactional, or pending with a signup within the last 30 days.

Edge cases always present when ``n >= 8``:

* one ``pending`` member whose signup is exactly 30 days before ``now`` (not due by the
  generator's count: "older than 30 days" is strict);
* a few members whose address has upper-case letters; their ``id`` (subscriber hash) is the
  MD5 of the lower-cased address, as Mailchimp computes it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

STATUSES = ("subscribed", "unsubscribed", "cleaned", "pending", "archived", "transactional")
STATUS_CODE = {name: code for code, name in enumerate(STATUSES)}
DUE_STATUSES = frozenset({"unsubscribed", "cleaned", "archived"})
PENDING_DAYS = 30
DOMAINS = ("example.org", "example.com", "example.net")
NO_TIME = -1  # epoch marker for an empty timestamp (timestamp_opt of a pending member)

_SYLLABLES = (
    "ka", "lo", "mi", "sa", "ne", "ro", "ta", "vi", "el", "an", "is", "or", "ul", "be", "da",
    "fi", "go", "ha", "jo", "ke", "li", "ma", "no", "pe", "ri", "su", "te", "va", "ye", "zo",
    "bo", "ca", "du", "en", "fa", "gi", "hu", "ir", "lu", "mo",
)
_LAST_ENDINGS = ("berg", "dal", "lund", "strom", "qvist", "by", "holm", "vik", "sten", "mark")
_N_FIRST = 1500
_N_LAST = 6000
_DAY = 86400

# Status mix of the due part and of the rest (shares of each part).
_DUE_MIX = (("unsubscribed", 0.50), ("cleaned", 0.20), ("archived", 0.15), ("pending_old", 0.15))
_KEEP_MIX = (("subscribed", 0.90), ("transactional", 0.05), ("pending_recent", 0.05))


@dataclass
class MemberColumns:
    """One audience in columns; row ``i`` is the ``i``-th member in insertion order.

    Byte-string columns are ASCII. Times are Unix seconds (UTC); ``NO_TIME`` means empty.
    """

    ids: np.ndarray  # S32, subscriber hash (md5 of the lower-cased address)
    emails: np.ndarray  # S, the address as stored (may contain upper case)
    unique_email_ids: np.ndarray  # S10
    contact_ids: np.ndarray  # S32
    first_names: np.ndarray  # S
    last_names: np.ndarray  # S
    status: np.ndarray  # int8 code into STATUSES
    timestamp_signup: np.ndarray  # int64
    timestamp_opt: np.ndarray  # int64, NO_TIME when never opted in
    last_changed: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.ids)

    def as_dict(self) -> dict[str, np.ndarray]:
        return dict(self.__dict__)


def iso(ts: int) -> str:
    """Mailchimp's time format, ``2025-03-01T10:00:00+00:00``; empty for ``NO_TIME``."""
    if ts == NO_TIME:
        return ""
    return datetime.fromtimestamp(int(ts), UTC).isoformat()


def iso_column(ts: np.ndarray) -> np.ndarray:
    """Vectorised :func:`iso` as an ``S25`` array (``b""`` for ``NO_TIME``).

    Dates are formatted once per distinct day, the time of day arithmetically, so a page of
    a thousand timestamps costs well under a millisecond.
    """
    ts = np.asarray(ts, dtype=np.int64)
    n = len(ts)
    if n == 0:
        return np.zeros(0, dtype="S25")
    valid = ts != NO_TIME
    days, secs = np.divmod(np.where(valid, ts, 0), _DAY)
    unique_days, inverse = np.unique(days, return_inverse=True)
    dates = np.datetime_as_string(unique_days.astype("datetime64[D]")).astype("S10")
    buf = np.empty((n, 25), dtype=np.uint8)
    buf[:, :10] = dates.view(np.uint8).reshape(-1, 10)[inverse.ravel()]
    hours, rest = np.divmod(secs, 3600)
    minutes, seconds = np.divmod(rest, 60)
    zero = ord("0")
    for col, value in ((11, hours), (14, minutes), (17, seconds)):
        buf[:, col] = zero + value // 10
        buf[:, col + 1] = zero + value % 10
    buf[:, 10] = ord("T")
    buf[:, 13] = buf[:, 16] = ord(":")
    buf[:, 19:] = np.frombuffer(b"+00:00", dtype=np.uint8)
    out = buf.view("S25").ravel()
    out[~valid] = b""
    return out


def due_under_policy(status: str, timestamp_signup: int, now: int, pending_days: int = PENDING_DAYS) -> bool:
    """The generator's own reading of the newsletter rules (for expected counts in tests).

    Unsubscribed, cleaned and archived members are due at once; a pending member is due when
    its signup is strictly more than ``pending_days`` days before ``now``. The rule engine, not
    this helper, is authoritative (it evaluates calendar durations in Europe/Stockholm).
    """
    if status in DUE_STATUSES:
        return True
    return status == "pending" and now - timestamp_signup > pending_days * _DAY


def _name_pool(rng: np.random.Generator, size: int, *, surname: bool) -> np.ndarray:
    """``size`` distinct capitalised names made of syllables."""
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < size:
        k = int(rng.integers(2, 4))
        parts = [_SYLLABLES[i] for i in rng.integers(0, len(_SYLLABLES), size=k)]
        if surname:
            parts.append(_LAST_ENDINGS[int(rng.integers(0, len(_LAST_ENDINGS)))])
        name = "".join(parts).capitalize()
        if name not in seen:
            seen.add(name)
            names.append(name)
    return np.array(names, dtype="S")


def _random_hex(rng: np.random.Generator, n: int, nchars: int) -> np.ndarray:
    raw = rng.integers(0, 256, size=(n, (nchars + 1) // 2), dtype=np.uint8)
    digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    nibbles = np.empty((n, raw.shape[1] * 2), dtype=np.uint8)
    nibbles[:, 0::2] = digits[raw >> 4]
    nibbles[:, 1::2] = digits[raw & 15]
    return np.ascontiguousarray(nibbles[:, :nchars]).view(f"S{nchars}").ravel()


def _occurrence(keys: np.ndarray) -> np.ndarray:
    """For each element, how many equal keys come before it (0 for the first)."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    starts = np.ones(len(keys), dtype=bool)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    group_start = np.maximum.accumulate(np.where(starts, np.arange(len(keys)), 0))
    occ = np.empty(len(keys), dtype=np.int64)
    occ[order] = np.arange(len(keys)) - group_start
    return occ


def generate_columns(n: int, *, seed: int, now: datetime, erase_share: float = 0.10) -> MemberColumns:
    """``n`` members in columns, deterministic from ``seed`` (see the module docstring)."""
    if n < 0:
        raise ValueError("n must be >= 0")
    if not 0.0 <= erase_share <= 1.0:
        raise ValueError("erase_share must be within [0, 1]")
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    rng = np.random.default_rng(seed)
    now_ts = int(now.timestamp())

    # Status per row: exact shares, shuffled.
    n_due = round(n * erase_share)
    kinds = []
    for part_n, mix in ((n_due, _DUE_MIX), (n - n_due, _KEEP_MIX)):
        counts = [int(part_n * share) for _, share in mix]
        counts[0] += part_n - sum(counts)
        for (kind, _), c in zip(mix, counts):
            kinds.append((kind, c))
    kind_names = [k for k, _ in kinds]
    kind_codes = np.repeat(np.arange(len(kinds), dtype=np.int8), [c for _, c in kinds])
    rng.shuffle(kind_codes)

    # Names and addresses. Duplicate (first, last, domain) triples get a number appended.
    first_pool = _name_pool(rng, _N_FIRST, surname=False)
    last_pool = _name_pool(rng, _N_LAST, surname=True)
    f_idx = rng.integers(0, _N_FIRST, size=n)
    l_idx = rng.integers(0, _N_LAST, size=n)
    d_idx = rng.integers(0, len(DOMAINS), size=n)
    style = rng.integers(0, 3, size=n)  # first.last | first_last | f.last
    # "f.last" addresses collide on the initial, not the whole first name.
    initials = np.array([name[:1].lower()[0] - ord("a") for name in first_pool.tolist()], dtype=np.int64)
    f_key = np.where(style == 2, _N_FIRST + initials[f_idx], f_idx)
    key = (f_key * _N_LAST + l_idx) * 9 + d_idx * 3 + style
    occ = _occurrence(key)
    first_names = first_pool[f_idx]
    last_names = last_pool[l_idx]
    f_low = [b.decode().lower() for b in first_pool.tolist()]
    l_low = [b.decode().lower() for b in last_pool.tolist()]
    seps = (".", "_", ".")
    emails_str = [
        f"{f_low[fi] if s != 2 else f_low[fi][0]}{seps[s]}{l_low[li]}{o + 1 if o else ''}@{DOMAINS[di]}"
        for fi, li, di, s, o in zip(f_idx.tolist(), l_idx.tolist(), d_idx.tolist(), style.tolist(), occ.tolist())
    ]
    # Subscriber hashes are of the lower-cased address: compute them before the upper-case edge case.
    md5 = hashlib.md5
    ids = np.array([md5(e.encode()).hexdigest() for e in emails_str], dtype="S32")

    # Edge case: a few addresses with upper case (hash still of the lower-cased form).
    upper_rows = [i for i in (1, 5, 7) if i < n]
    for i in upper_rows:
        local, domain = emails_str[i].split("@")
        emails_str[i] = f"{local.capitalize()}@{domain.upper()}"

    emails = np.array(emails_str, dtype="S")

    # Times.
    five_years = 5 * 365 * _DAY
    signup = now_ts - rng.integers(PENDING_DAYS * _DAY + 1, five_years, size=n)
    opt = signup + rng.integers(60, 3 * _DAY, size=n)
    span = np.maximum(now_ts - opt, 1)
    last_changed = opt + (rng.random(n) * span).astype(np.int64)
    status = np.zeros(n, dtype=np.int8)
    for code, kind in enumerate(kind_names):
        rows = kind_codes == code
        if kind == "pending_recent":
            status[rows] = STATUS_CODE["pending"]
            signup[rows] = now_ts - rng.integers(0, PENDING_DAYS * _DAY - 3600, size=int(rows.sum()))
        elif kind == "pending_old":
            status[rows] = STATUS_CODE["pending"]
            signup[rows] = now_ts - rng.integers(PENDING_DAYS * _DAY + 1, 2 * 365 * _DAY, size=int(rows.sum()))
        else:
            status[rows] = STATUS_CODE[kind]
    pending_or_tx = (status == STATUS_CODE["pending"]) | (status == STATUS_CODE["transactional"])
    opt[pending_or_tx] = NO_TIME
    pending = status == STATUS_CODE["pending"]
    last_changed[pending] = signup[pending]
    tx = status == STATUS_CODE["transactional"]
    last_changed[tx] = np.maximum(last_changed[tx], signup[tx])

    # Edge case: a pending signup exactly 30 days old, taken from the not-due rows.
    if n >= 8:
        candidates = np.flatnonzero(
            np.isin(kind_codes, [kind_names.index(k) for k in ("subscribed", "pending_recent") if k in kind_names])
        )
        if len(candidates):
            row = int(candidates[0])
            status[row] = STATUS_CODE["pending"]
            signup[row] = now_ts - PENDING_DAYS * _DAY
            opt[row] = NO_TIME
            last_changed[row] = signup[row]

    return MemberColumns(
        ids=ids,
        emails=emails,
        unique_email_ids=_random_hex(rng, n, 10),
        contact_ids=_random_hex(rng, n, 32),
        first_names=first_names,
        last_names=last_names,
        status=status,
        timestamp_signup=signup.astype(np.int64),
        timestamp_opt=opt.astype(np.int64),
        last_changed=last_changed.astype(np.int64),
    )


def member_dict(cols: MemberColumns, row: int, list_id: str) -> dict:
    """Row ``row`` of ``cols`` as a Mailchimp member object."""
    first = cols.first_names[row].decode()
    last = cols.last_names[row].decode()
    return {
        "id": cols.ids[row].decode(),
        "email_address": cols.emails[row].decode(),
        "unique_email_id": cols.unique_email_ids[row].decode(),
        "contact_id": cols.contact_ids[row].decode(),
        "full_name": f"{first} {last}",
        "merge_fields": {"FNAME": first, "LNAME": last},
        "status": STATUSES[cols.status[row]],
        "timestamp_signup": iso(cols.timestamp_signup[row]),
        "timestamp_opt": iso(cols.timestamp_opt[row]),
        "last_changed": iso(cols.last_changed[row]),
        "list_id": list_id,
    }


def generate_members(
    n: int, *, seed: int, now: datetime, erase_share: float = 0.10, list_id: str = "demo-list"
) -> list[dict]:
    """``n`` Mailchimp-shaped member dicts, deterministic from ``seed``."""
    cols = generate_columns(n, seed=seed, now=now, erase_share=erase_share)
    return [member_dict(cols, i, list_id) for i in range(n)]


def count_due(cols: MemberColumns, now: datetime, pending_days: int = PENDING_DAYS) -> int:
    """How many rows :func:`due_under_policy` calls due (vectorised)."""
    now_ts = int(now.timestamp())
    due_codes = [STATUS_CODE[s] for s in DUE_STATUSES]
    pending = (cols.status == STATUS_CODE["pending"]) & (now_ts - cols.timestamp_signup > pending_days * _DAY)
    return int((np.isin(cols.status, due_codes) | pending).sum())


def default_now() -> datetime:
    """The reference time the stand-in generates against: now, to the second, in UTC."""
    return datetime.now(UTC).replace(microsecond=0)


__all__ = [
    "DOMAINS",
    "NO_TIME",
    "PENDING_DAYS",
    "STATUSES",
    "STATUS_CODE",
    "MemberColumns",
    "count_due",
    "default_now",
    "due_under_policy",
    "generate_columns",
    "generate_members",
    "iso",
    "iso_column",
    "member_dict",
]
