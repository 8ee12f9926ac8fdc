"""Newsletter benchmark: plan and erase 1,000,000 subscribers, 10% due, against the stand-in.

Measures the stand-in's own ceiling in the same run (a bare ``requests`` client at 10
connections: pages read per second, permanent deletions per second) and runs the pipeline's
steps, each in a fresh process as Airflow would, and prints wall time, records/s, peak RSS and
the share of the ceiling. The read ceiling and the extract are measured in turns, and they,
plan and validate ``--repeat`` times (default 3): the figures are medians, each run's printed
too. Erase and verify run once. Figures, not assertions.

    scripts/bench.sh newsletter [--members 1000000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))

from tools.standins.process import StandIn  # noqa: E402

KEY = "standin-key-us0"
LIST = "bench-list"
FIELDS = "members.id,members.email_address,members.status,members.last_changed,members.timestamp_signup,total_items"


def bare_read(base: str, total: int) -> float:
    """Pages of 1000 per second, 10 threads, plain requests."""
    local = threading.local()

    def get(offset: int) -> int:
        s = getattr(local, "s", None) or requests.Session()
        local.s = s
        r = s.get(f"{base}/3.0/lists/{LIST}/members", params={"count": 1000, "offset": offset, "fields": FIELDS}, auth=("x", KEY))
        r.raise_for_status()
        return len(r.content)

    offsets = list(range(0, total, 1000))
    t = time.perf_counter()
    with ThreadPoolExecutor(10) as pool:
        list(pool.map(get, offsets))
    return len(offsets) / (time.perf_counter() - t)


def bare_delete(base: str, hashes: list[str]) -> float:
    local = threading.local()

    def delete(h: str) -> int:
        s = getattr(local, "s", None) or requests.Session()
        local.s = s
        return s.post(f"{base}/3.0/lists/{LIST}/members/{h}/actions/delete-permanent", auth=("x", KEY)).status_code

    t = time.perf_counter()
    with ThreadPoolExecutor(10) as pool:
        codes = list(pool.map(delete, hashes))
    assert set(codes) <= {204}, set(codes)
    return len(hashes) / (time.perf_counter() - t)


def due_hashes(base: str, total: int, limit: int) -> list[str]:
    out = []
    for status in ("unsubscribed", "cleaned"):
        offset = 0
        while len(out) < limit:
            r = requests.get(
                f"{base}/3.0/lists/{LIST}/members", params={"count": 1000, "offset": offset, "status": status, "fields": "members.id,total_items"},
                auth=("x", KEY),
            ).json()
            out += [m["id"] for m in r["members"]]
            offset += 1000
            if offset >= r["total_items"]:
                break
    return out[:limit]


def _step(name: str, run: dict, env: dict, queue) -> None:
    os.environ.update(env)
    import airflow.sdk  # noqa: F401 - an Airflow task process has Airflow loaded before the task starts

    from retention.runs import nightly as pipeline
    from retention.systems.newsletter.client import MailchimpClient
    from retention.systems.newsletter.adapter import NewsletterAdapter

    info = pipeline.RunInfo.from_dict(run)
    t = time.perf_counter()
    if name in ("extract", "erase", "verify"):
        adapter = NewsletterAdapter(MailchimpClient(KEY, base_url=env["BENCH_BASE_URL"] + "/3.0"), LIST)
        result = getattr(pipeline, name)(info, "newsletter", adapter)
        adapter.close()
    elif name == "validate":
        from retention.checks import validation

        validation.start_up()  # GX's one-time import and set-up, reported apart from the validation itself
        imported = time.perf_counter()
        result = pipeline.validate(info, "newsletter")
        result["gx_import_s"] = round(imported - t, 2)
        t = imported
    else:
        result = getattr(pipeline, name)(info, "newsletter")
    wall = time.perf_counter() - t
    queue.put({"wall": wall, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "result": result})


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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, default=1_000_000)
    ap.add_argument("--ceiling-deletes", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3, help="runs of the read ceiling/extract, plan and validate (medians)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="retention-bench-"))
    env = {
        "RETENTION_HOME": str(work),
        "RETENTION_PSEUDONYM_KEY": os.environ.get("RETENTION_PSEUDONYM_KEY") or "benchmark-only-key-" + "0" * 32,
        "PYTHONPATH": str(ROOT / "plugins"),
        "GX_ANALYTICS_ENABLED": "false",
    }
    os.environ.update(env)
    print(f"starting the Mailchimp stand-in with {args.members:,} members (10% due)...", flush=True)
    t = time.perf_counter()
    standin = StandIn("mailchimp", "--port", "0", "--members", str(args.members), "--seed", "7", "--list-id", LIST, "--api-key", KEY).start()
    print(f"  ready in {time.perf_counter() - t:.1f}s", flush=True)
    try:
        base = standin.base_url
        env["BENCH_BASE_URL"] = base
        total = requests.get(f"{base}/3.0/lists/{LIST}/members", params={"count": 1}, auth=("x", KEY)).json()["total_items"]
        print("ceiling (bare requests client, 10 connections):", flush=True)
        victims = due_hashes(base, total, args.ceiling_deletes)
        deletes_s = bare_delete(base, victims)
        total -= len(victims)
        print(f"  delete {deletes_s:8.1f} permanent deletions/s  ({len(victims):,} due members used)", flush=True)

        from retention.runs import nightly as pipeline

        run = pipeline.open_run("bench", "bench_run", None, dry_run=False, max_plan_share=0.5)
        # This machine's load moves single figures by a quarter: the read ceiling and the
        # extract are measured in turns, plan and validate repeated, and medians reported.
        runs: dict[str, list[dict]] = {"extract": [], "plan": [], "validate": []}
        for i in range(args.repeat):
            pages_s = bare_read(base, total)
            out = run_step("extract", run, env)
            n = sum(out["result"]["extracted"].values())
            out.update(ceiling=pages_s * 1000, n=n, share=n / out["wall"] / (pages_s * 1000))
            runs["extract"].append(out)
            print(
                f"  extract {i + 1}/{args.repeat}: ceiling {pages_s * 1000:,.0f} records/s, extract {out['wall']:.2f}s "
                f"= {n / out['wall']:,.0f}/s = {out['share']:.0%} of the ceiling",
                flush=True,
            )
        for step in ("plan", "validate"):
            for i in range(args.repeat):
                out = run_step(step, run, env)
                runs[step].append(out)
                print(f"  {step} {i + 1}/{args.repeat}: {out['wall']:.2f}s, {out['result']['seconds']}", flush=True)
        figures = {}
        for step in ("erase", "verify"):
            print(f"step {step}...", flush=True)
            figures[step] = run_step(step, run, env)

        med = statistics.median
        rows = []
        ex = runs["extract"]
        share = med(o["share"] for o in ex)
        wall = med(o["wall"] for o in ex)
        rows.append(("extract", wall, total, total / wall, max(o["rss_mb"] for o in ex),
                     f"{share:.0%} of read ceiling (median of {len(ex)}: " + ", ".join(f"{o['share']:.0%}" for o in ex) + ")"))
        for step in ("plan", "validate"):
            wall = med(o["wall"] for o in runs[step])
            note = f"(GX start-up {runs[step][0]['result']['gx_import_s']}s excluded)" if step == "validate" else ""
            rows.append((step, wall, total, total / wall, max(o["rss_mb"] for o in runs[step]), f"median of {args.repeat} {note}"))
        erase = figures["erase"]
        n = sum(v for k, v in erase["result"]["outcomes"].items() if k in ("erased", "already_gone"))
        rows.append(("erase", erase["wall"], n, n / erase["wall"], erase["rss_mb"], f"{n / erase['wall'] / deletes_s:.0%} of delete ceiling"))
        verify = figures["verify"]
        n = verify["result"]["checked"]
        rows.append(("verify", verify["wall"], n, n / verify["wall"], verify["rss_mb"], ""))
        print()
        print(f"{'step':<10}{'wall s':>9}{'records':>12}{'records/s':>13}{'peak RSS MB':>13}  share")
        for step, wall, n, rate, rss, note in rows:
            print(f"{step:<10}{wall:9.2f}{n:12,}{rate:13,.0f}{rss:13.0f}  {note}")
        compute = [
            p["result"]["seconds"]["rules"] + v["result"]["seconds"]["checks"] for p, v in zip(runs["plan"], runs["validate"])
        ]
        best = min(range(len(compute)), key=lambda i: abs(compute[i] - med(compute)))
        phases = runs["plan"][best]["result"]["rules_seconds"]
        print(
            f"\nrules + validation: {total / med(compute):,.0f} records/s (target >= 1,000,000); median of "
            + ", ".join(f"{total / c:,.0f}" for c in compute)
            + f"\n  e.g. plan {runs['plan'][best]['result']['seconds']['rules']:.2f}s ("
            + ", ".join(f"{k.replace('_', ' ')} {v:.2f}s" for k, v in phases.items())
            + f") + validation {runs['validate'][best]['result']['seconds']['checks']:.2f}s (GX suites on extract and plan, guard);"
            "\n  staging reads/writes and GX's start-up not included"
        )
        steps_s = med(p["wall"] + v["wall"] for p, v in zip(runs["plan"], runs["validate"]))
        print(f"plan + validate tasks, whole: {steps_s:.2f}s = {total / steps_s:,.0f} records/s (Parquet staging included)")
        print(f"peak RSS of any step: {max(r[4] for r in rows):.0f} MB (target < 1024)")
        stats = requests.get(f"{base}/_standin/stats").json()
        print(f"stand-in after: {stats['statuses']}, max in flight {stats['max_in_flight']}, 429s {stats['throttled']}")
    finally:
        standin.stop(timeout=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
