"""The Mailchimp client against the stand-in, over real HTTP, with injected faults."""

from __future__ import annotations

import hashlib
import logging
import threading
from datetime import UTC, datetime, timedelta

import pytest
import requests

from retention.systems.http import HTTPError
from retention.systems.newsletter.client import MailchimpClient, base_url_for_key
from retention_dev.standins import mailchimp_data as md
from retention_dev.standins.process import StandIn

NOW = datetime(2026, 5, 4, 10, 30, tzinfo=UTC)
KEY = "standin-key-us0"
LIST = "demo-list"


def start(tmp_path, members: int, *args: str) -> StandIn:
    return StandIn(
        "mailchimp",
        "--port", "0",
        "--state-file", str(tmp_path / "mc.npz"),
        "--members", str(members),
        "--seed", "17",
        "--now", NOW.isoformat(),
        *args,
    ).start()


def stats(s: StandIn) -> dict:
    return requests.get(f"{s.base_url}/_standin/stats").json()


def faults(s: StandIn, **spec) -> None:
    assert requests.post(f"{s.base_url}/_standin/faults", json=spec).status_code == 200


def reset(s: StandIn) -> None:
    faults(s)
    assert requests.post(f"{s.base_url}/_standin/reset-stats").status_code == 200


def client_for(s: StandIn, **kw) -> MailchimpClient:
    kw.setdefault("backoff", 0.01)
    return MailchimpClient(KEY, base_url=f"{s.base_url}/3.0", **kw)


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    """A stand-in only read from."""
    s = start(tmp_path_factory.mktemp("mc-read"), 2_500)
    yield s
    s.stop()


@pytest.fixture
def writer(tmp_path):
    s = start(tmp_path, 600)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def expected():
    return md.generate_members(2_500, seed=17, now=NOW)


# --- basics -------------------------------------------------------------------------------


def test_base_url_from_key_and_hash():
    assert base_url_for_key("0123abcd-us21") == "https://us21.api.mailchimp.com/3.0"
    c = MailchimpClient("0123abcd-us21")
    try:
        assert c.base_url == "https://us21.api.mailchimp.com/3.0"
        assert "0123abcd" not in repr(c)
    finally:
        c.close()
    with pytest.raises(ValueError) as err:
        MailchimpClient("secretkeywithoutdc")
    assert "secretkeywithoutdc" not in str(err.value)
    assert MailchimpClient.subscriber_hash("Anna.Berg@EXAMPLE.org") == hashlib.md5(b"anna.berg@example.org").hexdigest()


def test_ping_and_wrong_key(reader):
    with client_for(reader) as c:
        assert c.ping()
    bad = MailchimpClient("wrong-us0", base_url=f"{reader.base_url}/3.0")
    with pytest.raises(HTTPError) as err:
        bad.ping()
    assert err.value.status == 401 and "wrong-us0" not in str(err.value)
    bad.close()


# --- reading ------------------------------------------------------------------------------


def test_reads_every_member_once_in_order_within_the_connection_limit(reader, expected):
    reset(reader)
    faults(reader, slow_ms=60, match="/members")  # make the pages overlap, also on a loaded machine
    try:
        with client_for(reader) as c:
            pages = list(c.iter_member_pages(LIST, count=100))
    finally:
        faults(reader)
    assert [len(p) for p in pages] == [100] * 25
    got = [m for p in pages for m in p]
    want_fields = ("id", "email_address", "status", "last_changed", "timestamp_signup", "timestamp_opt")
    assert got == [{f: m[f] for f in want_fields} for m in expected]
    st = stats(reader)
    assert st["max_in_flight"] == 10  # concurrent, and never more than 10
    assert st["throttled"] == 0 and st["requests_by_kind"]["list_members"] == 25


def test_reading_survives_throttling_and_errors(reader, expected):
    reset(reader)
    # 9 faults: fewer than max_retries even if one request met them all.
    faults(reader, throttle_next=4, error_next=3, error_status=500, drop_next=2, match="/members")
    with client_for(reader, max_connections=4) as c:
        ids = [m["id"] for p in c.iter_member_pages(LIST, fields=("id",), count=300) for m in p]
        assert c.session.stats.as_dict()["retries"] == 9
    assert ids == [m["id"] for m in expected]
    assert stats(reader)["max_in_flight"] <= 4


