"""Erasure on request: real Airflow runs of ``erasure_request`` (dag.test) against the Mailchimp
and Zendesk stand-ins over real HTTP and a SQLite CRM, plus the Zendesk look-ups it needs.

One person is seeded into all three systems under one address: the Zendesk stand-in derives its
users' addresses from their ids (``user{id}@example.org``), so the person is a Zendesk user with
only solved/closed tickets, and that address is given to a Mailchimp member (written into the
stand-in's state file before it starts) and to a CRM contact.
"""

from __future__ import annotations

import ast
import datetime as dt
import hashlib
import json
import uuid
from datetime import UTC, datetime

import numpy as np
import pytest
import requests
import sqlalchemy as sa

from airflow_run import run_dag, task_states, xcom_values
from retention.domain.pseudonyms import Pseudonymizer
from retention.runs.request import EMAIL_PATTERN, InvalidRequest, normalise_email
from retention.store.ledger import Ledger
from retention.systems.crm import schema
from retention.systems.ticketing.client import ZendeskClient
from retention_dev.standins.mailchimp import Audience
from retention_dev.standins.mailchimp_data import STATUS_CODE, generate_columns, member_dict
from retention_dev.standins.process import StandIn

DAG_ID = "erasure_request"
MC_KEY = "standin-key-us0"
ZD_AUTH = ("agent@example.org/token", "token")
NOW = datetime(2026, 11, 20, 12, tzinfo=UTC)
LIMITS = (
    "--requests-per-minute", "1000000", "--incremental-per-minute", "100000", "--deleted-list-per-minute", "100000",
    "--user-deletes-per-10min", "1000000", "--job-seconds", "0.05",
)
CLIENT_LIMITS = {
    "requests_per_minute": 1_000_000, "incremental_per_minute": 100_000, "deleted_list_per_minute": 100_000,
    "user_deletes_per_10min": 1_000_000, "job_poll_interval": 0.05,
}
PERSON_NAME = ("Greta", "Raderingsson")
OTHER_NAME = ("Olle", "Kvarstad")
B_NAME = ("Berit", "Spärrsson")


def pseudo() -> Pseudonymizer:
    import os

    return Pseudonymizer(os.environ["RETENTION_PSEUDONYM_KEY"].encode())


# --- the three systems --------------------------------------------------------------------------


