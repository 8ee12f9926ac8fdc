"""What the three benchmarks share: the scratch environment, the step runner, the figures.

A benchmark script says what it seeds, which steps it times, what it compares them with and
which ratios it prints; this module does the rest, the same way for all three:

* ``Bench(name, system, ...)``, a context manager: a scratch ``RETENTION_HOME`` and ledger
  (SQLite under it, or a PostgreSQL database), the environment every step runs in, the
  stand-ins and databases it started; on leaving, it stops the stand-ins and removes the
  scratch state (``--keep`` leaves it and says where).
* ``Bench.step(name, prepare)``: one pipeline step (``retention.runs.nightly``) in a fresh
  spawned process, as Airflow runs a task: the environment set, Airflow loaded (its first
  Connection lookup included), the adapter built and (validate) GX's start-up paid and timed
  apart, all before the clock starts. It
  returns the step's figures: wall time of the step function, peak RSS, the 1-minute load
  average before and after, the step's result and whatever ``prepare``'s ``after`` adds.
  ``prepare(step, env) -> Hooks`` must be a module-level function of the script (the spawned
  process imports it by name); it runs in the step process.
* ``Bench.repeat(n, name, prepare)``: the same step ``n`` times; ``spread`` gives min, median
  and max of any figure of the runs.
* ``Bench.standin(module, *args)``: a stand-in (``retention_dev.standins``), started and stopped.
* ``AdapterProxy`` and ``timed_erase``: for a script's adapter wrapper that times ``erase``.
* ``Postgres`` (``Bench(..., postgres=True)``): the throw-away server of
  ``scripts/postgres.sh`` (port ``RETENTION_PG_PORT``, default 54329) and databases on it.
* ``Row``, ``table``, ``peak_line``, ``machine``: the figures in one format.

Peak RSS is the step process's own high-water mark (``VmHWM`` in ``/proc/self/status``), not
``ru_maxrss``: a spawned process's ``ru_maxrss`` starts at the peak of the process that
spawned it (Linux carries it over ``execve``), i.e. at the benchmark's own peak, which holds
a stand-in's client, generated data and plan frames. Elsewhere than Linux it falls back to
``ru_maxrss``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue as queue_module
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # retention_dev/ (the stand-ins, the synthetic data) without scripts/setup.sh too
    sys.path.insert(1, str(ROOT))

ADAPTER_STEPS = ("extract", "erase", "verify")
BENCH_KEY = "benchmark-only-key-" + "0" * 32


# ---------------------------------------------------------------------- memory
def _status_mb(field_name: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _ru_maxrss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 / 1024 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, kB elsewhere


def peak_rss_mb() -> float:
    """This process's peak RSS in MB: VmHWM where there is one, else ru_maxrss (see above)."""
    hwm = _status_mb("VmHWM")
    return _ru_maxrss_mb() if hwm is None else hwm


def rss_mb() -> float | None:
    return _status_mb("VmRSS")


def load1() -> float:
    return os.getloadavg()[0]


def machine() -> str:
    a, b, c = os.getloadavg()
    return f"{os.cpu_count()} CPUs, load average {a:.2f} {b:.2f} {c:.2f}"


# A machine whose 1-minute load average exceeds this share of its CPUs shares them with other
# work: a CPU-bound figure measured then is below what the code does on a quiet machine.
LOADED_SHARE = 0.5


class LoadWatch:
    """The load average when a benchmark started, and the line that says whether the machine
    was loaded over it: ``watch = LoadWatch()`` first, ``print(watch.line())`` with the figures."""

    def __init__(self) -> None:
        self.before = os.getloadavg()

    def line(self) -> str:
        after = os.getloadavg()
        cpus = os.cpu_count() or 1
        peak = max(self.before[0], after[0])
        fmt = " ".join(f"{x:.2f}" for x in self.before), " ".join(f"{x:.2f}" for x in after)
        verdict = (
            f"LOADED machine (1-minute load {peak:.2f} on {cpus} CPUs): CPU-bound figures are below a quiet machine's"
            if peak > LOADED_SHARE * cpus
            else f"quiet machine (1-minute load at most {peak:.2f} on {cpus} CPUs)"
        )
        return f"load average before {fmt[0]}, after {fmt[1]}: {verdict}"


