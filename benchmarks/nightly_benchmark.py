"""Nightly benchmark: what a night costs at a million records per system, the night after a first.

Per system (``--systems``, default all three; ``--records`` each, default 1,000,000):

1. **Set-up.** The CRM is generated into PostgreSQL (``retention_dev.synthetic.crm``, COPY);
   Mailchimp's and Zendesk's stand-ins generate their data into a state file. ``--due-share``
   (default 1%) is due at first: a system whose first backlog was cleared long ago, so that the
   first night's erasure stays short (``scripts/bench.sh newsletter|crm|ticketing`` measure
   large erasures).
2. **Night 1, a first full run,** as of ``--clock-step-hours`` (24) before night 2: the pipeline's
   own steps, ``retention.runs.nightly``'s ``open_run``, ``extract``, ``index``, ``plan``,
   ``validate``, ``erase``, ``verify``, ``report``, in that order (the DAG runs ``index`` beside
   plan, validate and erase: the sum of the steps is an upper bound of the night), each but ``open_run``/``report`` in a fresh
   process as Airflow runs a task (``harness.Bench.step``), on a PostgreSQL ledger that lives on
   into night 2 (whatever the pipeline keeps there between nights, a cursor or a record index,
   is kept). Zendesk's stand-in and client run with RELAXED limits here (``--setup-limit``
   requests a minute, incremental exports included, and as many permanent user deletions):
   only the set-up is relaxed, and the output says so.
3. **The change,** ``--change-share`` (0.1%) of the records, with the stand-in stopped (its state
   file) or in the CRM's database: status changes, new records and a few deletions (see
   ``change_*``); and the clock moves by ``--clock-step-hours``, so that records nobody touched
   fall due too.
4. **The reference: a full read of the changed state,** extract and plan only, on a fresh ledger
   (nothing carried over from night 1: no cursor, no index, so the pipeline reads everything),
   as of night 2's as-of time, with relaxed limits. Its plan is what night 2's must equal.
5. **Night 2, under the providers' real limits** (Zendesk: ``--requests-per-minute`` 700, the
   incremental exports 10 a minute and without the last minute's changes, permanent user
   deletions 700 per 10 minutes, the deleted-tickets listing 10 a minute; Mailchimp: 10
   connections, its only limit and the stand-in's throughout; the CRM has none): the same steps
   as night 1 on night 1's ledger, starting no earlier than a minute after the change (a night
   comes hours after the day's changes; a change younger than Zendesk's export lag is the next
   night's). Its plan is
   compared with the reference's (same rows, same values, in any order) before it erases. A
   night-2 step that runs past ``--give-up-after`` seconds (default 600, five times the target)
   is stopped, and the figure is a FAIL.

Printed per system and night: wall time (the step functions' own, and the elapsed time with a
process per step), requests (counted at the stand-ins: every API request; the CRM: the SQL
statements the pipeline sent, counted on its engine, and the rows the server read in the CRM's
database, ``pg_stat_database``'s ``tup_returned + tup_fetched``), the load average around each
step; then PASS/FAIL per done-when figure:

* night 2 finishes within ``--target-seconds`` (120) under the real limits;
* requests proportional to the change: night 2's extract sends at most
  ``--proportional-share`` (10%) of the requests the reference full read's extract sent (CRM:
  of the records its extract received; the statements are a handful either way, and the rows
  the server scanned are printed too); the change is 0.1% of the records: 10% leaves room for fixed costs
  such as a cursor's last empty page, and for reading every candidate of a status;
* night 2's plan equals the reference full read's.

    scripts/bench.sh nightly [--records 1000000] [--systems crm newsletter ticketing] [--keep] (the rest: --help)
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time

import numpy as np
import pandas as pd
from harness import Bench, LoadWatch, StepTimeout, describe, machine

from nightly_systems import DAG_ID, DRIVERS, QUIET, STEPS, SYSTEMS, ZD_REAL, System, prepare


# ---------------------------------------------------------------------- a night
def open_run(label: str, as_of: dt.datetime) -> dict:
    from retention.runs import nightly

    run_id = f"{label}_{int(time.time() * 1000)}"
    return nightly.open_run(DAG_ID, run_id, as_of, dry_run=False, max_plan_share=0.5)


def night(bench: Bench, sysd: System, label: str, as_of: dt.datetime, steps=STEPS, give_up: float | None = None,
          on_plan=None, reconcile: bool = False) -> dict:
    """The pipeline's steps in order; figures per step. ``on_plan(run)`` runs after plan.
    ``reconcile``: the extract reads everything (the DAG's ``reconcile`` param)."""
    from retention.runs import nightly

    print(f"\n== {sysd.name}: {label} (as of {as_of:%Y-%m-%d %H:%M} UTC) ==", flush=True)
    t0 = time.perf_counter()
    out: dict = {"label": label, "steps": {}, "requests": {}, "rows": {}, "load": [os.getloadavg()[0]], "finished": True}
    t = time.perf_counter()
    bench.run = open_run(label.split()[0], as_of)
    out["steps"]["open_run"] = {"wall": time.perf_counter() - t}
    base = sysd.counter()
    for step in steps:
        before = sysd.counter()
        t = time.perf_counter()
        try:
            fig = bench.step(step, prepare, label=f"{label}: {step}", timeout=give_up,
                             kwargs={"reconcile": True} if reconcile and step == "extract" else None)
        except StepTimeout as exc:
            print(f"  {exc}", flush=True)
            out["finished"] = False
            out["gave_up"] = str(exc)
            # What the stopped step had taken (its process's start-up included): a lower bound.
            out["steps"][f"{step} (stopped)"] = {"wall": time.perf_counter() - t}
            after = sysd.counter()
            out["requests"][step] = sysd.step_requests({}, before, after)
            if "rows_read" in after:
                out["rows"][step] = after["rows_read"] - before["rows_read"]
            break
        after = sysd.counter()
        out["steps"][step] = fig
        out["requests"][step] = sysd.step_requests(fig, before, after)
        if "rows_read" in after:
            out["rows"][step] = after["rows_read"] - before["rows_read"]
        if step == "plan" and on_plan is not None:
            on_plan(bench.run)
    end = sysd.counter()
    out["by_kind"] = {k: v - base.get("by_kind", {}).get(k, 0) for k, v in end.get("by_kind", {}).items()
                      if v != base.get("by_kind", {}).get(k, 0)}
    if out["finished"] and steps == STEPS:
        t = time.perf_counter()
        rep = nightly.report(nightly.RunInfo.from_dict(bench.run), (sysd.name,))
        out["steps"]["report"] = {"wall": time.perf_counter() - t, "result": rep}
        print(f"  report: {rep['state']} ({time.perf_counter() - t:.2f}s)", flush=True)
    out["elapsed"] = time.perf_counter() - t0
    out["wall"] = sum(s["wall"] for s in out["steps"].values())
    out["load"].append(os.getloadavg()[0])
    out["run"] = bench.run
    return out


def plan_frame(run: dict, system: str) -> pd.DataFrame:
    from retention.runs import nightly

    return nightly.RunInfo.from_dict(run).staging.read_frame(system, "plan")


def same_plan(a: pd.DataFrame, b: pd.DataFrame) -> tuple[bool, str]:
    """Equal as sets of rows: the same columns, the same rows with the same values, any order."""
    if sorted(a.columns) != sorted(b.columns):
        return False, f"columns differ: {sorted(set(a.columns) ^ set(b.columns))}"
    cols = sorted(a.columns)
    if len(a) != len(b):
        return False, f"{len(a):,} rows against {len(b):,}"

    def canon(f: pd.DataFrame) -> pd.DataFrame:
        f = f[cols].astype(str)
        return f.sort_values(cols, kind="stable").reset_index(drop=True)

    ca, cb = canon(a), canon(b)
    if ca.equals(cb):
        return True, f"{len(a):,} rows, identical"
    diff = (ca != cb).any(axis=1)
    bad = [c for c in cols if (ca[c] != cb[c]).any()]
    return False, f"{int(diff.sum()):,} of {len(a):,} rows differ (columns {bad})"


def comparison_can_fail(plan: pd.DataFrame) -> bool:
    """``same_plan`` tells a plan from itself with a row missing and with one value changed
    (a comparison that cannot fail would prove nothing)."""
    if len(plan) < 2:
        return True  # nothing to perturb; the row counts are compared anyway
    changed = plan.copy()
    column = "record_id" if "record_id" in changed else changed.columns[0]
    changed[column] = changed[column].astype(object)
    changed.iloc[0, changed.columns.get_loc(column)] = "not-a-planned-record"
    return same_plan(plan, plan)[0] and not same_plan(plan, plan.iloc[1:])[0] and not same_plan(plan, changed)[0]


class Ledger:
    """Swap the ledger the steps use (the reference read's fresh one), and back."""

    def __init__(self, bench: Bench, url: str):
        self.bench, self.url = bench, url

    def __enter__(self):
        import json

        self.saved = {k: self.bench.env[k] for k in ("RETENTION_LEDGER_URL", "AIRFLOW_CONN_RETENTION_LEDGER")}
        new = {"RETENTION_LEDGER_URL": self.url,
               "AIRFLOW_CONN_RETENTION_LEDGER": json.dumps({"conn_type": "generic", "extra": {"sqlalchemy_url": self.url}})}
        self.bench.env.update(new)
        os.environ.update(new)

    def __exit__(self, *exc):
        self.bench.env.update(self.saved)
        os.environ.update(self.saved)


# ---------------------------------------------------------------------- one system
def bench_system(name: str, args: argparse.Namespace) -> dict:

    with Bench(f"nightly_{name}", name, keep=args.keep, ledger="postgres", postgres=True, quiet=QUIET) as bench:
        sysd = DRIVERS[name](bench, args)
        rng = np.random.default_rng(args.seed)
        t = time.perf_counter()
        sysd.setup()
        clock_step = dt.timedelta(hours=args.clock_step_hours)
        as_of_1 = dt.datetime.now(dt.UTC) - clock_step
        sysd.start(real=False)
        print(f"  set-up {time.perf_counter() - t:.1f}s; {sysd.limits(False)}", flush=True)
        n1 = night(bench, sysd, "night1 (first full run)", as_of_1)
        n1["limits"] = sysd.limits(False)
        sysd.stop()

        n_change = max(1, round(args.records * args.change_share))
        t = time.perf_counter()
        changes = sysd.change(n_change, rng)
        changed_at = time.monotonic()
        print(f"\nchanged {sum(changes.values()):,} records ({args.change_share:.2%}): {changes} "
              f"({time.perf_counter() - t:.1f}s); the clock moves by {args.clock_step_hours:g} h", flush=True)
        as_of_2 = dt.datetime.now(dt.UTC)

        # The reference: a full read of the same state on a fresh ledger (nothing kept from night 1).
        ref_url = bench.pg.database(f"retention_bench_nightly_{name}_reference")
        sysd.start(real=False)
        # Asked to reconcile, the extract reads every record whatever the adapter could narrow
        # (the CRM selects the plan's candidates otherwise); on a fresh ledger a change feed has
        # no index yet and reads in full anyway.
        with Ledger(bench, ref_url):
            ref = night(bench, sysd, "reference full read (fresh ledger)", as_of_2, steps=("extract", "plan"), reconcile=True)
        ref_plan = plan_frame(ref["run"], name)
        sysd.stop()

        # Night 2 comes at least the export lag after the change (a night comes hours after the
        # day's changes): what changed within the lag is a night later in a change feed.
        wait = changed_at + sysd.export_lag(True) - time.monotonic()
        if wait > 0:
            print(f"  waiting {wait:.0f}s: {name}'s change feed leaves out the last {sysd.export_lag(True)} s", flush=True)
            time.sleep(wait)
        sysd.start(real=True)
        compared: dict = {}

        def compare(run: dict) -> None:
            if not comparison_can_fail(ref_plan):
                raise SystemExit("the plan comparison does not tell different plans apart: no verdict")
            ok, why = same_plan(plan_frame(run, name), ref_plan)
            compared.update(ok=ok, why=why)
            print(f"  plan compared with the reference full read's: {'EQUAL' if ok else 'DIFFERENT'} ({why})", flush=True)

        n2 = night(bench, sysd, "night2 (after the change)", as_of_2, give_up=args.give_up_after, on_plan=compare)
        n2["limits"] = sysd.limits(True)
        sysd.stop()
        return {"system": name, "night1": n1, "night2": n2, "reference": ref, "changes": changes, "n_change": n_change,
                "plan": compared, "unit": sysd.unit}


# ---------------------------------------------------------------------- figures
def verdict(ok: bool | None) -> str:
    return "n/a " if ok is None else "PASS" if ok else "FAIL"


def extracted(n: dict) -> int:
    """The records a night's extract received from the system: its summary's ``read`` counts
    (``extracted`` counts every record, which the CRM's narrowed read counts without reading)."""
    fig = n["steps"].get("extract")
    if not fig:
        return 0
    return sum((fig["result"].get("read") or fig["result"]["extracted"]).values())


def report(r: dict, args: argparse.Namespace) -> list[bool | None]:
    name, n1, n2 = r["system"], r["night1"], r["night2"]
    print(f"\n{name}: {args.records:,} records; change {r['n_change']:,} ({r['changes']})")
    for n in (n1, r["reference"], n2):
        req = n["requests"]
        rows = n["rows"]
        rows = f"; rows read in the CRM's database {sum(rows.values()):,} ({', '.join(f'{k} {v:,}' for k, v in rows.items())})" if rows else ""
        state = "" if n["finished"] else f"  GAVE UP: {n['gave_up']}"
        got = f"; extract received {extracted(n):,} records" if n["steps"].get("extract") else ""
        print(
            f"  {n['label']:<36} wall {n['wall']:8.1f}s (steps; {n['elapsed']:.1f}s elapsed, a process per step), "
            f"{r['unit']} {sum(req.values()):,} ({', '.join(f'{k} {v:,}' for k, v in req.items())}){rows}; "
            f"load {n['load'][0]:.2f} -> {n['load'][1]:.2f}{got}{state}"
        )
        for step, fig in n["steps"].items():
            if "rss_mb" in fig:
                print(f"      {step:<9} {describe(fig)}")
        if n.get("by_kind"):
            print(f"      {r['unit']} by kind: {n['by_kind']}")
    print(f"  night 1: {n1.get('limits', '')}; night 2: {n2.get('limits', '')}")
    finished = n2["finished"] and n2["wall"] <= args.target_seconds
    ref = r["reference"]
    if ref["rows"]:  # the CRM: the records its extract received (the server may scan more to find them)
        full, inc, what = extracted(ref), extracted(n2), "extract received records"
    else:
        full, inc, what = ref["requests"].get("extract", 0), n2["requests"].get("extract", 0), "extract sent requests"
    share = inc / full if full else float("nan")
    proportional = share <= args.proportional_share
    if not n2["finished"] and "extract" not in n2["steps"] and inc <= args.proportional_share * full:
        proportional = None  # stopped during the extract while still under the bound: unknown
    incremental = {k: v for k, v in ref.get("by_kind", {}).items() if k.startswith("incremental.")}
    if incremental and not n2["finished"]:
        need = sum(incremental.values())
        print(f"  a full read needs {need:,} incremental-export requests ({incremental}): at Zendesk's "
              f"{ZD_REAL['incremental']} a minute, {need / ZD_REAL['incremental']:.0f} minutes before anything is planned")
    plan_ok = r["plan"].get("ok")
    print(f"  {verdict(finished)} night 2 within {args.target_seconds:g}s under the real limits: "
          + (f"{n2['wall']:.1f}s" if n2["finished"] else f"more than {n2['wall']:.0f}s (given up, not finished)"))
    print(f"  {verdict(proportional)} requests proportional to the change: night 2's {what} {inc:,} = {share:.2%} of "
          f"the full read's {full:,} (at most {args.proportional_share:.0%}; the change is {args.change_share:.2%})")
    print(f"  {verdict(plan_ok)} night 2's plan equals a full read's: {r['plan'].get('why', 'not compared: night 2 did not plan')}")
    return [finished, proportional, plan_ok]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=1_000_000, help="records per system (contacts, members, tickets)")
    ap.add_argument("--systems", nargs="+", choices=SYSTEMS, default=list(SYSTEMS))
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--due-share", type=float, default=0.01, help="share due at set-up (night 1's erasure)")
    ap.add_argument("--change-share", type=float, default=0.001, help="share of the records changed before night 2")
    ap.add_argument("--clock-step-hours", type=float, default=24, help="how far the clock moves between the nights")
    ap.add_argument("--requests-per-minute", type=int, default=ZD_REAL["requests"], help="Zendesk's limit in night 2")
    ap.add_argument("--setup-limit", type=int, default=100_000, help="Zendesk's relaxed limits for night 1 and the reference")
    ap.add_argument("--give-up-after", type=float, default=600, help="seconds after which a night-2 step is stopped")
    ap.add_argument("--target-seconds", type=float, default=120)
    ap.add_argument("--proportional-share", type=float, default=0.10)
    ap.add_argument("--keep", action="store_true", help="leave RETENTION_HOME and the databases in place")
    args = ap.parse_args()
    if args.records < 1000:
        ap.error("--records must be at least 1000")
    watch = LoadWatch()
    print(f"Nightly benchmark: {args.records:,} records per system ({', '.join(args.systems)}); {machine()}", flush=True)
    results = [bench_system(name, args) for name in args.systems]
    print(f"\n==== Nightly benchmark: {args.records:,} records per system; {machine()}")
    verdicts = []
    for r in results:
        verdicts += report(r, args)
    print(watch.line())
    return 0 if all(v is True for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
