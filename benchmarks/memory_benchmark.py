"""Memory benchmark: the peak RSS of every nightly step of every system, at two sizes.

Issue 12 asks for bounded memory: every step under 1 GiB peak at a million records per
system, and flat, i.e. the 1,000,000-record figure within 10% of the 250,000-record one. For
each system and size this script seeds a scratch system (the CRM: the synthetic database on
PostgreSQL, as ``crm_benchmark``; the newsletter and the ticketing system: their stand-ins, as
``newsletter_benchmark`` and ``ticketing_benchmark``) and runs the nightly steps in order:
extract, plan, validate, erase, verify, report, each in a fresh spawned process (``harness``:
Airflow loaded, the adapter built before the clock), so each step's peak RSS (``VmHWM``) is its
own. Then it prints one table:

    system, step, peak MB at the smaller size, at the larger, their ratio, and PASS/FAIL
    (PASS: the larger figure < 1024 MB and at most 10% over the smaller one)

A whole run at a million records per system takes long on a small machine, so a run can be cut
to some systems and sizes and its figures kept in a results file (``--results``, JSON lines, one
per step run); the table is made from all the figures in the file (the latest per system, step
and size), so runs made one after another fill it in. ``--table-only`` prints the table of a
results file without running anything. Load averages are printed before and after each step
and in the table's heading: on a shared machine time figures move, memory figures much less.

The ticketing stand-in's limits are raised far beyond Zendesk's (requests, incremental exports,
user deletions; jobs of 0.05 s): the figures here are memory, not time.

    scripts/bench.sh memory [--systems crm,newsletter,ticketing] [--sizes 250000,1000000]
        [--until report] [--results FILE] [--table-only] [--keep]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import os
import queue as queue_module
import sys
import time
from pathlib import Path

from harness import Bench, Hooks, load1, machine, peak_rss_mb, rss_mb

SYSTEMS = ("crm", "newsletter", "ticketing")
STEPS = ("extract", "index", "plan", "validate", "erase", "verify", "report")
LIMIT_MB = 1024.0
FLAT = 1.10  # the larger size's peak at most 10% over the smaller's

MAILCHIMP_KEY = "standin-key-us0"
MAILCHIMP_LIST = "bench-list"
ZENDESK_EMAIL = "agent@example.org"
ZENDESK_TOKEN = "bench-token"
ZENDESK_LIMIT = 1_000_000  # requests a minute (stand-in and client): memory, not pacing, is measured


# ---------------------------------------------------------------------- the step processes
def prepare(step: str, env: dict) -> Hooks:
    """The step process's adapter: the plain one of the system, no timing wrapper."""
    if step not in ("extract", "erase", "verify"):
        return Hooks()
    system = env["BENCH_SYSTEM"]
    if system == "crm":
        import sqlalchemy as sa

        from retention.systems.crm.adapter import CrmAdapter
        from retention.systems.crm.client import CrmConnector

        return Hooks(adapter=CrmAdapter(CrmConnector(sa.create_engine(env["BENCH_CRM_URL"]))))
    if system == "newsletter":
        from retention.systems.newsletter.adapter import NewsletterAdapter
        from retention.systems.newsletter.client import MailchimpClient

        client = MailchimpClient(MAILCHIMP_KEY, base_url=env["BENCH_BASE_URL"] + "/3.0")
        return Hooks(adapter=NewsletterAdapter(client, MAILCHIMP_LIST))
    from retention.systems.ticketing.adapter import TicketingAdapter
    from retention.systems.ticketing.client import ZendeskClient

    client = ZendeskClient(
        base_url=env["BENCH_BASE_URL"], email=ZENDESK_EMAIL, api_token=ZENDESK_TOKEN,
        requests_per_minute=ZENDESK_LIMIT, incremental_per_minute=ZENDESK_LIMIT,
        user_deletes_per_10min=ZENDESK_LIMIT, deleted_list_per_minute=ZENDESK_LIMIT, max_connections=4,
    )
    return Hooks(adapter=TicketingAdapter(client))


