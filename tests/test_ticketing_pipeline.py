"""retention_nightly end to end for ticketing: real Airflow runs (dag.test) and the pipeline's
own steps against the Zendesk stand-in over real HTTP.

What the stand-in holds is always read back through its own API (incremental export, ``PUT``,
``/_standin/stats``), never through the pipeline, and compared with what the policy says should
be gone as of the run's as-of time: solved/closed tickets a calendar year (Europe/Stockholm)
after their solve, soft-deleted tickets 30 days after deletion, end users once no ticket of
theirs remains. Unsolved tickets, agents and the admin must come through untouched.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd
import pytest
import requests
import sqlalchemy as sa

from airflow_run import ROOT, run_dag, task_states, xcom_values
from retention.domain.pseudonyms import Pseudonymizer
from retention.runs import nightly as pipeline
from retention.runs.context import open_ledger
from retention.systems.ticketing.adapter import TicketingAdapter
from retention.systems.ticketing.client import ZendeskClient
from retention_dev.standins import zendesk as zs
from retention_dev.standins import zendesk_data as zd
from retention_dev.standins.process import StandIn

SEED = 23
TICKETS = 1200
TZ = "Europe/Stockholm"
AUTH = ("agent@example.org/token", "token")
DAY = 86_400
# High limits everywhere: these tests are about erasure, not pacing.
STANDIN_LIMITS = (
    "--requests-per-minute", "1000000", "--incremental-per-minute", "100000",
    "--deleted-list-per-minute", "100000", "--user-deletes-per-10min", "1000000", "--job-seconds", "0.1",
)
CLIENT_LIMITS = {
    "requests_per_minute": 1_000_000, "incremental_per_minute": 100_000, "deleted_list_per_minute": 100_000,
    "user_deletes_per_10min": 1_000_000, "job_poll_interval": 0.05,
}
UNSOLVED = ("new", "open", "pending", "hold")
SOLVED = ("solved", "closed")


# --- the stand-in ---------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def prepared_state(path, n_tickets: int, seed: int, now: datetime) -> dict:
    """Generate the stand-in's data, then soft-delete a few tickets in the past (the API can
    only soft-delete now): returns ``{"aged": [...], "recent": [...]}``, the ids of tickets
    soft-deleted 40 days ago (due under soft-deleted-ticket, not under support-ticket) and
    10 days ago (not due yet)."""
    state = zs.State.generate(n_tickets, seed, 0.2, now, job_seconds=0.1)
    now_s = int(now.timestamp())
    year_ago = int(zd.one_year_before(now).timestamp())
    rows = np.arange(6, n_tickets)  # rows 0..5 are the generator's edge cases
    closed_recently = rows[
        (state.t_status[rows] == zd.STATUS_CODE["closed"])
        & (state.t_solved[rows] > year_ago + 30 * DAY)
        & (state.t_solved[rows] < now_s - 60 * DAY)
    ]
    opened = rows[(state.t_status[rows] == zd.STATUS_CODE["open"]) & (state.t_created[rows] < now_s - 60 * DAY)]
    picks = {"aged": [int(closed_recently[0]), int(opened[0])], "recent": [int(closed_recently[1]), int(opened[1])]}
    for kind, ago in (("aged", 40), ("recent", 10)):
        for row in picks[kind]:
            at = now_s - ago * DAY
            state.t_prev[row] = state.t_status[row]
            state.t_status[row] = zd.STATUS_CODE["deleted"]
            state.t_deleted_at[row] = at
            state.t_updated[row] = at
    state.save(path)
    return {kind: [row + 1 for row in rows_] for kind, rows_ in picks.items()}


class Zendesk:
    """A running stand-in plus the facts the tests need about its seeded data."""

    def __init__(self, tmp_path, monkeypatch, n_tickets: int = TICKETS, seed: int = SEED):
        self.now = _now()
        state_file = tmp_path / "zendesk.npz"
        self.soft_deleted = prepared_state(state_file, n_tickets, seed, self.now)
        self.standin = StandIn("zendesk", "--port", "0", "--state-file", str(state_file), *STANDIN_LIMITS).start()
        self.base_url = self.standin.base_url
        self.edge = self.stats()["edge_cases"]
        monkeypatch.setenv(
            "AIRFLOW_CONN_RETENTION_ZENDESK",
            json.dumps({
                "conn_type": "retention_zendesk", "host": self.base_url, "login": "agent@example.org", "password": "token",
                "extra": CLIENT_LIMITS,
            }),
        )

    def stop(self) -> None:
        self.standin.stop()

    def api(self, method: str, path: str, **kw) -> requests.Response:
        r = requests.request(method, f"{self.base_url}{path}", auth=AUTH, timeout=30, **kw)
        r.raise_for_status()
        return r

    def stats(self) -> dict:
        return requests.get(f"{self.base_url}/_standin/stats", timeout=30).json()

    def faults(self, **spec) -> None:
        requests.post(f"{self.base_url}/_standin/faults", json=spec, timeout=30).raise_for_status()

    def _export(self, name: str, params: dict) -> list[dict]:
        out, params = [], {"start_time": 0, **params}
        while True:
            body = self.api("GET", f"/api/v2/incremental/{name}/cursor.json", params=params).json()
            out.append(body)
            if body["end_of_stream"]:
                return out
            params = {k: v for k, v in params.items() if k == "include"} | {"cursor": body["after_cursor"]}

    def tickets(self) -> pd.DataFrame:
        """Every live or soft-deleted ticket (the export's last word on each), by id."""
        rows = []
        for body in self._export("tickets", {"include": "metric_sets"}):
            solved = {m["ticket_id"]: m["solved_at"] for m in body["metric_sets"]}
            rows += [
                {"id": t["id"], "status": t["status"], "requester_id": t["requester_id"], "solved_at": solved.get(t["id"]),
                 "created_at": t["created_at"], "updated_at": t["updated_at"],
                 "cc": " ".join(map(str, sorted(set(t["collaborator_ids"]) | set(t["email_cc_ids"]) | set(t["follower_ids"]))))}
                for t in body["tickets"]
            ]
        frame = pd.DataFrame(rows, columns=["id", "status", "requester_id", "solved_at", "created_at", "updated_at", "cc"])
        for col in ("solved_at", "created_at", "updated_at"):
            frame[col] = pd.to_datetime(frame[col], utc=True)
        return frame.drop_duplicates("id", keep="last").set_index("id").sort_index()

    def users(self) -> pd.DataFrame:
        """Every user not permanently deleted, by id (soft-deleted ones with active False)."""
        rows = [
            {"id": u["id"], "role": u["role"], "active": u["active"], "email": u["email"], "updated_at": u["updated_at"],
             "created_at": u["created_at"]}
            for body in self._export("users", {})
            for u in body["users"]
        ]
        return pd.DataFrame(rows).drop_duplicates("id", keep="last").set_index("id").sort_index()

    def set_status(self, ticket_id: int, status: str) -> dict:
        return self.api("PUT", f"/api/v2/tickets/{ticket_id}.json", json={"ticket": {"status": status}}).json()["ticket"]


@pytest.fixture
def zendesk(tmp_path, monkeypatch, retention_home):
    z = Zendesk(tmp_path, monkeypatch)
    yield z
    z.stop()


# --- what the policy says, computed here independently of the engine --------------------------


def _local(ts: pd.Series | pd.Timestamp):
    if isinstance(ts, pd.Timestamp):
        return ts.tz_convert(TZ).tz_localize(None)
    return ts.dt.tz_convert(TZ).dt.tz_localize(None)


def due_tickets(tickets: pd.DataFrame, as_of: pd.Timestamp) -> set[int]:
    """support-ticket: solved/closed/deleted, a calendar year after solve; soft-deleted-ticket:
    deleted, 30 days after the deletion (updated_at). Unsolved tickets never."""
    as_of_local = _local(as_of)
    by_solve = tickets["status"].isin([*SOLVED, "deleted"]) & ((_local(tickets["solved_at"]) + pd.DateOffset(years=1)) <= as_of_local)
    by_delete = (tickets["status"] == "deleted") & ((_local(tickets["updated_at"]) + pd.Timedelta(days=30)) <= as_of_local)
    return set(tickets.index[(by_solve | by_delete).fillna(False)])


def named_users(tickets: pd.DataFrame) -> set[int]:
    """The users the tickets name: requesters, CCs and followers."""
    return set(tickets["requester_id"].astype(int)) | {int(u) for cc in tickets["cc"] for u in str(cc).split()}


def users_without_tickets(users: pd.DataFrame, tickets_left: pd.DataFrame, tickets_before: pd.DataFrame,
                          as_of: pd.Timestamp) -> set[int]:
    """End users no remaining ticket (live or soft-deleted) names as requester, CC or follower:
    at once when a ticket named them before the run (ticket-requester), else a calendar year
    after the account's creation (ticket-user-without-ticket)."""
    end_users = users.index[(users["role"] == "end-user") & users["active"]]
    left, before = named_users(tickets_left), named_users(tickets_before)
    created = _local(pd.to_datetime(users["created_at"], utc=True))
    old_enough = set(users.index[(created + pd.DateOffset(years=1)) <= _local(as_of)])
    return {u for u in end_users if u not in left and (u in before or u in old_enough)}


def as_of_of(home) -> pd.Timestamp:
    return pd.Timestamp(json.loads((home / "reports" / "latest.json").read_text())["as_of"])


# --- the ledger, the report, pseudonyms -------------------------------------------------------


def ledger_rows(home, run_id: str | None = None) -> list[dict]:
    engine = sa.create_engine(f"sqlite:///{home / 'ledger.db'}")
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(sa.text("select * from erasure_ledger")).mappings()]
    engine.dispose()
    return [r for r in rows if run_id is None or r["run_id"] == run_id]


