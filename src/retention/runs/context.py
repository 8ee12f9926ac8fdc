"""What every run knows about itself (``RunInfo``), and how a task opens the ledger.

A run is opened once (its first task): the policy is loaded and checked, the as-of time fixed,
the pseudonym key checked (present, not weak, and the key the ledger was written under), and the
run recorded in the ledger. Later tasks get the same
``RunInfo`` (a small dict through XCom, or read back from the ledger) and refuse a policy file
that changed since. Each task opens the ledger once (``task_ledger``) and passes it on.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import pandas as pd
import pyarrow as pa

from retention import config
from retention.domain.conform import conform
from retention.domain.policy import Policy, PolicyError, load_policy
from retention.domain.pseudonyms import Pseudonymizer
from retention.store.ledger import Ledger
from retention.store.staging import RunStaging
from retention.systems.base import SourceSystem

log = logging.getLogger("retention")


def open_ledger() -> Ledger:
    """The ledger (migrated to the current schema when opened)."""
    return Ledger(config.ledger_url())


@contextlib.contextmanager
def task_ledger() -> Iterator[Ledger]:
    """The ledger for one task: opened once, its connections closed when the task is done."""
    ledger = open_ledger()
    try:
        yield ledger
    finally:
        ledger.engine.dispose()


def lean_memory(*, fixed_malloc: bool = True) -> None:
    """Set a step's allocators to give back what it frees: glibc's malloc thresholds fixed
    (``_static_malloc_thresholds``; not with ``fixed_malloc=False``), and Arrow allocating from
    jemalloc (the C library's allocator where a build has no jemalloc) rather than from its
    default, mimalloc, unless ``ARROW_DEFAULT_MEMORY_POOL`` names one. A step converts its staged
    frames in several threads (the erase step: its loop and the write-ahead beside it), and
    mimalloc kept what each thread freed for that thread: the erase engine alone, on the CRM's
    plan at 250,000 and 1,000,000 contacts, peaked at 396 and 433 MB with mimalloc, 333 and 350
    MB with jemalloc."""
    if fixed_malloc:
        _static_malloc_thresholds()
    if os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
        return
    try:
        pool = pa.jemalloc_memory_pool()
    except NotImplementedError:
        pool = pa.system_memory_pool()
    if pa.default_memory_pool().backend_name != pool.backend_name:
        pa.set_memory_pool(pool)


_MALLOC_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters (glibc's malloc.h)
MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value
TRIM_THRESHOLD = 16 * 1024 * 1024


def _static_malloc_thresholds() -> None:
    """Keep glibc's mmap threshold fixed at its starting ``MMAP_THRESHOLD`` (numpy's and pandas'
    arrays come from malloc), and its trim threshold at ``TRIM_THRESHOLD``.

    By default glibc raises the mmap threshold to the size of each large block freed (up to
    32 MB): after a step's first large arrays are freed, arrays of that size come from the heap,
    and what they leave there stays with the process, so a step's memory grew with its arrays'
    size and not only with what it held at once (the ticketing plan step at a million tickets,
    step alone: 406 MB with the raised threshold, 382 MB with it fixed; 340 and 339 at 250,000).
    Fixed, a large array is mapped on its own and given back when freed. The trim threshold is
    kept well above it: at 128 KiB the heap was given back and taken again so often that rules +
    validation ran 5% slower (901,000 against 956,000 records a second), at 16 MiB as fast as
    without (948,000). The validate step keeps glibc's own: GX's work peaked 11 to 25 MB higher
    at a million members with the thresholds fixed. An operator's own setting
    (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``, or either threshold in
    ``GLIBC_TUNABLES``) wins; elsewhere than glibc nothing changes."""
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if any(os.environ.get(name) for name in _MALLOC_SETTINGS) or "malloc.mmap_threshold" in tunables or "malloc.trim_threshold" in tunables:
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)  # setting it stops glibc raising it
    mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def pseudonymizer() -> Pseudonymizer:
    return Pseudonymizer(config.pseudonym_key())


@dataclass(frozen=True)
class RunInfo:
    """What every task of a run needs to know; travels through XCom as a small dict."""

    dag_id: str
    run_id: str
    as_of: str
    policy_file: str
    policy_version: str
    policy_label: str
    dry_run: bool
    max_plan_share: float

    @classmethod
    def from_dict(cls, d: dict) -> RunInfo:
        return cls(**d)

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def as_of_ts(self) -> pd.Timestamp:
        return pd.Timestamp(self.as_of)

    @property
    def staging(self) -> RunStaging:
        return RunStaging(self.dag_id, self.run_id)

    def policy(self) -> Policy:
        """The run's policy, refusing a file that changed since the run began."""
        policy = load_policy(self.policy_file)
        if policy.version != self.policy_version:
            raise PolicyError(
                f"{self.policy_file}: policy changed during run {self.run_id} "
                f"(was {self.policy_version}, now {policy.version}); start a new run"
            )
        return policy