# ---------------------------------------------------------------------- the step process
@dataclass
class Hooks:
    """What a script adds to a step, made in the step process before the clock starts.

    ``adapter``: the adapter passed to extract, erase and verify (closed after the clock
    stops). ``after(start, end)``: called once the clock stopped (``time.perf_counter``
    values of the step's start and end), before the adapter is closed; the dict it returns
    joins the step's figures.
    """

    adapter: object | None = None
    after: Callable[[float, float], dict] | None = None


def _child(step: str, system: str, run: dict, env: dict, prepare, quiet: tuple[str, ...], queue, kwargs: dict) -> None:
    os.environ.update(env)
    import logging

    import airflow.sdk  # noqa: F401 - an Airflow task process has Airflow loaded before the task starts

    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)
    from retention.runs import nightly

    info = nightly.RunInfo.from_dict(run)
    hooks = prepare(step, env) if prepare else Hooks()
    figures: dict = {}
    # Airflow's first Connection lookup in a process (the ledger's, here) imports Airflow's
    # models when connections come from its local-file secrets backend, as this project's set-up
    # keeps them: about 0.6 s, once per task process, whatever the records. Airflow's start-up,
    # like its import above: paid and timed before the clock, and shown.
    from retention import config

    t = time.perf_counter()
    config.ledger_url()
    figures["airflow_lookup_s"] = time.perf_counter() - t
    if step == "validate":
        from retention.checks import validation

        t = time.perf_counter()
        validation.start_up()  # GX's one-time import and set-up, reported apart from the validation itself
        figures["gx_start_up_s"] = time.perf_counter() - t
    args: tuple = (info, system)
    if step in ADAPTER_STEPS:
        if hooks.adapter is None:
            raise RuntimeError(f"{step} needs an adapter: prepare() returned none")
        args += (hooks.adapter,)
    figures["rss_start_mb"] = rss_mb()
    start = time.perf_counter()
    result = getattr(nightly, step)(*args, **kwargs)
    end = time.perf_counter()
    figures.update(wall=end - start, rss_mb=peak_rss_mb(), ru_maxrss_mb=_ru_maxrss_mb(), result=result)
    if hooks.after:
        figures.update(hooks.after(start, end))
    if hooks.adapter is not None:
        hooks.adapter.close()
    queue.put(figures)


