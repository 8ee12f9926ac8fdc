"""Ticketing benchmark: 500,000 tickets, about 20% due, against the Zendesk stand-in with a
per-minute request limit.

Starts the stand-in (``tools.standins.zendesk``) with the limit, then runs the pipeline's
steps (extract, plan, validate, erase, verify), each in a fresh spawned process as Airflow runs
each task, through ``TicketingAdapter(ZendeskClient(...))`` paced at the same limit, and prints
wall time, records/s and peak RSS (``ru_maxrss`` of the step process) per step. For the
erasure it prints the requests the client sent (``ZendeskClient.stats()``), the requests per
minute against the limit, and the tickets erased per minute against what the limits allow.
Figures, not assertions.

What the limits allow (the "share" printed): the shortest time in which any client could do
this erasure without going over Zendesk's documented limits, divided by the time it took (from
the start of the first erase call to the end of the last, the pipeline's ledger work between
calls included), i.e. the tickets erased per minute over the most the limits allow per minute.

* The request limit. Every chunk of <= 100 tickets (``destroy_many`` takes at most 100 ids)
  needs three requests: the ``tickets/show_many`` status re-read right before its deletion (a
  ticket reopened since the plan is left alone), ``tickets/destroy_many`` (soft deletion, a
  background job) and ``deleted_tickets/destroy_many`` (permanent deletion, another job). Each
  of the two jobs must be seen ended by a job-status poll before its tickets count as erased;
  one ``job_statuses/show_many`` poll can report at most 30 jobs, since no more than 30 may be
  queued or running per account. So a call of the adapter with n tickets needs at least
  ``3 * ceil(n / 100) + ceil(2 * ceil(n / 100) / 30)`` requests (3.07 per 100 tickets), and the
  erasure at least the sum of those over its calls, divided by the limit, in minutes.
* The job limit: 30 jobs queued or running, each taking the stand-in's ``--job-seconds``,
  i.e. at most ``30 / job_seconds`` jobs a second, two per chunk. With 0.5-second jobs this
  allows far more than the request limit; it is printed, and used if it is the lower bound.

Earlier versions divided by ``limit / 4 * 100`` tickets a minute: four requests per chunk, the
two deletions and one poll for each. That left out the status re-read every chunk needs (the
client of the time sent five requests per chunk) and counted a poll request per job, though
one ``job_statuses/show_many`` reports on up to 30: it was neither what that client needed
nor a bound on what any client can do. At 2500 requests a minute the bound above allows
81,500 tickets a minute where the old figure allowed 62,500, so a given rate now gets a lower
share. A share of 1.0 is out of reach by design: the client keeps 2% of the limit as a
margin, and polls more often than once per 30 jobs so that job slots come free in time.

Limits (the stand-in and the client are configured alike):

* ``--limit`` (2500, Zendesk's top plan) requests per real 60-second minute, the headline;
  the rate window is not shortened.
* The incremental export is limited to 10 requests a minute in Zendesk; 500 pages would take
  50 minutes, so the benchmark raises that limit (``--incremental-limit``, default: the
  general limit) and says so. The extract figure is therefore not Zendesk's.
* Permanent user deletion is limited to 700 per 10 minutes in Zendesk; the benchmark raises
  it (``--user-deletes-per-10min``, default 10x the general limit, i.e. only the general limit
  applies) so that the requesters erased after their tickets do not take hours, and says so.

    scripts/bench.sh ticketing [--tickets 500000] [--limit 2500] [--skip-users] [--window-seconds 60]
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))

from tools.standins.process import StandIn  # noqa: E402

DAG_ID = "bench_ticketing"
EMAIL = "agent@example.org"
TOKEN = "bench-token"
STEPS = ("extract", "plan", "validate", "erase", "verify")
IDS_PER_CALL = 100  # tickets/destroy_many, deleted_tickets/destroy_many, tickets/show_many
JOB_LIMIT = 30  # queued or running background jobs per account (Zendesk's job limit)


def floor_requests(call_sizes: list[int]) -> int:
    """The fewest requests that erase tickets in calls of these sizes (see the docstring)."""
    total = 0
    for n in call_sizes:
        chunks = -(-n // IDS_PER_CALL)
        total += 3 * chunks + -(-2 * chunks // JOB_LIMIT)
    return total


# ---------------------------------------------------------------------- the pipeline's steps
class _TimedAdapter:
    """Passes everything to the real adapter; per record type, notes when its erasure began
    and ended and the client's request counters at both ends."""

    def __init__(self, inner, phases: dict):
        self._inner = inner
        self._phases = phases
        self.system = inner.system
        self.record_types = inner.record_types
        self.erase_batch = int(os.environ.get("BENCH_ERASE_BATCH") or inner.erase_batch)
        if os.environ.get("BENCH_SKIP_USERS"):  # erase and verify the tickets only
            self.record_types = tuple(rt for rt in inner.record_types if rt != "ticket_user")

    def extract(self, write, now):
        return self._inner.extract(write, now)

    def erase(self, record_type, action, record_ids):
        phase = self._phases.get(record_type)
        if phase is None:
            phase = self._phases[record_type] = {
                "start": time.perf_counter(),
                "before": self._inner.client.stats(),
                "in_erase_s": 0.0,
                "ids": 0,
                "calls": [],
                "outcomes": {},
            }
        t = time.perf_counter()
        outcomes = {}
        try:
            outcomes = self._inner.erase(record_type, action, record_ids)
            return outcomes
        finally:
            end = time.perf_counter()
            phase["in_erase_s"] += end - t
            phase["ids"] += len(record_ids)
            phase["calls"].append(len(record_ids))
            for outcome in outcomes.values():
                phase["outcomes"][outcome] = phase["outcomes"].get(outcome, 0) + 1
            phase["end"] = end
            phase["after"] = self._inner.client.stats()

    def still_present(self, record_type, record_ids):
        return self._inner.still_present(record_type, record_ids)

    def close(self):
        self._inner.close()


