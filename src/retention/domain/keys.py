"""Fast, exact duplicate detection for record keys.

Finding duplicate keys means hashing every key, and hashing a million 32-character strings
(Mailchimp's subscriber hashes) costs a quarter of a second, twice per run: in the quarantine
and in the validation. ASCII keys of up to 64 bytes are instead padded with NUL to one width
(a multiple of 8 bytes) and folded, eight bytes at a time, into a 64-bit fingerprint with
numpy, about five times faster and with a fraction of the memory. A word of padding leaves the
fingerprint as it was, so a key has one fingerprint at any width: keys read a part at a time
are fingerprinted in one pass, each part at its own width. Equal keys always have
equal fingerprints, so every duplicate is found; keys whose fingerprints merely collide are
told apart by comparing the keys themselves. Other keys take pandas' ordinary path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray, spare: np.ndarray | None = None) -> np.ndarray:
    """SplitMix64's finaliser, in place: every input bit affects every output bit. ``z`` is
    overwritten and returned; ``spare`` (as large) is scratch space. In place because each
    array a step allocates beyond glibc's mmap threshold (fixed at 128 KiB: ``runs.context``)
    is mapped afresh and its pages faulted in. With the eight temporaries a word of 100,000
    keys made, the plan step's quarantine at a million members took 0.32 to 0.38 s (the step
    alone, six runs); in place, 0.25 to 0.26 s (two runs)."""
    spare = np.empty_like(z) if spare is None else spare
    np.right_shift(z, np.uint64(30), out=spare)
    z ^= spare
    z *= _M1
    np.right_shift(z, np.uint64(27), out=spare)
    z ^= spare
    z *= _M2
    np.right_shift(z, np.uint64(31), out=spare)
    z ^= spare
    return z


def _fixed_width(arr: pa.Array, width: int) -> np.ndarray | None:
    """The array's bytes as rows of ``width`` bytes each, or None if any row is not."""
    n = len(arr)
    offset_type = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    offsets = np.frombuffer(arr.buffers()[1], dtype=offset_type)[arr.offset : arr.offset + n + 1]
    if n and (np.diff(offsets) != width).any():
        return None
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]] if n else np.empty(0, np.uint8)
    return data.reshape(n, width)


