"""NewsletterAdapter.extract_changes against the Mailchimp stand-in over real HTTP: a cursor per
audience, members changed since it through ``since_last_changed``, the same frames as the full
extract, requests proportional to the change, and the whole-second comparison overlapped."""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retention.config import DEFAULT_POLICY
from retention.domain.policy import load_policy
from retention.domain.quarantine import split_quarantine
from retention.systems.newsletter.adapter import MEMBER_FIELDS, NewsletterAdapter, members_frame
from retention.systems.newsletter.client import MailchimpClient
from retention_dev.standins.process import StandIn

KEY = "standin-key-us0"
NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
FIRST, SECOND = "demo-list", "second-list"
# The stand-in's clock is frozen a day after the generated members' last change, so no generated
# member falls inside the cursor's overlap and "exactly the changed members" can be asserted.
CLOCK0 = NOW + timedelta(days=1)
FRAME_COLUMNS = ["record_id", "status", "last_changed", "timestamp_signup", "has_email"]


def start(tmp_path, members: int) -> StandIn:
    return StandIn(
        "mailchimp", "--port", "0", "--state-file", str(tmp_path / "mc.npz"), "--members", str(members),
        "--seed", "23", "--now", NOW.isoformat(), "--api-key", KEY, "--also-list", SECOND,
    ).start()


def admin(s: StandIn, name: str, body: dict | None = None) -> dict:
    if body is None:
        return requests.get(f"{s.base_url}/_standin/{name}", timeout=10).json()
    response = requests.post(f"{s.base_url}/_standin/{name}", json=body, timeout=10)
    response.raise_for_status()
    return response.json()


def freeze(s: StandIn, when: datetime) -> None:
    admin(s, "clock", {"now": when.isoformat()})


def member_url(s: StandIn, list_id: str, subscriber_hash: str) -> str:
    return f"{s.base_url}/3.0/lists/{list_id}/members/{subscriber_hash}"


def set_status(s: StandIn, list_id: str, subscriber_hash: str, status: str) -> int:
    return requests.patch(member_url(s, list_id, subscriber_hash), json={"status": status}, auth=("x", KEY), timeout=10).status_code


def archive(s: StandIn, list_id: str, subscriber_hash: str) -> int:
    return requests.delete(member_url(s, list_id, subscriber_hash), auth=("x", KEY), timeout=10).status_code


def erase(s: StandIn, list_id: str, subscriber_hash: str) -> int:
    url = member_url(s, list_id, subscriber_hash) + "/actions/delete-permanent"
    return requests.post(url, auth=("x", KEY), timeout=10).status_code


def add(s: StandIn, list_id: str, email: str, status: str) -> str:
    """A new member through the API (``POST /lists/{id}/members``); its subscriber hash."""
    response = requests.post(
        f"{s.base_url}/3.0/lists/{list_id}/members", json={"email_address": email, "status": status}, auth=("x", KEY), timeout=10
    )
    assert response.status_code == 200, response.text
    return response.json()["id"]


def member_status(s: StandIn, list_id: str, subscriber_hash: str) -> str:
    return requests.get(member_url(s, list_id, subscriber_hash), auth=("x", KEY), timeout=10).json()["status"]


def adapter_for(s: StandIn, *lists: str) -> NewsletterAdapter:
    return NewsletterAdapter(MailchimpClient(KEY, base_url=f"{s.base_url}/3.0", backoff=0.01), list_ids=list(lists))


def collect(call) -> tuple[pd.DataFrame, list[str], object]:
    """(the frames written, concatenated and sorted by record id; the record types written; what
    ``call`` returned)."""
    frames: list[pd.DataFrame] = []
    types: list[str] = []

    def write(record_type: str, frame: pd.DataFrame) -> None:
        types.append(record_type)
        frames.append(frame)

    result = call(write)
    if frames:
        frame = pd.concat(frames, ignore_index=True)
    else:
        frame = members_frame({f: [] for f in MEMBER_FIELDS})  # no rows, the schema's dtypes
    return frame.sort_values("record_id", ignore_index=True), types, result


def full(adapter: NewsletterAdapter) -> pd.DataFrame:
    return collect(lambda w: adapter.extract(w, NOW))[0]


def changes(adapter: NewsletterAdapter, cursor: str | None) -> tuple[pd.DataFrame, list[str], str]:
    return collect(lambda w: adapter.extract_changes(w, NOW, cursor))


def merged(base: pd.DataFrame, changed: pd.DataFrame) -> pd.DataFrame:
    """The first full frame with the changed rows put in (new ones added, changed ones replaced)."""
    both = pd.concat([base, changed], ignore_index=True).drop_duplicates("record_id", keep="last")
    return both.sort_values("record_id", ignore_index=True)


def requests_by_kind(s: StandIn) -> dict[str, int]:
    return admin(s, "stats")["requests_by_kind"]


@pytest.fixture
def small(tmp_path):
    s = start(tmp_path, 300)
    freeze(s, CLOCK0)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    s = start(tmp_path_factory.mktemp("mc-big"), 3_500)
    freeze(s, CLOCK0)
    yield s
    s.stop()