def keys(record_type: str, ids) -> dict[str, int]:
    """pseudonym -> id, with the key the pipeline uses."""
    pseudo = Pseudonymizer(os.environ["RETENTION_PSEUDONYM_KEY"].encode())
    return {pseudo.key_for(record_type, i): int(i) for i in ids}


def by_record(rows: list[dict]) -> dict[tuple[str, str], dict]:
    out = {}
    for r in rows:
        assert (r["record_type"], r["record_key"]) not in out, "two ledger rows for one record in one run"
        out[(r["record_type"], r["record_key"])] = r
    return out


def assert_untouched(before: pd.DataFrame, after: pd.DataFrame, ids, what: str) -> None:
    ids = sorted(ids)
    missing = set(ids) - set(after.index)
    assert not missing, f"{len(missing)} {what} were erased"
    changed = before.loc[ids].compare(after.loc[ids])
    assert changed.empty, f"{what} were modified:\n{changed.head()}"


# --- the pipeline's steps, in-process (for faults between steps) -------------------------------


def adapter_for(z: Zendesk, **kw) -> TicketingAdapter:
    options = {"base_url": z.base_url, "email": "agent@example.org", "api_token": "token", **CLIENT_LIMITS, **kw}
    return TicketingAdapter(ZendeskClient(**options))


def planned_run(z: Zendesk, run_id: str, *, max_plan_share: float | None = None) -> pipeline.RunInfo:
    """open_run, extract, plan, validate: a run ready to erase."""
    run = pipeline.RunInfo.from_dict(
        pipeline.open_run("retention_nightly", run_id, None, dry_run=False, max_plan_share=max_plan_share)
    )
    adapter = adapter_for(z)
    try:
        pipeline.extract(run, "ticketing", adapter)
    finally:
        adapter.close()
    pipeline.plan(run, "ticketing")
    pipeline.validate(run, "ticketing")
    return run


def finish(run: pipeline.RunInfo, z: Zendesk) -> dict:
    adapter = adapter_for(z)
    try:
        pipeline.erase(run, "ticketing", adapter)
        pipeline.verify(run, "ticketing", adapter)
    finally:
        adapter.close()
    return pipeline.report(run, ("ticketing",))


def plan_ids(run: pipeline.RunInfo, record_type: str, action: str = "erase") -> set[int]:
    frame = run.staging.read_frame("ticketing", "plan")
    rows = frame[(frame["record_type"] == record_type) & (frame["action"] == action)]
    return {int(i) for i in rows["record_id"]}


# --- 1. a real Airflow run -------------------------------------------------------------------


def _walk(value, path=()):
    if isinstance(value, dict):
        for k, v in value.items():
            yield path, k
            yield from _walk(v, (*path, k))
    elif isinstance(value, list):
        for v in value:
            if isinstance(v, (dict, list)):
                yield from _walk(v, path)
            else:
                yield path, v
    else:
        yield path, value


