"""The staging area: owner-only files, and the purge of what failed or halted runs left."""

from __future__ import annotations

import os
import stat
import time

import pandas as pd
import pytest

from retention import config
from retention.store.staging import RunStaging, purge_older_than


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
            os.utime(p, (ten_days_ago, ten_days_ago))
    # A file written today in an old directory keeps the run: it is still in use.
    other = RunStaging("erasure_request", "old_but_touched", root=root)
    other.write_json("crm", "plan", {})
    os.utime(other.root, (ten_days_ago, ten_days_ago))

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
