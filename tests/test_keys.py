"""retention.domain.keys: the fast duplicate-key check must agree with pandas on every input."""

from __future__ import annotations

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from retention.domain import keys
from retention.domain.quarantine import quarantine_reasons

# Few letters so that duplicates are common: fixed widths, mixed widths (padded with NUL, so a
# trailing NUL makes two keys' fingerprints collide), non-ASCII and over-long keys (the pandas
# path), empty keys and missing ones.
key_text = st.one_of(
    st.none(),
    st.sampled_from([0, 1, 5, 8, 16, 32, 70]).flatmap(lambda w: st.text("ab", min_size=w, max_size=w)),
    st.text("ab\0", max_size=12),
    st.text("aé", min_size=1, max_size=4),
)


@settings(max_examples=300, deadline=None)
@given(values=st.lists(key_text, max_size=40), start=st.integers(0, 10))
def test_duplicated_matches_pandas(values, start):
    series = pd.Series(values, dtype="string").iloc[start:]  # sliced: an Arrow array with an offset
    expected = series.duplicated(keep=False).to_numpy()
    assert (keys.duplicated(series) == expected).all()


def test_colliding_fingerprints_are_told_apart(monkeypatch):
    # Every key gets the same fingerprint: only the exact comparison can find the duplicates.
    monkeypatch.setattr(keys, "_mix", lambda z, spare=None: np.zeros_like(z))
    series = pd.Series(["a" * 32, "b" * 32, "a" * 32, "c" * 32], dtype="string")
    assert keys.fingerprints(series).tolist() == [0, 0, 0, 0]
    assert keys.duplicated(series).tolist() == [True, False, True, False]


def _in_parts(series: pd.Series, cuts: list[int]):
    bounds = [0, *sorted(min(c, len(series)) for c in cuts), len(series)]
    return lambda: (series.iloc[a:b] for a, b in zip(bounds, bounds[1:]))


@settings(max_examples=300, deadline=None)
@given(values=st.lists(key_text, max_size=40), cuts=st.lists(st.integers(0, 40), max_size=5))
def test_duplicated_in_parts_matches_pandas_over_the_whole(values, cuts):
    """The plan step finds duplicate keys over a record type read a part at a time: a key twice
    in one part, in two parts, missing (read whole), or merely colliding."""
    series = pd.Series(values, dtype="string")
    expected = series.duplicated(keep=False).to_numpy()
    assert (keys.duplicated_in_parts(_in_parts(series, cuts)) == expected).all()


def test_colliding_fingerprints_in_different_parts_are_told_apart(monkeypatch):
    monkeypatch.setattr(keys, "_mix", lambda z, spare=None: np.zeros_like(z))
    series = pd.Series(["a" * 32, "b" * 32, "c" * 32, "a" * 32, "d" * 32], dtype="string")
    assert keys.duplicated_in_parts(_in_parts(series, [2, 4])).tolist() == [True, False, False, True, False]
    assert keys.duplicated_in_parts(_in_parts(series.iloc[:0], [])).tolist() == []


def test_a_key_has_one_fingerprint_whatever_the_longest_key_beside_it():
    """The plan step fingerprints a record type's ids a part at a time, each part padded to its
    own longest key: the CRM's "7" in a part of one-digit ids and in a part of 12-digit ids (and
    a Zendesk id beside 40-character ones) must still be found twice."""
    alone = keys.fingerprints(pd.Series(["7", "8"], dtype="string"))
    beside = keys.fingerprints(pd.Series(["7", "123456789012", "x" * 40], dtype="string"))
    assert alone[0] == beside[0]
    series = pd.Series(["7", "8", "123456789012", "7", "x" * 40, "123456789012"], dtype="string")
    assert keys.duplicated_in_parts(_in_parts(series, [2, 4])).tolist() == [True, False, True, True, False, True]


@settings(max_examples=300, deadline=None)
@given(values=st.lists(key_text, max_size=40), cuts=st.lists(st.integers(0, 40), max_size=5))
def test_last_listed_in_parts_matches_pandas_over_the_whole(values, cuts):
    """The last listing of each key (Zendesk's export lists a ticket again as it changes), over
    the keys a part at a time; None (read them whole) when a key has no fingerprint."""
    series = pd.Series(values, dtype="string")
    got = keys.last_listed_in_parts(_in_parts(series, cuts))
    if got is not None:
        assert (got == ~series.duplicated(keep="last").to_numpy()).all()
    # Present, non-empty ASCII keys of up to 64 bytes always have fingerprints.
    assert got is not None or not all(v and v.isascii() and len(v) <= 64 for v in values)