class Systems:
    def __init__(self, tmp_path, monkeypatch):
        self.zd = StandIn(
            "zendesk", "--port", "0", "--state-file", str(tmp_path / "zd.npz"), "--tickets", "60", "--seed", "7", *LIMITS
        ).start()
        edge = self.zd_stats()["edge_cases"]
        self.a_uid, self.b_uid = edge["user_all_due"], edge["user_due_and_open"]
        self.a_email, self.b_email = f"user{self.a_uid}@example.org", f"user{self.b_uid}@example.org"
        self.a_tickets = self.requested(self.a_uid)
        self.b_tickets = self.requested(self.b_uid)

        cols = generate_columns(300, seed=3, now=NOW)
        subscribed = [i for i in range(10, 300) if cols.status[i] == STATUS_CODE["subscribed"]]
        self.mc_rows = {"a": subscribed[0], "b": subscribed[1]}
        emails = cols.emails.tolist()
        for who, email in (("a", self.a_email), ("b", self.b_email)):
            row = self.mc_rows[who]
            emails[row] = email.encode()
            cols.ids[row] = hashlib.md5(email.encode()).hexdigest().encode()
        cols.emails = np.array(emails, dtype="S")
        self.mc_names = {who: member_dict(cols, row, "demo-list")["full_name"] for who, row in self.mc_rows.items()}
        self.mc_hash = {"a": hashlib.md5(self.a_email.encode()).hexdigest(), "b": hashlib.md5(self.b_email.encode()).hexdigest()}
        Audience(cols, "demo-list").save(tmp_path / "mc.npz")
        self.mc = StandIn("mailchimp", "--port", "0", "--state-file", str(tmp_path / "mc.npz"), "--api-key", MC_KEY).start()

        self.crm = sa.create_engine(f"sqlite:///{tmp_path / 'crm.db'}")
        seed_crm(self.crm, self.a_email.upper(), self.b_email)

        monkeypatch.setenv(
            "AIRFLOW_CONN_RETENTION_MAILCHIMP",
            json.dumps({"conn_type": "retention_mailchimp", "host": f"{self.mc.base_url}/3.0", "password": MC_KEY,
                        "extra": {"list_id": "demo-list"}}),
        )
        monkeypatch.setenv(
            "AIRFLOW_CONN_RETENTION_ZENDESK",
            json.dumps({"conn_type": "retention_zendesk", "host": self.zd.base_url, "login": "agent@example.org",
                        "password": "token", "extra": CLIENT_LIMITS}),
        )
        monkeypatch.setenv("AIRFLOW_CONN_RETENTION_CRM", json.dumps({"conn_type": "retention_crm", "extra": {"sqlalchemy_url": str(self.crm.url)}}))

    def stop(self) -> None:
        self.mc.stop()
        self.zd.stop()
        self.crm.dispose()

    # Zendesk, read through its own API
    def zd_get(self, path: str, **params) -> requests.Response:
        return requests.get(f"{self.zd.base_url}{path}", params=params, auth=ZD_AUTH, timeout=30)

    def zd_stats(self) -> dict:
        return requests.get(f"{self.zd.base_url}/_standin/stats", timeout=30).json()

    def requested(self, uid: int) -> dict[int, str]:
        body = self.zd_get(f"/api/v2/users/{uid}/tickets/requested.json").json()
        return {t["id"]: t["status"] for t in body["tickets"]}

    def ticket_state(self, tid: int) -> str:
        if self.zd_get(f"/api/v2/tickets/{tid}.json").status_code == 200:
            return "live"
        deleted = self.zd_get("/api/v2/deleted_tickets.json", per_page=100).json()["deleted_tickets"]
        return "soft_deleted" if tid in {t["id"] for t in deleted} else "gone"

    def user_state(self, uid: int) -> str:
        if self.zd_get(f"/api/v2/users/{uid}.json").status_code == 200:
            return "live"
        return "soft_deleted" if self.zd_get(f"/api/v2/deleted_users/{uid}.json").status_code == 200 else "gone"

    # Mailchimp
    def member(self, who: str) -> requests.Response:
        return requests.get(f"{self.mc.base_url}/3.0/lists/demo-list/members/{self.mc_hash[who]}", auth=("x", MC_KEY), timeout=30)

    def mc_stats(self) -> dict:
        return requests.get(f"{self.mc.base_url}/_standin/stats", timeout=30).json()

    # CRM
    def rows(self, table: str) -> list[dict]:
        with self.crm.connect() as c:
            return [dict(r) for r in c.execute(sa.select(schema.TABLES[table]).order_by(schema.TABLES[table].c.id)).mappings()]

    def ids(self, table: str) -> set[int]:
        return {r["id"] for r in self.rows(table)}