def test_filters_total_and_get_member(reader, expected):
    with client_for(reader) as c:
        pending = [m for p in c.iter_member_pages(LIST, status="pending", count=50) for m in p]
        assert [m["id"] for m in pending] == [m["id"] for m in expected if m["status"] == "pending"]
        assert c.total_members(LIST) == 2_500
        assert c.total_members(LIST, status="pending") == len(pending)
        cut = sorted(m["last_changed"] for m in expected)[2_000]
        recent = [m for p in c.iter_member_pages(LIST, since_last_changed=cut) for m in p]
        assert {m["id"] for m in recent} == {m["id"] for m in expected if m["last_changed"] > cut}
        upper = next(m for m in expected if m["email_address"] != m["email_address"].lower())
        got = c.get_member(LIST, c.subscriber_hash(upper["email_address"]))
        assert got == upper
        assert c.get_member(LIST, "0" * 32) is None
        with pytest.raises(ValueError):
            next(c.iter_member_pages(LIST, count=1001))


def test_closing_the_page_iterator_early(reader):
    with client_for(reader) as c:
        it = c.iter_member_pages(LIST, count=100)
        first, second = next(it), next(it)
        it.close()
        assert len(first) == len(second) == 100
        assert threading.active_count() < 20


@pytest.mark.parametrize("filters", [{}, {"status": "pending"}, {"since_last_changed": "cut"}])
def test_member_arrays_are_the_member_columns(reader, expected, filters):
    """The full read's pages as Arrow arrays (parsed by Arrow's JSON reader) hold what the pages
    decoded value by value hold: the same members, fields and values, page by page."""
    if "since_last_changed" in filters:
        filters = {"since_last_changed": sorted(m["last_changed"] for m in expected)[2_000]}
    fields = ("id", "email_address", "status", "last_changed", "timestamp_signup")
    with client_for(reader) as c:
        columns = list(c.iter_member_columns(LIST, fields=fields, count=300, **filters))
        arrays = list(c.iter_member_arrays(LIST, fields=fields, count=300, **filters))
    assert columns and [len(p["id"]) for p in arrays] == [len(p["id"]) for p in columns]
    assert [{f: p[f].to_pylist() for f in fields} for p in arrays] == columns


def test_a_page_arrow_will_not_read_as_text_is_read_value_by_value():
    """A value that is not text (a number, a flag, an object) is kept as its text, as the
    value-by-value decoding keeps it; a member without a field has it missing; a page laid out
    over several lines reads the same; what is no members page is refused in one line."""
    from retention.systems.newsletter.client import _arrow_page_options, _page_arrays

    fields = ("id", "email_address", "status")
    options = _arrow_page_options(fields)

    def read(content: bytes) -> tuple[dict, int, int]:
        page, n, total = _page_arrays(content, fields, options)
        return {f: a.to_pylist() for f, a in page.items()}, n, total

    text = b'{"members": [\n {"id": "a1", "email_address": "x@example.org", "status": "subscribed"},\n {"id": "a2", "status": "cleaned"}\n], "total_items": 7}'
    assert read(text) == ({"id": ["a1", "a2"], "email_address": ["x@example.org", None], "status": ["subscribed", "cleaned"]}, 2, 7)
    mixed = b'{"members": [{"id": "a1", "email_address": "x@example.org", "status": 3}, {"id": true, "status": "pending"}], "total_items": 2}'
    assert read(mixed) == ({"id": ["a1", "True"], "email_address": ["x@example.org", None], "status": ["3", "pending"]}, 2, 2)
    assert read(b'{"total_items": 0}') == ({"id": [], "email_address": [], "status": []}, 0, 0)
    for wrong in (b'[1, 2]', b'{"members": null}', b'{"members": 5}', b'{"members": [null]}', b'not json'):
        with pytest.raises(HTTPError, match="unexpected page shape"):
            read(wrong)


# --- erasing ------------------------------------------------------------------------------


def _all_ids(c: MailchimpClient) -> list[str]:
    return [m["id"] for p in c.iter_member_pages(LIST, fields=("id",)) for m in p]


