"""Newsletter benchmark: plan and erase 1,000,000 subscribers, 10% due, against the stand-in.

Measures the stand-in's own ceiling in the same run (a bare ``requests`` client at 10
connections: pages read per second, permanent deletions per second) and runs the pipeline's
steps, each in a fresh process as Airflow would (``harness``), and prints wall time,
records/s, peak RSS and the share of the ceiling. The read ceiling and the extract are
measured in turns, and they, plan and validate ``--repeat`` times (default 3): the figures are
medians, each run's printed too. Every extract is a full read (the first night's, then a
reconciliation's), each followed by the index step that builds the record index from it (in the
DAG beside plan, validate and erase). Erase and verify run once. Figures, not assertions.

    scripts/bench.sh newsletter [--members 1000000] [--repeat 3] [--ceiling-deletes 10000] [--keep]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests
from harness import Bench, Hooks, LoadWatch, Row, add_options, machine, median_run, peak_line, table

KEY = "standin-key-us0"
LIST = "bench-list"
FIELDS = "members.id,members.email_address,members.status,members.last_changed,members.timestamp_signup,total_items"


# ---------------------------------------------------------------------- the ceiling
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


# ---------------------------------------------------------------------- the pipeline's steps
def prepare(step: str, env: dict) -> Hooks:
    if step not in ("extract", "erase", "verify"):
        return Hooks()
    from retention.systems.newsletter.adapter import NewsletterAdapter
    from retention.systems.newsletter.client import MailchimpClient

    return Hooks(adapter=NewsletterAdapter(MailchimpClient(KEY, base_url=env["BENCH_BASE_URL"] + "/3.0"), LIST))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, default=1_000_000)
    ap.add_argument("--ceiling-deletes", type=int, default=10_000)
    add_options(ap, repeat=3, repeat_help="runs of the read ceiling/extract, plan and validate (medians)")
    args = ap.parse_args()
    watch = LoadWatch()
    with Bench("newsletter", "newsletter", keep=args.keep) as bench:
        standin = bench.standin(
            "mailchimp", "--port", "0", "--members", str(args.members), "--seed", "7", "--list-id", LIST, "--api-key", KEY,
            what=f"{args.members:,} members (10% due)",
        )
        base = bench.env["BENCH_BASE_URL"] = standin.base_url
        total = requests.get(f"{base}/3.0/lists/{LIST}/members", params={"count": 1}, auth=("x", KEY)).json()["total_items"]
        print("ceiling (bare requests client, 10 connections):", flush=True)
        victims = due_hashes(base, total, args.ceiling_deletes)
        deletes_s = bare_delete(base, victims)
        total -= len(victims)
        print(f"  delete {deletes_s:8.1f} permanent deletions/s  ({len(victims):,} due members used)", flush=True)

        # This machine's load moves single figures by a quarter: the read ceiling and the
        # extract are measured in turns, plan and validate repeated, and medians reported.
        extracts, indexes = [], []
        # Every extract a full read (a reconciliation after the first): what this measures.
        for i in range(args.repeat):
            pages_s = bare_read(base, total)

            def share(out: dict, ceiling: float = pages_s * 1000) -> str:
                n = sum(out["result"]["extracted"].values())
                out.update(ceiling=ceiling, n=n, share=n / out["wall"] / ceiling)
                return f"ceiling {ceiling:,.0f} records/s, extract {n / out['wall']:,.0f}/s = {out['share']:.0%} of the ceiling"

            extracts.append(bench.step("extract", prepare, label=f"extract {i + 1}/{args.repeat}", note=share,
                                       kwargs={"reconcile": True}))
            # The record index of that full read (the first, then reconciliations): its own step,
            # beside plan, validate and erase in the DAG, off the extract's critical path.
            indexes.append(bench.step("index", prepare, label=f"index {i + 1}/{args.repeat}"))
        plans = bench.repeat(args.repeat, "plan", note=lambda out: f"{out['result']['seconds']}")
        validations = bench.repeat(args.repeat, "validate", note=lambda out: f"{out['result']['seconds']}")
        erase = bench.step("erase", prepare)
        verify = bench.step("verify", prepare)

        # ------------------------------------------------------------------ figures
        med = statistics.median
        erased = sum(v for k, v in erase["result"]["outcomes"].items() if k in ("erased", "already_gone"))
        rows = [
            Row("extract", extracts, total, f"{med(o['share'] for o in extracts):.0%} of read ceiling (median of "
                f"{len(extracts)}: " + ", ".join(f"{o['share']:.0%}" for o in extracts) + ")"),
            Row("index", indexes, total, "record index of the full read (first, then reconciliations), beside plan"),
            Row("plan", plans, total),
            Row("validate", validations, total),
            Row("erase", erase, erased, f"{erased / erase['wall'] / deletes_s:.0%} of delete ceiling"),
            Row("verify", verify, verify["result"]["checked"]),
        ]
        print()
        print(f"Newsletter benchmark: {args.members:,} members (seed 7, 10% due), Mailchimp stand-in; {machine()}; "
              f"ledger {bench.ledger_label}")
        table(rows)
        compute = [p["result"]["seconds"]["rules"] + v["result"]["seconds"]["checks"] for p, v in zip(plans, validations)]
        pairs = [{"plan": p, "validate": v, "wall": c} for p, v, c in zip(plans, validations, compute)]
        best = median_run(pairs, key=lambda r: r["wall"])
        phases = best["plan"]["result"]["rules_seconds"]
        print(
            f"\nrules + validation: {total / med(compute):,.0f} records/s (target >= 1,000,000); median of "
            + ", ".join(f"{total / c:,.0f}" for c in compute)
            + f"\n  e.g. plan {best['plan']['result']['seconds']['rules']:.2f}s ("
            + ", ".join(f"{k.replace('_', ' ')} {v:.2f}s" for k, v in phases.items())
            + f") + validation {best['validate']['result']['seconds']['checks']:.2f}s (GX suites on extract and plan, guard);"
            "\n  staging reads/writes and GX's start-up not included"
        )
        steps_s = med(p["wall"] + v["wall"] for p, v in zip(plans, validations))
        print(f"plan + validate tasks, whole: {steps_s:.2f}s = {total / steps_s:,.0f} records/s (Parquet staging included)")
        print(peak_line(rows))
        stats = requests.get(f"{base}/_standin/stats").json()
        print(f"stand-in after: {stats['statuses']}, max in flight {stats['max_in_flight']}, 429s {stats['throttled']}")
        print(watch.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