def _report_child(system: str, run: dict, env: dict, quiet: tuple[str, ...], queue) -> None:
    """The report step (``nightly.report(run, systems)``), which ``harness`` does not run."""
    os.environ.update(env)
    import logging

    import airflow.sdk  # noqa: F401 - as in an Airflow task process

    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)
    from retention.runs import nightly

    info = nightly.RunInfo.from_dict(run)
    start_mb = rss_mb()
    t = time.perf_counter()
    result = nightly.report(info, (system,))
    wall = time.perf_counter() - t
    queue.put({"wall": wall, "rss_mb": peak_rss_mb(), "rss_start_mb": start_mb, "result": {"state": result["state"]}})


def report_step(bench: Bench) -> dict:
    print("step report...", flush=True)
    before = load1()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_report_child, args=(bench.system, bench.run, bench.env, bench.quiet, q), name="bench-report")
    p.start()
    try:
        while True:
            try:
                out = q.get(timeout=5)
                break
            except queue_module.Empty:
                if not p.is_alive():
                    raise SystemExit(f"step report failed (exit code {p.exitcode}); see its traceback above") from None
        p.join()
    finally:
        if p.is_alive():
            p.terminate()
            p.join()
    out["load"] = (before, load1())
    print(
        f"  report: {out['wall']:.2f}s, peak RSS {out['rss_mb']:.0f} MB ({out['rss_start_mb']:.0f} at the start), "
        f"load {out['load'][0]:.2f} -> {out['load'][1]:.2f}",
        flush=True,
    )
    return out


# ---------------------------------------------------------------------- seeding
def seed_crm(bench: Bench, size: int) -> str:
    import sqlalchemy as sa

    from retention.systems.crm import schema
    from retention_dev.synthetic import crm as synthetic

    url = bench.env["BENCH_CRM_URL"] = bench.pg.database(f"retention_bench_{bench.name}")
    engine = sa.create_engine(url)
    t = time.perf_counter()
    schema.create_schema(engine)
    generated = synthetic.generate(engine, contacts=size, seed=11, now=dt.datetime.now(dt.UTC), due_share=0.1)
    engine.dispose()
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as c:
        c.exec_driver_sql("VACUUM ANALYZE")
    engine.dispose()
    rows = ", ".join(f"{k} {v:,}" for k, v in generated.items())
    return f"{size:,} contacts (10% due) on PostgreSQL in {time.perf_counter() - t:.0f}s: {rows}"


def seed_newsletter(bench: Bench, size: int) -> str:
    standin = bench.standin(
        "mailchimp", "--port", "0", "--members", str(size), "--seed", "7", "--list-id", MAILCHIMP_LIST,
        "--api-key", MAILCHIMP_KEY, what=f"{size:,} members (10% due)",
    )
    bench.env["BENCH_BASE_URL"] = standin.base_url
    return f"{size:,} members (10% due), Mailchimp stand-in"


def seed_ticketing(bench: Bench, size: int) -> str:
    limit = str(ZENDESK_LIMIT)
    standin = bench.standin(
        "zendesk", "--port", "0", "--tickets", str(size), "--seed", "7", "--due-share", "0.2",
        "--requests-per-minute", limit, "--incremental-per-minute", limit, "--deleted-list-per-minute", limit,
        "--user-deletes-per-10min", limit, "--job-seconds", "0.05", "--token", ZENDESK_TOKEN,
        what=f"{size:,} tickets (20% due), limits raised",
    )
    bench.env["BENCH_BASE_URL"] = standin.base_url
    return f"{size:,} tickets (20% due), Zendesk stand-in, limits raised ({ZENDESK_LIMIT:,}/min), jobs 0.05 s"


SEED = {"crm": seed_crm, "newsletter": seed_newsletter, "ticketing": seed_ticketing}
QUIET = {
    "crm": ("retention.systems.crm.client",),
    "newsletter": (),
    "ticketing": ("retention.systems.ticketing.client",),
}


