"""Fast, exact duplicate detection for record keys.

Finding duplicate keys means hashing every key, and hashing a million 32-character strings
(Mailchimp's subscriber hashes) costs a quarter of a second, twice per run: in the quarantine
and in the validation. ASCII keys of up to 64 bytes are instead padded with NUL to one width
(a multiple of 8 bytes) and folded, eight bytes at a time, into a 64-bit fingerprint with
numpy, about five times faster and with a fraction of the memory. Equal keys always have
equal fingerprints, so every duplicate is found; keys whose fingerprints merely collide are
told apart by comparing the keys themselves. Other keys take pandas' ordinary path.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    # SplitMix64's finaliser: every input bit affects every output bit.
    z = z ^ (z >> np.uint64(30))
    z = z * _M1
    z = z ^ (z >> np.uint64(27))
    z = z * _M2
    return z ^ (z >> np.uint64(31))


def _fixed_width(arr: pa.StringArray) -> tuple[np.ndarray, int] | None:
    """The array's bytes as rows of one width (a multiple of 8), or None."""
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset : arr.offset + n + 1]
    widths = np.diff(offsets)
    width = int(widths[0])
    if width == 0 or width % 8 or (widths != width).any():
        return None
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    return data, width


def fingerprints(keys: pd.Series) -> np.ndarray | None:
    """A 64-bit fingerprint per key; None if a key is missing, or the keys are longer than
    64 bytes or not ASCII. Equal keys have equal fingerprints."""
    try:
        arr = pa.array(keys, type=pa.string())
    except (pa.ArrowTypeError, pa.ArrowInvalid):
        return None
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    n = len(arr)
    if n == 0 or arr.null_count:
        return None
    fixed = _fixed_width(arr)
    if fixed is None:
        # Keys of different lengths (CRM and Zendesk ids) are padded with NUL to one width.
        # Padding counts characters, so only ASCII keys come out all the same width in bytes.
        longest = int(pc.max(pc.binary_length(arr)).as_py())
        if longest == 0 or longest > 64:
            return None
        fixed = _fixed_width(pc.utf8_rpad(arr, width=-(-longest // 8) * 8, padding="\0"))
        if fixed is None:
            return None
    data, width = fixed
    words = data.view(np.uint64).reshape(n, width // 8)
    fp = np.zeros(n, dtype=np.uint64)
    for j in range(words.shape[1]):
        fp = _mix(fp ^ words[:, j])
    return fp


def duplicated(keys: pd.Series) -> np.ndarray:
    """True for every key that occurs more than once (``Series.duplicated(keep=False)``)."""
    fp = fingerprints(keys)
    if fp is None:
        return keys.duplicated(keep=False).to_numpy(dtype=bool)
    candidates = pd.Series(fp).duplicated(keep=False).to_numpy()
    if not candidates.any():
        return candidates
    rows = np.flatnonzero(candidates)
    out = np.zeros(len(keys), dtype=bool)
    out[rows] = keys.iloc[rows].duplicated(keep=False).to_numpy(dtype=bool)
    return out
