"""The staging area: owner-only files, the purge of what failed or halted runs left, and the same
on object storage (s3:// on an S3-compatible server the test starts)."""

from __future__ import annotations

import os
import platform
import stat
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from retention import config
from retention.store import staging as staging_module
from retention.store.staging import RunStaging, purge_older_than
from s3_server import s3_server


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_staging_is_readable_by_its_owner_only(tmp_path):
    old = os.umask(0o022)  # a permissive umask, as on many servers
    try:
        staging = RunStaging("retention_nightly", "manual__1", root=tmp_path / "staging")
        staging.write_frame("newsletter", "plan", pd.DataFrame({"record_id": ["a"]}))
        staging.write_json("newsletter", "extract", {"extracted": 1})
        writer = staging.extract_writer("newsletter")
        member = {"record_id": ["a"], "status": ["unsubscribed"], "last_changed": [pd.Timestamp("2026-01-01", tz="UTC")],
                  "timestamp_signup": [pd.NaT], "has_email": [True]}
        writer.write("newsletter_member", pd.DataFrame(member))
        writer.close()
    finally:
        os.umask(old)
    paths = [p for p in (tmp_path / "staging").rglob("*")]
    assert any(p.suffix == ".parquet" for p in paths) and any(p.suffix == ".json" for p in paths)
    for p in [tmp_path / "staging", *paths]:
        assert _mode(p) & 0o077 == 0, f"{p} has mode {oct(_mode(p))}"


def test_purge_removes_only_runs_unchanged_for_longer_than_the_limit(tmp_path):
    root = tmp_path / "staging"
    runs = {name: RunStaging("retention_nightly", name, root=root) for name in ("old", "recent", "current")}
    for staging in runs.values():
        staging.write_json("crm", "plan", {"planned": 1})
    ten_days_ago = time.time() - 10 * 86400
    for staging in (runs["old"], runs["current"]):
        for p in [*staging.root.rglob("*"), staging.root]:
            os.utime(Path(p.path), (ten_days_ago, ten_days_ago))
    # A file written today in an old directory keeps the run: it is still in use.
    other = RunStaging("erasure_request", "old_but_touched", root=root)
    other.write_json("crm", "plan", {})
    os.utime(Path(other.root.path), (ten_days_ago, ten_days_ago))

    assert purge_older_than(7, keep=runs["current"], root=root) == 1
    assert not runs["old"].root.exists()
    assert runs["recent"].root.exists() and runs["current"].root.exists() and other.root.exists()
    assert purge_older_than(7, root=tmp_path / "nothing_here") == 0


@pytest.mark.parametrize("value", ["abc", "1", "0", "-3", "100000"])
def test_a_bad_staging_keep_days_is_one_clear_error(monkeypatch, value):
    monkeypatch.setenv("RETENTION_STAGING_KEEP_DAYS", value)
    with pytest.raises(config.ConfigError, match="RETENTION_STAGING_KEEP_DAYS"):
        config.staging_keep_days()


def test_the_staging_keep_days_default(monkeypatch):
    monkeypatch.delenv("RETENTION_STAGING_KEEP_DAYS", raising=False)
    assert config.staging_keep_days() == config.DEFAULT_STAGING_KEEP_DAYS == 7


def test_a_staged_frame_is_read_in_batches_of_the_columns_asked(tmp_path):
    staging = RunStaging("retention_nightly", "manual__1", root=tmp_path / "staging")
    frame = pd.DataFrame({"record_id": [str(i) for i in range(7)], "action": ["erase"] * 7, "rule_id": ["r"] * 7})
    staging.write_frame("crm", "plan", frame)
    batches = list(staging.iter_batches("crm", "plan", ["record_id", "action"], batch_rows=3))
    assert [b.num_rows for b in batches] == [3, 3, 1]
    assert all(b.schema.names == ["record_id", "action"] for b in batches)
    assert [i for b in batches for i in b.column("record_id").to_pylist()] == frame["record_id"].tolist()
    with pytest.raises(FileNotFoundError, match="staging has no plan for newsletter"):
        next(staging.iter_batches("newsletter", "plan", ["record_id"]))