def assert_no_identifiers(where: str, text: str, ticket_ids: set[int], user_ids: set[int]) -> None:
    """No synthetic e-mail address, no user id, and no ticket id as an identifier (a JSON list
    element or key, or an ``id``-named field) in ``text`` (JSON where it parses)."""
    assert not re.search(r"user\d+@example\.org", text), f"a requester's e-mail address leaked into the {where}"
    leaked_users = set(map(int, re.findall(r"\b1\d{9}\b", text))) & user_ids
    assert not leaked_users, f"requester ids leaked into the {where}"
    try:
        parsed = json.loads(text)
    except ValueError:
        return
    for path, leaf in _walk(parsed):
        name = str(path[-1]) if path else ""
        as_id = str(leaf)
        if as_id.isdigit() and int(as_id) in ticket_ids and (isinstance(leaf, str) or "id" in name.lower()):
            pytest.fail(f"ticket id leaked into the {where} at {'/'.join(map(str, path))}")


@pytest.mark.airflow
def test_nightly_run_erases_exactly_what_is_due_once_and_a_second_run_nothing(zendesk, retention_home, capfd):
    z = zendesk
    # A due ticket soft-deleted through the API just before the run: already half-way.
    before_api = z.tickets()
    due_now = due_tickets(before_api, pd.Timestamp(z.now))
    pre_deleted = min(t for t in due_now if t > 6)
    z.api("DELETE", f"/api/v2/tickets/{pre_deleted}.json")
    t0, u0 = z.tickets(), z.users()
    assert t0.loc[pre_deleted, "status"] == "deleted"
    assert (t0.loc[z.soft_deleted["aged"] + z.soft_deleted["recent"], "status"] == "deleted").all()

    dr = run_dag({"systems": ["ticketing"]})
    assert dr.state == "success", task_states(dr)
    as_of = as_of_of(retention_home)
    assert abs(as_of - pd.Timestamp(z.now)) < pd.Timedelta(hours=1), "expected a run as of about now"
    t1, u1, s = z.tickets(), z.users(), z.stats()

    # Tickets: exactly the due ones are gone, for good; nothing due remains; the rest untouched.
    due = due_tickets(t0, as_of)
    assert set(z.soft_deleted["aged"]) <= due and pre_deleted in due
    assert len(due) > 150
    assert set(t0.index) - set(t1.index) == due
    assert not due_tickets(t1, as_of), "a ticket the policy says must go is still there"
    assert set(t1.index[t1["status"] == "deleted"]) == set(z.soft_deleted["recent"]), "a soft-deleted ticket is waiting"
    unsolved = t0.index[t0["status"].isin(UNSOLVED)]
    assert len(unsolved) > 100
    assert_untouched(t0, t1, unsolved, "new/open/pending/hold tickets")
    assert_untouched(t0, t1, set(t0.index) - due, "tickets not due")
    assert s["tickets_permanently_deleted"] == len(due)
    assert s["permanent_ticket_deletions"] == len(due)
    assert s["soft_ticket_deletions"] == len(due - {pre_deleted} - set(z.soft_deleted["aged"])) + 1  # + the API's own
    assert s["tickets_soft_deleted"] == len(z.soft_deleted["recent"])

    # Users: end users with nothing left are gone, for good; everyone else untouched.
    gone_users = users_without_tickets(u0, t1, t0, as_of)
    assert set(u0.index) - set(u1.index) == gone_users
    assert int(z.edge["user_all_due"]) in gone_users
    # Users created within the year who have not filed a ticket yet, and users CC'd on or
    # following a ticket that stays, keep their accounts (issue 10, item 2).
    idle = set(z.edge["users_without_tickets"])
    assert idle and not idle & gone_users, "a new user with no ticket yet was erased"
    ccd = {u for cc in t1["cc"] for u in map(int, str(cc).split())} & set(u0.index[u0["role"] == "end-user"])
    ccd_only = ccd - set(t1["requester_id"].astype(int))
    assert ccd_only and not ccd_only & gone_users, "a user CC'd on a ticket that stays was erased"
    survivor = int(z.edge["user_due_and_open"])
    assert survivor in u1.index and u1.loc[survivor, "active"], "the requester of an open ticket was deleted"
    staff = u0.index[u0["role"] != "end-user"]
    assert len(staff) >= 4
    assert_untouched(u0, u1, staff, "agents/admins")
    assert_untouched(u0, u1, set(u0.index) - gone_users, "users with a ticket left")
    assert s["permanent_user_deletions"] == len(gone_users) and s["users_soft_deleted"] == 0

    # Ledger: one row per erased record, keyed by pseudonym, statuses agreeing with the server.
    rows = ledger_rows(retention_home, dr.run_id)
    ledger = by_record(rows)
    ticket_keys, user_keys = keys("support_ticket", due), keys("ticket_user", gone_users)
    assert {k for t, k in ledger if t == "support_ticket"} == set(ticket_keys)
    assert {k for t, k in ledger if t == "ticket_user"} == set(user_keys)
    assert {r["status"] for r in rows} == {"erased"}
    assert all(r["completed_at"] and r["policy_version"] for r in rows)
    for tid in z.soft_deleted["aged"]:
        assert ledger[("support_ticket", next(k for k, v in ticket_keys.items() if v == tid))]["rule_id"] == "soft-deleted-ticket"
    assert {r["rule_id"] for r in rows if r["record_type"] == "ticket_user"} == {"ticket-requester"}

    report = json.loads((retention_home / "reports" / "latest.json").read_text())
    assert report["state"] == "success" and report["run_id"] == dr.run_id
    per_rule = report["ledger"]["ticketing"]
    assert per_rule["support-ticket"]["erased"] + per_rule["soft-deleted-ticket"]["erased"] == s["permanent_ticket_deletions"]
    assert per_rule["ticket-requester"] == {"erased": s["permanent_user_deletions"]}
    assert report["systems"]["ticketing"]["verify"] == {"dry_run": False, "checked": len(due) + len(gone_users), "still_present": 0}
    assert report["systems"]["ticketing"]["extracted"] == {"support_ticket": len(t0), "ticket_user": len(u0)}

    # No requester id, ticket id or e-mail address in what the run leaves behind.
    out, err = capfd.readouterr()
    user_ids = set(u0.index)
    ticket_ids = set(t0.index)
    for i, value in enumerate(xcom_values(dr)):
        assert_no_identifiers(f"xcom #{i}", value, ticket_ids, user_ids)
    for path in (retention_home / "reports").iterdir():
        assert_no_identifiers(f"report {path.name}", path.read_text(), ticket_ids, user_ids)
    assert_no_identifiers("task output", out + err, ticket_ids, user_ids)
    assert not (retention_home / "staging" / "retention_nightly").exists() or not any(
        (retention_home / "staging" / "retention_nightly").iterdir()
    ), "staging (which holds record ids) was left behind after a successful run"

    # A second run: nothing is due any more.
    dr2 = run_dag({"systems": ["ticketing"]})
    assert dr2.state == "success", task_states(dr2)
    s2 = z.stats()
    for counter in ("soft_ticket_deletions", "permanent_ticket_deletions", "soft_user_deletions", "permanent_user_deletions"):
        assert s2[counter] == s[counter], f"the second run changed {counter}"
    assert ledger_rows(retention_home, dr2.run_id) == []
    assert_untouched(t1, z.tickets(), t1.index, "tickets (second run)")
    assert_untouched(u1, z.users(), u1.index, "users (second run)")


