"""The Zendesk stand-in server and its synthetic data, over real HTTP."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import numpy as np
import pytest
import requests

from retention_dev.standins import zendesk_data as zd
from retention_dev.standins.process import StandIn

NOW = datetime(2026, 5, 4, 10, 30, tzinfo=UTC)


def start(tmp_path, *args: str, tickets: int = 300, name: str = "zd.npz") -> StandIn:
    return StandIn(
        "zendesk",
        "--port", "0",
        "--state-file", str(tmp_path / name),
        "--tickets", str(tickets),
        "--seed", "7",
        "--job-seconds", "0.05",
        "--requests-per-minute", "100000",
        "--incremental-per-minute", "100000",
        "--deleted-list-per-minute", "100000",
        *args,
    ).start()


def wait_job(base: str, job: dict, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while job["status"] not in ("completed", "failed"):
        assert time.monotonic() < deadline, "job did not finish"
        time.sleep(0.02)
        job = requests.get(f"{base}/api/v2/job_statuses/{job['id']}.json").json()["job_status"]
    return job


def stats(base: str) -> dict:
    return requests.get(f"{base}/_standin/stats").json()


@pytest.fixture
def server(tmp_path):
    s = start(tmp_path)
    yield s
    s.stop()


# --- synthetic data -----------------------------------------------------------------------


def test_generate_is_deterministic_fast_and_has_the_mix():
    t0 = time.perf_counter()
    tickets, users = zd.generate(500_000, seed=11, now=NOW)
    assert time.perf_counter() - t0 < 5.0
    again, _ = zd.generate(500_000, seed=11, now=NOW)
    assert np.array_equal(tickets.solved_at, again.solved_at) and np.array_equal(tickets.requester_id, again.requester_id)

    names = set(tickets.status_names())
    assert names == {"new", "open", "pending", "hold", "solved", "closed"}
    assert abs(zd.count_due(tickets, NOW) / len(tickets) - 0.2) < 0.01
    done = np.isin(tickets.status, (zd.STATUS_CODE["solved"], zd.STATUS_CODE["closed"]))
    assert (tickets.solved_at[done] > 0).all() and (tickets.solved_at[~done] == zd.NO_TIME).all()
    assert (tickets.created_at <= tickets.updated_at).all()
    assert (tickets.solved_at[done] >= tickets.created_at[done]).all()
    assert (tickets.updated_at < NOW.timestamp()).all()

    # Users: ~one requester per three tickets, several tickets for some, idle end users, agents.
    per_user = np.bincount(tickets.requester_id - zd.USER_ID_BASE - 1, minlength=len(users))
    end_users = users.role == zd.ROLE_CODE["end-user"]
    assert abs((per_user > 0).sum() - len(tickets) / 3) < len(tickets) * 0.01
    assert per_user.max() > 1 and (per_user[end_users] == 0).sum() > 0
    assert (per_user[~end_users] == 0).all() and (users.role == zd.ROLE_CODE["agent"]).sum() >= 3


def test_generate_edge_cases():
    tickets, users = zd.generate(50, seed=3, now=NOW, due_share=0.5)
    frame = tickets.to_frame().set_index("id")
    edge = tickets.edge_cases
    year_ago = datetime(2025, 5, 4, 10, 30, tzinfo=UTC)
    assert frame.loc[edge["solved_one_year_ago"], "solved_at"] == year_ago
    leap = frame.loc[edge["leap_day_solve"], "solved_at"]
    assert (leap.month, leap.day, leap.year) == (2, 29, 2024)

    mixed = frame[frame.requester_id == edge["user_due_and_open"]]
    assert sorted(mixed.status) == ["closed", "open"]
    assert mixed[mixed.status == "closed"].solved_at.iloc[0] < year_ago
    all_due = frame[frame.requester_id == edge["user_all_due"]]
    assert len(all_due) == 2 and (all_due.solved_at < year_ago).all()
    assert set(all_due.status) <= {"solved", "closed"}
    idle = set(edge["users_without_tickets"])
    assert idle and not idle & set(frame.requester_id)
    assert set(users.to_frame().role) == {"end-user", "agent", "admin"}


def test_generate_rejects_too_few_tickets():
    with pytest.raises(ValueError):
        zd.generate(5, seed=1, now=NOW)


# --- HTTP ---------------------------------------------------------------------------------


def test_soft_then_permanent_deletion_sequence(server):
    base = server.base_url
    resp = requests.delete(f"{base}/api/v2/tickets/destroy_many.json", params={"ids": "10,11,999999"})
    assert resp.status_code == 200
    job = resp.json()["job_status"]
    assert job["status"] == "queued" and job["url"].endswith(f"/api/v2/job_statuses/{job['id']}.json")
    job = wait_job(base, job)
    assert job["status"] == "completed" and job["total"] == 3 and job["progress"] == 3
    by_id = {r["id"]: r for r in job["results"]}
    assert by_id[10]["success"] and by_id[11]["success"]
    assert not by_id[999999]["success"] and by_id[999999]["error"] == "RecordNotFound"

    # Soft-deleted: gone from the live API, listed in deleted_tickets, exported as "deleted".
    assert requests.get(f"{base}/api/v2/tickets/10.json").status_code == 404
    shown = requests.get(f"{base}/api/v2/tickets/show_many.json", params={"ids": "10,11,12"}).json()["tickets"]
    assert [t["id"] for t in shown] == [12]
    listed = requests.get(f"{base}/api/v2/deleted_tickets.json", params={"page[size]": 100}).json()
    assert [t["id"] for t in listed["deleted_tickets"]] == [10, 11] and not listed["meta"]["has_more"]
    exported = requests.get(
        f"{base}/api/v2/incremental/tickets/cursor.json", params={"start_time": int(time.time()) - 5}
    ).json()
    assert {t["id"]: t["status"] for t in exported["tickets"]} == {10: "deleted", 11: "deleted"}
    s = stats(base)
    assert s["tickets_soft_deleted"] == 2 and s["soft_ticket_deletions"] == 2 and s["permanent_ticket_deletions"] == 0

    # Permanent deletion only takes soft-deleted tickets.
    resp = requests.delete(f"{base}/api/v2/deleted_tickets/destroy_many.json", params={"ids": "10,12"})
    job = wait_job(base, resp.json()["job_status"])
    by_id = {r["id"]: r for r in job["results"]}
    assert by_id[10]["success"] and not by_id[12]["success"]
    listed = requests.get(f"{base}/api/v2/deleted_tickets.json", params={"page[size]": 100}).json()
    assert [t["id"] for t in listed["deleted_tickets"]] == [11]
    exported = requests.get(
        f"{base}/api/v2/incremental/tickets/cursor.json", params={"start_time": int(time.time()) - 5}
    ).json()
    assert [t["id"] for t in exported["tickets"]] == [11]
    s = stats(base)
    assert s["permanent_ticket_deletions"] == 1 and s["tickets_permanently_deleted"] == 1
    assert s["jobs"] == {"completed": 2}


def test_more_than_100_ids_is_rejected(server):
    ids = ",".join(str(i) for i in range(1, 102))
    for path in ("tickets/destroy_many", "deleted_tickets/destroy_many"):
        resp = requests.delete(f"{server.base_url}/api/v2/{path}.json", params={"ids": ids})
        assert resp.status_code == 400 and resp.json()["error"] == "TooManyValues"
    assert requests.get(f"{server.base_url}/api/v2/tickets/show_many.json", params={"ids": ids}).status_code == 400
    assert stats(server.base_url)["jobs"] == {}


def test_job_goes_queued_working_completed(tmp_path):
    s = start(tmp_path, "--job-seconds", "0.6")
    try:
        base = s.base_url
        job = requests.delete(f"{base}/api/v2/tickets/destroy_many.json", params={"ids": "5"}).json()["job_status"]
        seen = [job["status"]]
        while seen[-1] not in ("completed", "failed"):
            time.sleep(0.05)
            seen.append(requests.get(f"{base}/api/v2/job_statuses/{job['id']}").json()["job_status"]["status"])
        assert seen[0] == "queued" and "working" in seen and seen[-1] == "completed"
        assert seen.index("working") < len(seen) - 1
        assert requests.get(f"{base}/api/v2/job_statuses/nope").status_code == 404
    finally:
        s.stop()


def test_job_statuses_show_many_reports_many_jobs_at_once(tmp_path):
    s = start(tmp_path, "--job-seconds", "0.3")
    try:
        base = s.base_url
        jobs = [
            requests.delete(f"{base}/api/v2/tickets/destroy_many.json", params={"ids": str(i)}).json()["job_status"]
            for i in (5, 6, 7)
        ]
        ids = [j["id"] for j in jobs]
        shown = requests.get(f"{base}/api/v2/job_statuses/show_many.json", params={"ids": ",".join([*ids, "nope"])})
        assert shown.status_code == 200
        body = shown.json()["job_statuses"]
        assert [j["id"] for j in body] == ids  # the unknown id is left out
        assert {j["status"] for j in body} <= {"queued", "working"} and all(j["results"] is None for j in body)
        time.sleep(0.45)
        body = requests.get(f"{base}/api/v2/job_statuses/show_many", params={"ids": ",".join(ids)}).json()["job_statuses"]
        assert [j["status"] for j in body] == ["completed"] * 3
        assert [j["results"][0]["id"] for j in body] == [5, 6, 7]
        assert requests.get(f"{base}/api/v2/job_statuses/show_many", params={"ids": ""}).status_code == 400
        too_many = ",".join(f"j{i}" for i in range(101))
        assert requests.get(f"{base}/api/v2/job_statuses/show_many", params={"ids": too_many}).status_code == 400
        assert stats(base)["requests_by_endpoint"]["job_statuses.show_many"] == 4
    finally:
        s.stop()


def test_job_limit_30_queued_or_running_then_429(tmp_path):
    s = start(tmp_path, "--job-seconds", "1.5")
    try:
        base = s.base_url
        for i in range(30):
            resp = requests.delete(f"{base}/api/v2/tickets/destroy_many.json", params={"ids": str(i + 1)})
            assert resp.status_code == 200
        resp = requests.delete(f"{base}/api/v2/deleted_tickets/destroy_many.json", params={"ids": "1"})
        assert resp.status_code == 429 and resp.json()["error"] == "TooManyJobs"
        assert int(resp.headers["Retry-After"]) >= 1
        assert sum(stats(base)["jobs"].values()) == 30  # the refused job was not created
        time.sleep(1.6)  # the 30 have ended: room again
        resp = requests.delete(f"{base}/api/v2/deleted_tickets/destroy_many.json", params={"ids": "1"})
        assert resp.status_code == 200
    finally:
        s.stop()


def test_requester_of_unclosed_ticket_cannot_be_deleted(server):
    base = server.base_url
    edge = stats(base)["edge_cases"]
    user = edge["user_due_and_open"]
    resp = requests.delete(f"{base}/api/v2/users/{user}.json")
    assert resp.status_code == 422 and resp.json()["error"] == "RecordInvalid"

    # The user's open ticket is the fourth edge row (id 4); a solved ticket blocks too.
    assert requests.put(f"{base}/api/v2/tickets/4.json", json={"ticket": {"status": "solved"}}).status_code == 200
    assert requests.delete(f"{base}/api/v2/users/{user}.json").status_code == 422
    assert requests.put(f"{base}/api/v2/tickets/4.json", json={"ticket": {"status": "closed"}}).status_code == 200
    resp = requests.delete(f"{base}/api/v2/users/{user}.json")
    assert resp.status_code == 200 and resp.json()["user"]["active"] is False
    assert requests.get(f"{base}/api/v2/users/{user}.json").status_code == 404
    assert requests.get(f"{base}/api/v2/deleted_users/{user}.json").status_code == 200
    assert requests.delete(f"{base}/api/v2/users/{user}.json").status_code == 404
    resp = requests.delete(f"{base}/api/v2/deleted_users/{user}.json")
    assert resp.status_code == 200 and resp.json()["deleted_user"]["email"] is None
    assert requests.delete(f"{base}/api/v2/deleted_users/{user}.json").status_code == 404
    s = stats(base)
    assert s["permanent_user_deletions"] == 1 and s["users_permanently_deleted"] == 1

    # A soft-deleted ticket does not block its requester.
    other = edge["user_all_due"]  # tickets 5 (closed) and 6 (solved)
    assert requests.delete(f"{base}/api/v2/users/{other}.json").status_code == 422
    wait_job(base, requests.delete(f"{base}/api/v2/tickets/destroy_many", params={"ids": "6"}).json()["job_status"])
    assert requests.delete(f"{base}/api/v2/users/{other}.json").status_code == 200


def test_rate_limit_gives_429_with_retry_after(tmp_path):
    s = start(tmp_path, "--requests-per-minute", "5", "--window-seconds", "1")
    try:
        base = s.base_url
        first = requests.get(f"{base}/api/v2/tickets/1.json")
        assert first.headers["X-Rate-Limit"] == "5" and first.headers["ratelimit-remaining"] == "4"
        codes = [requests.get(f"{base}/api/v2/tickets/1.json").status_code for _ in range(5)]
        assert codes == [200, 200, 200, 200, 429]
        throttled = requests.get(f"{base}/api/v2/tickets/1.json")
        assert throttled.status_code == 429 and int(throttled.headers["Retry-After"]) == 1
        time.sleep(float(throttled.headers["Retry-After"]) + 0.1)
        assert requests.get(f"{base}/api/v2/tickets/1.json").status_code == 200
        assert stats(base)["throttled"] == 2
    finally:
        s.stop()


def test_incremental_and_user_delete_limits(tmp_path):
    s = start(tmp_path, "--incremental-per-minute", "2", "--user-deletes-per-10min", "1", "--window-seconds", "1")
    try:
        base = s.base_url
        url = f"{base}/api/v2/incremental/users/cursor.json"
        codes = [requests.get(url, params={"start_time": 0}).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        idle = stats(base)["edge_cases"]["users_without_tickets"][:2]
        for uid in idle:
            assert requests.delete(f"{base}/api/v2/users/{uid}.json").status_code == 200
        assert requests.delete(f"{base}/api/v2/deleted_users/{idle[0]}.json").status_code == 200
        resp = requests.delete(f"{base}/api/v2/deleted_users/{idle[1]}.json")
        assert resp.status_code == 429 and 1 <= int(resp.headers["Retry-After"]) <= 10
    finally:
        s.stop()


def test_faults_throttle_error_slow_and_failing_jobs(server):
    base = server.base_url
    faults = {"throttle_next": 1, "error_next": 2, "error_status": 502, "match": "show_many"}
    assert requests.post(f"{base}/_standin/faults", json=faults).status_code == 200
    assert requests.get(f"{base}/api/v2/tickets/1.json").status_code == 200  # does not match
    url = f"{base}/api/v2/tickets/show_many.json"
    codes = [requests.get(url, params={"ids": "1"}).status_code for _ in range(4)]
    assert codes == [429, 502, 502, 200]

    requests.post(f"{base}/_standin/faults", json={"slow_ms": 300})
    t0 = time.perf_counter()
    requests.get(f"{base}/api/v2/tickets/1.json")
    assert time.perf_counter() - t0 >= 0.3

    requests.post(f"{base}/_standin/faults", json={"fail_job_next": 1, "fail_job_after": 2, "match": "destroy_many"})
    job = requests.delete(f"{base}/api/v2/tickets/destroy_many", params={"ids": "20,21,22,23"}).json()["job_status"]
    job = wait_job(base, job)
    assert job["status"] == "failed" and job["progress"] == 2 and [r["id"] for r in job["results"]] == [20, 21]
    job = requests.delete(f"{base}/api/v2/tickets/destroy_many", params={"ids": "22,23"}).json()["job_status"]
    assert wait_job(base, job)["status"] == "completed"

    requests.post(f"{base}/_standin/faults", json={})
    s = stats(base)
    assert s["errors_injected"] == 4 and s["throttled"] == 1 and s["soft_ticket_deletions"] == 4
    assert s["jobs"] == {"failed": 1, "completed": 1}


def test_export_pages_and_cursor(server):
    base = server.base_url
    url = f"{base}/api/v2/incremental/tickets/cursor.json"
    body = requests.get(url, params={"start_time": 0, "per_page": 120, "include": "metric_sets"}).json()
    seen = []
    while True:
        seen += [t["id"] for t in body["tickets"]]
        assert {m["ticket_id"] for m in body["metric_sets"]} == {t["id"] for t in body["tickets"]}
        if body["end_of_stream"]:
            break
        body = requests.get(url, params={"cursor": body["after_cursor"], "per_page": 120, "include": "metric_sets"}).json()
    assert sorted(seen) == list(range(1, 301))
    # The last cursor resumes later: nothing new yet, then the change shows up.
    assert requests.get(url, params={"cursor": body["after_cursor"]}).json()["tickets"] == []
    requests.put(f"{base}/api/v2/tickets/4.json", json={"ticket": {"status": "pending"}})
    later = requests.get(url, params={"cursor": body["after_cursor"]}).json()
    assert [t["id"] for t in later["tickets"]] == [4] and later["end_of_stream"]
    assert requests.get(url).status_code == 422
    assert requests.get(url, params={"cursor": "!!"}).status_code == 422


def test_token_is_checked(tmp_path):
    s = start(tmp_path, "--token", "sekret-token")
    try:
        url = f"{s.base_url}/api/v2/tickets/1.json"
        assert requests.get(url).status_code == 401
        assert requests.get(url, auth=("agent@example.org/token", "wrong")).status_code == 401
        assert requests.get(url, auth=("agent@example.org/token", "sekret-token")).status_code == 200
        assert requests.get(url, headers={"Authorization": "Bearer sekret-token"}).status_code == 200
        assert requests.get(f"{s.base_url}/_standin/health").status_code == 200
    finally:
        s.stop()


def test_state_survives_restart(tmp_path):
    s = start(tmp_path)
    base = s.base_url
    wait_job(base, requests.delete(f"{base}/api/v2/tickets/destroy_many", params={"ids": "30,31"}).json()["job_status"])
    wait_job(base, requests.delete(f"{base}/api/v2/deleted_tickets/destroy_many", params={"ids": "30"}).json()["job_status"])
    requests.put(f"{base}/api/v2/tickets/40.json", json={"ticket": {"status": "closed"}})
    idle = stats(base)["edge_cases"]["users_without_tickets"][0]
    requests.delete(f"{base}/api/v2/users/{idle}.json")
    assert requests.post(f"{base}/_standin/save").json() == {"saved": True}
    before = stats(base)
    s.stop()
    assert s.proc.returncode == 0

    # Different seed/size flags are ignored: the state file wins.
    s2 = StandIn("zendesk", "--state-file", str(tmp_path / "zd.npz"), "--tickets", "50", "--seed", "99").start()
    try:
        after = stats(s2.base_url)
        for key in ("tickets", "tickets_soft_deleted", "tickets_permanently_deleted", "users", "users_soft_deleted",
                    "permanent_ticket_deletions", "soft_ticket_deletions", "requests", "edge_cases", "generated"):
            assert after[key] == before[key], key
        base = s2.base_url
        assert requests.get(f"{base}/api/v2/tickets/40.json").json()["ticket"]["status"] == "closed"
        listed = requests.get(f"{base}/api/v2/deleted_tickets.json", params={"page[size]": 10}).json()
        assert [t["id"] for t in listed["deleted_tickets"]] == [31]
        assert requests.get(f"{base}/api/v2/deleted_users/{idle}.json").status_code == 200
    finally:
        s2.stop()
