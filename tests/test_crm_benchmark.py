"""The CRM benchmark keeps running. Its figures are for ``scripts/bench.sh crm`` at a million
contacts; this runs it on a small CRM so that a change to what it wraps (the ledger's writes,
the adapter's erase: it times them per record type) cannot break it unnoticed, as a
write-ahead given as an Arrow table once did."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_crm_benchmark_runs_two_passes_on_a_small_crm(postgres_url):
    # postgres_url: the server scripts/postgres.sh starts, the one the benchmark uses too
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "crm_benchmark.py"), "--contacts", "2000", "--passes", "2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "whole erasure over 2 passes" in out.stdout
    assert "row counts after erasure: identical in both databases in every pass" in out.stdout
    # Every step's figures were gathered: the per-type connector and ledger times among them.
    assert "crm_event_participation" in out.stdout and "ledger" in out.stdout
