"""CRM benchmark: 1,000,000 contacts with their notes and tags on PostgreSQL, about 10% due.

Generates the synthetic CRM once (``retention_dev.synthetic.crm``, COPY) into
``retention_bench_crm_seed`` and clones it (``CREATE DATABASE ... TEMPLATE``) into
``retention_bench_crm_pipeline`` and ``retention_bench_crm_hand``, so both hold the same rows. In the first it runs the pipeline's
steps (extract, plan, validate, erase, verify), each in a fresh spawned process as Airflow
runs each task (``harness``), through ``CrmAdapter(CrmConnector(engine))``, and prints wall
time, records/s and peak RSS of the step process (``--repeat``: plan and validate that many
times, medians). In the second it erases the contacts the pipeline's plan chose (read from the
staging plan parquet) with one hand-written set-based statement (a CTE chain of
``DELETE ... RETURNING``), and prints the ratio

    pipeline's contact erasure (erase/minimise ``crm_contact`` with notes, event
    participations, course registrations and survey responses, its ledger writes included)
    / the hand-written statement.

For the ratio to compare like with like, the hand-written database first gets the same
child-record erasures the pipeline did before its contacts (event participations, course
registrations, survey responses and invoices due under their own rules), as one timed
transaction of its own; then both contact erasures start from the same rows. At the end the
row counts of both databases are compared (they must be identical). Figures, not assertions.
The hand-written erasure runs first (after validate, from the staged plan), and each of the two
starts on a checkpointed server with the other's deletions vacuumed.

The ledger is PostgreSQL (``retention_bench_crm_ledger`` on the same server, as in the compose
deployment) unless ``--ledger sqlite``. The machine's other load shows in the figures: run it
on a quiet machine for numbers to compare across commits.

``--passes N`` runs N whole nights (extract to verify, the hand-written erasure beside each), each
on fresh copies of the CRM generated once (``DB_SEED``) and an empty ledger, and prints every
pass's erasure side by side, the pass nearest the median in detail, and the ratio of the
medians: the erase step moves by seconds from run to run on a 2-core machine.

    scripts/bench.sh crm [--contacts 1000000] [--seed 11] [--ledger postgres|sqlite] [--passes 1] [--repeat 1] [--keep]
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa
from harness import (
    AdapterProxy,
    Bench,
    Hooks,
    LoadWatch,
    Row,
    add_options,
    machine,
    median_run,
    peak_line,
    spread,
    table,
    timed_erase,
)

from retention.systems.crm.adapter import CrmAdapter

CRM_BATCH = CrmAdapter.erase_batch
DB_PIPELINE = "retention_bench_crm_pipeline"
DB_HAND = "retention_bench_crm_hand"
DB_SEED = "retention_bench_crm_seed"  # the generated CRM, copied afresh for every pass
CHILD_TYPES = {  # record type -> table, erased by their own rules before the contacts
    "crm_event_participation": "event_participation",
    "crm_course_registration": "course_registration",
    "crm_survey_response": "survey_response",
    "crm_invoice": "invoice",
}
TABLES = (
    "organisation",
    "membership",
    "contact",
    "communication_note",
    "event_participation",
    "course_registration",
    "survey_response",
    "invoice",
    "legal_hold",
)

# The hand-written erasure of the due contacts: one statement, every table touched once.
HAND_CONTACTS = """
WITH due AS MATERIALIZED (SELECT unnest(%(ids)s::bigint[]) AS id),
inv AS (UPDATE invoice SET contact_id = NULL WHERE contact_id IN (SELECT id FROM due) RETURNING 1),
n AS (DELETE FROM communication_note WHERE contact_id IN (SELECT id FROM due) RETURNING 1),
e AS (DELETE FROM event_participation WHERE contact_id IN (SELECT id FROM due) RETURNING 1),
r AS (DELETE FROM course_registration WHERE contact_id IN (SELECT id FROM due) RETURNING 1),
s AS (DELETE FROM survey_response WHERE contact_id IN (SELECT id FROM due) RETURNING 1),
c AS (DELETE FROM contact WHERE id IN (SELECT id FROM due) RETURNING 1)
SELECT (SELECT count(*) FROM c), (SELECT count(*) FROM n), (SELECT count(*) FROM e),
       (SELECT count(*) FROM r), (SELECT count(*) FROM s), (SELECT count(*) FROM inv)
