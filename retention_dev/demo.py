"""The README's main command: run ``retention_nightly`` through Airflow on the embedded default.

Starts the Mailchimp and Zendesk stand-ins (seeded with synthetic people on first use, a few of
them in all three systems; state kept under ``$RETENTION_HOME/demo`` so a second run sees what
the first left), a SQLite CRM, writes the Connections to them into the file Airflow and the
``retention`` command both read (``retention_dev.environment``), runs ``airflow dags test
retention_nightly`` and prints this run's report, or, when the run failed, its failed tasks and
their errors. With ``--serve`` the run goes through Airflow's api-server, scheduler and
dag-processor (task logs in the UI), which stay up with the stand-ins until Ctrl-C. Exit status
0 only when the run succeeded.

Extending it: a step before or after the nightly run goes into :func:`main` between the
stand-ins' start and :func:`show_outcome`; the systems' seeding is :func:`seed_systems`.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime

import requests

from retention import config
from retention.domain.records import SYSTEMS
from retention_dev import environment as envmod
from retention_dev import warehouse_demo
from retention_dev.airflow_ui import DEFAULT_PORT, AirflowUI, port_free
from retention_dev.standins import demo_servers
from retention_dev.standins.process import StandIn


def say(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def _airflow(*args: str, env: dict, stream: bool = False, watch: _RunWatch | None = None) -> int:
    cmd = [sys.executable, "-m", "airflow", *args]
    if not stream:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if out.returncode:
            print(out.stdout[-4000:], out.stderr[-4000:], file=sys.stderr)
        return out.returncode
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    try:
        for line in proc.stdout:
            if watch is not None:
                watch.feed(line)
            shown = _shown(line)
            if shown:
                print("   " + shown, flush=True)
        return proc.wait()
    except BaseException:  # Ctrl-C: the run stops with the demo
        proc.terminate()
        proc.wait()
        raise


_TASK = re.compile(r"\[DAG TEST\] running task <TaskInstance: \S+?\.(\S+) ")
_OURS = re.compile(r"\[(?:info|warning|error)\s*\] (.*?) \[retention[\].]")
_FINISHED = re.compile(r"DagRun Finished: .*?run_id=([^,\s]+),")
_STATE = re.compile(r"DagRun Finished: .*?\bstate=(\w+)")
# The last line of a traceback: "package.module.SomeError: what went wrong".
_EXCEPTION = re.compile(r"^\s*(?:[\w.]+\.)?(\w*(?:Error|Exception|Failed|Timeout)\w*): (.+)$")
_TASK_FAILED = re.compile(r"Task failed with exception|Marking task as FAILED|task_id=(\S+).*state=failed")


class _RunWatch:
    """What the streamed output of ``airflow dags test`` says: the run id when the run finished,
    and, per task, the last exception line it logged (one line, for the failure summary)."""

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.state: str | None = None
        self.task: str | None = None
        self.errors: dict[str, str] = {}

    def feed(self, line: str) -> None:
        if m := _TASK.search(line):
            self.task = m.group(1)
        elif m := _FINISHED.search(line):
            self.run_id = m.group(1)
            state = _STATE.search(line)
            self.state = state.group(1) if state else None
        elif (m := _EXCEPTION.match(line)) and self.task:
            self.errors[self.task] = f"{m.group(1)}: {m.group(2).strip()}"[:300]

    @property
    def failures(self) -> list[str]:
        return [f"{task}: {error}" for task, error in self.errors.items()]


def _failed_tasks(env: dict, run_id: str, errors: dict[str, str]) -> list[str]:
    """The run's failed tasks from Airflow's metadata database, each with its error when the
    output showed one; tasks that did not run because of them are counted, not listed."""
    out = subprocess.run(
        [sys.executable, "-m", "airflow", "tasks", "states-for-dag-run", "retention_nightly", run_id, "-o", "json"],
        env=env, capture_output=True, text=True,
    )
    try:
        rows = json.loads(out.stdout[out.stdout.index("["):])
    except ValueError:
        return []
    failed = [r["task_id"] for r in rows if r.get("state") == "failed"]
    skipped = sum(1 for r in rows if r.get("state") == "upstream_failed")
    lines = [f"task {t} failed: {errors.get(t, 'see its log')}" for t in failed]
    if skipped:
        lines.append(f"{skipped} task(s) downstream did not run (upstream_failed)")
    return lines


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
    p.add_argument("--serve", action="store_true",
                   help="run through Airflow's UI (api-server, scheduler, dag-processor on 127.0.0.1) and keep it and "
                        "the stand-ins up until Ctrl-C")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="the UI's port with --serve (default %(default)s)")
    p.add_argument("--members", type=int, default=5000, help="newsletter members to seed")
    p.add_argument("--tickets", type=int, default=3000, help="support tickets to seed")
    p.add_argument("--contacts", type=int, default=3000, help="CRM contacts to seed")
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args(argv)
    # Ctrl-C, and a plain kill too, stop the demo's servers in the finally below (SIGINT set
    # explicitly: a shell's background job starts with it ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if args.serve and not port_free(args.port):
        print(f"demo: port {args.port} on 127.0.0.1 is taken: give another with --port", file=sys.stderr)
        return 2

    if demo_servers.running():
        say("stopping the stand-ins started by `python -m retention_dev.standins start` (the demo starts its own)")
        demo_servers.stop_background()
    demo = envmod.demo_dir()
    if args.reset:
        shutil.rmtree(demo, ignore_errors=True)
    demo.mkdir(parents=True, exist_ok=True)
    # The Connections live in a file Airflow and the `retention` command both read (see
    # retention_dev.environment); scripts/setup.sh configures Airflow for it, this too.
    env = envmod.airflow_env()

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

    # Seeded afresh (--reset, or a first run): the ledger's record index and change-feed cursors
    # (in RETENTION_HOME, kept by --reset with the rest of the ledger) describe other systems: a
    # change feed would not list the new ones' records, so this run reconciles, as after a restore.
    fresh = not envmod.seeded()
    if fresh:
        say(f"seeding the demo systems ({args.contacts} CRM contacts, {args.members} newsletter members, "
            f"{args.tickets} tickets; synthetic people, example.* addresses)")
        seed_systems(members=args.members, tickets=args.tickets, contacts=args.contacts, seed=args.seed)
    crm_url = envmod.crm_url()
    say(f"CRM before the run: {_crm_counts(crm_url)}")

    say("starting the Mailchimp and Zendesk stand-ins")
    mailchimp, zendesk = demo_servers.start_children(members=args.members, tickets=args.tickets, seed=args.seed)
    say(f"Connections for Airflow and the retention command: {envmod.connections_file()}")
    ui = None
    try:
        if args.serve:
            say(f"starting Airflow's api-server on 127.0.0.1:{args.port} (scheduler and dag-processor after the run)")
            ui = AirflowUI(env, args.port).start()
            env = ui.env
        say(f"newsletter before the run: {_mailchimp_counts(mailchimp)}")
        say(f"ticketing before the run: {_zendesk_counts(zendesk)}")
        code, run_id, failures = run_nightly(env, dry_run=args.dry_run, use_executor=ui is not None, reconcile=fresh)
        say(f"newsletter after the run: {_mailchimp_counts(mailchimp)}")
        say(f"ticketing after the run: {_zendesk_counts(zendesk)}")
        say(f"CRM after the run: {_crm_counts(crm_url)}")
        ok = show_outcome(code, run_id, failures)
        if warehouse and ui is None:  # an example downstream: a warehouse DAG triggered by the run's asset events
            warehouse_demo.run_consumer(env)  # (with --serve, the scheduler started below runs it)
        show_people()
        if ui is not None:
            ui.start_rest()
            user, password = ui.login()
            say(f"Airflow's UI: {ui.url} (user {user}, password {password or 'see ' + str(ui.home)}); "
                f"the stand-ins stay up for the README's commands. Ctrl-C stops everything.")
            _wait_for_ctrl_c()
        else:
            say("the stand-ins are stopped; for the README's other commands start them with: "
                "python -m retention_dev.standins start")
        return 0 if ok else 1
    finally:
        if ui is not None:
            ui.stop()
        mailchimp.stop()
        zendesk.stop()


def run_nightly(env: dict, *, dry_run: bool, use_executor: bool, reconcile: bool = False) -> tuple[int, str | None, list[str]]:
    """One run of ``retention_nightly`` through Airflow: its exit code, its run id (None when
    Airflow never finished the run) and the failed tasks, each with its one-line error.
    ``reconcile``: the systems were seeded afresh under a ledger whose record index remembers
    the old ones (a restore, as far as the change feeds can tell): read them in full."""
    # The demo systems start with years of backlog, more than a nightly run would ever see:
    # the plan-size guard is raised for the demo as an engineer would for a first run.
    conf = {"dry_run": dry_run, "systems": list(SYSTEMS), "max_plan_share": 0.5}
    if reconcile:
        conf["reconcile"] = True
    conf = json.dumps(conf)
    say(f"running retention_nightly through Airflow (airflow dags test, conf {conf})")
    started = time.monotonic()
    extra = ["--use-executor"] if use_executor else []
    watch = _RunWatch()
    code = _airflow("dags", "test", "retention_nightly", "--conf", conf, *extra, env=env, stream=True, watch=watch)
    say(f"airflow dags test finished with exit code {code} in {time.monotonic() - started:.0f}s")
    failures = watch.failures
    if watch.run_id and (code or watch.state != "success"):
        failures = _failed_tasks(env, watch.run_id, watch.errors) or failures
    return code, watch.run_id, failures


def show_outcome(code: int, run_id: str | None, failures: list[str]) -> bool:
    """The run's report when it is this run's; else why there is none. True when the run succeeded."""
    latest = config.reports_dir() / "latest.json"
    rep = json.loads(latest.read_text()) if latest.exists() else None
    if rep is None or run_id is None or rep.get("run_id") != run_id:
        # The latest report is an earlier run's: never shown as this one's.
        print(file=sys.stderr)
        print(f"retention_nightly failed{f' (run {run_id})' if run_id else ''}: no report was written", file=sys.stderr)
        for line in failures or ["(no failed task was recorded: see the output above)"]:
            print(f"  {line}", file=sys.stderr)
        return False
    from retention.runs.nightly import render_report

    print()
    print(render_report(rep))
    print()
    if failures:
        print("failed tasks:", file=sys.stderr)
        for line in failures:
            print(f"  {line}", file=sys.stderr)
    erased = {
        f"{system}/{rule}": statuses.get("erased", 0)
        for system, rules in rep["ledger"].items()
        for rule, statuses in rules.items()
        if statuses.get("erased")
    }
    ok = code == 0 and rep["state"] == "success"
    say(f"erased per rule: {erased or ('nothing (nothing was due)' if ok else 'nothing')}")
    say(f"report: {config.reports_dir()}; ledger: {config.ledger_url()}")
    return ok


def show_people() -> None:
    """The synthetic people in all three systems, for an erasure request to try."""
    people = load_people()
    if not people:
        return
    erasable = next((p.email for p in people if p.kind == "erasable"), None)
    deferred = next((p.email for p in people if p.kind == "deferred"), None)
    say(f"in all three systems (synthetic): {erasable} (erased everywhere on request)"
        + (f", {deferred} (an open ticket: deferred; an invoice: minimised)" if deferred else ""))
    say(f"try: airflow dags test erasure_request --conf '{{\"email\": \"{erasable}\"}}'")


def _wait_for_ctrl_c() -> None:
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print()
        say("stopping")


def seed_systems(*, members: int, tickets: int, contacts: int, seed: int) -> None:
    """The demo's three systems, seeded from ``seed``, with a few people linked across all three
    (``retention_dev.synthetic.people``); the linked addresses are kept for the demo to print."""
    import sqlalchemy as sa

    from retention.systems.crm.schema import create_schema
    from retention_dev.standins.mailchimp_audience import Audience
    from retention_dev.standins.mailchimp_data import default_now, generate_columns
    from retention_dev.standins.zendesk_state import State
    from retention_dev.synthetic.crm import generate
    from retention_dev.synthetic.people import link

    now = datetime.now(UTC)
    engine = sa.create_engine(envmod.crm_url())
    create_schema(engine)
    generate(engine, contacts=contacts, seed=seed, now=now)
    # The stand-ins' own defaults (--due-share 0.2, --erase-share 0.10), made here and saved as
    # their state so the linked addresses are in it when they start.
    state = State.generate(tickets, seed, 0.2, default_now(), job_seconds=0.2)
    cols = generate_columns(members, seed=seed, now=default_now(), erase_share=0.10)
    edge = state.meta["edge_cases"]
    edge_users = {edge["user_due_and_open"], edge["user_all_due"], *edge["users_without_tickets"]}
    arrays = {"t_status": state.t_status, "t_requester": state.t_requester, "t_created": state.t_created}
    people = link(arrays, cols, engine, now, edge_users=edge_users)
    engine.dispose()
    state.save(envmod.zendesk_state())
    Audience(cols, envmod.LIST_ID).save(envmod.mailchimp_state())
    (envmod.demo_dir() / "people.json").write_text(json.dumps([{"email": p.email, "kind": p.kind} for p in people], indent=2))


def load_people() -> list:
    from retention_dev.synthetic.people import Person

    try:
        return [Person(**p) for p in json.loads((envmod.demo_dir() / "people.json").read_text())]
    except (OSError, ValueError, TypeError):
        return []


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
