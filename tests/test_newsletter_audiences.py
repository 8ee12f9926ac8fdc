"""Every configured Mailchimp audience is enforced (issue 10, item 10, last part).

A Connection names its audiences in ``list_ids`` (``list_id`` still works for one). A member of
two audiences is two records: the first audience's members keep their bare subscriber hash as
record id (so every hold and erased-record pseudonym of a single-audience deployment keeps
matching when audiences are added after it), those of any further audience are
``<list_id>:<subscriber_hash>``. Real Airflow runs (dag.test) against the Mailchimp stand-in
serving two lists over HTTP.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import requests
import sqlalchemy as sa
from hypothesis import given
from hypothesis import strategies as st

from airflow_run import run_dag, task_states
from retention.domain.pseudonyms import Pseudonymizer
from retention_dev.standins.mailchimp_data import generate_members
from retention_dev.standins.process import StandIn

ROOT = Path(__file__).resolve().parents[1]
SEED = 5
MEMBERS = 300
NOW = "2026-11-20T12:00:00+00:00"
KEY = "standin-key-us0"
FIRST, SECOND = "demo-list", "second-list"
GONE = ("unsubscribed", "cleaned", "archived")


def set_conn(monkeypatch, standin, **extra) -> None:
    monkeypatch.setenv(
        "AIRFLOW_CONN_RETENTION_MAILCHIMP",
        json.dumps({"conn_type": "retention_mailchimp", "host": f"{standin.base_url}/3.0", "password": KEY, "extra": extra}),
    )


@pytest.fixture
def two_lists(tmp_path, monkeypatch, retention_home):
    """The stand-in with two audiences of the same people (the same seed), both enforced."""
    standin = StandIn(
        "mailchimp", "--port", "0", "--state-file", str(tmp_path / "mc.npz"), "--members", str(MEMBERS),
        "--seed", str(SEED), "--now", NOW, "--api-key", KEY, "--also-list", SECOND,
    ).start()
    set_conn(monkeypatch, standin, list_ids=[FIRST, SECOND])
    yield standin
    standin.stop()


def members(standin, list_id: str) -> dict[str, str]:
    out, offset = {}, 0
    while True:
        response = requests.get(
            f"{standin.base_url}/3.0/lists/{list_id}/members",
            params={"count": 1000, "offset": offset, "fields": "members.id,members.status,total_items"},
            auth=("x", KEY), timeout=30,
        )
        response.raise_for_status()
        page = response.json()
        out.update({m["id"]: m["status"] for m in page["members"]})
        offset += 1000
        if offset >= page["total_items"]:
            return out


def set_status(standin, list_id: str, subscriber_hash: str, status: str) -> None:
    requests.patch(
        f"{standin.base_url}/3.0/lists/{list_id}/members/{subscriber_hash}", json={"status": status}, auth=("x", KEY), timeout=30
    ).raise_for_status()


def people() -> list[dict]:
    """The seeded members (the same in both audiences), with an address each."""
    return [m for m in generate_members(MEMBERS, seed=SEED, now=datetime.fromisoformat(NOW)) if "@" in (m["email_address"] or "")]


def of_status(status: str) -> list[dict]:
    return [m for m in people() if m["status"] == status]


def ledger_rows(home) -> list[dict]:
    engine = sa.create_engine(f"sqlite:///{home / 'ledger.db'}")
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.text("select * from erasure_ledger")).mappings()]


def key_of(record_id: str) -> str:
    return Pseudonymizer(os.environ["RETENTION_PSEUDONYM_KEY"].encode()).key_for("newsletter_member", record_id)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "retention.cli", *args], cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=180
    )


def refused(out: subprocess.CompletedProcess, *needles: str) -> str:
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert out.stdout == "" and len(out.stderr.splitlines()) == 1, out.stderr
    for needle in needles:
        assert needle in out.stderr, out.stderr
    return out.stderr


# --- the Connection -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"list_id": "L1"}, ("L1",)),
        ({"list_ids": ["L1", "L2"]}, ("L1", "L2")),
        ({"list_ids": ["L1"]}, ("L1",)),
    ],
)
def test_a_connection_names_one_or_several_audiences(monkeypatch, extra, expected):
    from retention.systems.newsletter.hook import MailchimpHook

    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_MAILCHIMP", json.dumps({"conn_type": "retention_mailchimp", "password": "k-us1", "extra": extra}))
    assert MailchimpHook().list_ids == expected


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        ({"list_id": "L1", "list_ids": ["L1", "L2"]}, "both list_id and list_ids"),
        ({"list_ids": []}, "list_ids"),
        ({"list_ids": "L1"}, "list_ids"),
        ({"list_ids": ["L1", ""]}, "list_ids"),
        ({"list_ids": ["L1", 7]}, "list_ids"),
        ({"list_ids": ["L1", "L1"]}, "twice"),
        ({"list_ids": ["L1", "a:b"]}, "':'"),
        ({}, "list_ids"),
    ],
)
def test_a_wrong_audience_setting_is_one_line_naming_connection_and_field(monkeypatch, extra, needle):
    from retention.config import SettingError
    from retention.systems.newsletter.hook import MailchimpHook

    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_MAILCHIMP", json.dumps({"conn_type": "retention_mailchimp", "password": "k-us1", "extra": extra}))
    with pytest.raises(SettingError) as error:
        _ = MailchimpHook().list_ids
    message = str(error.value)
    assert "\n" not in message and "'retention_mailchimp'" in message and needle in message, message


def test_the_stand_in_serves_each_list(two_lists):
    first, second = members(two_lists, FIRST), members(two_lists, SECOND)
    assert first == second and len(first) == MEMBERS  # the same people in both
    member = next(iter(first))
    set_status(two_lists, SECOND, member, "unsubscribed")
    assert members(two_lists, FIRST)[member] != "unsubscribed" or first[member] == "unsubscribed"
    assert members(two_lists, SECOND)[member] == "unsubscribed"
    assert requests.get(f"{two_lists.base_url}/3.0/lists/no-such-list/members", auth=("x", KEY), timeout=10).status_code == 404
    stats = requests.get(f"{two_lists.base_url}/_standin/stats", timeout=10).json()
    assert set(stats["lists"]) == {FIRST, SECOND}


# --- the nightly run ------------------------------------------------------------------------


@pytest.mark.airflow
def test_nightly_run_enforces_every_audience(two_lists, retention_home):
    """Due members go in both audiences; a member subscribed in one audience and unsubscribed
    in the other is erased from the other only."""
    x, y = (m["id"] for m in of_status("subscribed")[:2])
    set_status(two_lists, SECOND, x, "unsubscribed")  # x: still subscribed in the first
    set_status(two_lists, FIRST, y, "unsubscribed")  # y: still subscribed in the second
    before = {FIRST: members(two_lists, FIRST), SECOND: members(two_lists, SECOND)}

    dr = run_dag({"systems": ["newsletter"]})
    assert dr.state == "success", task_states(dr)

    after = {FIRST: members(two_lists, FIRST), SECOND: members(two_lists, SECOND)}
    for list_id in (FIRST, SECOND):
        assert not set(after[list_id].values()) & set(GONE), f"a member no longer subscribed survived in {list_id}"
        due = {h for h, s in before[list_id].items() if s in GONE}
        assert due and due <= set(before[list_id]) - set(after[list_id])
    assert after[FIRST][x] == "subscribed" and x not in after[SECOND]
    assert y not in after[FIRST] and after[SECOND][y] == "subscribed"

    erased = {(list_id, h) for list_id in before for h in set(before[list_id]) - set(after[list_id])}
    rows = ledger_rows(retention_home)
    assert len(rows) == len({r["record_key"] for r in rows}) == len(erased), "two audiences' members share a pseudonym"
    expected_keys = {key_of(h if list_id == FIRST else f"{list_id}:{h}") for list_id, h in erased}
    assert {r["record_key"] for r in rows} == expected_keys
    assert {r["status"] for r in rows} == {"erased"}
    stats = requests.get(f"{two_lists.base_url}/_standin/stats", timeout=10).json()
    assert stats["permanent_deletes"] == len(erased) and stats["archives"] == 0
    assert stats["max_in_flight"] <= 10

    dr2 = run_dag({"systems": ["newsletter"]})
    assert dr2.state == "success", task_states(dr2)
    assert len(ledger_rows(retention_home)) == len(erased), "the second run erased something"


@pytest.mark.airflow
def test_a_hold_made_with_one_audience_still_holds_after_adding_one(two_lists, retention_home, monkeypatch):
    """A hold added while the Connection named one audience (by address, stored as the
    pseudonym of the bare subscriber hash) still holds that member once a second audience is
    configured after it; the same person in the second audience is a record of its own, held
    only by a hold naming that audience (``second-list:<address>``); a bare id is refused."""
    z, w = of_status("unsubscribed")[:2]
    set_conn(monkeypatch, two_lists, list_id=FIRST)
    added = cli("hold", "add", "--record-type", "newsletter_member", "--record-id", z["email_address"], "--reason", "dispute 2026-11")
    assert added.returncode == 0, added.stderr

    set_conn(monkeypatch, two_lists, list_ids=[FIRST, SECOND])
    refused(
        cli("hold", "add", "--record-type", "newsletter_member", "--record-id", w["id"], "--reason", "dispute 2026-12"),
        "several audiences", FIRST, SECOND,
    )
    refused(
        cli("hold", "add", "--record-type", "newsletter_member", "--record-id", f"no-such-list:{w['id']}", "--reason", "x"),
        "no-such-list", FIRST, SECOND,
    )
    added = cli("hold", "add", "--record-type", "newsletter_member", "--record-id", f"{SECOND}:{w['email_address']}", "--reason", "dispute 2026-12")
    assert added.returncode == 0, added.stderr
    assert w["email_address"].lower() not in (added.stdout + added.stderr).lower()

    dr = run_dag({"systems": ["newsletter"]})
    assert dr.state == "success", task_states(dr)
    first, second = members(two_lists, FIRST), members(two_lists, SECOND)
    assert first.get(z["id"]) == "unsubscribed", "the hold made with one audience no longer holds"
    assert z["id"] not in second, "a hold on the first audience's member held the second audience's"
    assert second.get(w["id"]) == "unsubscribed", "the hold naming the second audience did not hold"
    assert w["id"] not in first
    held = {r["record_key"] for r in ledger_rows(retention_home) if r["status"] == "held"}
    assert held == {key_of(z["id"]), key_of(f"{SECOND}:{w['id']}")}


def test_explain_names_a_member_of_one_audience(two_lists, retention_home):
    member = of_status("unsubscribed")[0]
    refused(cli("explain", "--record-type", "newsletter_member", "--record-id", member["id"]), "several audiences", FIRST, SECOND)
    for record_id, key in (
        (f"{FIRST}:{member['email_address']}", key_of(member["id"])),
        (f"{SECOND}:{member['id']}", key_of(f"{SECOND}:{member['id']}")),
    ):
        out = cli("explain", "--record-type", "newsletter_member", "--record-id", record_id)
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout[out.stdout.index("{"):])
        assert result["record_key"] == key and result["decision"].startswith("planned: erase"), result
        assert member["email_address"].lower() not in out.stdout.lower()


# --- the erasure request --------------------------------------------------------------------


@pytest.mark.airflow
def test_the_erasure_request_reaches_every_audience(two_lists, retention_home, tmp_path, monkeypatch):
    from retention.systems.crm import schema

    crm = sa.create_engine(f"sqlite:///{tmp_path / 'crm.db'}")
    schema.create_schema(crm)
    crm.dispose()
    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_CRM", json.dumps({"conn_type": "retention_crm", "extra": {"sqlalchemy_url": str(crm.url)}}))
    zd = StandIn("zendesk", "--port", "0", "--state-file", str(tmp_path / "zd.npz"), "--tickets", "10", "--seed", "7").start()
    try:
        monkeypatch.setenv("AIRFLOW_CONN_RETENTION_ZENDESK", json.dumps(
            {"conn_type": "retention_zendesk", "host": zd.base_url, "login": "agent@example.org", "password": "token"}
        ))
        person, other = of_status("subscribed")[:2]
        dr = run_dag({"email": person["email_address"].upper()}, dag_id="erasure_request")
        assert dr.state == "success", task_states(dr)
    finally:
        zd.stop()
    for list_id in (FIRST, SECOND):
        now = members(two_lists, list_id)
        assert person["id"] not in now, f"the request did not reach {list_id}"
        assert now[other["id"]] == "subscribed"
    assert hashlib.md5(person["email_address"].lower().encode()).hexdigest() == person["id"]


# --- right before erasure, per audience -----------------------------------------------------


def test_a_member_who_subscribes_again_in_one_audience_is_kept_there_only(two_lists, retention_home):
    """Planned in both audiences; before the erase step the member subscribes again in the second
    one. The recheck (since_last_changed, per audience) keeps it there and erases it from the first."""
    from retention.runs import nightly as pipeline
    from retention.systems.newsletter.adapter import NewsletterAdapter
    from retention.systems.newsletter.client import MailchimpClient

    def adapter():
        return NewsletterAdapter(MailchimpClient(KEY, base_url=f"{two_lists.base_url}/3.0"), [FIRST, SECOND])

    run = pipeline.RunInfo.from_dict(pipeline.open_run("test", "per_audience", None, dry_run=False, max_plan_share=0.9))
    pipeline.extract(run, "newsletter", adapter())
    pipeline.plan(run, "newsletter")
    pipeline.validate(run, "newsletter")
    planned = set(run.staging.read_frame("newsletter", "plan")["record_id"].astype(str))
    member = next(m["id"] for m in of_status("unsubscribed") if m["id"] in planned and f"{SECOND}:{m['id']}" in planned)
    set_status(two_lists, SECOND, member, "subscribed")

    pipeline.erase(run, "newsletter", adapter())
    pipeline.verify(run, "newsletter", adapter())
    assert member not in members(two_lists, FIRST)
    assert members(two_lists, SECOND)[member] == "subscribed", "a member who subscribed again in one audience was erased there"
    rows = {r["record_key"]: r["status"] for r in ledger_rows(retention_home)}
    assert rows[key_of(member)] == "erased" and rows[key_of(f"{SECOND}:{member}")] == "deferred"


# --- the record ids -------------------------------------------------------------------------


@given(
    lists=st.lists(st.text("abcdef0123456789-", min_size=1, max_size=12), min_size=1, max_size=4, unique=True),
    hashes=st.lists(st.text("0123456789abcdef", min_size=32, max_size=32), min_size=1, max_size=20, unique=True),
)
def test_record_ids_of_audiences_are_distinct_and_lead_back(lists, hashes):
    """Every (audience, member) has its own record id; the first audience's is the bare hash (a
    single-audience deployment's id, so its holds and pseudonyms keep matching); and each id
    leads back to its audience and hash, as erase and verify need."""
    from retention.systems.newsletter.audiences import Audiences

    audiences = Audiences(lists)
    ids = {(a, h): audiences.record_id(a, h) for a in lists for h in hashes}
    assert len(set(ids.values())) == len(ids)
    assert all(ids[(lists[0], h)] == h for h in hashes)
    groups, unknown = audiences.by_audience(list(ids.values()))
    assert unknown == []
    assert {(a, h): rid for a, members in groups.items() for h, rid in members.items()} == ids
    assert audiences.by_audience([f"{lists[0]}:{hashes[0]}", f"not-ours:{hashes[0]}"])[1] == [f"{lists[0]}:{hashes[0]}", f"not-ours:{hashes[0]}"]


@given(
    lists=st.lists(st.text("abcdef0123456789-", min_size=1, max_size=12), min_size=1, max_size=4, unique=True),
    hashes=st.lists(st.one_of(st.none(), st.text("0123456789abcdef", min_size=32, max_size=32)), max_size=20),
)
def test_record_ids_of_an_arrow_page_are_those_of_its_values(lists, hashes):
    """The full read maps a page's hashes as an Arrow array (``record_id_array``): the same ids
    as ``record_ids`` gives for the values, a missing hash still missing."""
    import pyarrow as pa

    from retention.systems.newsletter.audiences import Audiences

    audiences = Audiences(lists)
    for list_id in lists:
        got = audiences.record_id_array(list_id, pa.array(hashes, pa.string())).to_pylist()
        assert got == audiences.record_ids(list_id, hashes)


@given(
    lists=st.lists(st.text("abcdef0123456789-", min_size=1, max_size=12), min_size=1, max_size=3, unique=True),
    ids=st.lists(
        st.one_of(
            st.text("0123456789abcdef", min_size=32, max_size=32),
            st.tuples(st.sampled_from(["", "not-ours", "x:y"]), st.text(min_size=0, max_size=34)).map(":".join),
            st.text(min_size=0, max_size=40),
        ),
        max_size=40,
    ),
    slice_rows=st.integers(1, 7),
)
def test_sorted_hashes_group_as_by_audience_does(lists, ids, slice_rows):
    """``sorted_hashes`` (verify's compact form) groups the ids as ``by_audience`` does: the same
    audiences in the same order, each with the same hashes, sorted, and each hash's position
    leading back to its id; ids of no audience of ours are left out."""
    from retention.systems.newsletter.audiences import Audiences, hash_text

    audiences = Audiences(lists)
    # some ids of the further audiences too, as the engine would hand them
    ids = ids + [audiences.record_id(a, i) for a in lists for i in ids[:3] if ":" not in i]
    groups, _unknown = audiences.by_audience(ids)
    table = audiences.sorted_hashes(ids, slice_rows=slice_rows)
    assert list(table) == list(groups)
    for list_id, (hashes, positions) in table.items():
        assert list(hashes) == sorted(hashes.tolist())
        assert all(audiences.by_audience([ids[p]])[0][list_id] == {hash_text(h): ids[p]} for h, p in zip(hashes, positions))
        assert {hash_text(h) for h in hashes} == set(groups[list_id])


def test_still_present_over_many_ids_pages_the_list_once():
    """More than 2,000 ids of an audience: one pass over the list's pages, each page's ids
    looked up in the sorted hashes; fewer: one lookup each. Present or not is exactly the
    list's membership, for ids handed as a list or as the engine's Arrow texts."""
    import random

    import pyarrow as pa

    from retention.runs.erasing import TextIds
    from retention.systems.newsletter.adapter import NewsletterAdapter

    rng = random.Random(7)
    listed = {a: {f"{rng.getrandbits(128):032x}" for _ in range(3000)} for a in (FIRST, SECOND)}

    class Client:
        def __init__(self):
            self.paged, self.looked_up = [], []

        def iter_member_pages(self, list_id, fields):
            self.paged.append(list_id)
            members = sorted(listed[list_id])
            rng.shuffle(members)
            for start in range(0, len(members), 1000):
                yield [{"id": h} for h in members[start : start + 1000]]

        def exists_many(self, list_id, hashes):
            hashes = list(hashes)
            self.looked_up.append((list_id, len(hashes)))
            return {h: h in listed[list_id] for h in hashes}

    client = Client()
    adapter = NewsletterAdapter(client, [FIRST, SECOND])
    first = sorted(listed[FIRST])[:1500] + [f"{rng.getrandbits(128):032x}" for _ in range(1500)]
    second = [f"{SECOND}:{h}" for h in sorted(listed[SECOND])[:10]] + [f"{SECOND}:{'0' * 32}"]
    ids = first + second + ["not-ours:" + first[0]]
    expected = set(sorted(listed[FIRST])[:1500]) | {f"{SECOND}:{h}" for h in sorted(listed[SECOND])[:10]}
    for given_ids in (ids, TextIds(pa.array(ids, pa.string()))):
        client.paged.clear(), client.looked_up.clear()
        assert adapter.still_present("newsletter_member", given_ids) == expected
        assert client.paged == [FIRST] and client.looked_up == [(SECOND, 11)]
