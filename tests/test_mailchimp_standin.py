"""The Mailchimp stand-in server and its synthetic audience, over real HTTP."""

from __future__ import annotations

import hashlib
import re
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

import numpy as np
import pytest
import requests

from retention_dev.standins import mailchimp_data as md
from retention_dev.standins.process import StandIn

NOW = datetime(2026, 5, 4, 10, 30, tzinfo=UTC)
KEY = "standin-key-us0"
AUTH = ("anystring", KEY)
LIST = "demo-list"
ISO_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$")


def start(tmp_path, *args: str, members: int = 300, seed: int = 11, name: str = "mc.npz") -> StandIn:
    return StandIn(
        "mailchimp",
        "--port", "0",
        "--state-file", str(tmp_path / name),
        "--members", str(members),
        "--seed", str(seed),
        "--now", NOW.isoformat(),
        *args,
    ).start()


def api(s: StandIn, path: str) -> str:
    return f"{s.base_url}/3.0{path}"


def members_url(s: StandIn) -> str:
    return api(s, f"/lists/{LIST}/members")


def stats(s: StandIn) -> dict:
    return requests.get(f"{s.base_url}/_standin/stats").json()


def faults(s: StandIn, **spec) -> dict:
    r = requests.post(f"{s.base_url}/_standin/faults", json=spec)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A read-only stand-in (tests that change members start their own)."""
    s = start(tmp_path_factory.mktemp("mc-shared"))
    yield s
    s.stop()


@pytest.fixture
def server(tmp_path):
    s = start(tmp_path, members=120)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def expected():
    return md.generate_members(300, seed=11, now=NOW)


# --- synthetic data -----------------------------------------------------------------------


def test_generate_is_deterministic_fast_and_synthetic():
    t0 = time.perf_counter()
    cols = md.generate_columns(100_000, seed=5, now=NOW)
    assert time.perf_counter() - t0 < 3.0
    again = md.generate_columns(100_000, seed=5, now=NOW)
    assert all(np.array_equal(a, b) for a, b in zip(cols.as_dict().values(), again.as_dict().values()))
    other = md.generate_columns(1_000, seed=6, now=NOW)
    assert not np.array_equal(cols.ids[:1000], other.ids)

    emails = [e.decode() for e in cols.emails.tolist()]
    assert len({e.lower() for e in emails}) == len(emails)  # unique addresses
    assert {e.rsplit("@", 1)[1].lower() for e in emails} <= {"example.org", "example.com", "example.net"}
    assert len(set(cols.ids.tolist())) == len(emails)
    for e, h in zip(emails[:2000], cols.ids.tolist()[:2000]):
        assert hashlib.md5(e.lower().encode()).hexdigest() == h.decode()


def test_status_mix_and_due_share():
    cols = md.generate_columns(50_000, seed=3, now=NOW, erase_share=0.10)
    statuses = Counter(md.STATUSES[c] for c in cols.status.tolist())
    assert set(statuses) == set(md.STATUSES)
    assert md.count_due(cols, NOW) == 5_000
    cols20 = md.generate_columns(10_000, seed=3, now=NOW, erase_share=0.20)
    assert md.count_due(cols20, NOW) == 2_000


def test_member_shape_and_edge_cases():
    members = md.generate_members(1000, seed=2, now=NOW)
    now_ts = int(NOW.timestamp())
    m = members[0]
    assert set(m) == {
        "id", "email_address", "unique_email_id", "contact_id", "full_name", "merge_fields",
        "status", "timestamp_signup", "timestamp_opt", "last_changed", "list_id",
    }
    assert m["full_name"] == f"{m['merge_fields']['FNAME']} {m['merge_fields']['LNAME']}"
    for m in members:
        assert ISO_RE.match(m["timestamp_signup"]) and ISO_RE.match(m["last_changed"])
        assert m["timestamp_opt"] == "" or ISO_RE.match(m["timestamp_opt"])
        if m["status"] == "pending":
            assert m["timestamp_opt"] == ""
    # A pending signup exactly 30 days old: on the boundary, not due by the generator's count.
    exact = [
        m for m in members
        if m["status"] == "pending"
        and now_ts - int(datetime.fromisoformat(m["timestamp_signup"]).timestamp()) == 30 * 86400
    ]
    assert len(exact) == 1
    signup = int(datetime.fromisoformat(exact[0]["timestamp_signup"]).timestamp())
    assert not md.due_under_policy("pending", signup, now_ts)
    assert md.due_under_policy("pending", signup - 1, now_ts)
    # Upper-case addresses hash as their lower-cased form.
    upper = [m for m in members if m["email_address"] != m["email_address"].lower()]
    assert upper
    for m in upper:
        assert m["id"] == hashlib.md5(m["email_address"].lower().encode()).hexdigest()
        assert m["id"] != hashlib.md5(m["email_address"].encode()).hexdigest()


# --- reading ------------------------------------------------------------------------------


def test_paging_total_items_and_insertion_order(shared, expected):
    seen = []
    for offset in range(0, 400, 70):
        r = requests.get(members_url(shared), params={"count": 70, "offset": offset}, auth=AUTH)
        assert r.status_code == 200
        body = r.json()
        assert body["total_items"] == 300 and body["list_id"] == LIST
        seen += body["members"]
    assert [m["id"] for m in seen] == [m["id"] for m in expected]
    assert seen == expected  # the stand-in serves exactly the generated members
    default = requests.get(members_url(shared), auth=AUTH).json()
    assert len(default["members"]) == 10  # Mailchimp's default count


def test_count_and_offset_validation(shared):
    r = requests.get(members_url(shared), params={"count": 1001}, auth=AUTH)
    assert r.status_code == 400
    problem = r.json()
    assert set(problem) == {"type", "title", "status", "detail", "instance"} and problem["status"] == 400
    assert requests.get(members_url(shared), params={"count": 1000}, auth=AUTH).status_code == 200
    assert requests.get(members_url(shared), params={"offset": -1}, auth=AUTH).status_code == 400
    assert requests.get(members_url(shared), params={"count": "x"}, auth=AUTH).status_code == 400
    assert requests.get(members_url(shared), params={"status": "nope"}, auth=AUTH).status_code == 400


def test_status_filter(shared, expected):
    want = Counter(m["status"] for m in expected)
    for status in md.STATUSES:
        body = requests.get(members_url(shared), params={"status": status, "count": 1000}, auth=AUTH).json()
        assert body["total_items"] == want[status]
        assert [m["id"] for m in body["members"]] == [m["id"] for m in expected if m["status"] == status]
    assert stats(shared)["statuses"] == {s: want[s] for s in md.STATUSES}


def test_since_last_changed(shared, expected):
    cut = sorted(m["last_changed"] for m in expected)[150]
    params = {"since_last_changed": cut, "count": 1000, "fields": "members.id,total_items"}
    body = requests.get(members_url(shared), params=params, auth=AUTH).json()
    want = [m["id"] for m in expected if m["last_changed"] > cut]
    assert body["total_items"] == len(want) and [m["id"] for m in body["members"]] == want
    params["status"] = "unsubscribed"
    body = requests.get(members_url(shared), params=params, auth=AUTH).json()
    assert [m["id"] for m in body["members"]] == [
        m["id"] for m in expected if m["last_changed"] > cut and m["status"] == "unsubscribed"
    ]
    bad = requests.get(members_url(shared), params={"since_last_changed": "yesterday"}, auth=AUTH)
    assert bad.status_code == 400


def test_fields_and_exclude_fields(shared, expected):
    body = requests.get(
        members_url(shared), params={"count": 3, "fields": "members.id,members.status,total_items"}, auth=AUTH
    ).json()
    assert set(body) == {"members", "total_items"}
    assert body["members"] == [{"id": m["id"], "status": m["status"]} for m in expected[:3]]

    body = requests.get(
        members_url(shared), params={"count": 2, "fields": "members.merge_fields.FNAME"}, auth=AUTH
    ).json()
    assert body == {"members": [{"merge_fields": {"FNAME": m["merge_fields"]["FNAME"]}} for m in expected[:2]]}

    body = requests.get(
        members_url(shared),
        params={"count": 2, "exclude_fields": "members.merge_fields,members.full_name,list_id"},
        auth=AUTH,
    ).json()
    assert set(body) == {"members", "total_items"}
    assert set(body["members"][0]) == set(expected[0]) - {"merge_fields", "full_name"}

    body = requests.get(members_url(shared), params={"fields": "total_items"}, auth=AUTH).json()
    assert body == {"total_items": 300}

    m = expected[4]
    one = requests.get(api(shared, f"/lists/{LIST}/members/{m['id']}"), params={"fields": "id,status"}, auth=AUTH)
    assert one.json() == {"id": m["id"], "status": m["status"]}


def test_get_member_by_hash_and_by_address(shared, expected):
    upper = next(m for m in expected if m["email_address"] != m["email_address"].lower())
    by_hash = requests.get(api(shared, f"/lists/{LIST}/members/{upper['id']}"), auth=AUTH)
    assert by_hash.status_code == 200 and by_hash.json() == upper
    by_address = requests.get(api(shared, f"/lists/{LIST}/members/{upper['email_address']}"), auth=AUTH)
    assert by_address.json()["id"] == upper["id"]
    missing = requests.get(api(shared, f"/lists/{LIST}/members/{'0' * 32}"), auth=AUTH)
    assert missing.status_code == 404 and missing.json()["title"] == "Resource Not Found"


def test_auth_unknown_list_and_ping(shared):
    assert requests.get(api(shared, "/ping"), auth=AUTH).json() == {"health_status": "Everything's Chimpy!"}
    wrong = requests.get(api(shared, "/ping"), auth=("anystring", "wrong-us0"))
    assert wrong.status_code == 401 and wrong.json()["title"] == "API Key Invalid"
    assert requests.get(api(shared, "/ping")).status_code == 401
    r = requests.get(api(shared, "/lists/nope/members"), auth=AUTH)
    assert r.status_code == 404 and r.json()["status"] == 404
    assert requests.get(api(shared, "/lists/nope"), auth=AUTH).status_code == 404
    info = requests.get(api(shared, f"/lists/{LIST}"), auth=AUTH).json()
    assert info["id"] == LIST and info["stats"]["total_contacts"] == 300


def test_deep_offset_is_served_in_page_time(tmp_path):
    s = start(tmp_path, members=1_000_000, seed=4)
    try:
        sess = requests.Session()
        sess.auth = AUTH
        params = {"count": 1000, "fields": "members.id,total_items"}

        def timed(offset: int) -> tuple[float, dict]:
            best, body = float("inf"), {}
            for _ in range(3):
                t0 = time.perf_counter()
                body = sess.get(members_url(s), params={**params, "offset": offset}).json()
                best = min(best, time.perf_counter() - t0)
            return best, body

        shallow, first = timed(0)
        deep, last = timed(999_000)
        assert first["total_items"] == last["total_items"] == 1_000_000
        assert len(last["members"]) == 1000
        assert not {m["id"] for m in first["members"]} & {m["id"] for m in last["members"]}
        assert deep < 5 * shallow + 0.05
        tail = sess.get(members_url(s), params={**params, "offset": 999_500}).json()
        assert len(tail["members"]) == 500
    finally:
        s.stop()


# --- changing members ---------------------------------------------------------------------


def test_archive_keeps_data_delete_permanent_removes(server):
    body = requests.get(members_url(server), params={"count": 3, "status": "subscribed"}, auth=AUTH).json()
    keep, erase, other = body["members"]
    before = stats(server)

    url = api(server, f"/lists/{LIST}/members/{keep['id']}")
    assert requests.delete(url, auth=AUTH).status_code == 204
    archived = requests.get(url, auth=AUTH).json()
    assert archived["status"] == "archived"
    assert archived["email_address"] == keep["email_address"]  # archiving keeps the data
    assert archived["last_changed"] >= keep["last_changed"]

    url = api(server, f"/lists/{LIST}/members/{erase['id']}")
    assert requests.post(f"{url}/actions/delete-permanent", auth=AUTH).status_code == 204
    assert requests.get(url, auth=AUTH).status_code == 404
    assert requests.post(f"{url}/actions/delete-permanent", auth=AUTH).status_code == 404
    assert requests.delete(url, auth=AUTH).status_code == 404
    listed = requests.get(members_url(server), params={"count": 1000}, auth=AUTH).json()
    assert erase["id"] not in {m["id"] for m in listed["members"]}
    assert erase["email_address"] not in str(listed)

    after = stats(server)
    assert after["total"] == before["total"] - 1
    assert after["archived"] == before["archived"] + 1
    assert after["subscribed"] == before["subscribed"] - 2
    assert after["permanent_deletes"] == 1 and after["archives"] == 1
    assert after["deleted_hashes_count"] == 1
    assert requests.get(api(server, f"/lists/{LIST}/members/{other['id']}"), auth=AUTH).status_code == 200
    assert requests.post(f"{server.base_url}/_standin/reset-stats").status_code == 200
    reset = stats(server)
    assert reset["permanent_deletes"] == 0 and reset["requests"] == 0 and reset["deleted_hashes_count"] == 1


def test_eleventh_simultaneous_request_is_throttled(server):
    faults(server, slow_ms=400)
    results: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(11)

    def one() -> None:
        barrier.wait()
        r = requests.get(api(server, "/ping"), auth=AUTH)  # a fresh connection each
        with lock:
            results.append(r.status_code)
            if r.status_code == 429:
                assert "Retry-After" not in r.headers
                assert r.json()["title"] == "Too Many Requests"

    threads = [threading.Thread(target=one) for _ in range(11)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [200] * 10 + [429]
    st = stats(server)
    assert st["max_in_flight"] == 11 and st["throttled"] == 1 and st["in_flight"] == 0
    faults(server)  # clear
    t0 = time.perf_counter()
    assert requests.get(api(server, "/ping"), auth=AUTH).status_code == 200
    assert time.perf_counter() - t0 < 0.3


def test_injected_faults(server):
    ids = [m["id"] for m in requests.get(members_url(server), params={"count": 10}, auth=AUTH).json()["members"]]
    member = api(server, f"/lists/{LIST}/members/")

    faults(server, throttle_next=2, match="/ping")
    assert [requests.get(api(server, "/ping"), auth=AUTH).status_code for _ in range(3)] == [429, 429, 200]
    assert requests.get(member + ids[0], auth=AUTH).status_code == 200  # does not match

    faults(server, error_next=1, error_status=502)
    r = requests.get(api(server, "/ping"), auth=AUTH)
    assert r.status_code == 502 and r.json()["status"] == 502
    assert requests.get(api(server, "/ping"), auth=AUTH).status_code == 200

    # A drop on delete-permanent happens after the erasure took effect.
    faults(server, drop_next=1, match="delete-permanent")
    with pytest.raises(requests.ConnectionError):
        requests.post(member + ids[1] + "/actions/delete-permanent", auth=AUTH)
    assert requests.get(member + ids[1], auth=AUTH).status_code == 404
    assert requests.post(member + ids[1] + "/actions/delete-permanent", auth=AUTH).status_code == 404

    faults(server, slow_ms=150, match="GET ")
    t0 = time.perf_counter()
    requests.get(api(server, "/ping"), auth=AUTH)
    assert time.perf_counter() - t0 >= 0.15
    faults(server)
    t0 = time.perf_counter()
    requests.get(api(server, "/ping"), auth=AUTH)
    assert time.perf_counter() - t0 < 0.15

    st = stats(server)
    assert st["throttled"] == 2 and st["throttled_injected"] == 2
    assert st["errors_injected"] == 1 and st["drops"] == 1 and st["permanent_deletes"] == 1
    assert st["faults"] == {}
    assert requests.post(f"{server.base_url}/_standin/faults", json={"error_status": 404}).status_code == 400


def test_state_survives_restart(tmp_path):
    s = start(tmp_path, members=200)
    try:
        body = requests.get(members_url(s), params={"count": 2, "status": "subscribed"}, auth=AUTH).json()
        gone, archived = (m["id"] for m in body["members"])
        member = api(s, f"/lists/{LIST}/members/")
        assert requests.post(member + gone + "/actions/delete-permanent", auth=AUTH).status_code == 204
        assert requests.delete(member + archived, auth=AUTH).status_code == 204
        saved = requests.post(f"{s.base_url}/_standin/save").json()
        assert saved == {"saved": True, "members": 199}
        before = requests.get(members_url(s), params={"count": 1000}, auth=AUTH).json()
    finally:
        s.stop()
    assert s.proc.returncode == 0
    assert (tmp_path / "mc.npz").exists() and not list(tmp_path.glob("*.tmp*"))

    again = start(tmp_path, members=999, seed=99)  # the state file wins over --members/--seed
    try:
        after = requests.get(members_url(again), params={"count": 1000}, auth=AUTH).json()
        assert after == before
        member = api(again, f"/lists/{LIST}/members/")
        assert requests.get(member + gone, auth=AUTH).status_code == 404
        assert requests.get(member + archived, auth=AUTH).json()["status"] == "archived"
        st = stats(again)
        assert st["total"] == 199 and st["deleted_hashes_count"] == 1
    finally:
        again.stop()


def test_same_seed_same_audience(tmp_path):
    a = start(tmp_path, members=50, seed=21, name="a.npz")
    b = start(tmp_path, members=50, seed=21, name="b.npz")
    c = start(tmp_path, members=50, seed=22, name="c.npz")
    try:
        pages = [requests.get(members_url(x), params={"count": 50}, auth=AUTH).json() for x in (a, b, c)]
    finally:
        for x in (a, b, c):
            x.stop()
    assert pages[0] == pages[1]
    assert pages[0]["members"] != pages[2]["members"]


def test_since_filter_sees_archive_changes(server):
    later = (NOW + timedelta(days=3650)).isoformat()
    assert requests.get(members_url(server), params={"since_last_changed": later}, auth=AUTH).json()["total_items"] == 0
    m = requests.get(members_url(server), params={"count": 1, "status": "subscribed"}, auth=AUTH).json()["members"][0]
    requests.delete(api(server, f"/lists/{LIST}/members/{m['id']}"), auth=AUTH)
    recent = (datetime.now(UTC) - timedelta(minutes=5)).isoformat()
    body = requests.get(members_url(server), params={"since_last_changed": recent}, auth=AUTH).json()
    assert [x["id"] for x in body["members"]] == [m["id"]]


# --- the clock, adding members, whole seconds (what the change feed relies on) ----------------


def freeze(s: StandIn, when: datetime | None) -> None:
    body = {"now": None if when is None else when.isoformat()}
    assert requests.post(f"{s.base_url}/_standin/clock", json=body).status_code == 200


def test_every_answer_carries_the_server_date_and_the_clock_can_be_frozen(server):
    before = datetime.now(UTC).replace(microsecond=0)
    answered = requests.get(api(server, "/ping"), auth=AUTH)
    assert before <= parsedate_to_datetime(answered.headers["Date"]) <= datetime.now(UTC)
    frozen = NOW + timedelta(days=2, seconds=7)
    freeze(server, frozen)
    assert parsedate_to_datetime(requests.get(api(server, "/ping"), auth=AUTH).headers["Date"]) == frozen
    m = requests.get(members_url(server), params={"count": 1, "status": "subscribed"}, auth=AUTH).json()["members"][0]
    changed = requests.patch(api(server, f"/lists/{LIST}/members/{m['id']}"), json={"status": "unsubscribed"}, auth=AUTH)
    assert changed.json()["last_changed"] == frozen.isoformat()
    assert requests.post(f"{server.base_url}/_standin/clock", json={"now": "2026-01-01T00:00:00"}).status_code == 400
    freeze(server, None)
    assert parsedate_to_datetime(requests.get(api(server, "/ping"), auth=AUTH).headers["Date"]) >= before


def test_since_last_changed_is_strictly_after_in_whole_seconds(server):
    at = NOW + timedelta(days=3)
    freeze(server, at)
    m = requests.get(members_url(server), params={"count": 1, "status": "subscribed"}, auth=AUTH).json()["members"][0]
    requests.delete(api(server, f"/lists/{LIST}/members/{m['id']}"), auth=AUTH)

    def listed(since: datetime) -> list[str]:
        body = requests.get(members_url(server), params={"since_last_changed": since.isoformat()}, auth=AUTH).json()
        return [x["id"] for x in body["members"]]

    assert listed(at - timedelta(seconds=1)) == [m["id"]]
    # Changed at 12:00:00 is not "after" 12:00:00, nor after 12:00:00.5 (compared to the second).
    assert listed(at) == [] and listed(at + timedelta(milliseconds=500)) == []
    archived = requests.get(members_url(server), params={"since_last_changed": (at - timedelta(seconds=1)).isoformat(),
                                                        "status": "archived"}, auth=AUTH).json()
    assert [(x["id"], x["status"], x["last_changed"]) for x in archived["members"]] == [(m["id"], "archived", at.isoformat())]


def test_adding_a_member(server):
    at = NOW + timedelta(days=4)
    freeze(server, at)
    before = stats(server)
    added = requests.post(members_url(server), json={"email_address": "New.Person@Example.org", "status": "pending",
                                                     "merge_fields": {"FNAME": "New", "LNAME": "Person"}}, auth=AUTH)
    assert added.status_code == 200
    member = added.json()
    assert member["id"] == hashlib.md5(b"new.person@example.org").hexdigest()
    assert member["status"] == "pending" and member["email_address"] == "New.Person@Example.org"
    # Added through the API: no signup time, as Mailchimp records it; changed now.
    assert member["timestamp_signup"] == "" and member["last_changed"] == at.isoformat()
    assert requests.get(api(server, f"/lists/{LIST}/members/{member['id']}"), auth=AUTH).json() == member
    listed = requests.get(members_url(server), params={"count": 1000}, auth=AUTH).json()
    assert listed["members"][-1]["id"] == member["id"] and listed["total_items"] == before["total"] + 1
    assert stats(server)["pending"] == before["pending"] + 1 and stats(server)["adds"] == before["adds"] + 1

    again = requests.post(members_url(server), json={"email_address": "new.person@example.org", "status": "subscribed"}, auth=AUTH)
    assert again.status_code == 400 and again.json()["title"] == "Member Exists"
    url = api(server, f"/lists/{LIST}/members/{member['id']}")
    assert requests.post(f"{url}/actions/delete-permanent", auth=AUTH).status_code == 204
    forgotten = requests.post(members_url(server), json={"email_address": "new.person@example.org", "status": "subscribed"}, auth=AUTH)
    assert forgotten.status_code == 400 and forgotten.json()["title"] == "Forgotten Email Not Subscribed"
    assert "new.person" not in forgotten.text
    for bad in ({"email_address": "no-at-sign", "status": "subscribed"}, {"email_address": "a@b.org", "status": "archived"},
                {"email_address": 'quo"te@b.org', "status": "subscribed"}, []):
        assert requests.post(members_url(server), json=bad, auth=AUTH).status_code == 400


def test_added_members_survive_a_restart(tmp_path):
    s = start(tmp_path, members=50)
    try:
        added = requests.post(members_url(s), json={"email_address": "kept@example.org", "status": "subscribed"}, auth=AUTH).json()
    finally:
        s.stop()
    s = start(tmp_path, members=50)
    try:
        assert requests.get(api(s, f"/lists/{LIST}/members/{added['id']}"), auth=AUTH).json()["status"] == "subscribed"
    finally:
        s.stop()


def test_a_cleaned_pending_or_archived_member_cannot_be_archived(server):
    for status in ("cleaned", "pending", "archived"):
        m = requests.get(members_url(server), params={"count": 1, "status": status}, auth=AUTH).json()["members"][0]
        refused = requests.delete(api(server, f"/lists/{LIST}/members/{m['id']}"), auth=AUTH)
        assert refused.status_code == 405 and "Can not archive" in refused.json()["detail"]
        assert requests.get(api(server, f"/lists/{LIST}/members/{m['id']}"), auth=AUTH).json() == m