"""


# ---------------------------------------------------------------------- the pipeline's steps
class _TimedAdapter(AdapterProxy):
    """Passes everything to the real adapter; adds up the seconds spent in ``erase`` per type."""

    def __init__(self, inner, seconds: dict):
        super().__init__(inner)
        self._seconds = seconds

    def erase(self, record_type, action, record_ids, *recheck):
        def add(s: float) -> None:
            self._seconds[record_type] = self._seconds.get(record_type, 0.0) + s

        return timed_erase(lambda: self._inner.erase(record_type, action, record_ids, *recheck), add)


def _instrument_ledger(ledger_s: dict, completed_at: dict, written_ahead: list) -> None:
    """Time the ledger's writes per record type (write-ahead, batches handed over, completions;
    step process only). A write-ahead of several record types at once is shared out by their
    numbers of entries; ``written_ahead`` gets ``(end, {record type: seconds})`` per write-ahead."""
    from retention.store.ledger import Ledger

    write_ahead, complete = Ledger.write_ahead, Ledger.complete

    def timed_write_ahead(self, run_id, policy_version, system, rows, *args, **kwargs):
        seen: dict[str, int] = {}

        def tap(rows):  # count the entries per record type, as the ledger takes them (frames, dicts)
            for r in [rows] if isinstance(rows, pd.DataFrame) else rows:
                for record_type, n in (
                    r["record_type"].value_counts().items() if isinstance(r, pd.DataFrame) else [(r["record_type"], 1)]
                ):
                    seen[record_type] = seen.get(record_type, 0) + int(n)
                yield r

        if isinstance(rows, pa.Table):  # the engine's write-ahead of destructive rows, one table
            for counted in pc.value_counts(pc.cast(rows.column("record_type"), pa.string())).to_pylist():
                seen[counted["values"]] = seen.get(counted["values"], 0) + counted["counts"]
        else:
            rows = tap(rows)
        t = time.perf_counter()
        write_ahead(self, run_id, policy_version, system, rows, *args, **kwargs)
        end = time.perf_counter()
        total = sum(seen.values())
        shares = {rt: (end - t) * n / total for rt, n in seen.items()}
        for rt, s in shares.items():
            ledger_s[rt] = ledger_s.get(rt, 0.0) + s
        if shares:
            written_ahead.append((end, shares))

    def timed_complete(self, run_id, system, record_type, outcomes, detail=None):
        t = time.perf_counter()
        complete(self, run_id, system, record_type, outcomes, detail)
        end = time.perf_counter()
        ledger_s[record_type] = ledger_s.get(record_type, 0.0) + end - t
        completed_at[record_type] = end

    submit = Ledger.submit

    def timed_submit(self, run_id, system, record_type, keys):
        t = time.perf_counter()
        submit(self, run_id, system, record_type, keys)
        ledger_s[record_type] = ledger_s.get(record_type, 0.0) + time.perf_counter() - t

    Ledger.write_ahead, Ledger.complete, Ledger.submit = timed_write_ahead, timed_complete, timed_submit


def prepare(step: str, env: dict) -> Hooks:
    """The step process's adapter (timed per record type) and, for erase, the ledger's timings."""
    if step not in ("extract", "erase", "verify"):
        return Hooks()
    from retention.systems.crm.client import CrmConnector

    erase_s: dict = {}
    ledger_s: dict = {}
    completed_at: dict = {}
    written_ahead: list = []
    if step == "erase":
        _instrument_ledger(ledger_s, completed_at, written_ahead)
    adapter = _TimedAdapter(CrmAdapter(CrmConnector(sa.create_engine(env["BENCH_CRM_URL"]))), erase_s)

    def after(start: float, end: float) -> dict:
        if step != "erase":
            return {}
        # The contact phase: from the last ledger completion of a record type erased before
        # the contacts (children, invoices) to the end of the step. It holds everything the
        # pipeline does for the contacts: plan filtering, write-ahead, erase, completion; a
        # write-ahead of the contacts made before it (with the whole plan's, up front) is added.
        before = [v for k, v in completed_at.items() if k != "crm_contact"]
        phase_start = max(before) if before else start
        ahead = sum(shares.get("crm_contact", 0.0) for at, shares in written_ahead if at <= phase_start)
        return {
            "contact_phase_s": end - phase_start + ahead,
            "contact_write_ahead_before_s": ahead,
            "adapter_erase_s": erase_s,
            "ledger_s": ledger_s,
        }

    return Hooks(adapter=adapter, after=after)


# ---------------------------------------------------------------------- the hand-written erasure
def vacuum_analyze(url: str) -> None:
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as c:
        c.exec_driver_sql("VACUUM ANALYZE")
    engine.dispose()


def checkpoint(url: str) -> None:
    """Write every dirty page of the server out now, untimed, so that no timed erasure pays for
    another's writes."""
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as c:
        c.exec_driver_sql("CHECKPOINT")
    engine.dispose()