def fingerprints(keys: pd.Series) -> np.ndarray | None:
    """A 64-bit fingerprint per key; None if a key is missing, or the keys are longer than
    64 bytes or not ASCII. Equal keys have equal fingerprints, in one call or in two (the keys
    are padded to their longest, rounded up to 8 bytes, and the padding does not count)."""
    try:
        arr = pa.chunked_array(pa.array(keys)) if not isinstance(keys, pa.ChunkedArray) else keys
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        return None
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        return None
    if len(arr) == 0 or arr.null_count:
        return None
    lengths = pc.binary_length(arr)
    shortest, longest = (int(v.as_py()) for v in pc.min_max(lengths).values())
    if longest == 0 or longest > 64:
        return None
    width = -(-longest // 8) * 8
    parts = []
    for chunk in arr.chunks:  # chunk by chunk: no copy of all the keys into one buffer
        if shortest != width or longest != width:
            # Keys of different lengths (CRM and Zendesk ids) are padded with NUL to one width.
            # Padding counts characters, so only ASCII keys come out all the same width in bytes.
            chunk = pc.utf8_rpad(chunk, width=width, padding="\0")
        rows = _fixed_width(chunk, width)
        if rows is None:
            return None
        parts.append(rows)
    fp = []
    for rows in parts:
        words = rows.reshape(-1).view(np.uint64).reshape(len(rows), width // 8)
        h = _mix(words[:, 0].copy())
        spare = np.empty_like(h)
        for j in range(1, words.shape[1]):
            word = words[:, j]
            # A word of NULs leaves the fingerprint as it was: a key padded to any width has
            # the fingerprint of its own bytes, so parts padded to their own widths agree.
            nonzero = word != 0
            if nonzero.all():  # no padding in this word (keys all of one width): no selection
                h ^= word
                h = _mix(h, spare)
            else:
                np.copyto(h, _mix(h ^ word, spare), where=nonzero)
        fp.append(h)
    return np.concatenate(fp) if len(fp) > 1 else fp[0]


def duplicated(keys: pd.Series) -> np.ndarray:
    """True for every key that occurs more than once (``Series.duplicated(keep=False)``)."""
    fp = fingerprints(keys)
    if fp is None:
        return keys.duplicated(keep=False).to_numpy(dtype=bool)
    # Sorting 64-bit integers is several times cheaper than hashing them.
    ordered = np.sort(fp)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if not len(repeated):
        return np.zeros(len(keys), dtype=bool)
    candidates = np.isin(fp, repeated)
    rows = np.flatnonzero(candidates)
    out = np.zeros(len(keys), dtype=bool)
    out[rows] = keys.iloc[rows].duplicated(keep=False).to_numpy(dtype=bool)
    return out


def _fingerprints_in_parts(parts: Callable[[], Iterable[pd.Series]]) -> np.ndarray | None:
    """The fingerprints of the keys of ``parts()`` one after another, in one pass (a part's
    keys padded to its own width: the fingerprint of a key is the same at any width); None
    when a key has none (missing, long, not ASCII)."""
    prints = []
    for part in parts():
        fp = fingerprints(part) if len(part) else np.empty(0, dtype=np.uint64)
        if fp is None:
            return None
        prints.append(fp)
    return np.concatenate(prints) if prints else np.empty(0, dtype=np.uint64)


def _repeated_rows(parts: Callable[[], Iterable[pd.Series]], fp: np.ndarray) -> tuple[np.ndarray, pd.Series]:
    """The rows whose fingerprints repeat (duplicates, and the rare mere collisions) and their
    keys, read again from ``parts()`` (a third pass, only when some repeat)."""
    ordered = np.sort(fp)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if not len(repeated):
        return np.empty(0, dtype=np.int64), pd.Series([], dtype="string")
    rows = np.flatnonzero(np.isin(fp, repeated))
    keys, at = [], 0
    for part in parts():
        mine = rows[(rows >= at) & (rows < at + len(part))] - at
        keys.append(part.iloc[mine].reset_index(drop=True))
        at += len(part)
    return rows, pd.concat(keys, ignore_index=True)


def duplicated_in_parts(parts: Callable[[], Iterable[pd.Series]]) -> np.ndarray:
    """``duplicated`` over the keys of ``parts()`` one after another, holding 8 bytes a key (its
    fingerprint) instead of every key: the plan step reads a record type's ids a staged part at a
    time. ``parts`` is called again to read the keys of the rows whose fingerprints repeat (the
    duplicates, and the rare mere collisions), which are then compared as keys. Keys that have no
    fingerprint (missing, long, not ASCII) are read whole and judged by ``duplicated``."""
    fp = _fingerprints_in_parts(parts)
    if fp is None:
        return duplicated(pd.concat(list(parts()), ignore_index=True))
    out = np.zeros(len(fp), dtype=bool)
    rows, keys = _repeated_rows(parts, fp)
    if len(rows):
        out[rows] = keys.duplicated(keep=False).to_numpy(dtype=bool)
    return out


def last_listed_in_parts(parts: Callable[[], Iterable[pd.Series]]) -> np.ndarray | None:
    """The last listing of each key: ``~Series.duplicated(keep="last")`` over the keys of
    ``parts()`` one after another, holding a fingerprint a key (as :func:`duplicated_in_parts`).
    None when a key has no fingerprint (missing, long, not ASCII): the caller reads them whole.
    Zendesk's incremental export lists a ticket or a user again each time it changes."""
    fp = _fingerprints_in_parts(parts)
    if fp is None:
        return None
    out = np.ones(len(fp), dtype=bool)
    rows, keys = _repeated_rows(parts, fp)
    if len(rows):
        out[rows] = ~keys.duplicated(keep="last").to_numpy(dtype=bool)
    return out


def partitions(keys: pd.Series, parts: int) -> np.ndarray:
    """Which of ``parts`` partitions each key falls in (0 to ``parts - 1``), by a hash of the
    key as text: equal keys fall in the same partition whichever frame they come from (an
    extract's ids, the plan's), so what compares keys (a uniqueness check, a join by id) can
    run a partition at a time and find what it would over the whole. Missing keys share one."""
    # A byte a key for up to 256 partitions: a million keys' partitions take a megabyte.
    dtype = np.uint8 if parts <= 256 else np.uint16 if parts <= 65536 else np.uint32
    if parts <= 1:
        return np.zeros(len(keys), dtype=dtype)
    text = pa.array(keys.astype("string"), type=pa.large_string())
    # A key that has a fingerprint wherever it is (present, ASCII, 1 to 64 bytes) is hashed by
    # it, in numpy; the others (none, most often) as Python strings. Whether a key has one is
    # the key's own property, so an id falls in one partition in every frame. Hashing every key
    # as a Python string made 50,000 objects a slice: 0.2 s of the validate step's 1.2 s spill
    # at a million newsletter members.
    size = pc.binary_length(text)
    plain = pc.fill_null(pc.and_(pc.and_(pc.greater(size, 0), pc.less_equal(size, 64)), pc.equal(size, pc.utf8_length(text))), False)
    plain = plain.to_numpy(zero_copy_only=False)
    out = np.empty(len(text), dtype=dtype)
    if plain.any():
        prints = fingerprints(text.filter(pa.array(plain)))
        if prints is None:  # cannot be: each of them has one
            raise RuntimeError("a key judged plain has no fingerprint")
        out[plain] = (prints % np.uint64(parts)).astype(dtype)
    if not plain.all():
        rest = text.filter(pa.array(~plain)).to_pandas().fillna("\x00").to_numpy(dtype=object)
        out[~plain] = (pd.util.hash_array(rest, categorize=False) % np.uint64(parts)).astype(dtype)
    return out


def positions_in(values: pd.Series, among: pd.Series, among_prints: np.ndarray | None = None) -> np.ndarray:
    """Where each of ``values`` first occurs in ``among``, -1 where it does not
    (``pyarrow.compute.index_in`` over the keys as text). Found by fingerprint, a table of
    integers rather than of strings (about half the time for 250,000 subscriber hashes), and
    every find confirmed by comparing the keys: a value whose fingerprint merely collides is
    looked up as text. ``among_prints``: ``fingerprints(among)`` when already taken."""
    among_text = pa.array(among.astype("string"), type=pa.large_string())
    value_text = pa.array(values.astype("string"), type=pa.large_string())
    among_prints = fingerprints(among) if among_prints is None else among_prints
    value_prints = fingerprints(values) if among_prints is not None else None
    if among_prints is None or value_prints is None:  # a key without a fingerprint: as text
        return pc.fill_null(pc.index_in(value_text, value_set=among_text), -1).to_numpy().astype(np.int64)
    at = pc.fill_null(pc.index_in(pa.array(value_prints), value_set=pa.array(among_prints)), -1).to_numpy().astype(np.int64)
    hit = np.flatnonzero(at >= 0)
    same = pc.equal(among_text.take(pa.array(at[hit])), value_text.take(pa.array(hit))).to_numpy(zero_copy_only=False)
    wrong = hit[~same]
    if len(wrong):  # the first key with that fingerprint is another key: the text decides
        found = pc.index_in(value_text.take(pa.array(wrong)), value_set=among_text)
        at[wrong] = pc.fill_null(found, -1).to_numpy().astype(np.int64)
    return at