def _client(env: dict):
    from retention.systems.ticketing.client import ZendeskClient

    options = {}  # the client's own defaults unless the command line says otherwise
    if env["BENCH_JOBS"]:
        options["max_jobs_in_flight"] = int(env["BENCH_JOBS"])
    if env["BENCH_POLL"]:
        options["job_poll_interval"] = float(env["BENCH_POLL"])
    return ZendeskClient(
        base_url=env["BENCH_BASE_URL"],
        email=EMAIL,
        api_token=TOKEN,
        requests_per_minute=int(env["BENCH_LIMIT"]),
        incremental_per_minute=int(env["BENCH_INCREMENTAL"]),
        user_deletes_per_10min=int(env["BENCH_USER_DELETES"]),
        max_connections=int(env["BENCH_CONNECTIONS"]),
        window_seconds=float(env["BENCH_WINDOW"]),
        **options,
    )


def _step(name: str, run: dict, env: dict, queue) -> None:
    os.environ.update(env)
    logging.getLogger("retention.systems.ticketing.client").setLevel(logging.WARNING)  # one line per batch otherwise
    from retention.runs import nightly as pipeline
    from retention.systems.ticketing.adapter import TicketingAdapter

    info = pipeline.RunInfo.from_dict(run)
    extra: dict = {}
    t = time.perf_counter()
    if name in ("extract", "erase", "verify"):
        phases: dict = {}
        adapter = _TimedAdapter(TicketingAdapter(_client(env)), phases)
        t = time.perf_counter()
        result = getattr(pipeline, name)(info, "ticketing", adapter)
        end = time.perf_counter()
        client = adapter._inner.client
        extra = {
            "client": client.stats(),
            "client_settings": {
                "max_connections": client.max_connections,
                "max_jobs_in_flight": client.max_jobs_in_flight,
                "job_poll_interval": client.job_poll_interval,
            },
            "erase_batch": adapter.erase_batch,
            "phases": {
                rt: {
                    "wall": p["end"] - p["start"],
                    "in_erase_s": p["in_erase_s"],
                    "ids": p["ids"],
                    "calls": p["calls"],
                    "outcomes": p["outcomes"],
                    "requests": _diff(p["after"], p["before"]),
                }
                for rt, p in phases.items()
            },
        }
        adapter.close()
    elif name == "validate":
        from retention.checks import validation

        validation._gx()  # the one-time GX import, reported apart from the validation itself
        imported = time.perf_counter()
        result = pipeline.validate(info, "ticketing")
        extra = {"gx_import_s": imported - t}
        t = imported
        end = time.perf_counter()
    else:
        result = pipeline.plan(info, "ticketing")
        end = time.perf_counter()
    queue.put({"wall": end - t, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "result": result, **extra})