def test_colliding_fingerprints_of_listings_are_told_apart(monkeypatch):
    monkeypatch.setattr(keys, "_mix", lambda z, spare=None: np.zeros_like(z))
    series = pd.Series(["a" * 32, "b" * 32, "c" * 32, "a" * 32, "d" * 32, "b" * 32], dtype="string")
    assert keys.last_listed_in_parts(_in_parts(series, [2, 4])).tolist() == [False, False, True, True, True, True]
    assert keys.last_listed_in_parts(_in_parts(series.iloc[:0], [])).tolist() == []


def test_fingerprints_for_present_ascii_keys_up_to_64_bytes():
    assert keys.fingerprints(pd.Series(["a" * 32, "b" * 32], dtype="string")) is not None
    assert keys.fingerprints(pd.Series(["12345", "678", "9"], dtype="string")) is not None  # CRM ids
    assert keys.fingerprints(pd.Series(["a" * 32, None], dtype="string")) is None
    assert keys.fingerprints(pd.Series(["a" * 65, "b"], dtype="string")) is None
    assert keys.fingerprints(pd.Series(["é", "ab"], dtype="string")) is None
    assert keys.fingerprints(pd.Series(["", ""], dtype="string")) is None
    assert keys.fingerprints(pd.Series([], dtype="string")) is None
    fp = keys.fingerprints(pd.Series(["x" * 16, "y" * 16, "x" * 16], dtype="string"))
    assert fp[0] == fp[2] != fp[1]
    fp = keys.fingerprints(pd.Series(["7", "70", "7", "7\0"], dtype="string"))
    assert fp[0] == fp[2] == fp[3] != fp[1]  # "7\0" pads like "7": a collision, told apart below
    assert keys.duplicated(pd.Series(["7", "70", "7", "7\0"], dtype="string")).tolist() == [True, False, True, False]


def test_quarantine_finds_duplicate_subscriber_hashes():
    from retention.config import DEFAULT_POLICY
    from retention.domain.policy import load_policy

    policy = load_policy(DEFAULT_POLICY)
    now = pd.Timestamp("2026-01-01", tz="UTC")
    ids = [f"{i:032x}" for i in range(1000)]
    ids[700] = ids[3]
    frame = pd.DataFrame(
        {
            "record_id": pd.Series(ids, dtype="string"),
            "status": pd.Series(["unsubscribed"] * 1000, dtype="string"),
            "last_changed": pd.Series([pd.Timestamp("2024-01-01", tz="UTC")] * 1000),
            "timestamp_signup": pd.Series([pd.Timestamp("2023-01-01", tz="UTC")] * 1000),
            "has_email": True,
        }
    )
    reasons = quarantine_reasons(frame, "newsletter_member", policy, now)
    assert reasons[reasons.notna()].to_dict() == {3: "duplicate key", 700: "duplicate key"}


@settings(max_examples=200, deadline=None)
@given(
    key=st.binary(min_size=32, max_size=200),
    record_type=st.sampled_from(["newsletter_member", "crm_contact", "ticket_user"]),
    ids=st.lists(st.one_of(st.text(max_size=40), st.integers()), max_size=20),
)
def test_bulk_pseudonyms_equal_the_standard_hmac(key, record_type, ids):
    import hashlib
    import hmac

    from retention.domain.pseudonyms import Pseudonymizer

    p = Pseudonymizer(key)
    expected = [hmac.new(key, f"{record_type}:{i}".encode(), hashlib.sha256).hexdigest()[:32] for i in ids]
    assert p.keys_for(record_type, ids) == expected
    column = p.column(pd.Series([record_type] * len(ids), dtype="string"), pd.Series(ids, dtype=object))
    assert column.tolist() == expected


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.one_of(st.none(), st.text(" \t\n\u00a0\u2003ab", max_size=4)), max_size=30))
def test_blank_keys_are_what_stripping_leaves_empty(values):
    from retention.domain.quarantine import _blank

    series = pd.Series(values, dtype="string")
    expected = series.isna().to_numpy() | (series.str.strip() == "").fillna(True).to_numpy()
    assert _blank(series).tolist() == expected.tolist()