def table_counts(url: str) -> dict[str, int]:
    engine = sa.create_engine(url)
    with engine.connect() as c:
        out = {t: int(c.exec_driver_sql(f"SELECT count(*) FROM {t}").scalar()) for t in TABLES}
        out["invoice_detached"] = int(c.exec_driver_sql("SELECT count(*) FROM invoice WHERE contact_id IS NULL").scalar())
    engine.dispose()
    return out


def hand_erase(url: str, child_ids: dict[str, list[int]], contact_ids: list[int]) -> dict:
    """The hand-written erasure: the children first (one transaction), then the contacts (one
    statement, one transaction), each timed from the first statement to the commit."""
    engine = sa.create_engine(url)
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        t = time.perf_counter()
        child_rows = {}
        for record_type, table in CHILD_TYPES.items():
            ids = child_ids.get(record_type) or []
            cur.execute(f"DELETE FROM {table} WHERE id IN (SELECT unnest(%(ids)s::bigint[]))", {"ids": ids})
            child_rows[table] = cur.rowcount
        raw.commit()
        children_s = time.perf_counter() - t
        t = time.perf_counter()
        cur.execute(HAND_CONTACTS, {"ids": contact_ids})
        counts = cur.fetchone()
        raw.commit()
        contacts_s = time.perf_counter() - t
    finally:
        raw.close()
        engine.dispose()
    names = ("contact", "communication_note", "event_participation", "course_registration", "survey_response", "invoice_detached")
    return {
        "children_s": children_s,
        "child_rows": child_rows,
        "contacts_s": contacts_s,
        "contact_rows": dict(zip(names, counts)),
    }


# ---------------------------------------------------------------------- one pass
def one_pass(bench: Bench, args: argparse.Namespace) -> dict:
    """One night over fresh copies of the generated CRM (``DB_SEED``): extract, plan, validate,
    the hand-written erasure, then the pipeline's erase and verify; the figures of each."""
    url_p = bench.env["BENCH_CRM_URL"] = bench.pg.database(DB_PIPELINE, template=DB_SEED)
    url_h = bench.pg.database(DB_HAND, template=DB_SEED)
    t = time.perf_counter()
    for url in (url_p, url_h):
        vacuum_analyze(url)  # the same physical state in both, every table read once (warm cache)
    print(f"  copied into {DB_PIPELINE} and {DB_HAND} and VACUUM ANALYZEd both in {time.perf_counter() - t:.1f}s", flush=True)

    bench.open_run()
    extract = bench.step("extract", prepare)
    plans = bench.repeat(args.repeat, "plan")
    validations = bench.repeat(args.repeat, "validate")

    # The hand-written erasure first, from the staged plan: each of the two erasures starts on
    # a server with nothing of the other's left to do (its deletions vacuumed, its pages
    # written out). Measured after the pipeline's, it shared the server with the autovacuum
    # of the pipeline's million deletions and moved between 19 and 35 s from run to run.
    plan = bench.info.staging.read_frame("crm", "plan")
    destructive = plan[plan["action"].isin(["erase", "minimise"])]
    ids = {rt: [int(i) for i in g["record_id"]] for rt, g in destructive.groupby("record_type")}
    contact_ids = ids.get("crm_contact", [])
    by_action = destructive[destructive["record_type"] == "crm_contact"]["action"].value_counts().to_dict()
    planned = len(destructive)
    del plan, destructive
    print(f"hand-written erasure in {DB_HAND} ({len(contact_ids):,} contacts from the plan parquet)...", flush=True)
    checkpoint(url_h)
    hand = hand_erase(url_h, ids, contact_ids)
    # counts only from here: the id lists (~30 MB at a million contacts) would otherwise stay
    # alive through the pipeline's erase and verify and pile up over the passes
    counts = {rt: len(v) for rt, v in ids.items()}
    del ids, contact_ids
    print(f"  children {hand['children_s']:.2f}s, contacts {hand['contacts_s']:.2f}s", flush=True)
    vacuum_analyze(url_h)
    checkpoint(url_h)

    erase = bench.step("erase", prepare)
    verify = bench.step("verify", prepare)
    return {
        "extract": extract,
        "plans": plans,
        "validations": validations,
        "hand": hand,
        "erase": erase,
        "verify": verify,
        "counts": counts,
        "by_action": by_action,
        "planned": planned,
        "after_pipeline": table_counts(url_p),
        "after_hand": table_counts(url_h),
    }