def _arrow_bytes() -> int:
    """Bytes allocated in every Arrow pool (pyarrow's default, and Arrow C++'s own: a reader's
    buffers come from either)."""
    import pyarrow as pa

    pools = [pa.system_memory_pool()]
    for pool in (pa.mimalloc_memory_pool, pa.jemalloc_memory_pool):
        try:
            pools.append(pool())
        except NotImplementedError:  # a build without that allocator
            pass
    return sum(pool.bytes_allocated() for pool in pools)


def test_reading_a_staged_frame_in_batches_holds_one_batch_not_what_was_read(tmp_path):
    """A step that reads a large staged frame a batch at a time (the verify step: a million
    rows of plan) holds about a batch: Arrow's read-ahead cache, which kept the column chunks it
    had read ahead (here the whole file's at the first batch) until the end of the file, is off."""
    staging = RunStaging("retention_nightly", "manual__1", root=tmp_path / "staging")
    n, rows = 400_000, 10_000
    keys = pd.Series([os.urandom(16).hex() for _ in range(n)])  # incompressible, 6 MB as Parquet
    with staging.frame_writer("crm", "plan", row_group_rows=rows) as out:
        for start in range(0, n, 100_000):
            out.write(pd.DataFrame({"record_key": keys[start : start + 100_000].reset_index(drop=True)}))
    before, held, read = _arrow_bytes(), [], 0
    for batch in staging.iter_batches("crm", "plan", ["record_key"], batch_rows=rows):
        held.append(_arrow_bytes())
        read += batch.num_rows
        del batch
    assert read == n
    one_batch = rows * (32 + 8)
    assert max(held) - before < 3 * one_batch, f"Arrow held {max(held) - before} bytes while reading a batch at a time"