def open_run(dag_id: str, run_id: str, as_of: datetime | None, *, dry_run: bool, max_plan_share: float | None) -> dict:
    """Load and check the policy, fix the run's as-of time, record the run in the ledger."""
    policy_path = config.policy_file()
    policy = load_policy(policy_path)
    key = config.pseudonym_key()  # fail now, not after extracting, when the key is missing or weak
    now = datetime.now(UTC)
    # A run never enforces at a time that has not come yet.
    as_of_ts = min(pd.Timestamp(as_of or now), pd.Timestamp(now)).tz_convert("UTC")
    share = policy.plan_guard.max_share if max_plan_share is None else float(max_plan_share)
    if not 0 < share <= 1:
        raise ValueError(f"max_plan_share must be in (0, 1], got {share}")
    info = RunInfo(
        dag_id=dag_id, run_id=run_id, as_of=as_of_ts.isoformat(), policy_file=str(policy_path),
        policy_version=policy.version, policy_label=policy.version_label, dry_run=bool(dry_run), max_plan_share=share,
    )
    with task_ledger() as ledger:
        # The key the ledger's pseudonyms (holds included) were made with, or the run stops here.
        ledger.check_key(config.key_fingerprint(key))
        ledger.open_run(run_id, dag_id, as_of_ts.to_pydatetime(), policy.version, policy.version_label, bool(dry_run))
    log.info(
        "run %s: policy %s (%s, %d rules), as of %s, dry_run=%s, plan guard %.0f%%",
        run_id, policy.version, policy.version_label, len(policy.rules), info.as_of, info.dry_run, 100 * share,
    )
    return info.as_dict()


def load_run(dag_id: str, run_id: str, ledger: Ledger) -> RunInfo:
    """The run as its first task recorded it in the ledger (as-of time, policy version, dry run)."""
    row = ledger.run(run_id)
    if row is None:
        raise RuntimeError(f"run {run_id} was never opened (its first task did not succeed)")
    as_of = row["as_of"] if row["as_of"].tzinfo else row["as_of"].replace(tzinfo=UTC)
    return RunInfo(
        dag_id=dag_id, run_id=run_id, as_of=as_of.isoformat(), policy_file=str(config.policy_file()),
        policy_version=row["policy_version"], policy_label=row["policy_label"] or "", dry_run=bool(row["dry_run"]),
        max_plan_share=1.0,
    )


class Stopwatch:
    """Seconds spent per phase of a step (``lap(name)`` adds the time since the last lap)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(self.laps.get(name, 0.0) + now - self._last, 3)
        self._last = now

    def __str__(self) -> str:
        return ", ".join(f"{k} {v:.2f}s" for k, v in self.laps.items())


def extract_in_memory(adapter: SourceSystem, now: datetime) -> dict[str, pd.DataFrame]:
    """The adapter's whole extract, in memory and in the domain's schema (nothing staged): for
    ``explain`` and the policy preview, which read a system without a run."""
    parts: dict[str, list[pd.DataFrame]] = {rt: [] for rt in getattr(adapter, "record_types", ())}
    adapter.extract(lambda rt, frame: parts.setdefault(rt, []).append(conform(rt, frame)), now)
    return {rt: pd.concat(frames, ignore_index=True) for rt, frames in parts.items() if frames}
