"""Newsletter benchmark: plan and erase 1,000,000 subscribers, 10% due, against the stand-in.

First measures the stand-in's own ceiling in the same run (a bare ``requests`` client at 10
connections: pages read per second, permanent deletions per second), then runs the pipeline's
steps, each in a fresh process as Airflow would, and prints wall time, records/s, peak RSS and
the share of the ceiling. Figures, not assertions.

    scripts/bench.sh newsletter [--members 1000000]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))

from retention.standins.process import StandIn  # noqa: E402

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

    from retention import pipeline
    from retention.connectors.mailchimp import MailchimpClient
    from retention.systems.newsletter import NewsletterAdapter

    info = pipeline.RunInfo.from_dict(run)
    t = time.perf_counter()
    if name in ("extract", "erase", "verify"):
        adapter = NewsletterAdapter(MailchimpClient(KEY, base_url=env["BENCH_BASE_URL"] + "/3.0"), LIST)
        result = getattr(pipeline, name)(info, "newsletter", adapter)
        adapter.close()
    elif name == "validate":
        from retention import validation

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
        pages_s = bare_read(base, total)
        victims = due_hashes(base, total, args.ceiling_deletes)
        deletes_s = bare_delete(base, victims)
        print(f"  read   {pages_s:8.1f} pages/s  = {pages_s * 1000:,.0f} records/s", flush=True)
        print(f"  delete {deletes_s:8.1f} permanent deletions/s  ({len(victims):,} due members used)", flush=True)

        from retention import pipeline

        run = pipeline.open_run("bench", "bench_run", None, dry_run=False, max_plan_share=0.5)
        rows = []
        figures = {}
        for step in ("extract", "plan", "validate", "erase", "verify"):
            print(f"step {step}...", flush=True)
            out = run_step(step, run, env)
            figures[step] = out
            res = out["result"]
            if step == "extract":
                n = sum(res["extracted"].values())
                rate = n / out["wall"]
                share = f"{rate / (pages_s * 1000):.0%} of read ceiling"
            elif step == "erase":
                n = sum(v for k, v in res["outcomes"].items() if k in ("erased", "already_gone"))
                rate = n / out["wall"]
                share = f"{rate / deletes_s:.0%} of delete ceiling"
            elif step == "verify":
                n = res["checked"]
                rate = n / out["wall"]
                share = ""
            else:
                n = total - len(victims)
                rate = n / out["wall"]
                share = f"(GX start-up {res['gx_import_s']}s excluded)" if step == "validate" else ""
            rows.append((step, out["wall"], n, rate, out["rss_mb"], share))
            print(f"  {out['wall']:.2f}s, {n:,} records, {rate:,.0f}/s, peak RSS {out['rss_mb']:.0f} MB {share}", flush=True)
        print()
        print(f"{'step':<10}{'wall s':>9}{'records':>12}{'records/s':>13}{'peak RSS MB':>13}  share")
        for step, wall, n, rate, rss, share in rows:
            print(f"{step:<10}{wall:9.2f}{n:12,}{rate:13,.0f}{rss:13.0f}  {share}")
        judged = total - len(victims)
        rules_s = figures["plan"]["result"]["seconds"]["rules"]
        checks_s = figures["validate"]["result"]["seconds"]["checks"]
        print(
            f"\nrules + validation: {judged / (rules_s + checks_s):,.0f} records/s (target >= 1,000,000)"
            f"\n  plan {rules_s:.2f}s ("
            + ", ".join(f"{k.replace('_', ' ')} {v:.2f}s" for k, v in figures["plan"]["result"]["rules_seconds"].items())
            + f") + validation {checks_s:.2f}s (GX suites on extract and plan, guard);"
            "\n  staging reads/writes and GX's start-up not included"
        )
        steps_s = figures["plan"]["wall"] + figures["validate"]["wall"]
        print(f"plan + validate tasks, whole: {steps_s:.2f}s = {judged / steps_s:,.0f} records/s (Parquet staging included)")
        print(f"peak RSS of any step: {max(r[4] for r in rows):.0f} MB (target < 1024)")
        stats = requests.get(f"{base}/_standin/stats").json()
        print(f"stand-in after: {stats['statuses']}, max in flight {stats['max_in_flight']}, 429s {stats['throttled']}")
    finally:
        standin.stop(timeout=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
