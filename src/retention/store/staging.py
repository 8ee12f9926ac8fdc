"""The run-scoped staging area: data passes between tasks as Parquet files here, not XCom.

``<staging root>/<dag_id>/<run_id>/<system>/`` holds the extract (chunked), the plan, the
quarantine list and small JSON summaries. It holds record identifiers, never names or e-mail
addresses, and is removed when the run's report is written. Identifiers are still personal data
(a subscriber hash is the MD5 of an address), so a local area is the owner's only (directories
0700, files 0600), and what a failed or halted run left behind is purged by
:func:`purge_older_than` after ``RETENTION_STAGING_KEEP_DAYS``.

The root is an Airflow ``ObjectStoragePath``: ``RETENTION_HOME/staging`` by default, or object
storage that every worker reaches (``RETENTION_STAGING_URL=s3://bucket/prefix``, Connection
``RETENTION_STAGING_CONN_ID``) when tasks of one run land on different machines (Celery
workers). There, who may read is the bucket's policy: objects have no file modes. Parquet is
written and read through the store's file objects, a part at a time, as on local disk.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from airflow.sdk import ObjectStoragePath

from retention import config
from retention.domain.conform import conform

# Staging files live for one run: write them fast rather than small. Dictionary encoding is
# wasted on columns of unique keys, which most of these columns are.
PARQUET_OPTIONS = {"compression": "lz4", "use_dictionary": False}
# A staged frame is written in row groups of at most this many rows. A reader of a few columns a
# batch at a time (verify's ``iter_batches``) decodes a whole row group at its first batch: a
# million-row plan in one row group cost the verify step 39 MB of Arrow buffers at once (11 MB in
# row groups of 100,000), a quarter-million-row plan a quarter of that, so the step's memory grew
# with the plan. A frame read whole still has each column in one piece.
ROW_GROUP_ROWS = 100_000


log = logging.getLogger(__name__)

PRIVATE_DIR, PRIVATE_FILE = 0o700, 0o600
LOCAL = frozenset({"", "file", "local"})

Root = ObjectStoragePath | Path | str


def staging_path(root: Root | None = None) -> ObjectStoragePath:
    """The staging root as an ``ObjectStoragePath``: ``root`` when given (a local ``Path``, a URL
    or a path already), else ``RETENTION_STAGING_URL`` with ``RETENTION_STAGING_CONN_ID``."""
    if isinstance(root, ObjectStoragePath):
        return root
    if isinstance(root, Path):
        return ObjectStoragePath(f"file://{root.resolve()}")
    conn_id = config.staging_conn_id()
    path = ObjectStoragePath(root or config.staging_url(), conn_id=conn_id)
    if conn_id:
        # Resolved now: Airflow would otherwise fall back silently to the store's defaults and
        # fail later with a credentials error that does not name the Connection.
        path.fs  # noqa: B018
    return path


def _is_local(path: ObjectStoragePath) -> bool:
    return path.protocol in LOCAL


def _local(path: ObjectStoragePath) -> Path:
    return Path(path.path)


def _private_dir(path: ObjectStoragePath) -> ObjectStoragePath:
    """``path`` and its missing parents, readable by the owner only (local disk; an object store
    has no directories to make)."""
    if _is_local(path):
        local = _local(path)
        missing = [p for p in (local, *local.parents) if not p.exists()]
        local.mkdir(parents=True, exist_ok=True)
        for p in missing:
            os.chmod(p, PRIVATE_DIR)
    return path


def _private_file(path: ObjectStoragePath) -> None:
    # Created owner-only before any row is in it.
    local = _local(path)
    local.touch(mode=PRIVATE_FILE, exist_ok=True)
    os.chmod(local, PRIVATE_FILE)


def _write_parquet(frame: pd.DataFrame, path: ObjectStoragePath, order: np.ndarray | None = None) -> None:
    table = pa.Table.from_pandas(frame, preserve_index=False)

    def write(out) -> None:
        if order is None:
            pq.write_table(table, out, row_group_size=ROW_GROUP_ROWS, **PARQUET_OPTIONS)
            return
        # A row group at a time in ``order``: the frame rearranged whole would be a third copy.
        with pq.ParquetWriter(out, table.schema, **PARQUET_OPTIONS) as writer:
            for start in range(0, len(order), ROW_GROUP_ROWS):
                writer.write_table(table.take(pa.array(order[start : start + ROW_GROUP_ROWS], pa.int64())))

    order = None if order is None else np.asarray(order, dtype=np.int64)
    if order is not None and len(order) != len(frame):
        raise ValueError(f"an order of {len(order)} rows for a frame of {len(frame)}")
    if _is_local(path):
        _private_file(path)
        write(str(_local(path)))
        return
    # The store's file object uploads in parts as pyarrow writes (s3fs: multipart).
    with path.open("wb") as out:
        write(out)


def _read_parquet(path: ObjectStoragePath, columns: Sequence[str] | None = None) -> pd.DataFrame:
    if _is_local(path):
        return pd.read_parquet(_local(path), columns=columns)
    with path.open("rb") as src:  # ranged reads: the footer, then the column chunks
        return pd.read_parquet(src, columns=columns)


def _read_whole_frame(path: ObjectStoragePath, columns: Sequence[str] | None = None, categories: Sequence[str] = ()) -> pd.DataFrame:
    """A staged frame with each column in one piece. ``pd.read_parquet`` hands back a column in
    pieces of about 130,000 rows, and taking a batch's rows out of a column in pieces costs
    twenty times as much (7.7 ms against 0.3 ms for 50,000 keys of an 835,000-row plan; the
    erase step takes its batches that way). A file read whole keeps each column in one piece,
    whatever its row groups (``ROW_GROUP_ROWS``); pandas' own metadata in the file gives the
    same frame as ``pd.read_parquet``.

    ``columns``: only those of them the file has (all when ``None``). ``categories``: text
    columns of few values read as categoricals (a code per row, each value once), not as a
    text per row: a million-row plan's record types, rules and actions took 57 MB as texts.

    Read a column at a time, Arrow's buffers handed back after each: read at once, a
    million-row plan's columns cost 172 MB at the peak for a 68 MB frame, a column at a time
    116 MB (82 MB at 250,000 rows against 50)."""

    def read(source) -> pd.DataFrame:
        file = _parquet(source, categories)
        names = file.schema_arrow.names
        parts = {}
        for name in names if columns is None else [c for c in columns if c in names]:
            table = file.read(columns=[name], use_threads=False, use_pandas_metadata=True).combine_chunks()
            parts[name] = table.to_pandas()[name]
            del table
            pa.default_memory_pool().release_unused()
        return pd.DataFrame(parts, copy=False)

    if _is_local(path):
        return read(_local(path))
    with path.open("rb") as src:
        return read(src)


def _parquet(source, categories: Sequence[str] = ()) -> pq.ParquetFile:
    """A staged Parquet file, its ``categories`` (those it has) read as dictionaries (pandas
    categoricals), its column chunks read when asked for (no buffering ahead)."""
    names = pq.ParquetFile(source).schema_arrow.names
    if hasattr(source, "seek"):
        source.seek(0)
    return pq.ParquetFile(source, read_dictionary=[c for c in categories if c in names] or None, pre_buffer=False)


def _write_text(path: ObjectStoragePath, text: str) -> None:
    if _is_local(path):
        # Written beside, then renamed: a reader never sees half a summary.
        tmp = _local(path).with_suffix(".tmp")
        tmp.touch(mode=PRIVATE_FILE, exist_ok=True)
        os.chmod(tmp, PRIVATE_FILE)
        tmp.write_text(text)
        tmp.replace(_local(path))
        return
    path.write_text(text)  # one PUT: an object appears whole or not at all


def _remove_tree(path: ObjectStoragePath) -> None:
    if _is_local(path):
        shutil.rmtree(_local(path), ignore_errors=True)
        return
    try:
        path.fs.rm(path.path, recursive=True)
    except FileNotFoundError:
        pass


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


class RunStaging:
    def __init__(self, dag_id: str, run_id: str, root: Root | None = None):
        self.root = staging_path(root) / _safe(dag_id) / _safe(run_id)

    def system_dir(self, system: str) -> ObjectStoragePath:
        return _private_dir(self.root / system)

    # -- extract, written in chunks ------------------------------------------------------
    def reset_extract(self, system: str) -> None:
        _remove_tree(self.system_dir(system) / "extract")

    def extract_writer(self, system: str) -> ExtractWriter:
        return ExtractWriter(self.system_dir(system) / "extract")

    def read_extract(self, system: str, record_type: str) -> pd.DataFrame | None:
        frames = list(self.iter_extract(system, record_type))
        return pd.concat(frames, ignore_index=True) if frames else None

    def iter_extract(
        self, system: str, record_type: str, columns: Sequence[str] | None = None, rows: int | None = None
    ) -> Iterator[pd.DataFrame]:
        """The staged extract of ``record_type`` a part at a time (at most ``ExtractWriter``'s
        ``chunk_rows``, or ``rows``), in the order it was written: bounded memory for a step that
        reads it all. ``columns``: only those (all when ``None``)."""
        for part in self._extract_parts(system, record_type):
            if rows is None:
                yield _read_parquet(part, columns)
                continue
            with contextlib.ExitStack() as stack:
                source = _local(part) if _is_local(part) else stack.enter_context(part.open("rb"))
                file = _parquet(source)
                metadata = file.schema_arrow.metadata  # pandas' own: the frame's dtypes
                for batch in file.iter_batches(batch_size=rows, columns=columns, use_threads=False):
                    yield pa.Table.from_batches([batch]).replace_schema_metadata(metadata).to_pandas()

    def has_extract(self, system: str, record_type: str) -> bool:
        """Whether the extract step staged rows of ``record_type``."""
        return bool(self._extract_parts(system, record_type))

    def _extract_parts(self, system: str, record_type: str) -> list[ObjectStoragePath]:
        path = self.system_dir(system) / "extract" / record_type
        return sorted(path.glob("part-*.parquet"), key=str) if path.exists() else []

    # -- whole frames ---------------------------------------------------------------------
    def write_frame(self, system: str, name: str, frame: pd.DataFrame, order: np.ndarray | None = None) -> ObjectStoragePath:
        """Stage ``frame``; with ``order`` (positions), its rows in that order."""
        path = self.system_dir(system) / f"{name}.parquet"
        if not _is_local(path):
            _write_parquet(frame, path, order)  # one object, complete when the upload completes
            return path
        tmp = path.with_suffix(".tmp")
        _write_parquet(frame, tmp, order)
        _local(tmp).replace(_local(path))
        return path

    def frame_writer(self, system: str, name: str, row_group_rows: int | None = None) -> FrameWriter:
        """Stage a frame a part at a time (``FrameWriter``); complete once closed. ``row_group_rows``:
        smaller row groups for a frame read in many small slices (default ``ROW_GROUP_ROWS``)."""
        return FrameWriter(self.system_dir(system) / f"{name}.parquet", row_group_rows)

    def read_frame(self, system: str, name: str, columns: Sequence[str] | None = None, categories: Sequence[str] = ()) -> pd.DataFrame:
        """A staged frame whole (see :func:`_read_whole_frame` for ``columns`` and ``categories``)."""
        path = self.system_dir(system) / f"{name}.parquet"
        if not path.exists():
            raise FileNotFoundError(f"staging has no {name} for {system}: did the earlier task of this run succeed?")
        return _read_whole_frame(path, columns, categories)

    def rows(self, system: str, name: str) -> StagedRows:
        """A staged frame to be read a slice of rows at a time (the erase step's plan)."""
        path = self.system_dir(system) / f"{name}.parquet"
        if not path.exists():
            raise FileNotFoundError(f"staging has no {name} for {system}: did the earlier task of this run succeed?")
        return StagedRows(path)

    def iter_batches(self, system: str, name: str, columns: list[str], batch_rows: int = 50_000) -> Iterator[pa.RecordBatch]:
        """A staged frame's ``columns`` in Arrow record batches of at most ``batch_rows`` rows:
        for a step that needs a few columns of a large frame a chunk at a time (bounded memory).
        Decoded in this thread: Arrow's decoding threads each kept memory of their own (the CRM's
        verify step at a million contacts peaked 27 MB higher with them), and a batch of a few
        columns gains little from them. Opened as every staged read is (:func:`_parquet`), with
        no buffering ahead: Arrow's read-ahead cache (``pre_buffer``, on by default) kept the
        column chunks it had read ahead until the end of the file (in Arrow C++'s own allocator,
        out of reach of the step's), and the CRM's verify step grew by 30 MB over a million
        contacts' plan."""
        path = self.system_dir(system) / f"{name}.parquet"
        if not path.exists():
            raise FileNotFoundError(f"staging has no {name} for {system}: did the earlier task of this run succeed?")
        if _is_local(path):
            yield from _parquet(_local(path)).iter_batches(batch_size=batch_rows, columns=columns, use_threads=False)
            return
        with path.open("rb") as src:  # ranged reads: the footer, then the column chunks
            yield from _parquet(src).iter_batches(batch_size=batch_rows, columns=columns, use_threads=False)

    def write_json(self, system: str, name: str, data: dict) -> ObjectStoragePath:
        path = self.system_dir(system) / f"{name}.json"
        _write_text(path, json.dumps(data, indent=2, default=str))
        return path

    def read_json(self, system: str, name: str) -> dict | None:
        path = self.root / system / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def remove(self) -> None:
        _remove_tree(self.root)


class StagedRows:
    """A staged frame read a slice of rows at a time, in pandas, as :func:`_read_whole_frame`
    reads it whole (the same dtypes; ``categories`` as categoricals): the erase step takes its
    plan this way, a batch's rows at a time, and holds a batch rather than the plan."""

    def __init__(self, path: ObjectStoragePath):
        self.path = path
        with self._open() as file:
            self.columns: list[str] = list(file.schema_arrow.names)
            meta = file.metadata
            self.num_rows = meta.num_rows
            sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])

    @contextlib.contextmanager
    def _open(self, categories: Sequence[str] = ()) -> Iterator[pq.ParquetFile]:
        if _is_local(self.path):
            yield _parquet(_local(self.path), categories)
            return
        with self.path.open("rb") as src:  # ranged reads: the footer, then the column chunks
            yield _parquet(src, categories)

    def chunks(
        self, columns: Sequence[str], start: int = 0, stop: int | None = None, rows: int = 50_000,
        categories: Sequence[str] = (),
    ) -> Iterator[pd.DataFrame]:
        """Rows ``start`` to ``stop`` (the end when ``None``) of ``columns`` (those the frame has),
        in frames of at most ``rows`` rows, reading only the row groups that hold them."""
        stop = self.num_rows if stop is None else min(stop, self.num_rows)
        if start >= stop:
            return
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        last = int(np.searchsorted(self._starts, stop, side="left"))  # row groups [first, last)
        with self._open(categories) as file:
            metadata = file.schema_arrow.metadata  # pandas' own: the frame's dtypes
            wanted = [c for c in columns if c in self.columns]
            at = int(self._starts[first])
            batches = file.iter_batches(batch_size=rows, row_groups=range(first, last), columns=wanted, use_threads=False)
            for batch in batches:
                a, b = max(start - at, 0), min(stop - at, batch.num_rows)
                at += batch.num_rows
                if a < b:
                    table = pa.Table.from_batches([batch.slice(a, b - a)]).replace_schema_metadata(metadata)
                    yield table.to_pandas()
                if at >= stop:
                    return

    def whole(self, columns: Sequence[str] | None = None, categories: Sequence[str] = ()) -> pd.DataFrame:
        return _read_whole_frame(self.path, columns, categories)