def whole_ratio(p: dict) -> float:
    """The pipeline's whole erase step over the hand-written statements (children + contacts)."""
    return p["erase"]["wall"] / (p["hand"]["children_s"] + p["hand"]["contacts_s"])


def print_pass(p: dict) -> None:
    """One pass's table and its erasure's figures in detail."""
    extract, plans, validations, hand, erase, verify, counts = (
        p[k] for k in ("extract", "plans", "validations", "hand", "erase", "verify", "counts")
    )
    extracted = sum(extract["result"]["extracted"].values())
    outcomes = erase["result"]["outcomes"]
    contact_phase = erase["contact_phase_s"]
    planned = p["planned"]
    print(
        f"extracted {extracted:,} records; planned {planned:,} erasures "
        f"({planned / max(extracted, 1):.1%} of extracted): "
        + ", ".join(f"{rt} {n:,}" for rt, n in sorted(counts.items()))
        + f"; contacts by action {p['by_action']}"
    )
    print()
    rows = [
        Row("extract", extract, extracted),
        Row("plan", plans, extracted),
        Row("validate", validations, extracted, f"{validations[0]['result']['suites']} suites"),
        Row("erase", erase, sum(v for k, v in outcomes.items() if k in ("erased", "already_gone")), f"outcomes {outcomes}"),
        Row("verify", verify, verify["result"]["checked"], f"still present {verify['result']['still_present']}"),
    ]
    table(rows)
    print()
    print(
        "pipeline erase step, per record type (seconds in the connector / in the ledger; a batch's outcomes are "
        "booked while the next batch runs, so the two overlap and do not add up to the step's wall time):"
    )
    for rt in ("crm_event_participation", "crm_course_registration", "crm_survey_response", "crm_invoice", "crm_contact"):
        if rt in erase["adapter_erase_s"] or rt in erase["ledger_s"]:
            print(
                f"  {rt:<26}{counts.get(rt, 0):>10,} records  connector {erase['adapter_erase_s'].get(rt, 0):7.2f}s"
                f"  ledger {erase['ledger_s'].get(rt, 0):7.2f}s"
            )
    waited = erase["result"].get("waited_seconds") or {}
    if waited:
        print(
            f"  the erase loop waited {waited.get('write_ahead', 0):.2f}s for batches' write-ahead and "
            f"{waited.get('bookings', 0):.2f}s for the previous batch's bookings"
        )
    print()
    print("erasure of the due contacts (crm_contact with notes, event participations, course registrations, survey responses;")
    print("invoices of minimised contacts detached), from the same rows in both databases:")
    print(
        f"  pipeline contact phase   {contact_phase:8.2f}s  ({counts.get('crm_contact', 0):,} contacts, batches of {CRM_BATCH:,}, "
        f"write-ahead + completion in the ledger included; connector alone "
        f"{erase['adapter_erase_s'].get('crm_contact', 0):.2f}s)"
    )
    if erase["contact_write_ahead_before_s"]:
        print(
            f"{'':29}of which {erase['contact_write_ahead_before_s']:.2f}s: the contacts' share of the plan's write-ahead, "
            "written before the phase began (beside earlier batches; counted in full)"
        )
    print(
        f"  hand-written statement   {hand['contacts_s']:8.2f}s  (one CTE of DELETE ... RETURNING; rows {hand['contact_rows']})"
    )
    ratio = contact_phase / hand["contacts_s"]
    print(f"  ratio                    {ratio:8.2f}x  (target <= 1.5x)")
    print(f"  ratio, connector only    {erase['adapter_erase_s'].get('crm_contact', 0) / hand['contacts_s']:8.2f}x")
    hand_total = hand["children_s"] + hand["contacts_s"]
    print(
        f"whole erasure: pipeline erase step {erase['wall']:.2f}s vs hand-written {hand_total:.2f}s "
        f"(children {hand['children_s']:.2f}s + contacts {hand['contacts_s']:.2f}s) = {whole_ratio(p):.2f}x"
    )
    print(f"plan {rows[1].wall:.2f}s, validate {rows[2].wall:.2f}s, {peak_line(rows)}")