class AdapterProxy:
    """Passes everything to the real adapter (``inner``), attributes included (``erase_batches``
    too); a script overrides what it times, typically ``erase`` with ``timed_erase``."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def timed_erase(
    call: Callable[[], object],
    add_seconds: Callable[[float], None],
    on_outcome: Callable[[str, str], None] = lambda record_id, outcome: None,
    on_done: Callable[[], None] = lambda: None,
):
    """Run an adapter's ``erase`` call, timing the time spent in it whether it returns its
    outcomes (a mapping id -> outcome) or yields ``(id, outcome)`` as they arrive; for the
    latter, the seconds are those the caller spent waiting in the generator. ``on_outcome``
    sees every outcome (as a plain string); ``on_done`` runs once the call's outcomes are all
    out (or the caller stopped reading them). Returns what the call returned, or a generator
    over it."""
    t = time.perf_counter()
    try:
        result = call()
    finally:
        add_seconds(time.perf_counter() - t)
    if isinstance(result, Mapping):
        for record_id, outcome in result.items():
            on_outcome(str(record_id), str(outcome))
        on_done()
        return result

    def outcomes():
        items = iter(result)
        try:
            while True:
                t = time.perf_counter()
                try:
                    item = next(items)
                except StopIteration:
                    return
                finally:
                    add_seconds(time.perf_counter() - t)
                on_outcome(str(item[0]), str(item[1]))
                yield item
        finally:
            on_done()

    return outcomes()


# ---------------------------------------------------------------------- PostgreSQL
class Postgres:
    """The server of ``scripts/postgres.sh`` (started if need be) and databases made on it."""

    def __init__(self) -> None:
        admin = subprocess.check_output([str(ROOT / "scripts" / "postgres.sh"), "postgres"], text=True).strip()
        self.base = admin.rsplit("/", 1)[0]
        self.created: list[str] = []
        import sqlalchemy as sa

        self._admin = sa.create_engine(admin, isolation_level="AUTOCOMMIT")

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    def database(self, name: str, template: str | None = None) -> str:
        """(Re)create a database, empty or a copy of ``template``; dropped on leaving the Bench."""
        with self._admin.connect() as c:
            c.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            c.exec_driver_sql(f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else ""))
        if name not in self.created:
            self.created.append(name)
        return self.url(name)

    def version(self) -> str:
        with self._admin.connect() as c:
            return str(c.exec_driver_sql("SHOW server_version").scalar()).split()[0]

    def drop_all(self) -> None:
        with self._admin.connect() as c:
            for name in self.created:
                c.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def dispose(self) -> None:
        self._admin.dispose()


# ---------------------------------------------------------------------- the benchmark
def add_options(ap: argparse.ArgumentParser, *, repeat: int = 1, repeat_help: str = "") -> None:
    """The options every benchmark has: ``--repeat`` and ``--keep``."""
    ap.add_argument("--repeat", type=int, default=repeat, help=repeat_help or "runs of the repeated steps (medians reported)")
    ap.add_argument(
        "--keep", action="store_true", help="leave RETENTION_HOME (staging, ledger) and the benchmark's databases in place"
    )


class Bench:
    """A benchmark's scratch state and its steps. ``ledger``: "sqlite" (under RETENTION_HOME)
    or "postgres" (database ``retention_bench_<name>_ledger``; needs ``postgres=True``)."""

    def __init__(
        self,
        name: str,
        system: str,
        *,
        keep: bool = False,
        ledger: str = "sqlite",
        postgres: bool = False,
        env: dict[str, str] | None = None,
        quiet: Iterable[str] = (),
    ):
        if ledger not in ("sqlite", "postgres") or (ledger == "postgres" and not postgres):
            raise ValueError(f"ledger {ledger!r} (postgres needs postgres=True)")
        self.name, self.system, self.keep, self.ledger = name, system, keep, ledger
        self.quiet = tuple(quiet)
        self.env: dict[str, str] = {
            "RETENTION_PSEUDONYM_KEY": os.environ.get("RETENTION_PSEUDONYM_KEY") or BENCH_KEY,
            "RETENTION_KEEP_STAGING": "1",
            "GX_ANALYTICS_ENABLED": "false",
            **(env or {}),
        }
        self.work: Path | None = None
        self.pg: Postgres | None = None
        self.standins: list = []
        self.run: dict | None = None
        self._postgres = postgres

    def __enter__(self) -> Bench:
        self.work = Path(tempfile.mkdtemp(prefix=f"retention-bench-{self.name}-"))
        self.env["RETENTION_HOME"] = str(self.work)
        try:
            if self._postgres:
                self.pg = Postgres()
            if self.ledger == "postgres":
                self.ledger_url = self.pg.database(f"retention_bench_{self.name}_ledger")
            else:
                self.ledger_url = f"sqlite:///{self.work / 'ledger.db'}"
            # Pinned as the Airflow Connection too, which would win over RETENTION_LEDGER_URL.
            self.env["RETENTION_LEDGER_URL"] = self.ledger_url
            self.env["AIRFLOW_CONN_RETENTION_LEDGER"] = json.dumps(
                {"conn_type": "generic", "extra": {"sqlalchemy_url": self.ledger_url}}
            )
            os.environ.update(self.env)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for standin in reversed(self.standins):
            standin.stop(timeout=120)
        kept = []
        if self.pg is not None:
            if self.keep:
                kept.append("databases " + ", ".join(self.pg.created))
            else:
                self.pg.drop_all()
            self.pg.dispose()
        if self.keep:
            kept.append(f"RETENTION_HOME {self.work}")
            print("kept: " + "; ".join(kept), flush=True)
        else:
            shutil.rmtree(self.work, ignore_errors=True)

    @property
    def ledger_label(self) -> str:
        if self.ledger == "postgres":
            return f"PostgreSQL ({self.ledger_url.rsplit('/', 1)[1]}, same server)"
        return "SQLite under RETENTION_HOME"

    # ------------------------------------------------------------------ set-up
    def standin(self, module: str, *args: str, what: str = ""):
        """Start a stand-in (``retention_dev.standins.<module>``); it is stopped on leaving the Bench."""
        from retention_dev.standins.process import StandIn

        print(f"starting the {module} stand-in{' with ' + what if what else ''}...", flush=True)
        t = time.perf_counter()
        standin = StandIn(module, *args)
        self.standins.append(standin)
        standin.start()
        print(f"  ready in {time.perf_counter() - t:.1f}s", flush=True)
        return standin

    def fresh_ledger(self) -> None:
        """An empty ledger again (for a benchmark's next pass over fresh copies of its data):
        the PostgreSQL database created anew, or the SQLite file removed. Every task opens the
        ledger anew and migrates it, so nothing holds the old one."""
        if self.ledger == "postgres":
            self.pg.database(f"retention_bench_{self.name}_ledger")
        else:
            for suffix in ("", "-wal", "-shm", "-journal"):
                (self.work / f"ledger.db{suffix}").unlink(missing_ok=True)
        self.run = None

    def open_run(self) -> dict:
        from retention.runs import nightly

        self.run = nightly.open_run(f"bench_{self.name}", f"bench_{int(time.time())}", None, dry_run=False, max_plan_share=0.5)
        return self.run

    @property
    def info(self):
        from retention.runs import nightly

        return nightly.RunInfo.from_dict(self.run)

    # ------------------------------------------------------------------ steps
    def step(
        self,
        name: str,
        prepare=None,
        *,
        label: str | None = None,
        note: Callable[[dict], str] | None = None,
        timeout: float | None = None,
        kwargs: dict | None = None,
    ) -> dict:
        """Run one step in a fresh process; print and return its figures (see the module).
        ``timeout``: seconds after which the step process is stopped and ``StepTimeout`` raised.
        ``kwargs``: the step function's keyword arguments (``reconcile=True`` for an extract
        that reads everything, as the DAG's ``reconcile`` param asks)."""
        if self.run is None:
            self.open_run()
        label = label or name
        print(f"step {label}...", flush=True)
        before = load1()
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        p = ctx.Process(target=_child, args=(name, self.system, self.run, self.env, prepare, self.quiet, q, kwargs or {}),
                        name=f"bench-{name}")
        p.start()
        started = time.monotonic()
        try:
            while True:
                try:
                    out = q.get(timeout=5 if timeout is None else min(5, timeout))
                    break
                except queue_module.Empty:  # still working, or dead
                    if not p.is_alive():
                        raise SystemExit(f"step {name} failed (exit code {p.exitcode}); see its traceback above") from None
                    if timeout is not None and time.monotonic() - started > timeout:
                        raise StepTimeout(f"step {label} stopped after {time.monotonic() - started:.0f}s (limit {timeout:.0f}s)") from None
            p.join()
        finally:
            if p.is_alive():  # interrupted: do not leave the step running
                p.terminate()
                p.join()
        out["load"] = (before, load1())
        out["step"] = name
        extra = note(out) if note else ""
        print(f"  {label}: {describe(out)}" + (f"; {extra}" if extra else ""), flush=True)
        return out

    def repeat(self, n: int, name: str, prepare=None, *, note: Callable[[dict], str] | None = None) -> list[dict]:
        return [self.step(name, prepare, label=f"{name} {i + 1}/{n}" if n > 1 else name, note=note) for i in range(n)]


class StepTimeout(Exception):
    """A step ran longer than its ``timeout`` and was stopped."""


def describe(out: dict) -> str:
    """One step run, in the progress lines' format."""
    start = out.get("rss_start_mb")
    text = f"{out['wall']:.2f}s, peak RSS {out['rss_mb']:.0f} MB" + (f" ({start:.0f} at the start)" if start else "")
    if "gx_start_up_s" in out:
        text += f", GX start-up {out['gx_start_up_s']:.1f}s before the clock"
    if out.get("airflow_lookup_s", 0) >= 0.05:
        text += f", Airflow's first Connection lookup {out['airflow_lookup_s']:.1f}s before the clock"
    before, after = out["load"]
    return text + f", load {before:.2f} -> {after:.2f}"


# ---------------------------------------------------------------------- figures
def spread(values: Iterable[float]) -> tuple[float, float, float]:
    """(min, median, max)."""
    v = list(values)
    return min(v), statistics.median(v), max(v)


def median_run(runs: list[dict], key: Callable[[dict], float]) -> dict:
    """The run whose ``key`` is nearest the median of all runs' (an actual run, not a mix)."""
    mid = statistics.median(key(r) for r in runs)
    return min(runs, key=lambda r: abs(key(r) - mid))


@dataclass
class Row:
    """A line of the table: one step over one or more runs (wall: median; peak RSS: the highest;
    load: the lowest before and the highest after; the note starts with ``standard_note``)."""

    step: str
    runs: list[dict] | dict  # a single run may be given as is
    records: int
    note: str = ""
    wall: float = field(init=False)

    def __post_init__(self) -> None:
        if isinstance(self.runs, dict):
            self.runs = [self.runs]
        self.wall = statistics.median(r["wall"] for r in self.runs)

    @property
    def rss_mb(self) -> float:
        return max(r["rss_mb"] for r in self.runs)

    @property
    def load(self) -> tuple[float, float]:
        return min(r["load"][0] for r in self.runs), max(r["load"][1] for r in self.runs)

    @property
    def standard_note(self) -> str:
        """The runs' spread (if more than one) and GX's start-up (validate), then ``note``."""
        notes = []
        if len(self.runs) > 1:
            lo, _, hi = spread(r["wall"] for r in self.runs)
            notes.append(f"median of {len(self.runs)} ({lo:.2f}-{hi:.2f}s)")
        if "gx_start_up_s" in self.runs[0]:
            notes.append(f"GX start-up {statistics.median(r['gx_start_up_s'] for r in self.runs):.1f}s excluded")
        return "; ".join(notes + [self.note] if self.note else notes)


def table(rows: list[Row]) -> None:
    print(f"{'step':<10}{'wall s':>9}{'records':>12}{'records/s':>13}{'peak RSS MB':>13}{'load 1m':>14}  note")
    for r in rows:
        note = r.standard_note
        load = f"{r.load[0]:.2f}->{r.load[1]:.2f}"
        rate = r.records / r.wall if r.wall else float("nan")
        print(f"{r.step:<10}{r.wall:9.2f}{r.records:12,}{rate:13,.0f}{r.rss_mb:13.0f}{load:>14}  {note}")
    print(
        "(wall: the step function alone, Airflow loaded (its first Connection lookup too), adapter built and GX started before the clock; "
        f"peak RSS: the step process's own; this process's peak {peak_rss_mb():.0f} MB)"
    )


def peak_line(rows: list[Row]) -> str:
    return f"peak RSS of any step: {max(r.rss_mb for r in rows):.0f} MB (target < 1024)"
