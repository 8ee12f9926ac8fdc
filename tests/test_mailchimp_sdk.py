"""Mailchimp's own Python SDK (mailchimp-marketing) against the stand-in, over real HTTP: what the
stand-in speaks is the API the vendor's client speaks, not only what this project's client sends
(the list-members filters the change feed uses, adding, changing, archiving and erasing)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta

import mailchimp_marketing as MailchimpMarketing
import pytest
import requests
from mailchimp_marketing.api_client import ApiClientError

from retention_dev.standins.process import StandIn

KEY = "standin-key-us0"
LIST = "demo-list"
NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


@pytest.fixture
def standin(tmp_path):
    s = StandIn(
        "mailchimp", "--port", "0", "--state-file", str(tmp_path / "mc.npz"), "--members", "120", "--seed", "5",
        "--now", NOW.isoformat(), "--api-key", KEY,
    ).start()
    yield s
    s.stop()


def sdk(s: StandIn) -> MailchimpMarketing.Client:
    client = MailchimpMarketing.Client()
    # No data centre to put into the host: the SDK's host is the stand-in's URL as it is.
    client.set_config({"api_key": KEY, "server": ""})
    client.api_client.host = f"{s.base_url}/3.0"
    return client


def test_the_vendor_sdk_reads_changes_and_changes_members(standin):
    client = sdk(standin)
    assert client.ping.get() == {"health_status": "Everything's Chimpy!"}
    page = client.lists.get_list_members_info(LIST, count=1000, fields=["members.id", "members.status", "total_items"])
    assert page["total_items"] == 120 and len(page["members"]) == 120

    at = NOW + timedelta(days=1)
    requests.post(f"{standin.base_url}/_standin/clock", json={"now": at.isoformat()}).raise_for_status()
    added = client.lists.add_list_member(LIST, {"email_address": "sdk.person@example.org", "status": "pending"})
    assert added["id"] == hashlib.md5(b"sdk.person@example.org").hexdigest() and added["timestamp_signup"] == ""
    subscribed = [m["id"] for m in page["members"] if m["status"] == "subscribed"]
    assert client.lists.update_list_member(LIST, subscribed[0], {"status": "unsubscribed"})["status"] == "unsubscribed"
    client.lists.delete_list_member(LIST, subscribed[1])  # archives
    client.lists.delete_list_member_permanent(LIST, subscribed[2])

    since = (at - timedelta(seconds=1)).isoformat()
    changed = client.lists.get_list_members_info(LIST, count=1000, since_last_changed=since, fields=["members.id", "members.status"])
    assert {(m["id"], m["status"]) for m in changed["members"]} == {
        (added["id"], "pending"), (subscribed[0], "unsubscribed"), (subscribed[1], "archived"),
    }
    archived = client.lists.get_list_members_info(LIST, status="archived", since_last_changed=since)
    assert [m["id"] for m in archived["members"]] == [subscribed[1]]
    assert client.lists.get_list_members_info(LIST, since_last_changed=at.isoformat())["total_items"] == 0

    with pytest.raises(ApiClientError) as gone:
        client.lists.get_list_member(LIST, subscribed[2])
    assert gone.value.status_code == 404
    with pytest.raises(ApiClientError) as exists:
        client.lists.add_list_member(LIST, {"email_address": "sdk.person@example.org", "status": "subscribed"})
    assert exists.value.status_code == 400