def print_passes(passes: list[dict]) -> None:
    """Every pass's erasure side by side, their medians and the ratio of the medians."""
    print(
        f"{'pass':<8}{'erase step s':>13}{'hand-written s':>16}{'ratio':>8}{'EP connector s':>16}"
        f"{'verify s':>10}{'erase RSS MB':>14}{'load 1m':>14}"
    )
    for i, p in enumerate(passes, 1):
        e, h = p["erase"], p["hand"]
        load = f"{e['load'][0]:.2f}->{e['load'][1]:.2f}"
        print(
            f"{i:<8}{e['wall']:13.2f}{h['children_s'] + h['contacts_s']:16.2f}{whole_ratio(p):7.2f}x"
            f"{e['adapter_erase_s'].get('crm_event_participation', 0):16.2f}{p['verify']['wall']:10.2f}"
            f"{e['rss_mb']:14.0f}{load:>14}"
        )
    step = statistics.median(p["erase"]["wall"] for p in passes)
    hand = statistics.median(p["hand"]["children_s"] + p["hand"]["contacts_s"] for p in passes)
    lo, mid, hi = spread(whole_ratio(p) for p in passes)
    print(f"{'median':<8}{step:13.2f}{hand:16.2f}{mid:7.2f}x")
    print(
        f"whole erasure over {len(passes)} passes: the erase step's median {step:.2f}s / the hand-written statements' "
        f"median {hand:.2f}s = {step / hand:.2f}x (target <= 1.5x); single passes {lo:.2f}x to {hi:.2f}x"
    )


# ---------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contacts", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument(
        "--ledger",
        choices=("postgres", "sqlite"),
        default="postgres",
        help="the ledger's database: retention_bench_crm_ledger on the same server (as deployed), or SQLite under RETENTION_HOME",
    )
    ap.add_argument(
        "--passes",
        type=int,
        default=1,
        help="whole nights, each on fresh copies of the generated CRM and an empty ledger (extract to verify, the "
        "hand-written erasure beside it); with more than one, every pass's erasure side by side and their medians",
    )
    add_options(ap, repeat=1, repeat_help="runs of plan and validate within each pass (medians)")
    args = ap.parse_args()
    if args.passes < 1 or args.repeat < 1:
        ap.error("--passes and --repeat must be at least 1")
    watch = LoadWatch()  # the machine's other load shows in every figure: printed with them
    quiet = ("retention.systems.crm.client",)  # one line per batch otherwise
    with Bench("crm", "crm", keep=args.keep, ledger=args.ledger, postgres=True, quiet=quiet) as bench:
        from retention.systems.crm import schema
        from retention_dev.synthetic import crm as synthetic

        now = dt.datetime.now(dt.UTC)
        print(f"generating {args.contacts:,} contacts (seed {args.seed}, 10% due) into {DB_SEED}...", flush=True)
        engine = sa.create_engine(bench.pg.database(DB_SEED))
        t = time.perf_counter()
        schema.create_schema(engine)
        generated = synthetic.generate(engine, contacts=args.contacts, seed=args.seed, now=now, due_share=0.1)
        gen_s = time.perf_counter() - t
        engine.dispose()
        print(
            f"  {sum(generated.values()):,} rows in {gen_s:.1f}s: " + ", ".join(f"{k} {v:,}" for k, v in generated.items()),
            flush=True,
        )

        passes = []
        for i in range(args.passes):
            if args.passes > 1:
                print(f"pass {i + 1}/{args.passes} (fresh copies of {DB_SEED}, an empty ledger)", flush=True)
            if i:
                bench.fresh_ledger()
            passes.append(one_pass(bench, args))

        # ------------------------------------------------------------------ figures
        print()
        print(
            f"CRM benchmark: {args.contacts:,} contacts, seed {args.seed}, PostgreSQL {bench.pg.version()} "
            f"(scripts/postgres.sh), ledger {bench.ledger_label}; {machine()}"
        )
        print(
            f"generated {sum(generated.values()):,} rows in {gen_s:.1f}s ("
            + ", ".join(f"{k} {v:,}" for k, v in generated.items())
            + ")"
        )
        shown = median_run(passes, lambda p: p["erase"]["wall"])
        if len(passes) > 1:
            print(
                f"{len(passes)} passes; in detail the pass whose erase step is nearest the median "
                f"(pass {passes.index(shown) + 1}):"
            )
        print_pass(shown)
        if len(passes) > 1:
            print()
            print_passes(passes)
        differ = [i for i, p in enumerate(passes, 1) if p["after_pipeline"] != p["after_hand"]]
        print(
            "row counts after erasure: "
            + (
                "identical in both databases" + (" in every pass" if len(passes) > 1 else "")
                if not differ
                else f"DIFFERENT (pass {', '.join(map(str, differ))})"
            )
        )
        for i in differ:
            after_p, after_h = passes[i - 1]["after_pipeline"], passes[i - 1]["after_hand"]
            for k in after_p:
                if after_p[k] != after_h[k]:
                    print(f"  pass {i}, {k}: pipeline {after_p[k]:,}, hand-written {after_h[k]:,}")
        print(watch.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