# --- 2. soft, then permanent, with job statuses polled to the end ------------------------------


class Trace:
    """Every call the client makes through its retrying session, in the order answered, with the
    ids it carried and, for jobs, the job id, state and the ids the job reported on. A job-status
    poll (``job_statuses/show_many``) reports on many jobs: it is recorded as one entry per job
    (``poll`` numbers the request they came in)."""

    def __init__(self, adapter: TicketingAdapter):
        self.calls: list[dict] = []
        self.polls = 0
        self._lock = threading.Lock()
        session = adapter.client.session
        inner = session.request

        def job_entry(job: dict) -> dict:
            return {"job": job["id"], "state": job["status"], "job_type": job["job_type"],
                    "processed": [r["id"] for r in job["results"] or []],
                    "done": [r["id"] for r in job["results"] or [] if r.get("success")]}

        def request(method, path, **kw):
            resp = inner(method, path, **kw)
            ids = (kw.get("params") or {}).get("ids")
            call = {"method": method, "path": path.split("?")[0], "status": resp.status_code}
            with self._lock:
                if resp.status_code == 200 and "job_statuses/show_many" in path:
                    self.polls += 1
                    for job in resp.json()["job_statuses"]:
                        self.calls.append({**call, "ids": [], "poll": self.polls, **job_entry(job)})
                    return resp
                call["ids"] = [int(i) for i in ids.split(",")] if ids else []
                if resp.status_code == 200 and "destroy_many" in path:
                    call.update(job_entry(resp.json()["job_status"]))
                self.calls.append(call)
            return resp

        session.request = request

    def submissions(self, kind: str) -> list[dict]:
        path = {"soft": "/api/v2/tickets/destroy_many.json", "permanent": "/api/v2/deleted_tickets/destroy_many.json"}[kind]
        return [c for c in self.calls if c["method"] == "DELETE" and c["path"] == path and "job" in c]

    def final_state(self, job_id: str) -> dict:
        return [c for c in self.calls if c.get("job") == job_id][-1]


def assert_each_processed_once(trace: Trace, kind: str, ids: set[int]) -> None:
    """Every id was processed by exactly one job of this kind, and no id was sent again after
    a job had processed it (a job that failed part-way is resumed with the rest only)."""
    processed: dict[int, int] = {}
    for sub in trace.submissions(kind):
        final = trace.final_state(sub["job"])
        assert final["state"] in ("completed", "failed"), f"{kind} job {final['state']}: not polled to its end"
        assert not set(sub["ids"]) & set(processed), f"a {kind} job was sent ids an earlier job had processed"
        for tid in final["processed"]:
            processed[tid] = processed.get(tid, 0) + 1
    assert set(processed) == ids
    assert set(processed.values()) == {1}