def seed_crm(engine: sa.Engine, a_email: str, b_email: str) -> None:
    """Person A (contact 10, at an active member organisation: the request still erases),
    another person (contact 20, untouched) and person B (contact 30, a survey response on hold)."""
    schema.create_schema(engine)
    ts = dt.datetime(2025, 3, 1, tzinfo=dt.UTC)
    with engine.begin() as c:
        c.execute(schema.organisation.insert(), [{"id": 1, "name": "Medlem AB"}])
        c.execute(schema.membership.insert(), [{"id": 1, "organisation_id": 1, "starts_on": dt.date(2019, 1, 1), "ends_on": None}])
        person = {"kind": "member", "organisation_id": 1, "phone": "+46 8 000 00 00", "address": "Exempelgatan 1",
                  "created_at": ts, "last_interaction_at": ts, "opted_out": False}
        c.execute(schema.contact.insert(), [
            {**person, "id": 10, "first_name": PERSON_NAME[0], "last_name": PERSON_NAME[1], "email": f" {a_email} "},
            {**person, "id": 20, "first_name": OTHER_NAME[0], "last_name": OTHER_NAME[1], "email": "olle.kvarstad@example.com"},
            {**person, "id": 30, "first_name": B_NAME[0], "last_name": B_NAME[1], "email": b_email},
        ])
        c.execute(schema.communication_note.insert(), [
            {"id": 1, "contact_id": 10, "noted_at": ts, "body": "called about the course"},
            {"id": 2, "contact_id": 10, "noted_at": ts, "body": "sent the invoice"},
            {"id": 3, "contact_id": 20, "noted_at": ts, "body": "renewal"},
            {"id": 4, "contact_id": 30, "noted_at": ts, "body": "complaint"},
        ])
        c.execute(schema.event_participation.insert(), [
            {"id": 11, "contact_id": 10, "event_name": "Sambi-dagen", "event_date": dt.date(2025, 5, 1), "kind": "event"},
            {"id": 21, "contact_id": 20, "event_name": "Sambi-dagen", "event_date": dt.date(2025, 5, 1), "kind": "event"},
        ])
        c.execute(schema.course_registration.insert(), [
            {"id": 12, "contact_id": 10, "course_name": "Federation 101", "course_end": dt.date(2025, 4, 1)},
            {"id": 32, "contact_id": 30, "course_name": "Federation 101", "course_end": dt.date(2025, 4, 1)},
        ])
        c.execute(schema.survey_response.insert(), [
            {"id": 13, "contact_id": 10, "survey_name": "Course evaluation", "survey_closed_at": ts, "answers": "5/5"},
            {"id": 33, "contact_id": 30, "survey_name": "Course evaluation", "survey_closed_at": ts, "answers": "1/5"},
        ])
        invoice = {"issued_on": dt.date(2025, 4, 2), "amount": 4500}
        c.execute(schema.invoice.insert(), [
            # Under the bookkeeping period (FY 2025: kept until 31 Dec 2032): stays, detached.
            {**invoice, "id": 100, "contact_id": 10, "invoice_number": "F-2025-100", "financial_year_end": dt.date(2025, 12, 31),
             "billing_name": " ".join(PERSON_NAME), "billing_address": "Exempelgatan 1"},
            # FY 2015: erasable since 1 Jan 2024, so the request erases it.
            {**invoice, "id": 101, "contact_id": 10, "invoice_number": "F-2015-101", "issued_on": dt.date(2015, 4, 2),
             "financial_year_end": dt.date(2015, 12, 31), "billing_name": " ".join(PERSON_NAME), "billing_address": "Exempelgatan 1"},
            {**invoice, "id": 200, "contact_id": 20, "invoice_number": "F-2025-200", "financial_year_end": dt.date(2025, 12, 31),
             "billing_name": " ".join(OTHER_NAME), "billing_address": "Annan väg 2"},
        ])
        c.execute(schema.legal_hold.insert(), [
            {"id": 1, "record_type": "crm_survey_response", "record_id": 33, "reason": "complaint 2026-4", "expires_at": None},
        ])


@pytest.fixture
def systems(tmp_path, monkeypatch, retention_home):
    s = Systems(tmp_path, monkeypatch)
    yield s
    s.stop()


def ledger_rows(home, run_id: str | None = None) -> list[dict]:
    """The entries as the ledger reads them (a batch handed over without its outcomes booked: ``submitted``)."""
    ledger = Ledger(f"sqlite:///{home / 'ledger.db'}")
    try:
        return ledger.entries(run_id)
    finally:
        ledger.engine.dispose()


