"""Holds that silently hold nothing (issue 10, item 4).

* The pseudonym key: a ledger remembers the fingerprint of the key it was written under (an HMAC
  of a fixed label under the key, which cannot give the key back) and every run and every hold
  command refuses another key; a blank or low-entropy key is refused before anything runs.
* ``retention hold add``: an id that cannot be the record's is normalised (an e-mail address to
  the member's subscriber hash, ``042`` to ``42``) or refused, and the record must exist in its
  system (``--allow-missing`` for a record a restore will bring back); past expiries and empty
  reasons are refused.

The key and the CRM test run ``retention_nightly`` for real (dag.test); the command runs as a
subprocess against a SQLite CRM and the Mailchimp and Zendesk stand-ins over HTTP.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import secrets
import subprocess
import sys
from datetime import UTC
from pathlib import Path

import numpy as np
import pytest
import requests
import sqlalchemy as sa

from retention import config
from retention.domain.pseudonyms import Pseudonymizer
from retention.store.ledger import Ledger

ROOT = Path(__file__).resolve().parents[1]
KEY_A = "test-only-key-A-" + "7f3c9e21b4d85a60c1e2f3a4b5c6d7e8"
KEY_B = "test-only-key-B-" + "0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a"


def key_of(key: str, record_type: str, record_id: object) -> str:
    return Pseudonymizer(key.encode()).key_for(record_type, record_id)


def cli(*args: str, key: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    run_env = {**os.environ, **(env or {}), "RETENTION_PSEUDONYM_KEY": key}
    run_env.pop("RETENTION_PSEUDONYM_KEY_FILE", None)
    return subprocess.run(
        [sys.executable, "-m", "retention.cli", *args], cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=180
    )


def one_line(out: subprocess.CompletedProcess, *needles: str) -> str:
    """The command refused: exit 2, one line on stderr (no traceback), nothing on stdout."""
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert out.stdout == "" and len(out.stderr.splitlines()) == 1, out.stderr
    for needle in needles:
        assert needle in out.stderr, out.stderr
    return out.stderr


# --- (b) the key itself -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, why",
    [
        ("", "no pseudonym key"),
        (" " * 40, "blank"),
        ("\t \n" * 12, "blank"),
        ("k" * 32, "repeats"),
        ("k" * 64, "repeats"),
        ("abcd" * 10, "repeats"),
        ("0123456789abcdef" * 2, "repeats"),
        ("passwordpasswordpasswordpassword1", "repeats"),
        ("changeme-changeme-changeme-changeme", "repeats"),
        ("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaab", "repeats"),
        ("1111111111111111111111111122222222222222", "repeats"),
        ("abcabcabcabcabcabcabcabcabcabcabcxyz", "repeats"),
        ("0" * 40 + "123456789abc", "repeats"),
        ("ecfcfffeadbfabacdbdeaebafbdcbdbabeedbbaa", "distinct"),  # six letters, no repetition
        ("abacadaeafagahaiajakalamanaoapaq", "entropy"),  # every other character an "a"
    ],
)
def test_a_blank_or_low_entropy_key_is_refused(monkeypatch, key, why):
    monkeypatch.setenv("RETENTION_PSEUDONYM_KEY", key)
    monkeypatch.delenv("RETENTION_PSEUDONYM_KEY_FILE", raising=False)
    monkeypatch.delenv("AIRFLOW_VAR_RETENTION_PSEUDONYM_KEY", raising=False)
    monkeypatch.delenv("AIRFLOW_HOME", raising=False)
    with pytest.raises(config.ConfigError, match=why) as refused:
        config.pseudonym_key()
    message = str(refused.value)
    assert "\n" not in message
    if key.strip():
        assert key not in message and key[:12] not in message, "the key is never printed"


def test_a_key_file_with_a_weak_key_is_refused_and_named(tmp_path, monkeypatch):
    path = tmp_path / "pseudonym.key"
    path.write_text("x" * 40 + "\n")
    monkeypatch.delenv("RETENTION_PSEUDONYM_KEY", raising=False)
    monkeypatch.setenv("RETENTION_PSEUDONYM_KEY_FILE", str(path))
    with pytest.raises(config.ConfigError, match="RETENTION_PSEUDONYM_KEY_FILE") as refused:
        config.pseudonym_key()
    assert "x" * 8 not in str(refused.value)


@pytest.mark.parametrize(
    "key",
    [
        os.environ["RETENTION_PSEUDONYM_KEY"],  # the tests' own key
        "production-install-test-key-not-a-secret",  # tests/test_production_install.py
        "benchmark-only-key-" + "0" * 32,  # benchmarks/harness.py
        "test-only-compose-key-0123456789abcdef",  # tests/test_docker_compose.py
        KEY_A,
        KEY_B,
    ],
)
def test_the_project_keys_pass(monkeypatch, key):
    monkeypatch.setenv("RETENTION_PSEUDONYM_KEY", key)
    assert config.pseudonym_key() == key.encode()


def test_generated_keys_pass(monkeypatch):
    """``scripts/setup.sh`` generates ``secrets.token_hex(32)``: every such key passes."""
    for _ in range(5000):
        key = secrets.token_hex(32)
        monkeypatch.setenv("RETENTION_PSEUDONYM_KEY", key)
        assert config.pseudonym_key() == key.encode()


def test_the_key_setup_sh_generates_passes(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RETENTION_", "AIRFLOW"))}
    env["RETENTION_HOME"] = str(tmp_path / "home")
    script = f'source "{ROOT}/scripts/setup.sh" >/dev/null && python -c "from retention import config; print(len(config.pseudonym_key()))"'
    out = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "64"
    assert (tmp_path / "home" / "pseudonym.key").stat().st_mode & 0o077 == 0


# --- (a) the key's fingerprint in the ledger -------------------------------------------------------


def test_the_fingerprint_cannot_give_the_key_back():
    fp_a, fp_b = config.key_fingerprint(KEY_A.encode()), config.key_fingerprint(KEY_B.encode())
    assert fp_a == config.key_fingerprint(KEY_A.encode()) and fp_a != fp_b
    assert len(fp_a) == 16 and int(fp_a, 16) >= 0
    # Not a plain hash of the key, and nothing of the key in it.
    assert fp_a not in hashlib.sha256(KEY_A.encode()).hexdigest() and fp_a not in KEY_A


def test_open_run_refuses_another_key(retention_home, monkeypatch):
    from retention.runs.context import open_run

    monkeypatch.setenv("RETENTION_PSEUDONYM_KEY", KEY_A)
    open_run("retention_nightly", "manual__a", None, dry_run=True, max_plan_share=None)
    open_run("retention_nightly", "manual__a", None, dry_run=True, max_plan_share=None)  # a retried first task
    monkeypatch.setenv("RETENTION_PSEUDONYM_KEY", KEY_B)
    with pytest.raises(config.ConfigError, match="pseudonym key has changed") as refused:
        open_run("erasure_request", "manual__b", None, dry_run=True, max_plan_share=None)
    message = str(refused.value)
    assert "\n" not in message and KEY_A not in message and KEY_B not in message
    assert config.key_fingerprint(KEY_A.encode()) in message and config.key_fingerprint(KEY_B.encode()) in message
    assert Ledger(config.ledger_url()).run("manual__b") is None, "the run was recorded under another key"
    monkeypatch.setenv("RETENTION_PSEUDONYM_KEY", KEY_A)
    open_run("replay_erasures", "manual__c", None, dry_run=True, max_plan_share=None)


@pytest.fixture
def crm(tmp_path, monkeypatch):
    """A SQLite CRM: contacts 1..10, leads; 1 and 2 due under the rule ``lead``."""
    from retention.systems.crm import schema

    url = f"sqlite:///{tmp_path / 'crm.db'}"
    engine = sa.create_engine(url)
    schema.create_schema(engine)
    now = dt.datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(schema.contact.insert(), [
            {"id": i, "kind": "lead", "first_name": "Spärr", "last_name": f"Testsson {i}", "email": f"hold{i}@example.org",
             "opted_out": False, "created_at": now - dt.timedelta(days=1000),
             "last_interaction_at": now - dt.timedelta(days=800 if i <= 2 else 10)}
            for i in range(1, 11)
        ])
    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_CRM", json.dumps({"conn_type": "retention_crm", "extra": {"sqlalchemy_url": url}}))
    yield engine
    engine.dispose()


def contacts(engine: sa.Engine) -> set[int]:
    with engine.connect() as conn:
        return {int(i) for i in conn.exec_driver_sql("SELECT id FROM contact").scalars()}


@pytest.mark.airflow
def test_a_held_contact_is_not_erased_under_a_new_key(crm, retention_home, monkeypatch):
    """The hold is added under key A; the key file is then replaced (the set-up script makes a
    new key whenever the file is missing). Under key B the hold matches nothing: the run must
    refuse to start, and under key A again it holds the contact."""
    from airflow_run import run_dag, task_states

    added = cli("hold", "add", "--record-type", "crm_contact", "--record-id", "1", "--reason", "dispute 2026-9", key=KEY_A)
    assert added.returncode == 0, added.stderr
    assert added.stdout.startswith(f"hold added: crm_contact {key_of(KEY_A, 'crm_contact', 1)}")

    monkeypatch.setenv("RETENTION_PSEUDONYM_KEY", KEY_B)
    refused = run_dag({"systems": ["crm"], "max_plan_share": 1.0})
    states = task_states(refused)
    assert 1 in contacts(crm), "a contact on manual hold was erased under a new pseudonym key"
    assert refused.state == "failed" and states["open_run"] == "failed", states
    assert states["crm.erase"] in ("upstream_failed", "skipped", "removed", None), states
    assert contacts(crm) == set(range(1, 11))
    one_line(cli("hold", "list", key=KEY_B), "pseudonym key has changed")

    monkeypatch.setenv("RETENTION_PSEUDONYM_KEY", KEY_A)
    held = run_dag({"systems": ["crm"], "max_plan_share": 1.0})
    assert held.state == "success", task_states(held)
    assert contacts(crm) == set(range(3, 11)) | {1}, "under the ledger's key the hold holds and the other due lead goes"


def test_hold_commands_refuse_another_key(tmp_path, crm):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    env = {"RETENTION_LEDGER_URL": url}
    assert cli("hold", "add", "--record-type", "crm_contact", "--record-id", "3", "--reason", "audit", key=KEY_A, env=env).returncode == 0
    for args in (
        ("hold", "add", "--record-type", "crm_contact", "--record-id", "4", "--reason", "audit"),
        ("hold", "list"),
        ("hold", "remove", "--hold-id", "1", "--reason", "settled"),
    ):
        message = one_line(cli(*args, key=KEY_B, env=env), "pseudonym key has changed")
        assert KEY_A not in message and KEY_B not in message
    holds = Ledger(url).holds()
    assert [(h["record_key"], h["reason"]) for h in holds] == [(key_of(KEY_A, "crm_contact", 3), "audit")]
    assert cli("hold", "list", key=KEY_A, env=env).returncode == 0


# --- (c) hold add: ids, existence, expiry, reason -------------------------------------------------

MC_KEY = "standin-key-us0"
MEMBER_EMAIL = "hold.me@example.org"
LIMITS = (
    "--requests-per-minute", "1000000", "--incremental-per-minute", "100000", "--deleted-list-per-minute", "100000",
    "--user-deletes-per-10min", "1000000", "--job-seconds", "0.05",
)


@pytest.fixture
def systems(tmp_path, crm, monkeypatch):
    """The Mailchimp stand-in with a member ``hold.me@example.org``, the Zendesk stand-in, the CRM."""
    from retention_dev.standins.mailchimp import Audience
    from retention_dev.standins.mailchimp_data import generate_columns
    from retention_dev.standins.process import StandIn

    cols = generate_columns(20, seed=3, now=dt.datetime(2026, 11, 20, tzinfo=UTC))
    emails = cols.emails.tolist()
    emails[5] = MEMBER_EMAIL.encode()
    cols.emails = np.array(emails, dtype="S")
    cols.ids[5] = hashlib.md5(MEMBER_EMAIL.encode()).hexdigest().encode()
    Audience(cols, "demo-list").save(tmp_path / "mc.npz")
    mc = StandIn("mailchimp", "--port", "0", "--state-file", str(tmp_path / "mc.npz"), "--api-key", MC_KEY).start()
    zd = StandIn("zendesk", "--port", "0", "--state-file", str(tmp_path / "zd.npz"), "--tickets", "30", "--seed", "7", *LIMITS).start()
    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_MAILCHIMP", json.dumps(
        {"conn_type": "retention_mailchimp", "host": f"{mc.base_url}/3.0", "password": MC_KEY, "extra": {"list_id": "demo-list"}}
    ))
    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_ZENDESK", json.dumps(
        {"conn_type": "retention_zendesk", "host": zd.base_url, "login": "agent@example.org", "password": "token",
         "extra": {"requests_per_minute": 1_000_000, "job_poll_interval": 0.05}}
    ))
    uid = requests.get(f"{zd.base_url}/_standin/stats", timeout=30).json()["edge_cases"]["user_all_due"]
    body = requests.get(f"{zd.base_url}/api/v2/users/{uid}/tickets/requested.json", auth=("agent@example.org/token", "token"), timeout=30).json()
    yield {"user": int(uid), "ticket": int(body["tickets"][0]["id"])}
    mc.stop()
    zd.stop()


def test_hold_add_names_the_record_the_ledger_will_see(tmp_path, systems):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    env = {"RETENTION_LEDGER_URL": url}
    key = os.environ["RETENTION_PSEUDONYM_KEY"]
    member = hashlib.md5(MEMBER_EMAIL.encode()).hexdigest()

    def add(record_type: str, record_id: str, *extra: str) -> subprocess.CompletedProcess:
        return cli("hold", "add", "--record-type", record_type, "--record-id", record_id, "--reason", "dispute", *extra, key=key, env=env)

    cases = [
        # (record type, as typed, the id the system has)
        ("crm_contact", "003", "3"),
        ("crm_contact", " 7 ", "7"),
        ("newsletter_member", "  Hold.Me@Example.ORG ", member),  # an address: its subscriber hash
        ("newsletter_member", member.upper(), member),
        ("support_ticket", f"0{systems['ticket']}", str(systems["ticket"])),
        ("ticket_user", str(systems["user"]), str(systems["user"])),
    ]
    for record_type, typed, record_id in cases:
        out = add(record_type, typed)
        assert out.returncode == 0, (record_type, typed, out.stderr)
        assert out.stdout.startswith(f"hold added: {record_type} {key_of(key, record_type, record_id)}"), (typed, out.stdout)
        assert MEMBER_EMAIL not in out.stdout.lower() + out.stderr.lower(), "the address is never printed"
    held = [(h["record_type"], h["record_key"]) for h in Ledger(url).holds()]
    assert held == [(t, key_of(key, t, i)) for t, _, i in cases]

    refused = [
        (("crm_contact", "42"), "crm_contact 42 does not exist in crm"),
        (("crm_contact", "abc"), "an integer"),
        (("crm_contact", "-3"), "an integer"),
        (("crm_contact", "4.0"), "an integer"),
        (("support_ticket", "999999999"), "does not exist in ticketing"),
        (("support_ticket", "#12"), "an integer"),
        (("ticket_user", "agent@example.org"), "an integer"),
        (("newsletter_member", "nobody@example.org"), "does not exist in newsletter"),
        (("newsletter_member", member[:31]), "32 hexadecimal"),
        (("newsletter_member", member[:31] + "g"), "32 hexadecimal"),
        (("newsletter_member", "not an address"), "32 hexadecimal"),
        (("crm_contact", "3", "--expires", "2020-01-01"), "in the past"),
        (("crm_contact", "3", "--expires", "31/12/2030"), "not a date"),
        (("crm_contact", "3", "--expires", (dt.date.today() - dt.timedelta(days=1)).isoformat()), "in the past"),
        (("no_such_type", "3"), "unknown record type"),
    ]
    for args, message in refused:
        text = one_line(add(*args), message)
        assert "nobody@example.org" not in text
    for reason in ("", "   ", "\t"):
        one_line(cli("hold", "add", "--record-type", "crm_contact", "--record-id", "3", "--reason", reason, key=key, env=env), "reason")
    one_line(cli("hold", "add", "--record-type", "crm_contact", "--record-id", "3", "--reason", "x" * 201, key=key, env=env), "200")
    assert [(h["record_type"], h["record_key"]) for h in Ledger(url).holds()] == held, "a refused hold was stored"

    # A record that is gone now but may come back (a restore from backup): on purpose only.
    allowed = add("crm_contact", "0042", "--allow-missing")
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout.startswith(f"hold added: crm_contact {key_of(key, 'crm_contact', '42')}")
    assert "does not exist" in allowed.stderr or "not found" in allowed.stderr.lower()
    later = add("crm_contact", "5", "--expires", (dt.date.today() + dt.timedelta(days=30)).isoformat())
    assert later.returncode == 0, later.stderr
    assert len(Ledger(url).holds()) == len(cases) + 2
