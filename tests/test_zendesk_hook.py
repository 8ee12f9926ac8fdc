"""ZendeskHook: connection parsing and a real call to the stand-in."""

from __future__ import annotations

import importlib
import json

import pytest
from airflow.sdk.bases.hook import BaseHook

from retention.systems.ticketing.client import ZendeskClient
from retention.systems.ticketing.hook import ZendeskHook
from retention_dev.standins.process import StandIn


def set_conn(monkeypatch, conn_id: str = "retention_zendesk", **fields) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({"conn_type": "retention_zendesk", **fields}))


def test_hook_metadata():
    assert ZendeskHook.conn_name_attr == "zendesk_conn_id"
    assert ZendeskHook.default_conn_name == "retention_zendesk"
    assert ZendeskHook.conn_type == "retention_zendesk"
    assert ZendeskHook.hook_name == "Zendesk Support"
    assert "password" in ZendeskHook.get_ui_field_behaviour()["relabeling"]


def test_nothing_is_read_at_import_time(monkeypatch):
    import retention.systems.ticketing.hook as module

    def refuse(*args, **kwargs):
        raise AssertionError("connection read")

    monkeypatch.setattr(BaseHook, "get_connection", classmethod(refuse))
    reloaded = importlib.reload(module)
    reloaded.ZendeskHook()
    reloaded.ZendeskHook(zendesk_conn_id="other")


def test_get_conn_talks_to_the_stand_in(tmp_path, monkeypatch):
    with StandIn(
        "zendesk", "--port", "0", "--state-file", str(tmp_path / "zd.npz"), "--tickets", "60", "--token", "tok-123",
        "--job-seconds", "0.02",
    ) as server:
        set_conn(
            monkeypatch, host=server.base_url, login="agent@example.org", password="tok-123",
            extra={"requests_per_minute": 6000, "incremental_per_minute": 600, "job_poll_interval": 0.02},
        )
        hook = ZendeskHook()
        client = hook.get_conn()
        try:
            assert isinstance(client, ZendeskClient) and hook.get_conn() is client
            assert client.base_url == server.base_url
            assert client.general.interval == pytest.approx(60 / (6000 * 0.98))
            assert client.job_poll_interval == 0.02
            assert hook.test_connection() == (True, "Zendesk API answered.")
            assert sum(len(p) for p in client.iter_ticket_pages(0)) == 60
            assert client.erase_tickets([1, 2]) == {1: "erased", 2: "erased"}
        finally:
            hook.close()

        set_conn(monkeypatch, "zendesk_wrong", host=server.base_url, login="agent@example.org", password="nope")
        wrong = ZendeskHook(zendesk_conn_id="zendesk_wrong")
        ok, message = wrong.test_connection()
        wrong.close()
        assert not ok and "401" in message and "nope" not in message


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"host": "acme"}, "https://acme.zendesk.com"),
        ({"host": "acme.zendesk.com"}, "https://acme.zendesk.com"),
        ({"host": "127.0.0.1", "port": 8082}, "https://127.0.0.1:8082"),
        ({"host": "http://127.0.0.1", "port": 8082}, "http://127.0.0.1:8082"),
        ({"host": "http://127.0.0.1:8082/"}, "http://127.0.0.1:8082"),
    ],
)
def test_host_forms(monkeypatch, fields, expected):
    set_conn(monkeypatch, login="agent@example.org", password="tok", **fields)
    hook = ZendeskHook()
    try:
        assert hook.get_conn().base_url == expected
    finally:
        hook.close()


def test_oauth_token_and_missing_credentials(monkeypatch):
    set_conn(monkeypatch, host="acme", extra={"oauth_token": "oauth-abc"})
    hook = ZendeskHook()
    client = hook.get_conn()
    assert client.session.session.headers["Authorization"] == "Bearer oauth-abc"
    assert client.session.session.auth is None
    hook.close()

    set_conn(monkeypatch, host="acme", login="agent@example.org")
    with pytest.raises(ValueError, match="API token"):
        ZendeskHook().get_conn()
    set_conn(monkeypatch, host="acme", password="tok")
    with pytest.raises(ValueError, match="e-mail"):
        ZendeskHook().get_conn()
    set_conn(monkeypatch, login="agent@example.org", password="tok")
    with pytest.raises(ValueError, match="host"):
        ZendeskHook().get_conn()