def test_without_a_cursor_the_frames_are_those_of_extract(small):
    adapter = adapter_for(small, FIRST, SECOND)
    frame, types, cursor = changes(adapter, None)
    assert set(types) == {"newsletter_member"}
    pd.testing.assert_frame_equal(frame, full(adapter))
    assert len(frame) == 600 and isinstance(cursor, str)


def test_the_frames_carry_nothing_personal(small):
    adapter = adapter_for(small, FIRST, SECOND)
    hashed = add(small, FIRST, "Someone.Real@Example.org", "subscribed")
    frame, _types, _cursor = changes(adapter, None)
    assert list(frame.columns) == FRAME_COLUMNS
    text = [str(value) for value in frame.to_numpy().ravel()]
    assert not any("@" in value or "example" in value.lower() for value in text)
    assert frame.loc[frame["record_id"] == hashed, "has_email"].item()


def test_exactly_the_changed_members_in_both_audiences_with_requests_proportional_to_the_change(big):
    adapter = adapter_for(big, FIRST, SECOND)
    base = full(adapter)
    _frame, _types, cursor = changes(adapter, None)
    first_ids = base.loc[~base["record_id"].str.contains(":"), ["record_id", "status"]]
    second_ids = base.loc[base["record_id"].str.contains(":"), ["record_id", "status"]]
    subscribed_first = first_ids.loc[first_ids["status"] == "subscribed", "record_id"].tolist()
    subscribed_second = [r.split(":", 1)[1] for r in second_ids.loc[second_ids["status"] == "subscribed", "record_id"]]

    # In the cursor's own second: Mailchimp compares whole seconds, so these must not be missed.
    assert set_status(big, FIRST, subscribed_first[0], "unsubscribed") == 200
    assert archive(big, SECOND, subscribed_second[0]) == 204
    new_first = add(big, FIRST, "new.member@example.org", "pending")
    freeze(big, CLOCK0 + timedelta(seconds=1))
    assert set_status(big, SECOND, subscribed_second[1], "unsubscribed") == 200
    new_second = add(big, SECOND, "other.member@example.net", "subscribed")
    assert archive(big, FIRST, subscribed_first[1]) == 204

    admin(big, "reset-stats", {})
    frame, types, cursor2 = changes(adapter, cursor)
    asked = requests_by_kind(big)
    expected = {
        subscribed_first[0], subscribed_first[1], new_first,
        f"{SECOND}:{subscribed_second[0]}", f"{SECOND}:{subscribed_second[1]}", f"{SECOND}:{new_second}",
    }
    assert set(frame["record_id"]) == expected and len(frame) == len(expected)
    assert set(types) == {"newsletter_member"}, "nothing is reported gone from a since_last_changed listing"
    # The rows are the full extract's rows for those members, archived ones included.
    now_full = full(adapter)
    pd.testing.assert_frame_equal(frame, now_full[now_full["record_id"].isin(expected)].reset_index(drop=True))
    statuses = dict(zip(frame["record_id"], frame["status"]))
    assert statuses[subscribed_first[1]] == "archived" and statuses[f"{SECOND}:{subscribed_second[0]}"] == "archived"
    assert pd.isna(frame.loc[frame["record_id"] == new_first, "timestamp_signup"].item())  # added by the API
    # One page per audience and one clock reading, against 4 pages per audience (and a count) for the full read.
    assert asked == {"ping": 1, "list_members": 2}

    # Nothing changed since: the next read lists at most what changed within the cursor's
    # overlap (read twice, harmlessly), and once the clock has moved on, nothing.
    freeze(big, CLOCK0 + timedelta(minutes=10))
    again, _types, cursor3 = changes(adapter, cursor2)
    assert set(again["record_id"]) <= expected
    again, _types, _cursor = changes(adapter, cursor3)
    assert again.empty


def test_requests_grow_with_the_change_a_page_per_thousand_members(big):
    adapter = adapter_for(big, FIRST, SECOND)
    freeze(big, CLOCK0 + timedelta(hours=1))
    base, _types, cursor = changes(adapter, None)
    subscribed = base.loc[~base["record_id"].str.contains(":") & (base["status"] == "subscribed"), "record_id"]
    moved = subscribed.iloc[:1200].tolist()
    with requests.Session() as session:
        for h in moved:
            url = member_url(big, FIRST, h)
            assert session.patch(url, json={"status": "unsubscribed"}, auth=("x", KEY), timeout=10).status_code == 200
    admin(big, "reset-stats", {})
    frame, _types, _cursor = changes(adapter, cursor)
    assert sorted(frame["record_id"]) == sorted(moved)
    # Two pages for the 1,200 changed in the first audience, one (empty) for the second.
    assert requests_by_kind(big) == {"ping": 1, "list_members": 3}


def test_a_change_in_the_same_second_as_the_cursor_is_read(small):
    adapter = adapter_for(small, FIRST)
    base = full(adapter)
    _frame, _types, cursor = changes(adapter, None)
    victim = base.loc[base["status"] == "subscribed", "record_id"].iloc[0]
    assert set_status(small, FIRST, victim, "unsubscribed") == 200  # same frozen second as the cursor
    frame, _types, _cursor = changes(adapter, cursor)
    assert victim in set(frame["record_id"])


