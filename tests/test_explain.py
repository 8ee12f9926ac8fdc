"""Explain one CRM record: through the library and through the command, erasing nothing."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys

import pytest
import sqlalchemy as sa

from retention.config import DEFAULT_POLICY
from retention.domain.policy import load_policy
from retention.domain.pseudonyms import Pseudonymizer
from retention.runs.explain import explain
from retention.systems.crm import schema
from retention.systems.crm.adapter import CrmAdapter
from retention.systems.crm.client import CrmConnector
from retention_dev.standins.mailchimp_data import generate_members
from retention_dev.standins.process import StandIn

AS_OF = dt.datetime(2026, 11, 25, 12, tzinfo=dt.UTC)
POLICY = load_policy(DEFAULT_POLICY)


@pytest.fixture
def crm(tmp_path):
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'crm.db'}")
    schema.create_schema(engine)
    ts = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    with engine.begin() as c:
        c.execute(schema.organisation.insert(), [{"id": 1, "name": "Active Org"}, {"id": 2, "name": "Former Org"}])
        c.execute(
            schema.membership.insert(),
            [
                {"id": 1, "organisation_id": 1, "starts_on": dt.date(2015, 1, 1), "ends_on": None},
                {"id": 2, "organisation_id": 2, "starts_on": dt.date(2015, 1, 1), "ends_on": dt.date(2024, 2, 29)},
            ],
        )
        base = {"first_name": "Ada", "last_name": "Example", "email": "ada@example.org", "created_at": ts, "last_interaction_at": ts, "opted_out": False}
        c.execute(
            schema.contact.insert(),
            [
                {**base, "id": 10, "organisation_id": 1, "kind": "member"},
                {**base, "id": 20, "organisation_id": 2, "kind": "member"},
                {**base, "id": 30, "organisation_id": None, "kind": "lead", "last_interaction_at": None},
                {**base, "id": 40, "organisation_id": 2, "kind": "member"},
                {**base, "id": 50, "organisation_id": None, "kind": "lead", "last_interaction_at": None, "created_at": None},
            ],
        )
        c.execute(schema.legal_hold.insert(), [{"id": 1, "record_type": "crm_contact", "record_id": 40, "reason": "dispute 2026-17", "expires_at": None}])
    return engine


def test_explain_names_rule_deadline_and_decision(crm):
    adapter = CrmAdapter(CrmConnector(crm))
    due = explain(adapter, POLICY, "crm_contact", record_id="20", as_of=AS_OF)
    assert due["decision"] == "planned: erase under rule former-member-contact"
    rule = next(r for r in due["rules"] if r["rule"] == "former-member-contact")
    assert rule["applies"] and rule["due"]
    assert rule["deadline"].startswith("2025-02-2")  # 29 Feb 2024 + P1Y = 28 Feb 2025 (Stockholm), shown in UTC
    assert due["policy_version"] == POLICY.version
    assert due["record_key"] == Pseudonymizer(os.environ["RETENTION_PSEUDONYM_KEY"].encode()).key_for("crm_contact", "20")

    active = explain(adapter, POLICY, "crm_contact", record_id="10", as_of=AS_OF)
    assert active["protected"] and active["decision"].startswith("protected")

    # A lead with no interaction recorded is judged from its creation: the policy's fallback clock.
    fallback = explain(adapter, POLICY, "crm_contact", record_id="30", as_of=AS_OF)
    assert fallback["decision"] == "planned: erase under rule lead (fallback clock created_at: the organisation's decision)"
    lead = next(r for r in fallback["rules"] if r["rule"] == "lead")
    assert lead["fallback_clock"] and lead["clock_used"] == "created_at" and lead["due"]
    no_clock = explain(adapter, POLICY, "crm_contact", record_id="50", as_of=AS_OF)
    assert no_clock["decision"].startswith("quarantined")

    held = explain(adapter, POLICY, "crm_contact", record_id="40", as_of=AS_OF)
    assert held["decision"].startswith("planned: hold") and any("dispute 2026-17" in h for h in held["manual_holds"])

    by_key = explain(adapter, POLICY, "crm_contact", record_key=due["record_key"], as_of=AS_OF)
    assert by_key["decision"] == due["decision"]
    before = explain(adapter, POLICY, "crm_contact", record_id="20", as_of=dt.datetime(2025, 2, 1, tzinfo=dt.UTC))
    assert before["decision"] == "not planned: no rule is due"
    with crm.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(schema.contact)).scalar() == 5, "explain erased something"


def test_explain_command(crm, tmp_path, monkeypatch):
    env = dict(os.environ, AIRFLOW_CONN_RETENTION_CRM=json.dumps({"conn_type": "retention_crm", "extra": {"sqlalchemy_url": str(crm.url)}}))
    out = subprocess.run(
        [sys.executable, "-m", "retention.cli", "explain", "--record-type", "crm_contact", "--record-id", "20", "--as-of", AS_OF.isoformat()],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    result = only_json(out.stdout)
    assert result["decision"] == "planned: erase under rule former-member-contact"
    assert "ada@example.org" not in out.stdout and "Example" not in out.stdout


def only_json(stdout: str) -> dict:
    """stdout is the JSON document and nothing else (Airflow's and the hooks' log lines go to
    stderr): `retention explain ... | jq` works."""
    assert stdout.lstrip().startswith("{"), f"stdout does not start with the JSON: {stdout[:300]!r}"
    return json.loads(stdout)


def test_explain_command_names_a_newsletter_member_by_address(tmp_path):
    members = generate_members(30, seed=3, now=AS_OF)
    member = next(m for m in members if m["status"] == "unsubscribed")
    key = "standin-key-us0"
    standin = StandIn("mailchimp", "--port", "0", "--members", "30", "--seed", "3", "--now", AS_OF.isoformat(),
                      "--api-key", key, "--state-file", str(tmp_path / "mc.npz")).start()
    try:
        conn = {"conn_type": "retention_mailchimp", "host": f"{standin.base_url}/3.0", "password": key, "extra": {"list_id": "demo-list"}}
        env = dict(os.environ, AIRFLOW_CONN_RETENTION_MAILCHIMP=json.dumps(conn))
        address = member["email_address"].upper()  # as a person may write it: Mailchimp's id is of the lower-cased address
        out = subprocess.run(
            [sys.executable, "-m", "retention.cli", "explain", "--record-type", "newsletter_member", "--record-id", address,
             "--as-of", AS_OF.isoformat()],
            capture_output=True, text=True, env=env, timeout=120,
        )
    finally:
        standin.stop()
    assert out.returncode == 0, out.stderr[-2000:]
    result = only_json(out.stdout)
    assert result["record_key"] == Pseudonymizer(os.environ["RETENTION_PSEUDONYM_KEY"].encode()).key_for("newsletter_member", member["id"])
    assert result["decision"], result
    assert "reading members" in out.stderr, "the log lines went nowhere: they belong on stderr"
    assert member["email_address"].lower() not in (out.stdout + out.stderr).lower()
