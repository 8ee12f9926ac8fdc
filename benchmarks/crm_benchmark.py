"""CRM benchmark: 1,000,000 contacts with their notes and tags on PostgreSQL, about 10% due.

Generates the synthetic CRM once (``tools.synthetic.crm``, COPY) into
``retention_bench_crm_pipeline`` and clones it (``CREATE DATABASE ... TEMPLATE``) into
``retention_bench_crm_hand``, so both hold the same rows. In the first it runs the pipeline's
steps (extract, plan, validate, erase, verify), each in a fresh spawned process as Airflow
runs each task, through ``CrmAdapter(CrmConnector(engine))``, and prints wall time, records/s
and peak RSS (``ru_maxrss`` of the step process). In the second it erases the contacts the
pipeline's plan chose (read from the staging plan parquet) with one hand-written set-based
statement (a CTE chain of ``DELETE ... RETURNING``), and prints the ratio

    pipeline's contact erasure (erase/minimise ``crm_contact`` with notes, event
    participations, course registrations and survey responses, its ledger writes included)
    / the hand-written statement.

For the ratio to compare like with like, the hand-written database first gets the same
child-record erasures the pipeline did before its contacts (event participations, course
registrations, survey responses and invoices due under their own rules), as one timed
transaction of its own; then both contact erasures start from the same rows. At the end the
row counts of both databases are compared (they must be identical). Figures, not assertions.

The ledger is PostgreSQL (``retention_bench_crm_ledger`` on the same server, as in the compose
deployment) unless ``--ledger sqlite``. The machine's other load shows in the figures: run it
on a quiet machine for numbers to compare across commits.

    scripts/bench.sh crm [--contacts 1000000] [--seed 11] [--ledger postgres|sqlite] [--keep]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import multiprocessing as mp
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))

from retention.systems.crm.adapter import CrmAdapter  # noqa: E402

DAG_ID = "bench_crm"
CRM_BATCH = CrmAdapter.erase_batch
DB_PIPELINE = "retention_bench_crm_pipeline"
DB_HAND = "retention_bench_crm_hand"
DB_LEDGER = "retention_bench_crm_ledger"
STEPS = ("extract", "plan", "validate", "erase", "verify")
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
class _TimedAdapter:
    """Passes everything to the real adapter; adds up the seconds spent in ``erase`` per type."""

    def __init__(self, inner, seconds: dict):
        self._inner = inner
        self._seconds = seconds
        self.system = inner.system
        self.record_types = inner.record_types
        self.erase_batch = inner.erase_batch

    def extract(self, write, now):
        return self._inner.extract(write, now)

    def erase(self, record_type, action, record_ids):
        t = time.perf_counter()
        try:
            return self._inner.erase(record_type, action, record_ids)
        finally:
            self._seconds[record_type] = self._seconds.get(record_type, 0.0) + time.perf_counter() - t

    def still_present(self, record_type, record_ids):
        return self._inner.still_present(record_type, record_ids)

    def close(self):
        self._inner.close()


def _instrument_ledger(ledger_s: dict, completed_at: dict) -> None:
    """Time the ledger's writes per record type (step process only)."""
    from retention.store.ledger import Ledger

    write_ahead, complete = Ledger.write_ahead, Ledger.complete

    def timed_write_ahead(self, run_id, policy_version, system, rows, status="planned"):
        seen: list[str] = []

        def tap(rows):  # the record type of the first entry, as the ledger takes them
            for r in rows:
                if not seen:
                    seen.append(r["record_type"])
                yield r

        t = time.perf_counter()
        write_ahead(self, run_id, policy_version, system, tap(rows), status=status)
        if seen:
            ledger_s[seen[0]] = ledger_s.get(seen[0], 0.0) + time.perf_counter() - t

    def timed_complete(self, run_id, system, record_type, outcomes, detail=None):
        t = time.perf_counter()
        complete(self, run_id, system, record_type, outcomes, detail)
        end = time.perf_counter()
        ledger_s[record_type] = ledger_s.get(record_type, 0.0) + end - t
        completed_at[record_type] = end

    Ledger.write_ahead, Ledger.complete = timed_write_ahead, timed_complete