def _newest_change(run_dir: ObjectStoragePath) -> float:
    if _is_local(run_dir):
        local = _local(run_dir)
        newest = local.stat().st_mtime
        for folder, _dirs, files in os.walk(local):
            for name in files:
                try:
                    newest = max(newest, os.stat(os.path.join(folder, name)).st_mtime)
                except FileNotFoundError:  # removed under us by the run it belongs to
                    pass
        return newest
    found = run_dir.fs.find(run_dir.path, detail=True)
    return max((_modified(info) for info in found.values()), default=0.0)


def _modified(info: dict[str, Any]) -> float:
    """An object's last change, as the store reports it (s3: LastModified; gcs: updated)."""
    for key in ("mtime", "LastModified", "last_modified", "updated"):
        value = info.get(key)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return 0.0


def purge_older_than(days: float, *, keep: RunStaging | None = None, root: Root | None = None) -> int:
    """Remove the staging of every run (of any DAG) that has not changed for ``days`` days: a
    failed or halted run's ids must not stay on disk for ever. ``keep`` (the calling run) is
    never removed. Returns how many runs' staging went; logs the count only."""
    root = staging_path(root)
    if not root.exists():
        return 0
    cutoff = time.time() - days * 86400
    purged = 0
    for dag_dir in sorted((p for p in root.iterdir() if p.is_dir()), key=str):
        for run_dir in sorted((p for p in dag_dir.iterdir() if p.is_dir()), key=str):
            if keep is not None and str(run_dir) == str(keep.root):
                continue
            if _newest_change(run_dir) < cutoff:
                _remove_tree(run_dir)
                purged += 1
    if purged:
        log.info("staging: purged what %d earlier run(s) left, unchanged for more than %g days", purged, days)
    return purged