def by_type(rows: list[dict]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        out.setdefault(r["record_type"], {}).setdefault(r["status"], 0)
        out[r["record_type"]][r["status"]] += 1
    return out


def report_of(home, dr) -> dict:
    stem = f"{DAG_ID}__{dr.run_id}".replace(":", "_").replace("+", "_")
    return json.loads((home / "reports" / f"{stem}.json").read_text())


def assert_nothing_personal(texts: dict[str, str], secrets: list[str]) -> None:
    for where, text in texts.items():
        low = text.lower()
        for secret in secrets:
            assert secret.lower() not in low, f"{secret!r} leaked into the {where}"


# --- done-when: a person in all three systems, erased once, then again ---------------------------


@pytest.mark.airflow
def test_request_leaves_only_the_held_invoice_and_again_erases_nothing(systems, retention_home, capfd):
    s = systems
    assert set(s.a_tickets.values()) <= {"solved", "closed"} and len(s.a_tickets) == 2
    other_member_count = s.mc_stats()["total"] - 1
    live_before = s.zd_stats()["tickets_live"]

    dr = run_dag({"email": s.a_email}, dag_id=DAG_ID)
    assert dr.state == "success", task_states(dr)
    assert set(task_states(dr).values()) == {"success"}

    # CRM: only the invoice under the bookkeeping period is left of the person, detached.
    assert s.ids("contact") == {20, 30}
    assert {r["contact_id"] for r in s.rows("communication_note")} == {20, 30}
    assert s.ids("event_participation") == {21} and s.ids("course_registration") == {32} and s.ids("survey_response") == {33}
    invoices = {r["id"]: r for r in s.rows("invoice")}
    assert set(invoices) == {100, 200}, "the invoice past its bookkeeping period goes, the one under it stays"
    kept = invoices[100]
    assert kept["contact_id"] is None
    assert (kept["invoice_number"], kept["issued_on"], kept["financial_year_end"], float(kept["amount"])) == (
        "F-2025-100", dt.date(2025, 4, 2), dt.date(2025, 12, 31), 4500.0)
    assert kept["billing_name"] and kept["billing_address"], "the invoice keeps the fields bookkeeping law needs"
    assert invoices[200]["contact_id"] == 20

    # Newsletter: permanently deleted (never archived), nobody else touched.
    assert s.member("a").status_code == 404 and s.member("b").status_code == 200
    mc = s.mc_stats()
    assert mc["permanent_deletes"] == 1 and mc["archives"] == 0 and mc["total"] == other_member_count

    # Ticketing: the person's tickets and the user permanently deleted; nothing else.
    assert {tid: s.ticket_state(tid) for tid in s.a_tickets} == dict.fromkeys(s.a_tickets, "gone")
    assert s.user_state(s.a_uid) == "gone"
    zd = s.zd_stats()
    assert zd["tickets_live"] == live_before - 2 and zd["tickets_permanently_deleted"] == 2
    assert zd["users_permanently_deleted"] == 1
    assert s.user_state(s.b_uid) == "live"

    # Ledger: write-ahead entries under the run, all completed, named by pseudonyms.
    rows = ledger_rows(retention_home, dr.run_id)
    assert {r["rule_id"] for r in rows} == {"erasure-request"}
    assert all(r["completed_at"] and len(r["record_key"]) == 32 for r in rows)
    assert by_type(rows) == {
        "crm_contact": {"erased": 1}, "crm_event_participation": {"erased": 1}, "crm_course_registration": {"erased": 1},
        "crm_survey_response": {"erased": 1}, "crm_invoice": {"erased": 1, "held": 1},
        "newsletter_member": {"erased": 1}, "support_ticket": {"erased": 2}, "ticket_user": {"erased": 1},
    }
    contact = next(r for r in rows if r["record_type"] == "crm_contact")
    assert (contact["action"], contact["hold"]) == ("minimise", "bookkeeping")
    held = next(r for r in rows if r["status"] == "held")
    assert held["record_key"] == pseudo().key_for("crm_invoice", "100") and held["hold"] == "bookkeeping"

    rep = report_of(retention_home, dr)
    assert rep["state"] == "success" and rep["outstanding"] == 0
    assert rep["request_key"] == pseudo().key_for("erasure_request", s.a_email)
    assert rep["systems"]["crm"]["records"]["communication_note"] == {"erased": 2}
    assert rep["totals"] == {"erased": 11, "held": 1}  # 9 ledger entries erased + 2 notes; the invoice held
    assert "metadata database" in rep["note"]

    # The same request again: finds nothing, erases nothing, succeeds.
    dr2 = run_dag({"email": s.a_email}, dag_id=DAG_ID)
    assert dr2.state == "success", task_states(dr2)
    assert ledger_rows(retention_home, dr2.run_id) == []
    rep2 = report_of(retention_home, dr2)
    assert rep2["state"] == "success" and rep2["totals"] == {}
    assert all(not sys_["records"] for sys_ in rep2["systems"].values())
    assert s.mc_stats()["permanent_deletes"] == 1 and s.zd_stats()["tickets_permanently_deleted"] == 2
    assert s.ids("invoice") == {100, 200}

    # No address, no name anywhere we leave text behind.
    out, err = capfd.readouterr()
    texts = {
        "task output": out + err,
        "xcom": " ".join(xcom_values(dr) + xcom_values(dr2)),
        "ledger": json.dumps(ledger_rows(retention_home), default=str),
        "report": "\n".join(p.read_text() for p in (retention_home / "reports").iterdir()),
    }
    secrets = [s.a_email, s.a_email.replace("@", "%40"), s.mc_hash["a"], s.mc_names["a"], *PERSON_NAME, f"Example User {s.a_uid}"]
    assert_nothing_personal(texts, secrets)
    for value in xcom_values(dr) + xcom_values(dr2):  # counts only (a dict, and each key on its own)
        parsed = ast.literal_eval(value) if value not in ("None", "success") else None
        if isinstance(parsed, dict):
            assert all(isinstance(v, int) or (k, v) == ("state", "success") for k, v in parsed.items()), value
        else:
            assert parsed is None or isinstance(parsed, int), value


# --- a malformed address: rejected before anything runs --------------------------------------------


def test_address_check():
    assert normalise_email("Greta.R+news@Example.ORG") == "greta.r+news@example.org"
    for bad in ("", "greta", "greta@", "@example.org", "greta@example", "a b@example.org", "a@b@example.org",
                "greta@example..org", "greta@example.org\n", " greta@example.org", "x" * 250 + "@example.org", None, 42):
        with pytest.raises(InvalidRequest) as info:
            normalise_email(bad)
        assert str(bad) not in str(info.value) or bad in ("", None), "the message must not repeat the value"
    # The DAG param uses the same pattern under JSON-schema rules (re.search).
    import jsonschema

    jsonschema.validate("greta@example.org", {"type": "string", "pattern": EMAIL_PATTERN})
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate("greta", {"type": "string", "pattern": EMAIL_PATTERN})


@pytest.mark.airflow
def test_malformed_address_is_rejected_before_anything_runs(systems, retention_home, capfd):
    s = systems
    # Airflow validates the params before it creates the run.
    with pytest.raises(Exception) as info:
        run_dag({"email": "not an address"}, dag_id=DAG_ID)
    assert type(info.value).__name__ == "ParamValidationError" and "param email" in str(info.value)

    # What the param pattern lets through (a trailing newline) the first task refuses, clearly.
    dr = run_dag({"email": s.a_email + "\n"}, dag_id=DAG_ID)
    assert dr.state == "failed"
    states = task_states(dr)
    assert states["check_request"] == "failed"
    assert {states[t] for t in ("crm", "newsletter", "ticketing")} == {"upstream_failed"}
    assert states["report"] == "failed"
    out, err = capfd.readouterr()
    assert "not an e-mail address" in out + err
    assert s.a_email not in (out + err).lower()

    assert s.member("a").status_code == 200 and s.mc_stats()["permanent_deletes"] == 0
    assert s.zd_stats()["tickets_soft_deleted"] == 0 and s.user_state(s.a_uid) == "live"
    assert 10 in s.ids("contact")
    assert ledger_rows(retention_home) == []
    assert not (retention_home / "reports").exists() or not list((retention_home / "reports").iterdir())


# --- an unsolved ticket and legal holds: deferred and held, the rest erased ---------------------------


@pytest.mark.airflow
def test_unsolved_ticket_is_deferred_and_holds_are_kept(systems, retention_home, capfd):
    s = systems
    closed = [t for t, st in s.b_tickets.items() if st == "closed"]
    unsolved = [t for t, st in s.b_tickets.items() if st in ("new", "open", "pending", "hold")]
    assert len(closed) == 1 and len(unsolved) == 1
    retention_home.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(f"sqlite:///{retention_home / 'ledger.db'}")
    ledger.add_hold("newsletter_member", pseudo().key_for("newsletter_member", s.mc_hash["b"]), "complaint 2026-4", None)
    ledger.engine.dispose()

    dr = run_dag({"email": s.b_email}, dag_id=DAG_ID)
    assert dr.state == "success", task_states(dr)

    # Ticketing: the closed ticket erased, the open one and its requester untouched (deferred).
    assert s.ticket_state(closed[0]) == "gone" and s.ticket_state(unsolved[0]) == "live"
    assert s.user_state(s.b_uid) == "live"
    # Newsletter: a manual hold in the ledger (by pseudonym) keeps the member.
    assert s.member("b").status_code == 200
    # CRM: the held survey response keeps its contact (and the contact's note); the rest goes.
    assert 30 in s.ids("contact") and 33 in s.ids("survey_response") and 32 not in s.ids("course_registration")
    assert s.ids("contact") == {10, 20, 30} and s.ids("course_registration") == {12}

    rows = ledger_rows(retention_home, dr.run_id)
    assert by_type(rows) == {
        "support_ticket": {"erased": 1, "deferred": 1}, "ticket_user": {"deferred": 1},
        "newsletter_member": {"held": 1},
        "crm_contact": {"held": 1}, "crm_survey_response": {"held": 1}, "crm_course_registration": {"erased": 1},
    }
    deferred = {r["record_type"]: r["detail"] for r in rows if r["status"] == "deferred"}
    assert "unsolved" in deferred["support_ticket"] and "unsolved" in deferred["ticket_user"]
    rep = report_of(retention_home, dr)
    assert rep["state"] == "success" and rep["outstanding"] == 2
    out, err = capfd.readouterr()
    assert "deferred" in out + err
    assert_nothing_personal({"task output": out + err, "report": json.dumps(rep)}, [s.b_email, *B_NAME, s.mc_hash["b"]])


# --- the Zendesk look-ups an erasure request needs (client and stand-in) -----------------------------


def test_zendesk_find_user_by_email_and_requested_tickets(tmp_path):
    zd = StandIn("zendesk", "--port", "0", "--state-file", str(tmp_path / "zd.npz"), "--tickets", "60", "--seed", "7", *LIMITS).start()
    try:
        edge = requests.get(f"{zd.base_url}/_standin/stats", timeout=30).json()["edge_cases"]
        uid = edge["user_due_and_open"]
        with ZendeskClient(base_url=zd.base_url, email="agent@example.org", api_token="token", **CLIENT_LIMITS) as client:
            assert client.find_user_ids_by_email(f"  USER{uid}@Example.org ") == [uid]
            assert client.find_user_ids_by_email("nobody@example.org") == []
            assert client.find_user_ids_by_email("") == []
            agent = requests.get(f"{zd.base_url}/api/v2/users/me.json", auth=ZD_AUTH, timeout=30).json()["user"]
            assert client.find_user_ids_by_email(agent["email"]) == [], "staff are never found by default"
            assert client.find_user_ids_by_email(agent["email"], roles=None) == [agent["id"]]

            tickets = list(client.iter_requested_tickets(uid))
            assert [t["id"] for t in tickets] == [3, 4] and {t["status"] for t in tickets} == {"closed", "open"}
            assert all(t["requester_id"] == uid for t in tickets)
            assert client.requested_ticket_ids(edge["users_without_tickets"][0]) == []

            # Cursor paging in the stand-in, one ticket a page.
            page1 = requests.get(f"{zd.base_url}/api/v2/users/{uid}/tickets/requested.json", params={"page[size]": 1},
                                 auth=ZD_AUTH, timeout=30).json()
            assert [t["id"] for t in page1["tickets"]] == [3] and page1["meta"]["has_more"]
            page2 = requests.get(f"{zd.base_url}/api/v2/users/{uid}/tickets/requested.json",
                                 params={"page[size]": 1, "page[after]": page1["meta"]["after_cursor"]}, auth=ZD_AUTH, timeout=30).json()
            assert [t["id"] for t in page2["tickets"]] == [4] and not page2["meta"]["has_more"]
            assert "/users/" in page1["links"]["next"]
            bad = requests.get(f"{zd.base_url}/api/v2/users/search.json", params={"query": "role:agent"}, auth=ZD_AUTH, timeout=30)
            assert bad.status_code == 400

            # A soft-deleted ticket is no longer listed; a deleted user has no list (404 -> nothing).
            assert client.erase_tickets([3]) == {3: "erased"}
            assert client.requested_ticket_ids(uid) == [4]
            due_user = edge["user_all_due"]
            client.erase_tickets(client.requested_ticket_ids(due_user))
            assert client.erase_user(due_user) == "erased"
            assert client.requested_ticket_ids(due_user) == []
            assert client.find_user_ids_by_email(f"user{due_user}@example.org") == []
            families = requests.get(f"{zd.base_url}/_standin/stats", timeout=30).json()["requests_by_endpoint"]
            assert families.get("users.search") and families.get("users.tickets_requested")
    finally:
        zd.stop()


# --- the CRM part on its own: resume after an interrupted attempt, on SQLite and PostgreSQL --------


@pytest.fixture(params=["sqlite", "postgresql"])
def crm_engine(request, tmp_path):
    if request.param == "sqlite":
        eng = sa.create_engine(f"sqlite:///{tmp_path / 'crm.db'}")
        yield eng
        eng.dispose()
        return
    url = request.getfixturevalue("postgres_url")
    namespace = f"erasure_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(url)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{namespace}"')
    eng = sa.create_engine(url, connect_args={"options": f"-c search_path={namespace}"})
    yield eng
    eng.dispose()
    with admin.begin() as conn:
        conn.exec_driver_sql(f'DROP SCHEMA "{namespace}" CASCADE')
    admin.dispose()


def test_crm_part_resumes_after_an_interrupted_attempt(crm_engine, retention_home, monkeypatch):
    """Killed after the CRM minimised the contact but before the ledger heard of it: the retry
    can no longer find the contact by address, takes its id from staging, and books the entry
    to this run (erased by its killed attempt), not as already gone."""
    from retention.runs.request import erase_person, load_run, open_request
    from retention.systems.crm.adapter import CrmAdapter
    from retention.systems.crm.client import CrmConnector

    seed_crm(crm_engine, "Person.A@Example.org", "person.b@example.org")
    email = "person.a@example.org"
    open_request(DAG_ID, "manual__resume", email)
    run = load_run(DAG_ID, "manual__resume")
    connector = CrmConnector(crm_engine)
    real = connector.minimise_contacts

    def killed(ids):
        real(ids)
        raise RuntimeError("worker killed")

    monkeypatch.setattr(connector, "minimise_contacts", killed)
    with pytest.raises(RuntimeError, match="worker killed"):
        erase_person(run, "crm", email, CrmAdapter(connector))
    first = by_type(ledger_rows(retention_home, run.run_id))
    assert first["crm_contact"] == {"submitted": 1} and first["crm_invoice"] == {"erased": 1, "held": 1}

    counts = erase_person(run, "crm", email, CrmAdapter(CrmConnector(crm_engine)))
    rows = ledger_rows(retention_home, run.run_id)
    assert by_type(rows) == {
        "crm_contact": {"erased": 1}, "crm_event_participation": {"erased": 1}, "crm_course_registration": {"erased": 1},
        "crm_survey_response": {"erased": 1}, "crm_invoice": {"erased": 1, "held": 1},
    }
    assert len(rows) == 6, "the retry writes no second entry for anything"
    assert counts == {"erased": 5, "held": 1, "found": 6}
    with crm_engine.connect() as c:
        assert set(c.execute(sa.select(schema.contact.c.id)).scalars()) == {20, 30}
        assert dict(c.execute(sa.select(schema.invoice.c.id, schema.invoice.c.contact_id)).all()) == {100: None, 200: 20}


def test_errors_naming_the_address_are_withheld(tmp_path, retention_home, monkeypatch):
    from retention.runs.request import erase_person, load_run, open_request
    from retention.systems.crm.adapter import CrmAdapter
    from retention.systems.crm.client import CrmConnector

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'crm.db'}")
    seed_crm(engine, "person.a@example.org", "person.b@example.org")
    open_request(DAG_ID, "manual__errors", "person.a@example.org")
    run = load_run(DAG_ID, "manual__errors")
    connector = CrmConnector(engine)

    def leaky(email):
        raise ValueError(f"lookup of {email.replace('@', '%40')} failed")

    monkeypatch.setattr(connector, "find_contact_ids_by_email", leaky)
    with pytest.raises(RuntimeError) as info:
        erase_person(run, "crm", "Person.A@example.org", CrmAdapter(connector))
    assert "person.a" not in str(info.value).lower() and "withheld" in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert engine.hide_parameters, "SQL errors must not print the bound address"
    engine.dispose()