def test_soft_then_permanent_deletion_with_job_statuses_polled_to_completion(zendesk, retention_home):
    z = zendesk
    run = planned_run(z, "manual__soft_then_permanent")
    planned = plan_ids(run, "support_ticket")
    already_soft = set(z.soft_deleted["aged"])
    assert already_soft <= planned and len(planned) > 150
    s0 = z.stats()

    samples, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            st = z.stats()
            samples.append((st["soft_ticket_deletions"], st["permanent_ticket_deletions"]))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    adapter = adapter_for(z)
    trace = Trace(adapter)
    sampler.start()
    try:
        outcome = pipeline.erase(run, "ticketing", adapter)
    finally:
        stop.set()
        sampler.join()
        adapter.close()
    s1 = z.stats()

    # The server: a soft deletion for every planned ticket not already soft-deleted, then a
    # permanent deletion for every planned ticket; never more permanent than soft-deleted.
    assert s1["soft_ticket_deletions"] - s0["soft_ticket_deletions"] == len(planned - already_soft)
    assert s1["permanent_ticket_deletions"] - s0["permanent_ticket_deletions"] == len(planned)
    assert all(perm <= soft + len(already_soft) for soft, perm in samples)
    assert any(soft > perm for soft, perm in samples[1:]), "no soft deletion was seen before its permanent one"
    assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(samples, samples[1:]))
    assert set(s1["jobs"]) == {"completed"}, f"jobs left unfinished or failed: {s1['jobs']}"

    # The client: each ticket soft-deleted by one job, then (after that job completed) sent to
    # one permanent-deletion job; every job polled until completed.
    soft_subs, perm_subs = trace.submissions("soft"), trace.submissions("permanent")
    assert s1["jobs"]["completed"] - s0["jobs"].get("completed", 0) == len(soft_subs) + len(perm_subs)
    assert all(len(c["ids"]) <= 100 for c in soft_subs + perm_subs)
    assert_each_processed_once(trace, "soft", planned)
    assert_each_processed_once(trace, "permanent", planned)
    position = {id(c): i for i, c in enumerate(trace.calls)}
    soft_done_at = {}
    for sub in soft_subs:
        final = trace.final_state(sub["job"])
        assert final["state"] == "completed" and final is not sub, "a soft-deletion job was not polled"
        for tid in sub["ids"]:
            soft_done_at[tid] = position[id(final)]
    for sub in perm_subs:
        final = trace.final_state(sub["job"])
        assert final["state"] == "completed" and final is not sub, "a permanent-deletion job was not polled"
        assert set(final["done"]) == set(sub["ids"])
        assert all(soft_done_at[tid] < position[id(sub)] for tid in sub["ids"]), "permanent deletion before the soft job ended"
    polls = [c for c in trace.calls if c["path"].startswith("/api/v2/job_statuses/")]
    assert {c["state"] for c in polls} <= {"queued", "working", "completed"}
    sent = s1["requests_by_endpoint"]["job_statuses.show_many"] - s0["requests_by_endpoint"].get("job_statuses.show_many", 0)
    assert sent == trace.polls and "job_statuses" not in s1["requests_by_endpoint"]
    # No job is asked for again once a poll saw it end. (That jobs waited for together share
    # a poll is test_zendesk_client's: these jobs end in 0.1 s, and on a loaded machine the
    # chunks' jobs may not overlap at all, each then rightly polled on its own.)
    ended_at = {}
    for c in polls:
        assert c["job"] not in ended_at or ended_at[c["job"]] == c["poll"], "a job was polled after it was seen ending"
        if c["state"] in ("completed", "failed"):
            ended_at[c["job"]] = c["poll"]
    peak = adapter.client.jobs_in_flight_peak
    assert 1 <= peak <= adapter.client.max_jobs_in_flight <= 30

    # Users after their tickets: read again right before their deletion (one show_many for each
    # hundred, then each one's live tickets counted), then soft, then permanent, one each.
    users = plan_ids(run, "ticket_user")
    user_calls = [(c["method"], c["path"]) for c in trace.calls if "users/" in c["path"]]
    reads = [i for i, call in enumerate(user_calls) if call == ("GET", "/api/v2/users/show_many.json")]
    for uid in users:
        related_at = user_calls.index(("GET", f"/api/v2/users/{uid}/related.json"))
        soft_at = user_calls.index(("DELETE", f"/api/v2/users/{uid}.json"))
        perm_at = user_calls.index(("DELETE", f"/api/v2/deleted_users/{uid}.json"))
        assert reads and reads[0] < related_at < soft_at < perm_at
    assert len(reads) == -(-len(users) // 100)
    assert len(user_calls) == 3 * len(users) + len(reads)
    last_ticket_call = max(position[id(c)] for c in soft_subs + perm_subs)
    first_user_call = min(i for i, c in enumerate(trace.calls) if "users/" in c["path"])
    assert last_ticket_call < first_user_call, "a requester was deleted before the tickets were"
    assert s1["permanent_user_deletions"] - s0["permanent_user_deletions"] == len(users)
    assert {k: v for k, v in outcome["outcomes"].items() if v} == {"erased": len(planned) + len(users)}
    statuses = {(r["record_type"], r["status"]) for r in ledger_rows(retention_home, run.run_id)}
    assert statuses == {("support_ticket", "erased"), ("ticket_user", "erased")}


# --- 3. throttling and server errors during erasure ------------------------------------------


def assert_erased_exactly(z: Zendesk, before: pd.DataFrame, users_before: pd.DataFrame, due: set[int], gone_users: set[int], s0: dict) -> dict:
    after, users_after, s = z.tickets(), z.users(), z.stats()
    assert set(before.index) - set(after.index) == due
    assert_untouched(before, after, set(before.index) - due, "tickets not planned")
    assert set(users_before.index) - set(users_after.index) == gone_users
    assert_untouched(users_before, users_after, set(users_before.index) - gone_users, "users not planned")
    assert s["permanent_ticket_deletions"] - s0["permanent_ticket_deletions"] == len(due), "a ticket erased twice, or lost"
    assert s["permanent_user_deletions"] - s0["permanent_user_deletions"] == len(gone_users)
    return s


@pytest.mark.airflow
def test_throttling_and_server_errors_during_erasure_still_erase_each_planned_ticket_once(zendesk, retention_home):
    z = zendesk
    t0, u0, s0 = z.tickets(), z.users(), z.stats()
    z.faults(throttle_next=4, error_next=6, error_status=503, match="destroy_many")
    dr = run_dag({"systems": ["ticketing"]})
    assert dr.state == "success", task_states(dr)
    as_of = as_of_of(retention_home)
    due = due_tickets(t0, as_of)
    gone_users = users_without_tickets(u0, t0.drop(index=list(due)), t0, as_of)
    s = assert_erased_exactly(z, t0, u0, due, gone_users, s0)
    assert s["errors_injected"] - s0["errors_injected"] == 10, "the faults did not all fire"
    assert s["requests_by_endpoint"]["tickets.destroy_many"] > len(due) / 100 + 1
    rows = ledger_rows(retention_home, dr.run_id)
    assert len(by_record(rows)) == len(due) + len(gone_users)
    assert {r["status"] for r in rows} == {"erased"}
    assert json.loads((retention_home / "reports" / "latest.json").read_text())["systems"]["ticketing"]["verify"]["still_present"] == 0


class FaultsPerRecordType:
    """Arms the stand-in's faults just before each record type's erasure: bursts on the job
    polls while tickets go, on the user endpoints while requesters go."""

    def __init__(self, inner: TicketingAdapter, z: Zendesk, faults: dict[str, dict]):
        self.inner, self.z, self.plan = inner, z, faults
        self.system, self.record_types, self.erase_batch = inner.system, inner.record_types, inner.erase_batch

    def erase(self, record_type, action, record_ids, *recheck):
        self.z.faults(**self.plan[record_type])
        return self.inner.erase(record_type, action, record_ids, *recheck)

    def still_present(self, record_type, record_ids):
        return self.inner.still_present(record_type, record_ids)

    def close(self):
        self.inner.close()


def test_faults_on_job_polls_and_user_deletions_still_erase_each_planned_record_once(zendesk, retention_home):
    z = zendesk
    t0, u0 = z.tickets(), z.users()
    run = planned_run(z, "manual__faults_polls_users")
    due, users = plan_ids(run, "support_ticket"), plan_ids(run, "ticket_user")
    s0 = z.stats()
    adapter = FaultsPerRecordType(adapter_for(z), z, {
        "support_ticket": {"throttle_next": 2, "error_next": 3, "error_status": 500, "match": "job_statuses"},
        "ticket_user": {"throttle_next": 2, "error_next": 3, "error_status": 502, "match": "users/"},
    })
    try:
        pipeline.erase(run, "ticketing", adapter)
    finally:
        adapter.close()
    z.faults()
    assert finish(run, z)["state"] == "success"
    s = assert_erased_exactly(z, t0, u0, due, users, s0)
    assert s["errors_injected"] - s0["errors_injected"] == 10, "the faults did not all fire"
    rows = ledger_rows(retention_home, run.run_id)
    assert len(by_record(rows)) == len(due) + len(users)
    assert {r["status"] for r in rows} == {"erased"}


# --- 4. a job failing part-way; a task killed after the write-ahead ----------------------------


def test_jobs_failing_part_way_are_resumed_without_repeating_or_losing_an_erasure(zendesk, retention_home):
    z = zendesk
    t0, u0 = z.tickets(), z.users()
    run = planned_run(z, "manual__failing_jobs")
    due, users = plan_ids(run, "support_ticket"), plan_ids(run, "ticket_user")
    s0 = z.stats()

    # First attempt: one job per chunk allowed, two jobs fail after 30 of their ids: those
    # chunks' remaining tickets fail, and so does the task.
    z.faults(fail_job_next=2, fail_job_after=30, match="destroy_many")
    first = adapter_for(z, max_job_attempts=1)
    trace1 = Trace(first)
    with pytest.raises(RuntimeError, match="erasures failed"):
        pipeline.erase(run, "ticketing", first)
    first.close()
    failed = {k for (t, k), s in open_ledger().statuses(run.run_id, "ticketing").items() if s == "failed"}
    assert failed and len(failed) <= 2 * 70
    assert z.stats()["jobs"]["failed"] == 2

    # The retry: more jobs fail part-way, the client resubmits only their unprocessed ids.
    z.faults(fail_job_next=3, fail_job_after=20, match="destroy_many")
    second = adapter_for(z)
    trace2 = Trace(second)
    try:
        pipeline.erase(run, "ticketing", second)
        pipeline.verify(run, "ticketing", second)
    finally:
        second.close()
    s = assert_erased_exactly(z, t0, u0, due, users, s0)
    assert s["jobs"]["failed"] == 5
    assert s["soft_ticket_deletions"] - s0["soft_ticket_deletions"] == len(due - set(z.soft_deleted["aged"]))

    # Across both attempts every ticket was processed by exactly one soft and one permanent job.
    merged = Trace.__new__(Trace)
    merged.calls = trace1.calls + trace2.calls
    assert_each_processed_once(merged, "soft", due)
    assert_each_processed_once(merged, "permanent", due)
    resumed = 0
    for kind in ("soft", "permanent"):
        subs = trace2.submissions(kind)
        for i, sub in enumerate(subs):
            final = trace2.final_state(sub["job"])
            if final["state"] != "failed":
                continue
            assert len(final["processed"]) == min(20, len(sub["ids"]))
            rest = [t for t in sub["ids"] if t not in set(final["processed"])]
            if rest:  # a job of <= 20 ids failed only after doing all of them
                assert any(later["ids"] == rest for later in subs[i + 1 :]), f"a failed {kind} job's rest was not resubmitted"
                resumed += 1
    assert resumed >= 2  # the retry sends the failed ids again: its first jobs hold more than 20

    rows = ledger_rows(retention_home, run.run_id)
    ledger = by_record(rows)
    assert {k for t, k in ledger if t == "support_ticket"} == set(keys("support_ticket", due))
    assert {r["status"] for r in rows} == {"erased"}, "the retry did not complete every failed entry"


class KilledAfterFirstBatch:
    """An adapter whose task dies right after its first batch went through the API, before the
    ledger hears about it."""

    def __init__(self, inner: TicketingAdapter, batch: int):
        self.inner = inner
        self.system, self.record_types, self.erase_batch = inner.system, inner.record_types, batch
        self.batches: list[list[str]] = []

    def extract(self, write, now):
        raise AssertionError("not used")

    def erase(self, record_type, action, record_ids, *recheck):
        outcomes = dict(self.inner.erase(record_type, action, record_ids, *recheck))
        self.batches.append(list(record_ids))
        assert set(outcomes.values()) == {"erased"}
        raise KeyboardInterrupt("task killed")
        yield  # an adapter's erase yields its outcomes; this one dies before the first

    def still_present(self, record_type, record_ids):
        return self.inner.still_present(record_type, record_ids)

    def close(self):
        self.inner.close()


def test_killed_erase_task_resumes_from_the_ledger_and_erases_each_ticket_once(zendesk, retention_home):
    z = zendesk
    t0, u0 = z.tickets(), z.users()
    run = planned_run(z, "manual__killed")
    due, users = plan_ids(run, "support_ticket"), plan_ids(run, "ticket_user")
    s0 = z.stats()

    killed = KilledAfterFirstBatch(adapter_for(z), batch=60)
    with pytest.raises(KeyboardInterrupt):
        pipeline.erase(run, "ticketing", killed)
    killed.close()
    (first_batch,) = killed.batches
    first_batch = {int(i) for i in first_batch}
    assert len(first_batch) == 60 and first_batch <= due
    assert z.stats()["permanent_ticket_deletions"] - s0["permanent_ticket_deletions"] == 60
    statuses = open_ledger().statuses(run.run_id, "ticketing")
    ticket_keys = keys("support_ticket", due)
    assert {ticket_keys[k] for (t, k), s in statuses.items() if t == "support_ticket"} == due, "write-ahead incomplete"
    # The killed batch was marked submitted before it went; the engine heard nothing of it.
    sent = {ticket_keys[k] for (t, k), s in statuses.items() if t == "support_ticket" and s == "submitted"}
    assert sent == first_batch, "the killed batch is not the submitted one"
    assert {s for (t, k), s in statuses.items()} == {"planned", "submitted"}, "the ledger heard of the killed batch"

    result = finish(run, z)
    assert result["state"] == "success"
    assert_erased_exactly(z, t0, u0, due, users, s0)
    rows = ledger_rows(retention_home, run.run_id)
    ledger = by_record(rows)
    assert len(ledger) == len(due) + len(users)
    status_of = {ticket_keys[k]: r["status"] for (t, k), r in ledger.items() if t == "support_ticket"}
    assert set(status_of) == due
    # The killed attempt's batch is booked to this run: erased, with a detail saying so.
    assert {status_of[t] for t in first_batch} == {"erased"}
    by_killed = {ticket_keys[k] for (t, k), r in ledger.items()
                 if t == "support_ticket" and r["detail"] == "erased by an earlier attempt of this run, killed before it heard back"}
    assert by_killed == first_batch
    assert {status_of[t] for t in due - first_batch} == {"erased"}
    assert not [r for r in rows if r["status"] in ("planned", "submitted", "already_gone") or not r["completed_at"]]


# --- 5. a requester with an open ticket ---------------------------------------------------------


class _Later(datetime):
    """``datetime`` for a pipeline living 400 days on (a run as of a year after today's solve)."""

    @classmethod
    def now(cls, tz=None):
        return datetime.now(tz) + timedelta(days=400)


def test_requester_with_an_open_ticket_keeps_the_account_until_it_is_closed_and_its_year_is_over(zendesk, retention_home, monkeypatch):
    z = zendesk
    uid = int(z.edge["user_due_and_open"])
    t0 = z.tickets()
    theirs = t0[t0["requester_id"] == uid]
    due_one = int(theirs.index[theirs["status"] == "closed"][0])
    open_one = int(theirs.index[theirs["status"] == "open"][0])
    assert len(theirs) == 2
    user_key = next(iter(keys("ticket_user", [uid])))

    # Run 1: the due ticket goes, the requester of an open ticket is not even planned.
    run1 = planned_run(z, "manual__requester_1")
    assert due_one in plan_ids(run1, "support_ticket") and open_one not in plan_ids(run1, "support_ticket")
    assert uid not in plan_ids(run1, "ticket_user")
    assert finish(run1, z)["state"] == "success"
    t1, u1 = z.tickets(), z.users()
    assert due_one not in t1.index and open_one in t1.index
    assert uid in u1.index and u1.loc[uid, "active"]
    assert ("ticket_user", user_key) not in by_record(ledger_rows(retention_home, run1.run_id))

    # The ticket is closed through the API: its year starts now.
    ticket = z.set_status(open_one, "closed")
    assert ticket["status"] == "closed"
    closed = z.tickets().loc[open_one]
    assert closed["status"] == "closed" and closed["solved_at"] > pd.Timestamp(z.now) - pd.Timedelta(minutes=10)

    # Run 2, right away: the closed ticket is kept for its year, so is its requester.
    run2 = planned_run(z, "manual__requester_2")
    assert open_one not in plan_ids(run2, "support_ticket") and uid not in plan_ids(run2, "ticket_user")
    assert finish(run2, z)["state"] == "success"
    assert open_one in z.tickets().index and uid in z.users().index

    # Run 3, as of 400 days on: ticket and requester go; unsolved tickets and their requesters stay.
    from retention.runs import context

    monkeypatch.setattr(pipeline, "datetime", _Later)
    monkeypatch.setattr(context, "datetime", _Later)  # where the run's as-of time is fixed
    t2, u2 = z.tickets(), z.users()
    run3 = planned_run(z, "manual__requester_3", max_plan_share=1.0)
    as_of = run3.as_of_ts
    assert as_of > closed["solved_at"] + pd.DateOffset(years=1)
    assert open_one in plan_ids(run3, "support_ticket") and uid in plan_ids(run3, "ticket_user")
    assert finish(run3, z)["state"] == "success"
    t3, u3 = z.tickets(), z.users()
    assert open_one not in t3.index and uid not in u3.index
    due = due_tickets(t2, as_of)
    assert set(t2.index) - set(t3.index) == due
    unsolved = t2.index[t2["status"].isin(UNSOLVED)]
    assert_untouched(t2, t3, unsolved, "unsolved tickets (400 days on)")
    assert set(u2.index) - set(u3.index) == users_without_tickets(u2, t3, t2, as_of)
    row = by_record(ledger_rows(retention_home, run3.run_id))[("ticket_user", user_key)]
    assert (row["rule_id"], row["status"]) == ("ticket-requester", "erased")


# --- 6. a manual hold --------------------------------------------------------------------------


# A hold's reason is free text and may name a person: it must stay out of the erasure ledger.
HOLD_REASON = "dispute raised by Anna Svensson"


def hold_from_cli(home, ticket_id: int) -> None:
    env = dict(os.environ, RETENTION_HOME=str(home))
    out = subprocess.run(
        [sys.executable, "-m", "retention.cli", "hold", "add", "--record-type", "support_ticket",
         "--record-id", str(ticket_id), "--reason", HOLD_REASON],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True,
    )
    assert out.stdout.startswith(f"hold added: support_ticket {next(iter(keys('support_ticket', [ticket_id])))}")


def held_and_other(z: Zendesk, tickets: pd.DataFrame) -> tuple[int, int, int]:
    """The user all of whose two tickets are due: (user, the closed one to hold, the other)."""
    uid = int(z.edge["user_all_due"])
    theirs = tickets[tickets["requester_id"] == uid]
    assert len(theirs) == 2 and len(due_tickets(theirs, pd.Timestamp(z.now))) == 2
    held = int(theirs.index[theirs["status"] == "closed"][0])
    return uid, held, int(theirs.index[theirs.index != held][0])


@pytest.mark.airflow
def test_manual_hold_from_the_cli_keeps_a_due_ticket(zendesk, retention_home):
    z = zendesk
    t0 = z.tickets()
    _, held, other = held_and_other(z, t0)
    hold_from_cli(retention_home, held)

    dr = run_dag({"systems": ["ticketing"]})
    assert dr.state == "success", task_states(dr)
    t1 = z.tickets()
    assert held in t1.index, "a ticket on manual hold was erased"
    assert_untouched(t0, t1, [held], "the held ticket")
    assert other not in t1.index
    due = due_tickets(t0, as_of_of(retention_home))
    assert set(t0.index) - set(t1.index) == due - {held}
    assert z.stats()["permanent_ticket_deletions"] == len(due) - 1

    ledger = by_record(ledger_rows(retention_home, dr.run_id))
    row = ledger[("support_ticket", next(iter(keys("support_ticket", [held]))))]
    assert (row["status"], row["action"], row["rule_id"]) == ("held", "hold", "support-ticket")
    assert re.fullmatch(r"manual hold #\d+", row["hold"]), row["hold"]  # a reference, not the reason
    assert not any("Svensson" in str(v) for r in ledger.values() for v in r.values())
    assert row["completed_at"]
    assert "Svensson" not in (retention_home / "reports" / "latest.json").read_text()
    report = json.loads((retention_home / "reports" / "latest.json").read_text())
    assert report["ledger"]["ticketing"]["support-ticket"]["held"] == 1


def test_requester_of_a_held_ticket_is_kept(zendesk, retention_home):
    z = zendesk
    uid, held, _ = held_and_other(z, z.tickets())
    hold_from_cli(retention_home, held)
    run = planned_run(z, "manual__held_requester")
    assert held in plan_ids(run, "support_ticket", "hold")
    assert uid not in plan_ids(run, "ticket_user"), "the requester of a held ticket was planned for erasure"
    finish(run, z)
    assert held in z.tickets().index
    assert uid in z.users().index, "the requester of a held ticket was erased"


# --- a ticket reopened between plan and erase ---------------------------------------------------


def test_ticket_reopened_after_the_plan_is_not_erased(zendesk, retention_home):
    """A requester replies to a solved ticket after the plan was made (or before a retried erase
    task): Zendesk reopens it, and an unsolved ticket is never erased, whatever the plan says."""
    z = zendesk
    t0 = z.tickets()
    run = planned_run(z, "manual__reopened")
    due = plan_ids(run, "support_ticket")
    solved = sorted(t for t in due if t0.loc[t, "status"] == "solved")
    assert solved
    reopened = solved[0]
    assert z.set_status(reopened, "open")["status"] == "open"
    finish(run, z)
    t1 = z.tickets()
    assert reopened in t1.index and t1.loc[reopened, "status"] == "open", "a reopened (unsolved) ticket was erased"
    assert set(t0.index) - set(t1.index) == due - {reopened}


# --- 7. state that changes between plan and erase ------------------------------------------------


def test_a_ticket_solved_again_and_a_user_made_agent_after_the_plan_are_kept(zendesk, retention_home):
    """After validation a planned ticket is reopened and solved again (its year starts again) and
    a planned requester becomes an agent. Each chunk is read again right before its deletion and
    the domain judges it: both are kept (deferred, with the reason); the rest planned goes."""
    z = zendesk
    run = planned_run(z, "manual__changed_after_plan")
    tickets, users = plan_ids(run, "support_ticket"), plan_ids(run, "ticket_user")
    t0 = z.tickets()
    resolved = next(t for t in sorted(tickets) if t0.loc[t, "status"] == "solved")
    promoted = sorted(users)[0]
    z.set_status(resolved, "open")
    assert z.set_status(resolved, "solved")["status"] == "solved"
    assert z.api("PUT", f"/api/v2/users/{promoted}.json", json={"user": {"role": "agent"}}).json()["user"]["role"] == "agent"

    assert finish(run, z)["state"] == "success"
    assert resolved in z.tickets().index, "a ticket solved again after the plan was erased"
    assert promoted in z.users().index, "a user made an agent after the plan was erased"
    rows = by_record(ledger_rows(retention_home, run.run_id))
    for record_type, rid in (("support_ticket", resolved), ("ticket_user", promoted)):
        key = next(iter(keys(record_type, [rid])))
        assert rows[(record_type, key)]["status"] == "deferred" and rows[(record_type, key)]["detail"], record_type
    gone = {int(t) for t in tickets} - {resolved} - set(z.tickets().index)
    assert len(gone) == len(tickets) - 1, "a planned ticket that did not change was kept"


# --- 9. requesters before their tickets, through failing jobs and a 429 storm (issue 10, item 2) --


@pytest.mark.airflow
def test_no_requester_is_erased_while_a_ticket_of_theirs_failed_to_erase(zendesk, retention_home, monkeypatch):
    """A 429 storm on destroy_many and permanent-deletion jobs that keep failing part-way (one
    job attempt per chunk): many due tickets stay behind, soft-deleted, which the API itself does
    not count against deleting their requester. The run fails (erasures failed) after Airflow's
    retries, and no user is gone while a ticket they requested remains."""
    z = zendesk
    extra = {**CLIENT_LIMITS, "max_job_attempts": 1}
    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_ZENDESK", json.dumps({
        "conn_type": "retention_zendesk", "host": z.base_url, "login": "agent@example.org", "password": "token", "extra": extra,
    }))
    u0 = z.users()
    z.faults(throttle_next=6, fail_job_next=1000, fail_job_after=10, match="destroy_many")
    dr = run_dag({"systems": ["ticketing"]})
    z.faults()
    states = task_states(dr)
    assert dr.state == "failed" and states["ticketing.erase"] == "failed", states
    t1, u1 = z.tickets(), z.users()
    gone_users = set(u0.index) - set(u1.index)
    still_there = set(t1["requester_id"].astype(int))
    wrongly = gone_users & still_there
    assert not wrongly, f"{len(wrongly)} users erased with tickets still present"
    # The scenario happened: planned requesters were held back by their failed tickets.
    rows = [r for r in ledger_rows(retention_home, dr.run_id) if r["record_type"] == "ticket_user"]
    deferred = [r for r in rows if r["status"] == "deferred"]
    assert deferred and all("support_ticket" in (r["detail"] or "") for r in deferred)
    assert len(due_tickets(t1, pd.Timestamp.now(tz="UTC"))) > 50, "the faults left no due ticket behind"


