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
import shutil
import subprocess
import sys
import time
from pathlib import Path

import requests

from retention import config
from retention.standins.process import StandIn

SYSTEMS = ("newsletter",)
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
        if _interesting(line):
            print("   " + line.rstrip()[:220], flush=True)
    return proc.wait()


def _interesting(line: str) -> bool:
    """Progress lines from the pipeline and task state changes, not Airflow's chatter."""
    keys = ("retention", "Marking task as", "Task finished", "state=", "ERROR", "Traceback", "Error", "failed")
    return any(k in line for k in keys) and "DeprecationWarning" not in line


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="demo", description=__doc__)
    p.add_argument("--dry-run", action="store_true", help="plan and validate, erase nothing")
    p.add_argument("--reset", action="store_true", help="forget the demo systems' state and seed them afresh")
    p.add_argument("--members", type=int, default=5000, help="newsletter members to seed")
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

    say("starting the Mailchimp stand-in")
    mailchimp = StandIn(
        "mailchimp", "--port", "0", "--state-file", str(demo / "mailchimp.state"), "--members", str(args.members),
        "--seed", str(args.seed), "--list-id", LIST_ID, "--api-key", MAILCHIMP_KEY,
    ).start()
    try:
        before = _mailchimp_counts(mailchimp)
        say(f"newsletter before the run: {before}")
        env["AIRFLOW_CONN_MAILCHIMP_DEFAULT"] = json.dumps(
            {"conn_type": "mailchimp", "host": f"{mailchimp.base_url}/3.0", "password": MAILCHIMP_KEY, "extra": {"list_id": LIST_ID}}
        )
        conf = json.dumps({"dry_run": args.dry_run, "systems": list(SYSTEMS)})
        say(f"running retention_nightly through Airflow (airflow dags test, conf {conf})")
        started = time.monotonic()
        code = _airflow("dags", "test", "retention_nightly", "--conf", conf, env=env, stream=True)
        say(f"airflow dags test finished with exit code {code} in {time.monotonic() - started:.0f}s")
        after = _mailchimp_counts(mailchimp)
    finally:
        mailchimp.stop()
    say(f"newsletter after the run: {after}")
    latest = config.reports_dir() / "latest.json"
    if not latest.exists():
        print("no report was written: the run failed before its report task", file=sys.stderr)
        return 1
    rep = json.loads(latest.read_text())
    from retention.pipeline import render_report

    print()
    print(render_report(rep))
    print()
    erased = {
        f"{system}/{rule}": statuses.get("erased", 0)
        for system, rules in rep["ledger"].items()
        for rule, statuses in rules.items()
    }
    say(f"erased per rule: {erased or 'nothing (nothing was due)'}")
    say(f"report: {config.reports_dir()}; ledger: {config.ledger_url()}")
    return 0 if code == 0 and rep["state"] == "success" else 1


def _mailchimp_counts(standin: StandIn) -> dict:
    stats = requests.get(f"{standin.base_url}/_standin/stats", timeout=10).json()
    return stats.get("statuses") or {k: v for k, v in stats.items() if k in ("subscribed", "unsubscribed", "cleaned", "pending", "archived", "transactional")}


if __name__ == "__main__":
    sys.exit(main())
