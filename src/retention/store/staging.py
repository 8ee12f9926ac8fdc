"""The run-scoped staging area: data passes between tasks as Parquet files here, not XCom.

``<RETENTION_HOME>/staging/<dag_id>/<run_id>/<system>/`` holds the extract (chunked), the plan,
the quarantine list and small JSON summaries. It holds record identifiers, never names or
e-mail addresses, and is removed when the run's report is written.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from retention.config import staging_root
from retention.domain.conform import conform

# Staging files live for one run: write them fast rather than small. Dictionary encoding is
# wasted on columns of unique keys, which most of these columns are.
PARQUET_OPTIONS = {"compression": "lz4", "use_dictionary": False}


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path, **PARQUET_OPTIONS)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


class RunStaging:
    def __init__(self, dag_id: str, run_id: str, root: Path | None = None):
        self.root = (root or staging_root()) / _safe(dag_id) / _safe(run_id)

    def system_dir(self, system: str) -> Path:
        path = self.root / system
        path.mkdir(parents=True, exist_ok=True)
        return path

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

    def write_json(self, system: str, name: str, data: dict) -> Path:
        path = self.system_dir(system) / f"{name}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2, default=str))
        tmp.replace(path)
        return path

    def read_json(self, system: str, name: str) -> dict | None:
        path = self.root / system / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


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
        path = self.directory / record_type
        path.mkdir(parents=True, exist_ok=True)
        n = self.parts.get(record_type, 0)
        self.parts[record_type] = n + 1
        _write_parquet(frame, path / f"part-{n:05d}.parquet")

    def close(self) -> dict[str, int]:
        for record_type in list(self.buffers):
            self._flush(record_type)
        return dict(self.counts)
