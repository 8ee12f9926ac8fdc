"""The run-scoped staging area: data passes between tasks as Parquet files here, not XCom.

``<RETENTION_HOME>/staging/<dag_id>/<run_id>/<system>/`` holds the extract (chunked), the plan,
the quarantine list and small JSON summaries. It holds record identifiers, never names or
e-mail addresses, and is removed when the run's report is written. Identifiers are still
personal data (a subscriber hash is the MD5 of an address), so the area is the owner's only
(directories 0700, files 0600), and what a failed or halted run left behind is purged by
:func:`purge_older_than` after ``RETENTION_STAGING_KEEP_DAYS``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from retention.config import staging_root
from retention.domain.conform import conform

# Staging files live for one run: write them fast rather than small. Dictionary encoding is
# wasted on columns of unique keys, which most of these columns are.
PARQUET_OPTIONS = {"compression": "lz4", "use_dictionary": False}


log = logging.getLogger(__name__)

PRIVATE_DIR, PRIVATE_FILE = 0o700, 0o600


def _private_dir(path: Path) -> Path:
    """``path`` and its missing parents under the staging root, readable by the owner only."""
    missing = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    for p in missing:
        os.chmod(p, PRIVATE_DIR)
    return path


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    # Created owner-only before any row is in it.
    path.touch(mode=PRIVATE_FILE, exist_ok=True)
    os.chmod(path, PRIVATE_FILE)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path, **PARQUET_OPTIONS)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


class RunStaging:
    def __init__(self, dag_id: str, run_id: str, root: Path | None = None):
        self.root = (root or staging_root()) / _safe(dag_id) / _safe(run_id)

    def system_dir(self, system: str) -> Path:
        return _private_dir(self.root / system)

    # -- extract, written in chunks ------------------------------------------------------
    def reset_extract(self, system: str) -> None:
        shutil.rmtree(self.system_dir(system) / "extract", ignore_errors=True)

    def extract_writer(self, system: str) -> ExtractWriter:
        return ExtractWriter(self.system_dir(system) / "extract")

    def read_extract(self, system: str, record_type: str) -> pd.DataFrame | None:
        path = self.system_dir(system) / "extract" / record_type
        parts = sorted(path.glob("part-*.parquet")) if path.exists() else []
        if not parts:
            return None
        return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)

    # -- whole frames ---------------------------------------------------------------------
    def write_frame(self, system: str, name: str, frame: pd.DataFrame) -> Path:
        path = self.system_dir(system) / f"{name}.parquet"
        tmp = path.with_suffix(".tmp")
        _write_parquet(frame, tmp)
        tmp.replace(path)
        return path

    def read_frame(self, system: str, name: str) -> pd.DataFrame:
        path = self.system_dir(system) / f"{name}.parquet"
        if not path.exists():
            raise FileNotFoundError(f"staging has no {name} for {system}: did the earlier task of this run succeed?")
        return pd.read_parquet(path)

    def iter_batches(self, system: str, name: str, columns: list[str], batch_rows: int = 50_000) -> Iterator[pa.RecordBatch]:
        """A staged frame's ``columns`` in Arrow record batches of at most ``batch_rows`` rows:
        for a step that needs a few columns of a large frame a chunk at a time (bounded memory)."""
        path = self.system_dir(system) / f"{name}.parquet"
        if not path.exists():
            raise FileNotFoundError(f"staging has no {name} for {system}: did the earlier task of this run succeed?")
        yield from pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=columns)

    def write_json(self, system: str, name: str, data: dict) -> Path:
        path = self.system_dir(system) / f"{name}.json"
        tmp = path.with_suffix(".tmp")
        tmp.touch(mode=PRIVATE_FILE, exist_ok=True)
        os.chmod(tmp, PRIVATE_FILE)
        tmp.write_text(json.dumps(data, indent=2, default=str))
        tmp.replace(path)
        return path

    def read_json(self, system: str, name: str) -> dict | None:
        path = self.root / system / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _newest_change(run_dir: Path) -> float:
    newest = run_dir.stat().st_mtime
    for folder, _dirs, files in os.walk(run_dir):
        for name in files:
            try:
                newest = max(newest, os.stat(os.path.join(folder, name)).st_mtime)
            except FileNotFoundError:  # removed under us by the run it belongs to
                pass
    return newest


def purge_older_than(days: float, *, keep: RunStaging | None = None, root: Path | None = None) -> int:
    """Remove the staging of every run (of any DAG) that has not changed for ``days`` days: a
    failed or halted run's ids must not stay on disk for ever. ``keep`` (the calling run) is
    never removed. Returns how many runs' staging went; logs the count only."""
    root = root or staging_root()
    if not root.exists():
        return 0
    cutoff = time.time() - days * 86400
    purged = 0
    for dag_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for run_dir in sorted(p for p in dag_dir.iterdir() if p.is_dir()):
            if keep is not None and run_dir == keep.root:
                continue
            if _newest_change(run_dir) < cutoff:
                shutil.rmtree(run_dir, ignore_errors=True)
                purged += 1
    if purged:
        log.info("staging: purged what %d earlier run(s) left, unchanged for more than %g days", purged, days)
    return purged


class ExtractWriter:
    """Buffers rows per record type and writes Parquet parts of ``chunk_rows`` rows."""

    def __init__(self, directory: Path, chunk_rows: int = 200_000):
        self.directory = directory
        self.chunk_rows = chunk_rows
        self.buffers: dict[str, list[pd.DataFrame]] = {}
        self.buffered: dict[str, int] = {}
        self.parts: dict[str, int] = {}
        self.counts: dict[str, int] = {}

    def write(self, record_type: str, frame: pd.DataFrame) -> None:
        """Stage a frame of ``record_type``, conformed to the domain's schema for it."""
        frame = conform(record_type, frame)
        self.counts[record_type] = self.counts.get(record_type, 0) + len(frame)
        self.buffers.setdefault(record_type, []).append(frame)
        self.buffered[record_type] = self.buffered.get(record_type, 0) + len(frame)
        if self.buffered[record_type] >= self.chunk_rows:
            self._flush(record_type)

    def declare(self, record_type: str) -> None:
        """Record that a record type was extracted even if it has no rows."""
        self.counts.setdefault(record_type, 0)

    def _flush(self, record_type: str) -> None:
        frames = self.buffers.pop(record_type, [])
        self.buffered[record_type] = 0
        if not frames:
            return
        frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
        path = _private_dir(self.directory / record_type)
        n = self.parts.get(record_type, 0)
        self.parts[record_type] = n + 1
        _write_parquet(frame, path / f"part-{n:05d}.parquet")

    def close(self) -> dict[str, int]:
        for record_type in list(self.buffers):
            self._flush(record_type)
        return dict(self.counts)