def _diff(after: dict, before: dict) -> dict:
    """Client counters sent between two ``stats()`` snapshots (absent counters are 0)."""
    fam = {k: v - before["by_family"].get(k, 0) for k, v in after["by_family"].items()}
    out = {k: after[k] - before.get(k, 0) for k in after if isinstance(after[k], (int, float))}
    out.setdefault("requests", 0)
    out["by_family"] = {k: v for k, v in sorted(fam.items()) if v}
    return out


def run_step(name: str, run: dict, env: dict) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_step, args=(name, run, env, q))
    p.start()
    while True:
        try:
            out = q.get(timeout=5)
            break
        except Exception:  # queue.Empty: still working, or dead
            if not p.is_alive():
                raise SystemExit(f"step {name} failed (exit code {p.exitcode}); see its traceback above") from None
    p.join()
    return out


# ---------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tickets", type=int, default=500_000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--limit", type=int, default=2500, help="requests per minute (per window; stand-in and client)")
    ap.add_argument(
        "--window-seconds",
        type=float,
        default=60.0,
        help="length of the rate window (60: a real minute; shorter only when a full run takes too long)",
    )
    ap.add_argument("--incremental-limit", type=int, default=None, help="incremental exports per minute (default: --limit)")
    ap.add_argument(
        "--user-deletes-per-10min", type=int, default=None, help="permanent user deletions per 10 min (default: 10x --limit)"
    )
    ap.add_argument("--job-seconds", type=float, default=0.5, help="how long a stand-in job takes")
    ap.add_argument("--connections", type=int, default=4, help="client max_connections (the hook's default: 4)")
    ap.add_argument(
        "--jobs-in-flight", type=int, default=None, help="client max_jobs_in_flight (default: the client's, 30)"
    )
    ap.add_argument(
        "--job-poll-interval", type=float, default=None, help="client job_poll_interval (default: the client's)"
    )
    ap.add_argument(
        "--skip-users",
        action="store_true",
        help="erase and verify the tickets only (the requesters stay planned but untouched): a full-size "
        "run's users take 2 requests each and verify 1 each, i.e. ~20 min more at 2500/min",
    )
    ap.add_argument("--keep", action="store_true", help="leave RETENTION_HOME (staging, ledger) in place")
    ap.add_argument(
        "--erase-batch",
        type=int,
        default=None,
        help="ids per adapter.erase call (default: TicketingAdapter.erase_batch); an experiment knob",
    )
    args = ap.parse_args()
    incremental = args.incremental_limit or args.limit
    user_deletes = args.user_deletes_per_10min or 10 * args.limit
    work = Path(tempfile.mkdtemp(prefix="retention-bench-ticketing-"))
    env = {
        "RETENTION_HOME": str(work),
        "RETENTION_PSEUDONYM_KEY": os.environ.get("RETENTION_PSEUDONYM_KEY") or "benchmark-only-key-" + "0" * 32,
        "RETENTION_KEEP_STAGING": "1",
        "PYTHONPATH": str(ROOT / "plugins"),
        "GX_ANALYTICS_ENABLED": "false",
        "BENCH_LIMIT": str(args.limit),
        "BENCH_INCREMENTAL": str(incremental),
        "BENCH_USER_DELETES": str(user_deletes),
        "BENCH_CONNECTIONS": str(args.connections),
        "BENCH_JOBS": "" if args.jobs_in_flight is None else str(args.jobs_in_flight),
        "BENCH_POLL": "" if args.job_poll_interval is None else str(args.job_poll_interval),
        "BENCH_WINDOW": str(args.window_seconds),
        "BENCH_ERASE_BATCH": str(args.erase_batch or ""),
        "BENCH_SKIP_USERS": "1" if args.skip_users else "",
        # The ledger: SQLite in RETENTION_HOME, pinned as the Airflow Connection too (which would win).
        "RETENTION_LEDGER_URL": f"sqlite:///{work / 'ledger.db'}",
        "AIRFLOW_CONN_RETENTION_LEDGER": json.dumps(
            {"conn_type": "generic", "extra": {"sqlalchemy_url": f"sqlite:///{work / 'ledger.db'}"}}
        ),
    }
    os.environ.update(env)
    win = args.window_seconds
    per = "min" if win == 60 else f"{win:g}s-window"  # the unit every rate below is given in
    shortened = (
        ""
        if win == 60
        else (
            f"SHORTENED RATE WINDOW: every limit is per {win:g} s instead of 60 s (the user-delete window is "
            f"{10 * win:g} s), i.e. {args.limit * 60 / win:,.0f} requests per real minute; rates are per window"
        )
    )
    if shortened:
        print(shortened, flush=True)
    print(
        f"starting the Zendesk stand-in with {args.tickets:,} tickets (20% due), {args.limit}/{per}, "
        f"incremental {incremental}/{per}, user deletes {user_deletes} per 10 {'min' if win == 60 else 'windows'}, "
        f"jobs {args.job_seconds}s...",
        flush=True,
    )
    t = time.perf_counter()
    standin = StandIn(
        "zendesk",
        "--port",
        "0",
        "--tickets",
        str(args.tickets),
        "--seed",
        str(args.seed),
        "--due-share",
        "0.2",
        "--requests-per-minute",
        str(args.limit),
        "--incremental-per-minute",
        str(incremental),
        "--user-deletes-per-10min",
        str(user_deletes),
        "--job-seconds",
        str(args.job_seconds),
        "--token",
        TOKEN,
        "--window-seconds",
        str(args.window_seconds),
    ).start()
    print(f"  ready in {time.perf_counter() - t:.1f}s", flush=True)
    try:
        base = standin.base_url
        env["BENCH_BASE_URL"] = base
        before = requests.get(f"{base}/_standin/stats").json()

        from retention.runs import nightly as pipeline

        run = pipeline.open_run(DAG_ID, f"bench_{int(time.time())}", None, dry_run=False, max_plan_share=0.5)
        figures = {}
        for step in STEPS:
            print(f"step {step}...", flush=True)
            figures[step] = out = run_step(step, run, env)
            print(f"  {out['wall']:.2f}s, peak RSS {out['rss_mb']:.0f} MB", flush=True)
        after = requests.get(f"{base}/_standin/stats").json()

        # ------------------------------------------------------------------ figures
        extracted = figures["extract"]["result"]["extracted"]
        n_extracted = sum(extracted.values())
        planned = figures["plan"]["result"]["planned"]
        erase = figures["erase"]
        print()
        cs = erase["client_settings"]
        print(
            f"Ticketing benchmark: {args.tickets:,} tickets (seed {args.seed}, 20% due), stand-in limit {args.limit} "
            f"requests per {win:g} s; client max_connections {cs['max_connections']}, max_jobs_in_flight "
            f"{cs['max_jobs_in_flight']}, job_poll_interval {cs['job_poll_interval']:g} s; ids per erase call "
            f"{erase['erase_batch']:,}; stand-in jobs take {args.job_seconds}s (job limit 30); "
            f"{os.cpu_count()} CPUs; ledger SQLite under RETENTION_HOME"
        )
        if shortened:
            print(shortened)
        if args.skip_users:
            print("--skip-users: the planned requesters were NOT erased or verified in this run (tickets only)")
        print(
            f"raised for the benchmark: incremental export {incremental}/{per} (Zendesk: 10/min), "
            f"permanent user deletions {user_deletes} per 10 {'min' if win == 60 else 'windows'} (Zendesk: 700 per 10 min)"
        )
        print(
            f"stand-in before: {before['tickets_live']:,} live tickets, {before['tickets_soft_deleted']:,} soft-deleted, "
            f"users {before['users']}"
        )
        print(f"extracted {extracted}; planned {planned}")
        print()
        print(f"{'step':<10}{'wall s':>9}{'records':>12}{'records/s':>13}{'peak RSS MB':>13}  note")
        for step in STEPS:
            out = figures[step]
            res = out["result"]
            note = ""
            if step == "extract":
                n = n_extracted
                note = f"{out['client']['requests']} requests"
            elif step == "erase":
                n = sum(v for k, v in res["outcomes"].items() if k in ("erased", "already_gone"))
                note = f"outcomes {res['outcomes']}"
            elif step == "verify":
                n = res["checked"]
                note = f"still present {res['still_present']}; {out['client']['requests']} requests {out['client']['by_family']}"
            else:
                n = n_extracted
                if step == "validate":
                    note = f"GX import {out['gx_import_s']:.1f}s excluded; {res['suites']} suites"
            print(f"{step:<10}{out['wall']:9.2f}{n:12,}{n / out['wall']:13,.0f}{out['rss_mb']:13.0f}  {note}")
        print()
        for rt, p in erase["phases"].items():
            req = p["requests"]
            minutes = p["wall"] / win  # in windows: real minutes unless shortened
            print(
                f"erasure of {rt}: {p['ids']:,} records in {len(p['calls'])} erase calls, {p['wall']:.1f}s (first to last "
                f"erase call, ledger work between calls included; {p['in_erase_s']:.1f}s inside the client); "
                f"outcomes {p['outcomes']}"
            )
            print(f"  requests {req['requests']:,}: {req['by_family']}")
            print(
                f"  {req['requests'] / minutes:,.0f} requests/{per} = {req['requests'] / minutes / args.limit:.0%} of the limit "
                f"({args.limit}/{per}); 429s seen by the client {req.get('throttled', 0)}, retries {req.get('retries', 0)}; "
                f"peak jobs in flight {erase['client'].get('jobs_in_flight_peak', '?')}"
            )
            if rt == "support_ticket":
                done = sum(v for k, v in p["outcomes"].items() if k in ("erased", "already_gone"))
                rate = done / minutes
                need = floor_requests(p["calls"])
                by_requests = done / (need / args.limit)
                by_jobs = JOB_LIMIT / args.job_seconds * win / 2 * IDS_PER_CALL  # two jobs per chunk of 100
                allowed = min(by_requests, by_jobs)
                print(
                    f"  the erasure needs at least {need:,} requests ({need / max(done, 1) * 100:.2f} per 100 tickets: "
                    f"show_many, destroy_many, deleted_tickets/destroy_many per 100, one job-status poll per 30 jobs); "
                    f"sent {req['requests'] / max(done, 1) * 100:.2f} per 100"
                )
                print(
                    f"  what the limits allow: {by_requests:,.0f} tickets/{per} by the request limit, {by_jobs:,.0f} by the "
                    f"job limit (30 jobs of {args.job_seconds:g}s, 2 per 100 tickets)"
                )
                print(
                    f"  {rate:,.0f} tickets/{per} erased; share of what the limits allow {rate / allowed:.2f} (target >= 0.9)"
                )
            else:
                rate = p["ids"] / minutes
                print(
                    f"  {rate:,.0f} users/{per} (2 requests each: the limit allows {args.limit / 2:,.0f}/{per}; "
                    f"Zendesk's own 700/10 min would allow 70/min)"
                )
        print()
        peak = max(figures[s]["rss_mb"] for s in STEPS)
        print(f"peak RSS of any step: {peak:.0f} MB (target < 1024)")
        print(
            f"stand-in after: {after['tickets_live']:,} live tickets, {after['tickets_soft_deleted']:,} soft-deleted, "
            f"{after['tickets_permanently_deleted']:,} permanently deleted; users permanently deleted "
            f"{after['users_permanently_deleted']:,}; 429s sent {after['throttled'] - before['throttled']}; "
            f"jobs {after['jobs']}"
        )
    finally:
        standin.stop(timeout=120)
        if args.keep:
            print(f"kept RETENTION_HOME {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