def test_an_audience_new_to_the_cursor_is_read_whole(small):
    _frame, _types, cursor = changes(adapter_for(small, FIRST), None)
    both = adapter_for(small, FIRST, SECOND)
    frame, _types, cursor2 = changes(both, cursor)
    assert set(frame["record_id"]) == {r for r in full(both)["record_id"] if r.startswith(f"{SECOND}:")}
    frame, _types, _cursor = changes(both, cursor2)
    assert frame.empty


def test_permanently_deleted_members_are_not_seen_by_the_change_feed(small):
    """Documented limit: Mailchimp forgets a deleted member; the weekly reconciliation finds it."""
    adapter = adapter_for(small, FIRST)
    base = full(adapter)
    _frame, _types, cursor = changes(adapter, None)
    assert erase(small, FIRST, base["record_id"].iloc[0]) == 204
    frame, types, _cursor = changes(adapter, cursor)
    assert frame.empty and not any(t.endswith(":gone") for t in types)


@pytest.mark.parametrize("cursor", ["", "yesterday", json.dumps({"v": 1, "since": {FIRST: "not a time"}}), "[]"])
def test_a_cursor_this_adapter_did_not_write_is_one_line(small, cursor):
    with pytest.raises(ValueError) as caught:
        changes(adapter_for(small, FIRST), cursor)
    assert "\n" not in str(caught.value) and "cursor" in str(caught.value)


# --- property: the full frame, merged with the changes, is the next full frame -------------------

OPS = st.lists(
    st.tuples(
        st.sampled_from(["status", "archive", "add", "erase", "tick"]),
        st.sampled_from([FIRST, SECOND]),
        st.integers(min_value=0, max_value=10_000),
        st.sampled_from(["subscribed", "unsubscribed", "cleaned", "pending", "transactional"]),
    ),
    max_size=12,
)
_clock = itertools.count(1)
_new = itertools.count(1)


@pytest.fixture(scope="module")
def prop(tmp_path_factory):
    s = start(tmp_path_factory.mktemp("mc-prop"), 200)
    freeze(s, CLOCK0)
    yield s
    s.stop()


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_merging_the_changes_into_the_full_frame_gives_the_next_full_frame(prop, ops):
    adapter = adapter_for(prop, FIRST, SECOND)
    clock = CLOCK0 + timedelta(seconds=20 * next(_clock))  # past the last example's ticks (at most 12)
    freeze(prop, clock)
    base, _types, cursor = changes(adapter, None)
    erased: set[str] = set()
    for kind, list_id, pick, status in ops:
        ids = sorted(r for r in base["record_id"] if (":" in r) == (list_id == SECOND) and r not in erased)
        rid = ids[pick % len(ids)]
        member = rid.split(":", 1)[1] if list_id == SECOND else rid
        if kind == "status":
            assert set_status(prop, list_id, member, status) == 200
        elif kind == "archive":
            current = member_status(prop, list_id, member)
            # Mailchimp refuses to archive a cleaned, pending or archived member (405).
            assert archive(prop, list_id, member) == (405 if current in ("cleaned", "pending", "archived") else 204)
        elif kind == "add":
            add(prop, list_id, f"prop.{next(_new)}@example.org", status)
        elif kind == "erase":
            assert erase(prop, list_id, member) == 204
            erased.add(rid)
        else:
            clock += timedelta(seconds=1)
            freeze(prop, clock)
    changed, _types, _cursor = changes(adapter, cursor)
    after = full(adapter)
    expected = merged(base, changed)
    # Permanently deleted members stay in the merged frame (Mailchimp no longer lists them):
    # exactly those are the difference, which the weekly reconciliation removes.
    assert set(expected["record_id"]) - set(after["record_id"]) == erased
    pd.testing.assert_frame_equal(expected[~expected["record_id"].isin(erased)].reset_index(drop=True), after)


# --- why the full read asks for every status -----------------------------------------------------


def test_quarantine_judges_members_of_every_status_so_the_full_read_takes_no_status_filter(small):
    """A server-side ``status`` filter for the statuses the rules can match would drop these
    subscribed members from the extract, and with them their quarantine (counted in the plan,
    reported, and alarmed on when stuck): the full read must keep asking for every status."""
    frame = full(adapter_for(small, FIRST))
    subscribed = frame.index[frame["status"] == "subscribed"][:2]
    frame.loc[subscribed[0], "has_email"] = False
    frame.loc[subscribed[1], "last_changed"] = pd.NaT
    policy = load_policy(DEFAULT_POLICY)
    _clean, _quarantined, counts = split_quarantine(frame, "newsletter_member", policy, NOW)
    assert counts == {"no e-mail address": 1, "missing or invalid last_changed": 1}
    candidates = {v for r in policy.rules_for("newsletter_member") for v in r.when.get("status", ())}
    assert "subscribed" not in candidates  # what a status filter would leave out
