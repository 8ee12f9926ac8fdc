"""The README's main command: run ``retention_nightly`` through Airflow on the embedded default.

Starts the Mailchimp and Zendesk stand-ins (seeded with synthetic people on first use, state
kept under ``$RETENTION_HOME/demo`` so a second run sees what the first left), a SQLite CRM,
points the Airflow Connections at them, runs ``airflow dags test retention_nightly`` and prints
the run's report. Exit status 0 only when the run succeeded.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime

import requests

from retention import config
from retention.domain.records import SYSTEMS
from retention_dev import warehouse_demo
from retention_dev.standins.process import StandIn

MAILCHIMP_KEY = "standin-key-us0"
LIST_ID = "demo-list"


def say(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def _airflow(*args: str, env: dict, stream: bool = False) -> int:
    cmd = [sys.executable, "-m", "airflow", *args]
    if not stream:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode:
            print(out.stdout[-4000:], out.stderr[-4000:], file=sys.stderr)
        return out.returncode
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    for line in proc.stdout:
        shown = _shown(line)
        if shown:
            print("   " + shown, flush=True)
    return proc.wait()


_TASK = re.compile(r"\[DAG TEST\] running task <TaskInstance: \S+?\.(\S+) ")
_OURS = re.compile(r"\[(?:info|warning|error)\s*\] (.*?) \[retention[\].]")


def _shown(line: str) -> str | None:
    """Our own progress lines and each task as it starts; errors in full; no Airflow chatter."""
    if m := _TASK.search(line):
        return f"task {m.group(1)}"
    if m := _OURS.search(line):
        return "  " + m.group(1)
    if any(k in line for k in ("[error", "Traceback", "Error:", "DagRun Finished")):
        return line.rstrip()[:300]
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="demo", description=__doc__)
    p.add_argument("--dry-run", action="store_true", help="plan and validate, erase nothing")
    p.add_argument("--reset", action="store_true", help="forget the demo systems' state and seed them afresh")
    p.add_argument("--members", type=int, default=5000, help="newsletter members to seed")
    p.add_argument("--tickets", type=int, default=3000, help="support tickets to seed")
    p.add_argument("--contacts", type=int, default=3000, help="CRM contacts to seed")
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args(argv)

    demo = config.retention_home() / "demo"
    if args.reset:
        shutil.rmtree(demo, ignore_errors=True)
    demo.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)

    say("Airflow metadata database (SQLite under AIRFLOW_HOME)")
    if _airflow("db", "migrate", env=env):
        return 1
    say("the providers' pools (retention pools): the limits every DAG shares")
    pools = subprocess.run([sys.executable, "-m", "retention.cli", "pools"], env=env, capture_output=True, text=True)
    if pools.returncode:
        print(pools.stderr[-4000:], file=sys.stderr)
        return 1

    # The example warehouse DAG, registered before the run so that its erasure events queue a run of it.
    warehouse = warehouse_demo.prepare(env)

    crm_url = f"sqlite:///{demo / 'crm.db'}"
    if not (demo / "crm.db").exists():
        say(f"seeding the demo CRM ({args.contacts} synthetic contacts, SQLite)")
        _seed_crm(crm_url, args.contacts, args.seed)
    env["AIRFLOW_CONN_RETENTION_CRM"] = json.dumps({"conn_type": "retention_crm", "extra": {"sqlalchemy_url": crm_url}})
    crm_before = _crm_counts(crm_url)
    say(f"CRM before the run: {crm_before}")

    say("starting the Mailchimp stand-in")
    mailchimp = StandIn(
        "mailchimp", "--port", "0", "--state-file", str(demo / "mailchimp.state"), "--members", str(args.members),
        "--seed", str(args.seed), "--list-id", LIST_ID, "--api-key", MAILCHIMP_KEY,
    ).start()
    say("starting the Zendesk stand-in")
    zendesk = StandIn(
        "zendesk", "--port", "0", "--state-file", str(demo / "zendesk.state"), "--tickets", str(args.tickets),
        "--seed", str(args.seed), "--job-seconds", "0.2", "--incremental-per-minute", "600", "--user-deletes-per-10min", "7000",
    ).start()
    try:
        before = _mailchimp_counts(mailchimp)
        say(f"ticketing before the run: {_zendesk_counts(zendesk)}")
        env["AIRFLOW_CONN_RETENTION_ZENDESK"] = json.dumps(
            {
                "conn_type": "retention_zendesk", "host": zendesk.base_url, "login": "agent@example.org", "password": "standin-token",
                # The demo stand-in allows more than Zendesk's documented limits, so the demo is quick;
                # the defaults of the client are the real ones.
                "extra": {"incremental_per_minute": 600, "user_deletes_per_10min": 7000, "job_poll_interval": 0.2},
            }
        )
        say(f"newsletter before the run: {before}")
        env["AIRFLOW_CONN_RETENTION_MAILCHIMP"] = json.dumps(
            {"conn_type": "retention_mailchimp", "host": f"{mailchimp.base_url}/3.0", "password": MAILCHIMP_KEY, "extra": {"list_id": LIST_ID}}
        )
        # The demo systems start with years of backlog, more than a nightly run would ever see:
        # the plan-size guard is raised for the demo as an engineer would for a first run.
        conf = json.dumps({"dry_run": args.dry_run, "systems": list(SYSTEMS), "max_plan_share": 0.5})
        say(f"running retention_nightly through Airflow (airflow dags test, conf {conf})")
        started = time.monotonic()
        code = _airflow("dags", "test", "retention_nightly", "--conf", conf, env=env, stream=True)
        say(f"airflow dags test finished with exit code {code} in {time.monotonic() - started:.0f}s")
        after = _mailchimp_counts(mailchimp)
        say(f"ticketing after the run: {_zendesk_counts(zendesk)}")
    finally:
        mailchimp.stop()
        zendesk.stop()
    say(f"newsletter after the run: {after}")
    say(f"CRM after the run: {_crm_counts(crm_url)}")
    latest = config.reports_dir() / "latest.json"
    if not latest.exists():
        print("no report was written: the run failed before its report task", file=sys.stderr)
        return 1
    rep = json.loads(latest.read_text())
    from retention.runs.nightly import render_report

    print()
    print(render_report(rep))
    print()
    erased = {
        f"{system}/{rule}": statuses.get("erased", 0)
        for system, rules in rep["ledger"].items()
        for rule, statuses in rules.items()
        if statuses.get("erased")
    }
    say(f"erased per rule: {erased or 'nothing (nothing was due)'}")
    say(f"report: {config.reports_dir()}; ledger: {config.ledger_url()}")
    if warehouse:  # an example downstream: a warehouse DAG triggered by the run's asset events
        warehouse_demo.run_consumer(env)
    return 0 if code == 0 and rep["state"] == "success" else 1


def _seed_crm(url: str, contacts: int, seed: int) -> None:
    import sqlalchemy as sa

    from retention.systems.crm.schema import create_schema
    from retention_dev.synthetic.crm import generate

    engine = sa.create_engine(url)
    create_schema(engine)
    generate(engine, contacts=contacts, seed=seed, now=datetime.now(UTC))
    engine.dispose()


def _crm_counts(url: str) -> dict:
    import sqlalchemy as sa

    from retention.systems.crm.schema import metadata

    engine = sa.create_engine(url)
    with engine.connect() as conn:
        counts = {t.name: conn.execute(sa.select(sa.func.count()).select_from(t)).scalar() for t in metadata.sorted_tables}
    engine.dispose()
    return counts


def _zendesk_counts(standin: StandIn) -> dict:
    stats = requests.get(f"{standin.base_url}/_standin/stats", timeout=10).json()
    return {k: stats[k] for k in ("tickets", "tickets_soft_deleted", "users", "users_soft_deleted") if k in stats}


def _mailchimp_counts(standin: StandIn) -> dict:
    stats = requests.get(f"{standin.base_url}/_standin/stats", timeout=10).json()
    return stats.get("statuses") or {k: v for k, v in stats.items() if k in ("subscribed", "unsubscribed", "cleaned", "pending", "archived", "transactional")}


if __name__ == "__main__":
    sys.exit(main())