def test_a_staged_frame_is_read_as_pandas_reads_it_with_each_column_in_one_piece(tmp_path):
    staging = RunStaging("retention_nightly", "manual__1", root=tmp_path / "staging")
    n = 200_000  # more than one piece of pd.read_parquet's (about 130,000 rows)
    frame = pd.DataFrame({
        "record_id": pd.Series([str(i) for i in range(n)], dtype="string"),
        "record_type": ["crm_contact"] * n,  # plain strings
        "hold": pd.Series([None, "case 7"] * (n // 2), dtype="string"),
        "blocks": [None, "1 2"] * (n // 2),  # strings and None, as object
        "clock": pd.Series(pd.date_range("2020-01-01", periods=n, freq="min", tz="UTC")).where(lambda c: c.dt.minute != 3),
        "fallback_clock": [i % 3 == 0 for i in range(n)],
        "count": pd.Series(range(n), dtype="Int64"),
    })
    path = staging.write_frame("crm", "plan", frame)
    # Written in row groups (a reader of a few columns a batch at a time decodes one at once).
    assert pq.ParquetFile(str(path.path)).metadata.num_row_groups == 2
    read = staging.read_frame("crm", "plan")
    pd.testing.assert_frame_equal(read, pd.read_parquet(str(path.path)))
    pd.testing.assert_frame_equal(read, frame, check_dtype=False)
    arrow_backed = [c for c in read.columns if hasattr(read[c].array, "__arrow_array__") and not isinstance(read[c].dtype, pd.Int64Dtype)]
    assert {"record_id", "hold"} <= set(arrow_backed)
    assert {c: read[c].array.__arrow_array__().num_chunks for c in arrow_backed} == dict.fromkeys(arrow_backed, 1)


def test_a_staged_frame_is_read_with_the_columns_asked_and_few_valued_texts_as_categoricals(tmp_path):
    """The erase step reads only the engine's columns, record types, rules and actions as
    categoricals; a column asked for that the frame does not have is left out (a nightly plan
    has no policy_version), and the values are those of the whole read."""
    staging = RunStaging("retention_nightly", "manual__1", root=tmp_path / "staging")
    n = 150_000  # more than one row group
    frame = pd.DataFrame({
        "record_type": ["crm_contact", "crm_invoice", "crm_contact"] * (n // 3),
        "record_id": pd.Series([str(i) for i in range(n)], dtype="string"),
        "action": pd.Series(["erase", "minimise", None] * (n // 3), dtype="string"),
        "deadline": pd.Series(pd.date_range("2020-01-01", periods=n, freq="min", tz="UTC")),
    })
    staging.write_frame("crm", "plan", frame)
    whole = staging.read_frame("crm", "plan")
    read = staging.read_frame("crm", "plan", columns=("record_id", "action", "record_type", "policy_version"), categories=("record_type", "action", "hold"))
    assert list(read.columns) == ["record_id", "action", "record_type"]
    assert {c: str(read[c].dtype) for c in ("record_type", "action")} == {"record_type": "category", "action": "category"}
    assert read["record_id"].dtype == whole["record_id"].dtype
    assert read["action"].isna().sum() == n // 3
    pd.testing.assert_frame_equal(read.astype({"record_type": whole["record_type"].dtype, "action": whole["action"].dtype}), whole[list(read.columns)])
    assert read["record_id"].array.__arrow_array__().num_chunks == 1


def test_a_staged_frame_is_read_a_slice_of_rows_at_a_time_as_it_is_read_whole(tmp_path, monkeypatch):
    """The erase step reads its plan a batch's rows at a time (``RunStaging.rows``): any slice,
    across row groups, in frames of at most the rows asked, gives the rows and dtypes of the
    whole read; ``order`` stages the rows in the order given."""
    monkeypatch.setattr(staging_module, "ROW_GROUP_ROWS", 7)
    staging = RunStaging("retention_nightly", "manual__1", root=tmp_path / "staging")
    n = 40
    frame = pd.DataFrame({
        "record_type": ["crm_contact", "crm_invoice"] * (n // 2),
        "record_id": pd.Series([str(i) for i in range(n)], dtype="string"),
        "hold": pd.Series([None, "case 7", None, None] * (n // 4), dtype="string"),
        "clock": pd.Series(pd.date_range("2020-01-01", periods=n, freq="min", tz="UTC")),
    })
    order = [*range(1, n, 2), *range(0, n, 2)]  # the invoices first
    path = staging.write_frame("crm", "plan", frame, order=order)
    assert pq.ParquetFile(str(path.path)).metadata.num_row_groups == 6
    whole = staging.read_frame("crm", "plan")
    pd.testing.assert_frame_equal(whole, frame.iloc[order].reset_index(drop=True))
    rows = staging.rows("crm", "plan")
    assert (rows.num_rows, rows.columns) == (n, list(frame.columns))
    for start, stop, size in [(0, None, 5), (6, 8, 100), (7, 14, 7), (13, 29, 3), (39, 40, 1), (12, 12, 4), (35, 99, 10)]:
        chunks = list(rows.chunks(["clock", "record_id", "policy_version"], start, stop, rows=size))
        assert all(0 < len(c) <= size for c in chunks)
        read = pd.concat(chunks, ignore_index=True) if chunks else whole.iloc[:0][["clock", "record_id"]]
        pd.testing.assert_frame_equal(read, whole[["clock", "record_id"]].iloc[start:stop].reset_index(drop=True))
    types = pd.concat(rows.chunks(["record_type"], 10, 30, categories=["record_type"]), ignore_index=True)["record_type"]
    assert isinstance(types.dtype, pd.CategoricalDtype) and types.astype(str).tolist() == whole["record_type"].iloc[10:30].tolist()
    pd.testing.assert_frame_equal(rows.whole(), whole)
    with pytest.raises(ValueError, match="an order of 3 rows for a frame of 40"):
        staging.write_frame("crm", "other", frame, order=[0, 1, 2])
    with pytest.raises(FileNotFoundError, match="staging has no quarantine for crm"):
        staging.rows("crm", "quarantine")


def _parts_frame(n: int) -> pd.DataFrame:
    return pd.DataFrame({
        "record_id": pd.Series([str(i) for i in range(n)], dtype="string"),
        "hold": pd.Series([None, "case 7", None] * (n // 3) + [None] * (n % 3), dtype="string"),
        "clock": pd.Series(pd.date_range("2020-01-01", periods=n, freq="min", tz="UTC")),
        "fallback_clock": [i % 2 == 0 for i in range(n)],
    })


def test_a_frame_staged_a_part_at_a_time_reads_as_the_frame_staged_whole(tmp_path, monkeypatch):
    """The plan step stages the frames the engine judged and the plan a part at a time
    (``RunStaging.frame_writer``): the same rows, dtypes and row groups as ``write_frame``, a
    part whose column is all missing cast to the first part's types, an empty part adding
    nothing; the file appears only once closed, and an error leaves nothing behind."""
    monkeypatch.setattr(staging_module, "ROW_GROUP_ROWS", 7)
    staging = RunStaging("retention_nightly", "manual__1", root=tmp_path / "staging")
    frame = _parts_frame(30)
    staging.write_frame("crm", "whole", frame)
    with staging.frame_writer("crm", "parts") as out:
        for start, stop in [(0, 12), (12, 12), (12, 13), (13, 30)]:
            part = frame.iloc[start:stop]
            if start == 13:
                part = part.assign(hold=None)  # all missing: no type of its own
            out.write(part)
            assert not (staging.system_dir("crm") / "parts.parquet").exists()
    assert out.rows == 30
    expected = frame.assign(hold=frame["hold"].where(frame.index < 13, None))
    pd.testing.assert_frame_equal(staging.read_frame("crm", "parts"), expected)
    pd.testing.assert_frame_equal(staging.read_frame("crm", "whole").iloc[:13], expected.iloc[:13])
    whole = pq.ParquetFile(str((staging.system_dir("crm") / "whole.parquet").path)).metadata
    parts = pq.ParquetFile(str((staging.system_dir("crm") / "parts.parquet").path)).metadata
    assert max(parts.row_group(i).num_rows for i in range(parts.num_row_groups)) == 7 == whole.row_group(0).num_rows
    with pytest.raises(RuntimeError, match="stopped"):
        with staging.frame_writer("crm", "broken") as out:
            out.write(frame)
            raise RuntimeError("stopped")
    assert sorted(p.name for p in staging.system_dir("crm").iterdir()) == ["parts.parquet", "whole.parquet"]


# --- on object storage ---------------------------------------------------------------------------

MEMBER = {"status": "unsubscribed", "last_changed": pd.Timestamp("2026-01-01", tz="UTC"), "timestamp_signup": pd.NaT, "has_email": True}


def _members(ids) -> pd.DataFrame:
    return pd.DataFrame([{"record_id": i, **MEMBER} for i in ids])


@pytest.fixture(scope="module")
def s3():
    with s3_server() as store:
        yield store


@pytest.fixture
def s3_staging(s3, monkeypatch, request):
    """RETENTION_STAGING_URL on the S3 server, reached through an ``aws`` Connection."""
    prefix = f"runs-{request.node.name[:40]}".replace("[", "_").replace("]", "_")
    monkeypatch.setenv("AIRFLOW_CONN_STAGING_STORE", s3.connection())
    monkeypatch.setenv("RETENTION_STAGING_URL", f"s3://{s3.bucket}/{prefix}")
    monkeypatch.setenv("RETENTION_STAGING_CONN_ID", "staging_store")
    return prefix


def test_a_run_stages_through_object_storage(s3, s3_staging, retention_home):
    staging = RunStaging("retention_nightly", "scheduled__2026-12-01")
    assert (staging.root.protocol, staging.root.conn_id) == ("s3", "staging_store")
    assert staging.root.path == f"{s3.bucket}/{s3_staging}/retention_nightly/scheduled__2026-12-01"
    staging.reset_extract("newsletter")  # nothing there yet: no error
    writer = staging.extract_writer("newsletter")
    writer.chunk_rows = 2
    writer.write("newsletter_member", _members(["a", "b"]))
    writer.write("newsletter_member", _members(["c"]))
    assert writer.close() == {"newsletter_member": 3}
    staging.write_frame("newsletter", "plan", pd.DataFrame({"record_id": ["b"], "action": ["erase"]}))
    staging.write_json("newsletter", "extract", {"extracted": 3})

    # Another worker (another process, its own RETENTION_HOME) reads what this one wrote.
    keys = s3.keys(s3_staging)
    run = f"{s3.bucket}/{s3_staging}/retention_nightly/scheduled__2026-12-01/newsletter/"
    assert [k.removeprefix(run) for k in keys] == [
        "extract.json", "extract/newsletter_member/part-00000.parquet", "extract/newsletter_member/part-00001.parquet", "plan.parquet"]
    assert not (retention_home / "staging").exists() or not any((retention_home / "staging").rglob("*.parquet"))
    again = RunStaging("retention_nightly", "scheduled__2026-12-01")
    assert again.read_extract("newsletter", "newsletter_member")["record_id"].tolist() == ["a", "b", "c"]
    assert again.read_extract("newsletter", "crm_contact") is None
    assert again.read_frame("newsletter", "plan").to_dict("list") == {"record_id": ["b"], "action": ["erase"]}
    part = again.read_frame("newsletter", "plan", columns=["action", "hold"], categories=["action"])
    assert part["action"].astype(str).tolist() == ["erase"] and list(part.columns) == ["action"]
    staged = again.rows("newsletter", "plan")
    assert [c.to_dict("list") for c in staged.chunks(["record_id"], 0, 1)] == [{"record_id": ["b"]}]
    assert again.read_json("newsletter", "extract") == {"extracted": 3}
    assert again.read_json("newsletter", "validation") is None
    with pytest.raises(FileNotFoundError, match="staging has no quarantine for newsletter"):
        again.read_frame("newsletter", "quarantine")

    again.reset_extract("newsletter")
    assert again.read_extract("newsletter", "newsletter_member") is None
    again.remove()
    assert s3.keys(s3_staging) == []


def test_purge_on_object_storage_removes_only_runs_unchanged_for_longer_than_the_limit(s3, s3_staging, monkeypatch):
    runs = {name: RunStaging("retention_nightly", name) for name in ("old", "current")}
    for staging in runs.values():
        staging.write_json("crm", "plan", {"planned": 1})
    # Objects cannot be aged: the clock is moved instead, ten days on.
    now = time.time()
    monkeypatch.setattr(staging_module.time, "time", lambda: now + 10 * 86400)
    assert purge_older_than(7, keep=runs["current"]) == 1
    assert [k.split("/")[-3] for k in s3.keys(s3_staging)] == ["current"]
    monkeypatch.setattr(staging_module.time, "time", lambda: now)
    assert purge_older_than(7) == 0
    assert purge_older_than(7, root=f"s3://{s3.bucket}/nothing_here") == 0


@pytest.mark.parametrize("url", ["bucket/prefix", "s3://", "://x", "s3:///"])
def test_a_bad_staging_url_is_one_clear_error(monkeypatch, url):
    monkeypatch.setenv("RETENTION_STAGING_URL", url)
    with pytest.raises(config.ConfigError, match="RETENTION_STAGING_URL .*expected a URL such as s3://bucket/prefix"):
        RunStaging("retention_nightly", "manual__1")


def test_the_staging_url_defaults_to_the_local_directory(monkeypatch, retention_home):
    monkeypatch.delenv("RETENTION_STAGING_URL", raising=False)
    staging = RunStaging("retention_nightly", "manual__1")
    staging.write_json("crm", "plan", {})
    assert (retention_home / "staging" / "retention_nightly" / "manual__1" / "crm" / "plan.json").exists()


def test_a_staging_connection_that_does_not_exist_is_one_clear_error(monkeypatch, retention_home):
    monkeypatch.setenv("RETENTION_STAGING_URL", "s3://bucket/prefix")
    monkeypatch.setenv("RETENTION_STAGING_CONN_ID", "no_such_store")
    monkeypatch.delenv("AIRFLOW_CONN_NO_SUCH_STORE", raising=False)
    with pytest.raises(config.ConfigError, match=r"^connection 'no_such_store' \(the staging store's\): not defined or unreadable$"):
        RunStaging("retention_nightly", "manual__1")


def test_a_staged_frame_is_read_in_batches_from_object_storage(s3, s3_staging):
    staging = RunStaging("retention_nightly", "manual__1")
    frame = pd.DataFrame({"record_id": [str(i) for i in range(5)], "action": ["erase"] * 5})
    staging.write_frame("crm", "plan", frame)
    batches = list(staging.iter_batches("crm", "plan", ["record_id"], batch_rows=2))
    assert [b.num_rows for b in batches] == [2, 2, 1]
    assert [i for b in batches for i in b.column("record_id").to_pylist()] == frame["record_id"].tolist()


def test_a_frame_is_staged_a_part_at_a_time_on_object_storage(s3, s3_staging):
    staging = RunStaging("retention_nightly", "manual__1")
    frame = _parts_frame(10)
    with staging.frame_writer("crm", "plan") as out:
        out.write(frame.iloc[:4])
        out.write(frame.iloc[4:])
    pd.testing.assert_frame_equal(staging.read_frame("crm", "plan"), frame)
    with pytest.raises(RuntimeError, match="stopped"):
        with staging.frame_writer("crm", "broken") as out:
            out.write(frame)
            raise RuntimeError("stopped")
    assert [k for k in s3.keys(s3_staging) if "broken" in k] == []


def test_steps_allocate_arrow_memory_from_jemalloc_unless_told_otherwise(monkeypatch):
    """A step's Arrow buffers come from jemalloc (the C library's allocator where a build has
    none), not mimalloc, which kept what each thread freed; ``ARROW_DEFAULT_MEMORY_POOL`` set
    by the operator is left alone."""
    import pyarrow as pa

    from retention.runs.context import lean_memory

    before = pa.default_memory_pool()
    try:
        pa.set_memory_pool(pa.mimalloc_memory_pool())
        monkeypatch.setenv("ARROW_DEFAULT_MEMORY_POOL", "mimalloc")
        lean_memory()
        assert pa.default_memory_pool().backend_name == "mimalloc"
        monkeypatch.delenv("ARROW_DEFAULT_MEMORY_POOL")
        lean_memory()
        try:
            expected = pa.jemalloc_memory_pool().backend_name
        except NotImplementedError:  # a build without jemalloc
            expected = "system"
        assert pa.default_memory_pool().backend_name == expected
    finally:
        pa.set_memory_pool(before)


_MALLOC_PROBE = """
import sys, numpy as np
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
if sys.argv[1] == "lean":
    from retention.runs.context import lean_memory
    lean_memory()
big = np.ones(16 * 2**20 // 8)
del big  # a large block freed: by default glibc raises its mmap threshold to its size
start = rss()
held, kept = [], []
for _ in range(10):  # each array with a small one after it: a freed array is not the heap's top
    held.append(np.ones(8 * 2**20 // 8))
    kept.append(np.ones(1000))
del held
print(round(rss() - start))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_a_step_gives_back_the_large_arrays_it_frees():
    """After ``lean_memory`` a step's large arrays are given back when freed (glibc's mmap
    threshold kept fixed); without it, once a large block was freed, arrays of that size came
    from the heap and stayed with the process (80 MB here)."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")}
    kept = {
        how: int(subprocess.run([sys.executable, "-c", _MALLOC_PROBE, how], env=env, capture_output=True, text=True, check=True).stdout)
        for how in ("plain", "lean")
    }
    assert kept["plain"] >= 40, kept  # the probe shows what it is for
    assert kept["lean"] <= 8, kept


def test_an_operators_malloc_setting_wins(monkeypatch):
    """``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_`` or either threshold in
    ``GLIBC_TUNABLES``: ``lean_memory`` leaves glibc's malloc as the operator set it."""
    import ctypes

    from retention.runs import context

    calls = []

    class FakeLibc:
        def mallopt(self, option, value):
            calls.append((option, value))
            return 1

    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeLibc())
    for name, value in (("MALLOC_MMAP_THRESHOLD_", "65536"), ("MALLOC_TRIM_THRESHOLD_", "65536"), ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=65536")):
        monkeypatch.setenv(name, value)
        context._static_malloc_thresholds()
        monkeypatch.delenv(name)
    assert calls == []
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.check=0")  # another tunable: not a threshold
    context._static_malloc_thresholds()
    assert calls == [(-3, 128 * 1024), (-1, 16 * 2**20)]
    calls.clear()
    monkeypatch.delenv("GLIBC_TUNABLES")
    context.lean_memory(fixed_malloc=False)  # the validate step: glibc's own
    assert calls == []


def test_the_extract_is_written_as_it_comes_in_parts_of_chunk_rows(tmp_path):
    """Each frame is a row group of its type's open part (nothing buffered); a part closes at
    ``chunk_rows`` or more; a frame with other columns (one flagging unreadable values) starts a
    new part. Read back, the rows and dtypes are those of the frames concatenated, as the writer
    that buffered them staged them; an empty type still has its columns."""
    from retention.domain.conform import conform
    from retention.domain.records import UNREADABLE

    staging = RunStaging("retention_nightly", "manual__parts", root=tmp_path / "staging")
    writer = staging.extract_writer("newsletter")
    writer.chunk_rows = 4
    frames = [
        _members(["a", "b"]),
        _members(["c"]),
        _members(["d", "e"]).assign(**{UNREADABLE: [None, "last_changed"]}),
        _members(["f"]),
        _members(["x"]).iloc[:0],
        _members(["g", "h", "i", "j", "k"]),
    ]
    for frame in frames:
        writer.write("newsletter_member", frame)
    assert writer.close() == {"newsletter_member": 11}
    parts = sorted(p.name for p in (Path(staging.root.path) / "newsletter" / "extract" / "newsletter_member").iterdir())
    # a+b+c (the next frame's columns differ), d+e (then f has none), f+g..k (at 4 rows or more)
    assert parts == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert [pq.ParquetFile(Path(staging.root.path) / "newsletter" / "extract" / "newsletter_member" / p).metadata.num_rows for p in parts] == [3, 2, 6]
    expected = pd.concat([conform("newsletter_member", f) for f in frames], ignore_index=True)
    got = staging.read_extract("newsletter", "newsletter_member")
    pd.testing.assert_frame_equal(got[expected.columns], expected, check_dtype=True)
    sliced = pd.concat(list(staging.iter_extract("newsletter", "newsletter_member", rows=2)), ignore_index=True)
    pd.testing.assert_frame_equal(sliced[expected.columns], expected, check_dtype=True)

    staging.reset_extract("newsletter")
    with staging.extract_writer("newsletter") as writer:
        writer.write("newsletter_member", _members(["x"]).iloc[:0])
    empty = staging.read_extract("newsletter", "newsletter_member")
    assert len(empty) == 0 and list(empty.columns) == [c for c in expected.columns if c != UNREADABLE]


def test_an_extract_that_fails_leaves_no_part_half_written(tmp_path):
    staging = RunStaging("retention_nightly", "manual__abandon", root=tmp_path / "staging")
    with pytest.raises(RuntimeError, match="the source went away"):
        with staging.extract_writer("newsletter") as writer:
            writer.chunk_rows = 2
            writer.write("newsletter_member", _members(["a", "b"]))  # a part, closed
            writer.write("newsletter_member", _members(["c"]))  # open
            raise RuntimeError("the source went away")
    folder = Path(staging.root.path) / "newsletter" / "extract" / "newsletter_member"
    assert sorted(p.name for p in folder.iterdir()) == ["part-00000.parquet"]
    assert staging.read_extract("newsletter", "newsletter_member")["record_id"].tolist() == ["a", "b"]
    staging.reset_extract("newsletter")
    with staging.extract_writer("newsletter") as writer:
        writer.write("newsletter_member", _members(["x"]).iloc[:0])
    assert staging.has_extract("newsletter", "newsletter_member")