def run_system(system: str, size: int, steps: tuple[str, ...], keep: bool) -> list[dict]:
    """Seed ``system`` with ``size`` records and run ``steps`` in order; one figure per step."""
    print(f"\n=== {system}, {size:,} records; {machine()}", flush=True)
    out = []
    env = {"BENCH_SYSTEM": system}
    # The process id in the names: two runs (say, two systems) on one server do not meet.
    with Bench(f"memory_{system}_{os.getpid()}", system, keep=keep, ledger="postgres", postgres=True, env=env, quiet=QUIET[system]) as bench:
        seeded = SEED[system](bench, size)
        print(f"  seeded: {seeded}", flush=True)
        bench.open_run()
        for step in steps:
            figures = report_step(bench) if step == "report" else bench.step(step, prepare)
            out.append({
                "system": system, "size": size, "step": step, "peak_mb": round(figures["rss_mb"], 1),
                "start_mb": round(figures.get("rss_start_mb") or 0.0, 1), "wall_s": round(figures["wall"], 2),
                "load": [round(x, 2) for x in figures["load"]], "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "seeded": seeded,
            })
    return out


# ---------------------------------------------------------------------- the table
def load_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def verdict(small: float | None, large: float | None) -> str:
    if small is None or large is None:
        return "-"
    if large >= LIMIT_MB:
        return "FAIL (>= 1024 MB)"
    if large > small * FLAT:
        return "FAIL (not flat)"
    return "PASS"


def print_table(results: list[dict], sizes: tuple[int, int]) -> None:
    small, large = sizes
    latest: dict[tuple[str, str, int], dict] = {}
    for r in results:  # the file's order: later runs win
        latest[(r["system"], r["step"], r["size"])] = r
    print()
    print(f"Memory benchmark: peak RSS per step process (VmHWM), MB; PASS: < {LIMIT_MB:.0f} MB at {large:,} and "
          f"within {FLAT - 1:.0%} of the {small:,} figure; now {machine()}")
    head = f"{'system':<11}{'step':<10}{f'{small:,}':>12}{f'{large:,}':>12}{'ratio':>8}  {'verdict':<19}{'load 1m (large run)':>20}"
    print(head)
    print("-" * len(head))
    for system in SYSTEMS:
        for step in STEPS:
            a, b = latest.get((system, step, small)), latest.get((system, step, large))
            if a is None and b is None:
                continue
            pa_, pb = (a or {}).get("peak_mb"), (b or {}).get("peak_mb")
            ratio = f"{pb / pa_:.2f}" if pa_ and pb else "-"
            load = f"{b['load'][0]:.2f}->{b['load'][1]:.2f}" if b else "-"
            print(
                f"{system:<11}{step:<10}{(f'{pa_:.0f}' if pa_ else '-'):>12}{(f'{pb:.0f}' if pb else '-'):>12}{ratio:>8}  "
                f"{verdict(pa_, pb):<19}{load:>20}"
            )
    print("(one process per step, as Airflow runs each task: Airflow loaded and the adapter built before the step; "
          "the load average is the 1-minute one before -> after the step)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated: crm,newsletter,ticketing")
    ap.add_argument("--sizes", default="250000,1000000", help="two record counts per system: the smaller, the larger")
    ap.add_argument("--until", choices=STEPS, default="report", help="the last step to run (the steps before it run too)")
    ap.add_argument("--results", type=Path, default=None, help="a JSON-lines file the figures are added to; the table is made from it")
    ap.add_argument("--table-only", action="store_true", help="print the table of --results and stop")
    ap.add_argument("--only-size", type=int, default=None, help="run one of the two sizes only (the table still shows both)")
    ap.add_argument("--keep", action="store_true", help="leave the scratch state and databases")
    args = ap.parse_args()
    sizes = tuple(int(s) for s in args.sizes.split(","))
    if len(sizes) != 2 or sizes[0] >= sizes[1]:
        ap.error("--sizes: two record counts, the smaller first (e.g. 250000,1000000)")
    systems = tuple(s.strip() for s in args.systems.split(",") if s.strip())
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown:
        ap.error(f"--systems: unknown {', '.join(unknown)}; known: {', '.join(SYSTEMS)}")
    if args.table_only:
        if args.results is None:
            ap.error("--table-only needs --results")
        print_table(load_results(args.results), sizes)
        return 0
    steps = STEPS[: STEPS.index(args.until) + 1]
    run_sizes = (args.only_size,) if args.only_size else sizes
    results: list[dict] = []
    for system in systems:
        for size in run_sizes:
            figures = run_system(system, size, steps, args.keep)
            results += figures
            if args.results is not None:
                with args.results.open("a") as f:
                    for r in figures:
                        f.write(json.dumps(r) + "\n")
    print_table(load_results(args.results) if args.results is not None else results, sizes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