def _step(name: str, run: dict, env: dict, queue) -> None:
    os.environ.update(env)
    logging.getLogger("retention.systems.crm.client").setLevel(logging.WARNING)  # one line per batch otherwise
    import airflow.sdk  # noqa: F401 - an Airflow task process has Airflow loaded before the task starts

    from retention.runs import nightly as pipeline
    from retention.systems.crm.client import CrmConnector
    from retention.systems.crm.adapter import CrmAdapter

    info = pipeline.RunInfo.from_dict(run)
    extra: dict = {}
    t = time.perf_counter()
    if name in ("extract", "erase", "verify"):
        erase_s: dict = {}
        ledger_s: dict = {}
        completed_at: dict = {}
        if name == "erase":
            _instrument_ledger(ledger_s, completed_at)
        engine = sa.create_engine(env["BENCH_CRM_URL"])
        adapter = _TimedAdapter(CrmAdapter(CrmConnector(engine)), erase_s)
        t = time.perf_counter()
        result = getattr(pipeline, name)(info, "crm", adapter)
        end = time.perf_counter()
        adapter.close()
        if name == "erase":
            # The contact phase: from the last ledger completion of a record type erased before
            # the contacts (children, invoices) to the end of the step. It holds everything the
            # pipeline does for the contacts: plan filtering, write-ahead, erase, completion.
            before = [v for k, v in completed_at.items() if k != "crm_contact"]
            extra = {
                "contact_phase_s": end - (max(before) if before else t),
                "adapter_erase_s": erase_s,
                "ledger_s": ledger_s,
            }
    elif name == "validate":
        from retention.checks import validation

        validation.start_up()  # GX's one-time import and set-up, reported apart from the validation itself
        imported = time.perf_counter()
        result = pipeline.validate(info, "crm")
        extra = {"gx_import_s": imported - t}
        t = imported
        end = time.perf_counter()
    else:
        result = pipeline.plan(info, "crm")
        end = time.perf_counter()
    queue.put({"wall": end - t, "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "result": result, **extra})


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


# ---------------------------------------------------------------------- databases
def pg_url(dbname: str) -> str:
    return subprocess.check_output([str(ROOT / "scripts" / "postgres.sh"), dbname], text=True).strip()


def admin_engine(url: str) -> sa.Engine:
    return sa.create_engine(url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")


def recreate(admin: sa.Engine, name: str, template: str | None = None) -> None:
    with admin.connect() as c:
        c.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        c.exec_driver_sql(f"CREATE DATABASE {name}" + (f" TEMPLATE {template}" if template else ""))


def vacuum_analyze(url: str) -> None:
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as c:
        c.exec_driver_sql("VACUUM ANALYZE")
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


# ---------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contacts", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument(
        "--ledger",
        choices=("postgres", "sqlite"),
        default="postgres",
        help=f"the ledger's database: {DB_LEDGER} on the same server (as deployed), or SQLite under RETENTION_HOME",
    )
    ap.add_argument("--keep", action="store_true", help="leave the databases and RETENTION_HOME (staging, ledger) in place")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="retention-bench-crm-"))
    env = {
        "RETENTION_HOME": str(work),
        "RETENTION_PSEUDONYM_KEY": os.environ.get("RETENTION_PSEUDONYM_KEY") or "benchmark-only-key-" + "0" * 32,
        "RETENTION_KEEP_STAGING": "1",
        "PYTHONPATH": str(ROOT / "plugins"),
        "GX_ANALYTICS_ENABLED": "false",
    }
    os.environ.update(env)

    from retention.systems.crm import schema
    from tools.synthetic import crm as synthetic

    url_p, url_h = pg_url(DB_PIPELINE), pg_url(DB_HAND)
    admin = admin_engine(url_p)
    try:
        if args.ledger == "postgres":
            recreate(admin, DB_LEDGER)
            ledger_url = url_p.rsplit("/", 1)[0] + "/" + DB_LEDGER
        else:
            ledger_url = f"sqlite:///{work / 'ledger.db'}"
        # Pinned as the Airflow Connection too, which would win over RETENTION_LEDGER_URL.
        env["RETENTION_LEDGER_URL"] = ledger_url
        env["AIRFLOW_CONN_RETENTION_LEDGER"] = json.dumps({"conn_type": "generic", "extra": {"sqlalchemy_url": ledger_url}})
        os.environ.update(env)
        env["BENCH_CRM_URL"] = url_p
        now = dt.datetime.now(dt.UTC)
        print(f"generating {args.contacts:,} contacts (seed {args.seed}, 10% due) into {DB_PIPELINE}...", flush=True)
        recreate(admin, DB_PIPELINE)
        engine = sa.create_engine(url_p)
        t = time.perf_counter()
        schema.create_schema(engine)
        generated = synthetic.generate(engine, contacts=args.contacts, seed=args.seed, now=now, due_share=0.1)
        gen_s = time.perf_counter() - t
        engine.dispose()
        print(
            f"  {sum(generated.values()):,} rows in {gen_s:.1f}s: " + ", ".join(f"{k} {v:,}" for k, v in generated.items()),
            flush=True,
        )
        t = time.perf_counter()
        recreate(admin, DB_HAND, template=DB_PIPELINE)
        for url in (url_p, url_h):
            vacuum_analyze(url)  # the same physical state in both, every table read once (warm cache)
        print(f"  cloned into {DB_HAND} and VACUUM ANALYZEd both in {time.perf_counter() - t:.1f}s", flush=True)

        from retention.runs import nightly as pipeline

        run = pipeline.open_run(DAG_ID, f"bench_{int(time.time())}", None, dry_run=False, max_plan_share=0.5)
        info = pipeline.RunInfo.from_dict(run)
        figures = {}
        for step in STEPS:
            print(f"step {step}...", flush=True)
            figures[step] = out = run_step(step, run, env)
            print(f"  {out['wall']:.2f}s, peak RSS {out['rss_mb']:.0f} MB", flush=True)

        plan = info.staging.read_frame("crm", "plan")
        destructive = plan[plan["action"].isin(["erase", "minimise"])]
        ids = {rt: [int(i) for i in g["record_id"]] for rt, g in destructive.groupby("record_type")}
        contact_ids = ids.get("crm_contact", [])
        by_action = destructive[destructive["record_type"] == "crm_contact"]["action"].value_counts().to_dict()
        print(f"hand-written erasure in {DB_HAND} ({len(contact_ids):,} contacts from the plan parquet)...", flush=True)
        hand = hand_erase(url_h, ids, contact_ids)
        print(f"  children {hand['children_s']:.2f}s, contacts {hand['contacts_s']:.2f}s", flush=True)
        after_p, after_h = table_counts(url_p), table_counts(url_h)

        # ------------------------------------------------------------------ figures
        extracted = sum(figures["extract"]["result"]["extracted"].values())
        erase = figures["erase"]
        outcomes = erase["result"]["outcomes"]
        contact_phase = erase["contact_phase_s"]
        print()
        ledger = f"PostgreSQL ({DB_LEDGER}, same server)" if args.ledger == "postgres" else "SQLite under RETENTION_HOME"
        print(
            f"CRM benchmark: {args.contacts:,} contacts, seed {args.seed}, PostgreSQL {server_version(url_h)} "
            f"(scripts/postgres.sh), ledger {ledger}; {os.cpu_count()} CPUs"
        )
        print(
            f"generated {sum(generated.values()):,} rows in {gen_s:.1f}s ("
            + ", ".join(f"{k} {v:,}" for k, v in generated.items())
            + ")"
        )
        print(
            f"extracted {extracted:,} records; planned {len(destructive):,} erasures "
            f"({len(destructive) / max(extracted, 1):.1%} of extracted): "
            + ", ".join(f"{rt} {len(v):,}" for rt, v in sorted(ids.items()))
            + f"; contacts by action {by_action}"
        )
        print()
        print(f"{'step':<10}{'wall s':>9}{'records':>12}{'records/s':>13}{'peak RSS MB':>13}  note")
        for step in STEPS:
            out = figures[step]
            res = out["result"]
            note = ""
            if step == "erase":
                n = sum(v for k, v in outcomes.items() if k in ("erased", "already_gone"))
                note = f"outcomes {outcomes}"
            elif step == "verify":
                n = res["checked"]
                note = f"still present {res['still_present']}"
            else:
                n = extracted
                if step == "validate":
                    note = f"GX start-up {out['gx_import_s']:.1f}s excluded; {res['suites']} suites"
            print(f"{step:<10}{out['wall']:9.2f}{n:12,}{n / out['wall']:13,.0f}{out['rss_mb']:13.0f}  {note}")
        peak = max(figures[s]["rss_mb"] for s in STEPS)
        print()
        print("pipeline erase step, per record type (seconds in the connector / in the ledger):")
        for rt in ("crm_event_participation", "crm_course_registration", "crm_survey_response", "crm_invoice", "crm_contact"):
            if rt in erase["adapter_erase_s"] or rt in erase["ledger_s"]:
                print(
                    f"  {rt:<26}{len(ids.get(rt, [])):>10,} records  connector {erase['adapter_erase_s'].get(rt, 0):7.2f}s"
                    f"  ledger {erase['ledger_s'].get(rt, 0):7.2f}s"
                )
        print()
        print(
            "erasure of the due contacts (crm_contact with notes, event participations, course registrations, survey responses;"
        )
        print("invoices of minimised contacts detached), from the same rows in both databases:")
        print(
            f"  pipeline contact phase   {contact_phase:8.2f}s  ({len(contact_ids):,} contacts, batches of {CRM_BATCH:,}, "
            f"write-ahead + completion in the ledger included; connector alone "
            f"{erase['adapter_erase_s'].get('crm_contact', 0):.2f}s)"
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
            f"(children {hand['children_s']:.2f}s + contacts {hand['contacts_s']:.2f}s) = {erase['wall'] / hand_total:.2f}x"
        )
        print(
            f"plan {figures['plan']['wall']:.2f}s, validate {figures['validate']['wall']:.2f}s, "
            f"peak RSS of any step {peak:.0f} MB (target < 1024)"
        )
        same = after_p == after_h
        print(f"row counts after erasure: {'identical in both databases' if same else 'DIFFERENT'}")
        if not same:
            for k in after_p:
                if after_p[k] != after_h[k]:
                    print(f"  {k}: pipeline {after_p[k]:,}, hand-written {after_h[k]:,}")
    finally:
        if args.keep:
            print(
                f"kept: databases {DB_PIPELINE}, {DB_HAND}"
                + (f", {DB_LEDGER}" if args.ledger == "postgres" else "")
                + f"; RETENTION_HOME {work}"
            )
        else:
            with admin.connect() as c:
                for name in (DB_PIPELINE, DB_HAND, DB_LEDGER):
                    c.exec_driver_sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            shutil.rmtree(work, ignore_errors=True)
        admin.dispose()
    return 0


def server_version(url: str) -> str:
    engine = sa.create_engine(url)
    with engine.connect() as c:
        version = c.exec_driver_sql("SHOW server_version").scalar()
    engine.dispose()
    return str(version).split()[0]


if __name__ == "__main__":
    sys.exit(main())