def test_delete_permanent_many_under_faults(writer, caplog):
    caplog.set_level(logging.DEBUG)
    with client_for(writer, max_retries=20) as c:
        ids = _all_ids(c)
        targets, keep = ids[:300], ids[300:]
        reset(writer)
        faults(
            writer,
            throttle_next=25,
            error_next=15,
            error_status=503,
            drop_next=15,
            match="delete-permanent",
        )
        outcomes: list[tuple[str, str]] = []
        caller = threading.get_ident()

        def on_result(h: str, outcome: str) -> None:
            assert threading.get_ident() == caller
            outcomes.append((h, outcome))

        results = c.delete_permanent_many(LIST, [*targets, targets[0]], on_result=on_result)

        assert set(results) == set(targets)
        assert sorted(outcomes) == sorted(results.items())  # once per hash, as each finished
        assert set(results.values()) == {"erased"}  # no "failed"; a 404 after a drop is ours
        st = stats(writer)
        assert st["permanent_deletes"] == 300  # each erased exactly once on the server
        assert st["throttled_injected"] == 25 and st["errors_injected"] == 15 and st["drops"] == 15
        assert st["max_in_flight"] <= 10
        assert st["archives"] == 0 and "archive" not in st["requests_by_kind"]  # never the archiving DELETE
        assert st["total"] == 300
        assert _all_ids(c) == keep  # the others untouched, order kept
        exists = c.exists_many(LIST, [*targets[:20], *keep[:20]])
        assert exists == {**dict.fromkeys(targets[:20], False), **dict.fromkeys(keep[:20], True)}
    ours = [r for r in caplog.records if r.name.startswith("retention")]
    assert any("delete-permanent" in r.getMessage() for r in ours)
    for record in ours:  # no subscriber hashes in our log lines
        assert not any(h in record.getMessage() for h in targets)


def test_unknown_hash_is_already_gone_even_after_throttling(writer):
    unknown = hashlib.md5(b"nobody@example.org").hexdigest()
    with client_for(writer) as c:
        assert c.delete_permanent_many(LIST, [unknown]) == {unknown: "already_gone"}
        faults(writer, throttle_next=2, match="delete-permanent")
        assert c.delete_permanent(LIST, unknown) == "already_gone"
        assert c.session.stats.as_dict()["throttled"] == 2


def test_dropped_response_then_404_counts_as_erased(writer):
    with client_for(writer) as c:
        first, second = _all_ids(c)[:2]
        faults(writer, drop_next=1, match=f"{first}/actions/delete-permanent")
        assert c.delete_permanent(LIST, first) == "erased"
        assert c.delete_permanent(LIST, first) == "already_gone"
        assert c.delete_permanent(LIST, second) == "erased"
        assert stats(writer)["permanent_deletes"] == 2


def test_one_failing_hash_does_not_stop_the_others(writer):
    with client_for(writer, max_retries=2) as c:
        ids = _all_ids(c)[:40]
        doomed = ids[7]
        faults(writer, error_next=1000, error_status=500, match=doomed)
        results = c.delete_permanent_many(LIST, ids)
        faults(writer)
        assert results[doomed] == "failed"
        assert all(results[h] == "erased" for h in ids if h != doomed)
        assert c.exists_many(LIST, [doomed]) == {doomed: True}


def test_on_result_error_stops_the_run(writer):
    with client_for(writer, max_connections=2) as c:
        ids = _all_ids(c)[:100]
        seen: list[str] = []

        def on_result(h: str, outcome: str) -> None:
            seen.append(h)
            if len(seen) == 3:
                raise RuntimeError("ledger unavailable")

        with pytest.raises(RuntimeError, match="ledger unavailable"):
            c.delete_permanent_many(LIST, ids, on_result=on_result)
        erased = stats(writer)["permanent_deletes"]
        assert 3 <= erased <= 3 + 2 * 2  # at most the queued window after the failure


def test_archived_members_still_exist_until_erased(writer):
    with client_for(writer) as c:
        h = _all_ids(c)[0]
        requests.delete(f"{writer.base_url}/3.0/lists/{LIST}/members/{h}", auth=("x", KEY))
        assert c.exists_many(LIST, [h]) == {h: True}
        assert c.delete_permanent_many(LIST, [h]) == {h: "erased"}
        assert c.exists_many(LIST, [h]) == {h: False}


def test_clock_is_the_earlier_of_the_servers_date_and_ours(writer):
    c = client_for(writer)
    try:
        past = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
        requests.post(f"{writer.base_url}/_standin/clock", json={"now": past.isoformat()}).raise_for_status()
        assert c.clock() == past  # the server's clock, behind ours
        future = datetime.now(UTC) + timedelta(hours=3)
        requests.post(f"{writer.base_url}/_standin/clock", json={"now": future.isoformat()}).raise_for_status()
        before = datetime.now(UTC).replace(microsecond=0)
        assert before <= c.clock() <= datetime.now(UTC)  # ours, behind the server's: the earlier one
    finally:
        c.close()