def _index_in(values: pd.Series, among: pd.Series) -> list[int]:
    """The reference: Arrow's index_in over the keys as text, -1 for not found."""
    import pyarrow as pa
    import pyarrow.compute as pc

    text = lambda s: pa.array(s.astype("string"), type=pa.large_string())  # noqa: E731
    return pc.fill_null(pc.index_in(text(values), value_set=text(among)), -1).to_numpy().tolist()


@settings(max_examples=300, deadline=None)
@given(values=st.lists(key_text, max_size=30), among=st.lists(key_text, max_size=30))
def test_positions_in_matches_index_in_over_the_keys(values, among):
    """The validate step finds each plan row's record in the clean extract by fingerprint: the
    same first position as a lookup of the keys as text, or -1, whatever the keys' widths."""
    values, among = pd.Series(values, dtype="string"), pd.Series(among, dtype="string")
    assert keys.positions_in(values, among).tolist() == _index_in(values, among)
    prints = keys.fingerprints(among)
    assert keys.positions_in(values, among, prints).tolist() == _index_in(values, among)


def test_positions_in_tells_colliding_fingerprints_apart(monkeypatch):
    # Every key gets the same fingerprint: the first key of the extract is found for every
    # value by fingerprint, and only the comparison of the keys finds the right one.
    monkeypatch.setattr(keys, "_mix", lambda z, spare=None: np.zeros_like(z))
    among = pd.Series(["a" * 32, "b" * 32, "c" * 32, "b" * 32], dtype="string")
    values = pd.Series(["c" * 32, "d" * 32, "a" * 32, "b" * 32], dtype="string")
    assert keys.positions_in(values, among).tolist() == [2, -1, 0, 1]


@settings(max_examples=300, deadline=None)
@given(a=st.lists(key_text, max_size=20), b=st.lists(key_text, max_size=20), parts=st.sampled_from([2, 3, 7, 300]))
def test_a_key_falls_in_one_partition_whatever_the_keys_beside_it(a, b, parts):
    """The validate step splits the extract's ids and the plan's into partitions apart: a key
    must fall in the same partition in both, whatever else each frame holds (keys with and
    without fingerprints, of other widths, missing ones)."""
    ka, kb = pd.Series(a, dtype="string"), pd.Series(b, dtype="string")
    pa_, pb = keys.partitions(ka, parts), keys.partitions(kb, parts)
    assert all(p < parts for p in [*pa_, *pb])
    seen = {}
    for key, part in [*zip(a, pa_), *zip(b, pb)]:
        assert seen.setdefault(key, part) == part


def test_keys_spread_over_the_partitions():
    ids = pd.Series([f"{i:032x}" for i in range(4000)], dtype="string")
    counts = np.bincount(keys.partitions(ids, 4), minlength=4)
    assert counts.min() > 800  # about 1,000 each


def _reference_fingerprint(key: str) -> int:
    """A key's fingerprint worked out plainly, one key at a time: its bytes padded with NUL to
    a multiple of 8, each 8-byte word (little-endian) folded in by SplitMix64's finaliser, a
    word of NULs after the first skipped."""
    mask = (1 << 64) - 1

    def mix(z: int) -> int:
        z ^= z >> 30
        z = (z * 0xBF58476D1CE4E5B9) & mask
        z ^= z >> 27
        z = (z * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    data = key.encode("ascii")
    data += b"\0" * (-len(data) % 8)
    words = [int.from_bytes(data[i : i + 8], "little") for i in range(0, len(data), 8)]
    h = mix(words[0])
    for word in words[1:]:
        if word:
            h = mix(h ^ word)
    return h


@settings(max_examples=300, deadline=None)
@given(values=st.lists(st.text("ab\0xyz0123456789", min_size=1, max_size=64), min_size=1, max_size=30))
def test_fingerprints_are_the_plain_fold_of_each_key(values):
    """The vectorised fold (in place, words of NUL padding skipped by selection) gives each key
    the fingerprint the plain definition gives it, beside keys of any width."""
    got = keys.fingerprints(pd.Series(values, dtype="string"))
    assert got is not None and got.tolist() == [_reference_fingerprint(v) for v in values]