class _Written:
    """A writer used as a context manager: closed when the block ends, abandoned (nothing left
    behind) when it ends by an error. Its subclasses have ``close`` and ``abandon``."""

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb) -> None:
        if kind is None:
            self.close()
        else:
            self.abandon()


class FrameWriter(_Written):
    """A staged frame written a part at a time, as ``RunStaging.write_frame`` writes it whole:
    one Parquet file, row groups of at most ``ROW_GROUP_ROWS`` (or ``row_group_rows``), pandas' dtypes those of the first
    part (later parts are cast to its columns). Locally the file takes its name only once closed
    (a half-written frame is never read as the whole); on an object store it is one object,
    complete when its upload completes. Use it as a context manager: an error leaves nothing
    behind."""

    def __init__(self, path: ObjectStoragePath, row_group_rows: int | None = None):
        self.path = path
        self.row_group_rows = row_group_rows or ROW_GROUP_ROWS
        self.rows = 0
        self._schema: pa.Schema | None = None
        self._writer: pq.ParquetWriter | None = None
        self._out = None
        self._target = path.with_suffix(".tmp") if _is_local(path) else path

    @property
    def schema(self) -> pa.Schema | None:
        """The columns and types of the frame (its first part's), once a part is written."""
        return self._schema

    def write(self, part: pd.DataFrame | pa.Table) -> None:
        table = part if isinstance(part, pa.Table) else pa.Table.from_pandas(part, preserve_index=False)
        if self._writer is None:
            self._schema = table.schema
            if _is_local(self._target):
                _private_file(self._target)
                self._writer = pq.ParquetWriter(str(_local(self._target)), table.schema, **PARQUET_OPTIONS)
            else:
                self._out = self._target.open("wb")
                self._writer = pq.ParquetWriter(self._out, table.schema, **PARQUET_OPTIONS)
        elif table.schema != self._schema:
            table = table.select(self._schema.names).cast(self._schema)
        for start in range(0, table.num_rows, self.row_group_rows):  # an empty part: its columns only
            self._writer.write_table(table.slice(start, self.row_group_rows))
        self.rows += table.num_rows

    def close(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        if self._out is not None:
            self._out.close()
        if _is_local(self.path):
            _local(self._target).replace(_local(self.path))
        self._writer = None

    def abandon(self) -> None:
        """Leave nothing behind (a local temporary file is removed; an upload is not completed)."""
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception:  # noqa: BLE001 - what was written is thrown away
                pass
            out = getattr(self._out, "_obj", self._out)  # Airflow wraps the store's file for lineage
            if out is not None and hasattr(out, "discard"):
                out.discard()  # fsspec: the upload is aborted, its buffer dropped ...
                out.closed = True  # ... and the file must not upload when it is closed
            elif out is not None:
                out.close()
                self._target.unlink(missing_ok=True)
            if _is_local(self._target):
                _local(self._target).unlink(missing_ok=True)
        self._writer = None


class ExtractWriter(_Written):
    """Writes each record type's rows to Parquet parts of ``chunk_rows`` rows or a little more,
    as they come: a frame written is a row group of its type's open part, nothing is buffered.
    (It buffered a part's frames in pandas and concatenated them: the CRM's extract step held
    200,000 rows of a type twice at a million contacts, 324 MB, and the 250,000-contact run's
    smaller types never reached a part, 285 MB.) A frame whose columns differ from its part's
    (one with ``UNREADABLE``, one without) starts a new part: readers take the parts in order.
    A part takes its name once closed; ``abandon`` (or leaving a ``with`` block by an error)
    leaves no partial part behind."""

    def __init__(self, directory: ObjectStoragePath, chunk_rows: int = 200_000):
        self.directory = directory
        self.chunk_rows = chunk_rows
        self.open: dict[str, FrameWriter] = {}
        self.parts: dict[str, int] = {}
        self.counts: dict[str, int] = {}

    def write(self, record_type: str, frame: pd.DataFrame) -> None:
        """Stage a frame of ``record_type``, conformed to the domain's schema for it."""
        frame = conform(record_type, frame)
        self.counts[record_type] = self.counts.get(record_type, 0) + len(frame)
        table = pa.Table.from_pandas(frame, preserve_index=False)
        del frame
        part = self.open.get(record_type)
        if part is not None and not table.schema.equals(part.schema, check_metadata=False):
            self._close(record_type)
            part = None
        if part is None:
            n = self.parts.get(record_type, 0)
            self.parts[record_type] = n + 1
            part = self.open[record_type] = FrameWriter(_private_dir(self.directory / record_type) / f"part-{n:05d}.parquet")
        part.write(table)
        if part.rows >= self.chunk_rows:
            self._close(record_type)

    def declare(self, record_type: str) -> None:
        """Record that a record type was extracted even if it has no rows."""
        self.counts.setdefault(record_type, 0)

    def _close(self, record_type: str) -> None:
        self.open.pop(record_type).close()

    def close(self) -> dict[str, int]:
        for record_type in list(self.open):
            self._close(record_type)
        return dict(self.counts)

    def abandon(self) -> None:
        """Drop the parts not yet closed (an extract that failed is read again from the start)."""
        for record_type in list(self.open):
            self.open.pop(record_type).abandon()
