"""The Mailchimp Airflow hook: a client from an Airflow connection (environment variable form)."""

from __future__ import annotations

import json

import pytest

from retention.systems.newsletter.client import MailchimpClient
from retention.systems.newsletter.hook import MailchimpHook
from retention_dev.standins.process import StandIn

ENV = "AIRFLOW_CONN_RETENTION_MAILCHIMP"


def set_conn(monkeypatch, name: str = ENV, **conn) -> None:
    monkeypatch.setenv(name, json.dumps({"conn_type": "retention_mailchimp", **conn}))


def test_provider_attributes():
    assert MailchimpHook.conn_name_attr == "mailchimp_conn_id"
    assert MailchimpHook.default_conn_name == "retention_mailchimp"
    assert MailchimpHook.conn_type == "retention_mailchimp"
    assert MailchimpHook.hook_name == "Mailchimp Marketing"
    behaviour = MailchimpHook.get_ui_field_behaviour()
    assert "login" in behaviour["hidden_fields"] and behaviour["relabeling"]["password"] == "API key"


def test_nothing_is_read_before_use(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    hook = MailchimpHook()  # no connection defined: constructing must not look it up
    assert hook.mailchimp_conn_id == "retention_mailchimp"


def test_client_from_host_and_extra(monkeypatch):
    set_conn(
        monkeypatch,
        password="0123abcd-us21",
        host="http://127.0.0.1:8081/3.0",
        extra={"list_id": "a1b2c3d4e5", "max_connections": 4, "timeout": 5},
    )
    hook = MailchimpHook()
    client = hook.get_conn()
    try:
        assert isinstance(client, MailchimpClient)
        assert client.base_url == "http://127.0.0.1:8081/3.0"
        assert client.max_connections == 4 and client.session.max_connections == 4
        assert client.session.timeout == 5
        assert hook.list_id == "a1b2c3d4e5"
        assert hook.get_conn() is client  # one client per hook
    finally:
        hook.close()


def test_base_url_from_the_keys_data_centre(monkeypatch):
    set_conn(monkeypatch, password="0123abcd-us21", extra=json.dumps({"list_id": "L1"}))
    hook = MailchimpHook()
    try:
        assert hook.get_conn().base_url == "https://us21.api.mailchimp.com/3.0"
        assert hook.get_conn().max_connections == 10  # Mailchimp's limit by default
        assert hook.list_id == "L1"
    finally:
        hook.close()


def test_bare_host_and_other_conn_id(monkeypatch):
    set_conn(monkeypatch, "AIRFLOW_CONN_MC_EU", password="k-us1", host="mc.example.net")
    hook = MailchimpHook(mailchimp_conn_id="mc_eu")
    try:
        assert hook.get_conn().base_url == "https://mc.example.net/3.0"
        with pytest.raises(ValueError, match="list_id"):
            _ = hook.list_id
    finally:
        hook.close()


def test_missing_key_is_an_error_without_secrets(monkeypatch):
    set_conn(monkeypatch, host="http://127.0.0.1:1/3.0", extra={"list_id": "L1"})
    with pytest.raises(ValueError, match="API key"):
        MailchimpHook().get_conn()


def test_against_the_stand_in(monkeypatch, tmp_path):
    s = StandIn("mailchimp", "--port", "0", "--members", "40", "--state-file", str(tmp_path / "mc.npz")).start()
    try:
        set_conn(monkeypatch, password="standin-key-us0", host=f"{s.base_url}/3.0", extra={"list_id": "demo-list"})
        hook = MailchimpHook()
        assert hook.test_connection() == (True, "Mailchimp API answered the ping.")
        assert hook.get_conn().total_members(hook.list_id) == 40
        hook.close()
        set_conn(monkeypatch, password="wrong-us0", host=f"{s.base_url}/3.0", extra={"list_id": "demo-list"})
        ok, message = MailchimpHook().test_connection()
        assert not ok and "401" in message and "wrong-us0" not in message
    finally:
        s.stop()


def test_extras_must_be_a_json_object_and_options_have_types(monkeypatch):
    set_conn(monkeypatch, password="k-us1", extra=["list_id", "L1"])
    with pytest.raises(ValueError, match="extra must be a JSON object"):
        MailchimpHook().get_conn()
    set_conn(monkeypatch, password="k-us1", extra={"list_id": "L1", "max_connections": "many", "timeout": 5})
    with pytest.raises(ValueError, match="'max_connections' must be an integer"):
        MailchimpHook().get_conn()
    set_conn(monkeypatch, password="k-us1", extra={"list_id": "L1", "max_connections": -2})
    with pytest.raises(ValueError, match="max_connections must be >= 1"):
        MailchimpHook().get_conn()
    # An option left empty in the form takes its default; numbers may come as text.
    set_conn(monkeypatch, password="k-us1", extra={"list_id": "L1", "max_connections": "", "timeout": "7.5"})
    hook = MailchimpHook()
    try:
        assert hook.get_conn().max_connections == 10 and hook.get_conn().session.timeout == 7.5
    finally:
        hook.close()


def test_the_connection_is_fetched_once_per_hook(monkeypatch):
    set_conn(monkeypatch, password="k-us1", extra={"list_id": "L1"})
    hook = MailchimpHook()
    calls = []
    fetch = hook.get_connection
    monkeypatch.setattr(hook, "get_connection", lambda conn_id: calls.append(conn_id) or fetch(conn_id))
    try:
        assert (hook.list_id, hook.max_connections, hook.base_url) == ("L1", 10, None)
        hook.get_conn()
        hook.test_connection()
        assert calls == ["retention_mailchimp"]
    finally:
        hook.close()


def test_connection_form_metadata_for_the_provider():
    from airflow.providers_manager import _create_customized_form_field_behaviours_schema_validator

    info = MailchimpHook.connection_type_info()
    assert info["connection-type"] == "retention_mailchimp"
    assert info["hook-class-name"] == "retention.systems.newsletter.hook.MailchimpHook"
    assert info["conn-fields"]["list_id"]["schema"]["type"] == ["string", "null"]
    assert info["conn-fields"]["max_connections"]["schema"] == {"type": ["integer", "null"], "default": 10}
    behaviour = info["ui-field-behaviour"]
    _create_customized_form_field_behaviours_schema_validator().validate(
        {"hidden_fields": behaviour["hidden-fields"], "relabeling": behaviour["relabeling"],
         "placeholders": behaviour["placeholders"]}
    )
    assert behaviour["relabeling"]["password"] == "API key"