def test_a_user_cc_d_on_a_live_ticket_after_the_plan_is_kept(zendesk, retention_home):
    """After validation a planned end user is CC'd on an open ticket. Right before their
    deletion each user's live tickets are counted (``users/{id}/related``): the user is kept,
    deferred with the reason; the other planned users go."""
    z = zendesk
    run = planned_run(z, "manual__cc_after_plan")
    users = plan_ids(run, "ticket_user")
    t0 = z.tickets()
    ccd = sorted(users)[1]
    open_ticket = int(t0.index[(t0["status"] == "open") & (t0["requester_id"] != ccd)][0])
    ticket = z.api("PUT", f"/api/v2/tickets/{open_ticket}.json", json={"ticket": {"email_cc_ids": [ccd]}}).json()["ticket"]
    assert ticket["email_cc_ids"] == [ccd] and ccd in ticket["collaborator_ids"]

    assert finish(run, z)["state"] == "success"
    assert ccd in z.users().index, "a user CC'd on a live ticket after the plan was erased"
    row = by_record(ledger_rows(retention_home, run.run_id))[("ticket_user", next(iter(keys("ticket_user", [ccd]))))]
    assert row["status"] == "deferred" and "no longer due" in row["detail"]
    gone = users - {ccd} - set(z.users().index)
    assert len(gone) == len(users) - 1, "a planned user who did not change was kept"