def test_dry_run_counts_and_changes_nothing(tmp_path, retention_home):
    from retention.runs.request import erase_person, open_request, report
    from retention.runs.request import load_run as load
    from retention.systems.crm.adapter import CrmAdapter
    from retention.systems.crm.client import CrmConnector

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'crm.db'}")
    seed_crm(engine, "person.a@example.org", "person.b@example.org")
    open_request(DAG_ID, "manual__dry", "person.a@example.org", dry_run=True)
    run = load(DAG_ID, "manual__dry")
    assert run.dry_run
    counts = erase_person(run, "crm", "person.a@example.org", CrmAdapter(CrmConnector(engine)))
    assert counts == {"would_erase": 5, "would_keep": 1, "found": 6}  # contact, 3 children, the old invoice; the new kept
    with engine.connect() as c:
        assert c.execute(sa.select(sa.func.count()).select_from(schema.contact)).scalar() == 3
    assert ledger_rows(retention_home, "manual__dry") == []
    rep = report(DAG_ID, "manual__dry", "person.a@example.org")
    assert rep["state"] == "failed", "two systems did not run in this test"
    saved = json.loads((retention_home / "reports" / "erasure_request__manual__dry.json").read_text())
    assert saved["dry_run"] and saved["systems"]["crm"]["records"]["crm_invoice"] == {"would_erase": 1, "would_keep": 1}
    engine.dispose()
