"""Replay after a restore: the demo-like CRM (SQLite) and the Mailchimp stand-in are backed up,
cleaned by retention_nightly, restored from the backups, and cleaned again by replay_erasures
(real Airflow runs, real HTTP), leaving alone a person who subscribed again and records under
a live manual hold; a dry run erases nothing, a replay with nothing restored finds nothing."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest
import requests
import sqlalchemy as sa

from airflow_run import ROOT, run_dag, task_states, xcom_values
from retention.domain.pseudonyms import Pseudonymizer
from retention.store.ledger import Ledger
from retention.systems.crm import schema
from retention_dev.standins.mailchimp import Audience
from retention_dev.standins.mailchimp_data import STATUS_CODE, generate_members
from retention_dev.standins.process import StandIn
from retention_dev.synthetic.crm import generate

SEED = 11
MEMBERS = 1500
CONTACTS = 600
KEY = "standin-key-us0"
LIST = "demo-list"
# The systems' data is a day old: everything in them happened before the nightly run erased it.
NOW = (datetime.now(UTC) - timedelta(days=1)).replace(minute=0, second=0, microsecond=0)
CRM_TABLES = [t.name for t in schema.metadata.sorted_tables]
CHILDREN = ("communication_note", "event_participation", "course_registration", "survey_response", "invoice")


def pseudo() -> Pseudonymizer:
    return Pseudonymizer(os.environ["RETENTION_PSEUDONYM_KEY"].encode())


class Systems:
    """The Mailchimp stand-in and a SQLite CRM, with backup and restore as an operator does them."""

    def __init__(self, tmp_path, monkeypatch):
        self.tmp, self.monkeypatch = tmp_path, monkeypatch
        self.state = tmp_path / "mailchimp.state"
        self.crm_file = tmp_path / "crm.db"
        self.crm = sa.create_engine(f"sqlite:///{self.crm_file}")
        schema.create_schema(self.crm)
        generate(self.crm, contacts=CONTACTS, seed=SEED, now=NOW)
        self.crm.dispose()
        monkeypatch.setenv("AIRFLOW_CONN_RETENTION_CRM", json.dumps({"conn_type": "retention_crm", "extra": {"sqlalchemy_url": f"sqlite:///{self.crm_file}"}}))
        self.mailchimp = None
        self.start()

    def start(self) -> None:
        self.mailchimp = StandIn(
            "mailchimp", "--port", "0", "--state-file", str(self.state), "--members", str(MEMBERS),
            "--seed", str(SEED), "--now", NOW.isoformat(), "--api-key", KEY, "--list-id", LIST,
        ).start()
        self.monkeypatch.setenv(
            "AIRFLOW_CONN_RETENTION_MAILCHIMP",
            json.dumps({"conn_type": "retention_mailchimp", "host": f"{self.mailchimp.base_url}/3.0", "password": KEY, "extra": {"list_id": LIST}}),
        )

    def backup(self) -> None:
        requests.post(f"{self.mailchimp.base_url}/_standin/save", timeout=30).raise_for_status()
        shutil.copyfile(self.state, self.tmp / "mailchimp.backup")
        self.crm.dispose()
        shutil.copyfile(self.crm_file, self.tmp / "crm.backup")

    def restore(self, edit_audience=None) -> None:
        self.mailchimp.stop()
        shutil.copyfile(self.tmp / "mailchimp.backup", self.state)
        if edit_audience:  # what happened in the provider after the restore, while it was down
            audience = Audience.load(self.state, LIST)
            edit_audience(audience)
            audience.save(self.state)
        self.crm.dispose()
        shutil.copyfile(self.tmp / "crm.backup", self.crm_file)
        self.start()

    # -- what the systems hold, read independently of the pipeline ---------------------------
    def members(self) -> dict[str, str]:
        out, offset = {}, 0
        while True:
            page = requests.get(
                f"{self.mailchimp.base_url}/3.0/lists/{LIST}/members",
                params={"count": 1000, "offset": offset, "fields": "members.id,members.status,total_items"},
                auth=("x", KEY), timeout=30,
            ).json()
            out.update({m["id"]: m["status"] for m in page["members"]})
            offset += 1000
            if offset >= page["total_items"]:
                return out

    def permanent_deletes(self) -> int:
        return requests.get(f"{self.mailchimp.base_url}/_standin/stats", timeout=10).json()["permanent_deletes"]

    def crm_rows(self) -> dict[str, set[tuple]]:
        """Per table the ids, and for child tables (id, contact_id): a minimised contact's invoices
        are detached (contact_id NULL), so a replayed minimisation shows there."""
        out = {}
        with self.crm.connect() as c:
            for name in CRM_TABLES:
                t = schema.metadata.tables[name]
                cols = [t.c.id, t.c.contact_id] if name in CHILDREN else [t.c.id]
                out[name] = {tuple(r) for r in c.execute(sa.select(*cols))}
        self.crm.dispose()
        return out

    def stop(self) -> None:
        self.mailchimp.stop()
        self.crm.dispose()


@pytest.fixture
def systems(tmp_path, monkeypatch, retention_home):
    s = Systems(tmp_path, monkeypatch)
    yield s
    s.stop()


def ledger_rows(home) -> list[dict]:
    """The entries as the ledger reads them (a batch handed over without its outcomes booked: ``submitted``)."""
    ledger = Ledger(f"sqlite:///{home / 'ledger.db'}")
    try:
        return ledger.entries()
    finally:
        ledger.engine.dispose()


def erased_in(rows: list[dict], system: str, run_id: str | None = None) -> list[dict]:
    return [r for r in rows if r["system"] == system and r["status"] in ("erased", "already_gone") and (run_id is None or r["run_id"] == run_id)]


def replay_report(result_path: str) -> dict:
    return json.loads(open(result_path).read())


def latest_replay_report(home) -> dict:
    paths = sorted((home / "reports").glob("replay_erasures__*.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(paths[-1].read_text())


def replay_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "retention.cli", "replay", *args], capture_output=True, text=True, timeout=300, cwd=ROOT, env=dict(os.environ)
    )


@pytest.mark.airflow
def test_restored_backup_is_cleaned_again_by_the_replay(systems, retention_home, capfd):
    from retention.runs import replay

    # -- back up both systems, then the nightly run erases what is due ------------------------
    systems.backup()
    members_before, crm_before = systems.members(), systems.crm_rows()
    dr = run_dag({"systems": ["newsletter", "crm"], "max_plan_share": 0.5})
    assert dr.state == "success", task_states(dr)
    members_after, crm_after = systems.members(), systems.crm_rows()
    nightly = ledger_rows(retention_home)
    erased_nl, erased_crm = erased_in(nightly, "newsletter"), erased_in(nightly, "crm")
    gone_members = set(members_before) - set(members_after)
    assert len(erased_nl) == len(gone_members) > 10
    assert len(erased_crm) > 10 and {r["action"] for r in erased_crm} == {"erase", "minimise"}

    # -- a replay with nothing restored finds nothing ------------------------------------------
    idle = replay.run_replay(["newsletter", "crm"])
    assert idle["state"] == "success" and idle["found"] == {"newsletter": 0, "crm": 0}
    assert systems.members() == members_after and systems.crm_rows() == crm_after
    assert len(ledger_rows(retention_home)) == len(nightly)

    # -- restore both backups; one person subscribes again, some records go on hold ----------
    keys = pseudo()
    by_key_nl = {keys.key_for("newsletter_member", h): h for h in gone_members}
    resubscribed, held_member = sorted(by_key_nl[r["record_key"]] for r in erased_nl)[:2]
    resubscribed_at = math.ceil(time.time())  # after the nightly erasure completed

    def subscribe_again(audience: Audience) -> None:
        row = audience.row_of(resubscribed)
        audience.cols.status[row] = STATUS_CODE["subscribed"]
        audience.cols.timestamp_signup[row] = resubscribed_at
        audience.cols.last_changed[row] = resubscribed_at

    systems.restore(edit_audience=subscribe_again)
    assert systems.members().keys() == members_before.keys()
    assert systems.crm_rows() == crm_before
    ledger = Ledger(f"sqlite:///{retention_home / 'ledger.db'}")
    ledger.add_hold("newsletter_member", keys.key_for("newsletter_member", held_member), "Dispute (test)", datetime.now(UTC) + timedelta(days=30))
    # In the CRM: a live hold on one erased contact (in the CRM's own hold table), and one erased
    # contact id reused by a contact created after the erasure (a new record with the same key).
    erased_contacts = sorted(int(cid) for (cid,) in crm_before["contact"] - crm_after["contact"])
    by_key_crm = {keys.key_for("crm_contact", str(c)): c for c in erased_contacts}
    plain = sorted(by_key_crm[r["record_key"]] for r in erased_crm if r["record_type"] == "crm_contact" and r["action"] == "erase")
    held_contact, new_contact = plain[0], plain[1]
    with systems.crm.begin() as c:
        c.execute(schema.legal_hold.insert().values(record_type="crm_contact", record_id=held_contact, reason="Audit (test)", expires_at=NOW + timedelta(days=90)))
        c.execute(schema.contact.update().where(schema.contact.c.id == new_contact).values(created_at=datetime.now(UTC).replace(tzinfo=None)))
    crm_restored = systems.crm_rows()
    systems.crm.dispose()
    members_restored = systems.members()

    # -- dry run (the command): finds everything, erases nothing, writes no ledger entry -------
    deletes = systems.permanent_deletes()
    out = replay_cli("--systems", "newsletter", "crm", "--dry-run")
    assert out.returncode == 0, out.stderr[-3000:]
    dry = replay_report(out.stdout.strip().splitlines()[-1].removeprefix("report: "))
    assert dry["dry_run"] is True and dry["state"] == "success"
    assert dry["systems"]["newsletter"]["totals"]["found"] == len(erased_nl)
    assert dry["systems"]["newsletter"]["totals"]["would_replay"] == len(erased_nl) - 2
    assert dry["systems"]["crm"]["totals"]["found"] == len(erased_crm)
    assert systems.members() == members_restored and systems.crm_rows() == crm_restored
    assert systems.permanent_deletes() == deletes
    assert len(ledger_rows(retention_home)) == len(nightly)

    # -- the replay DAG ------------------------------------------------------------------------
    dr = run_dag({"systems": ["newsletter", "crm"]}, dag_id="replay_erasures")
    assert dr.state == "success", task_states(dr)
    rep = latest_replay_report(retention_home)
    assert rep["state"] == "success" and rep["dry_run"] is False
    nl, crm = rep["systems"]["newsletter"]["totals"], rep["systems"]["crm"]["totals"]
    # It found every record the nightly run had erased, per system ...
    assert nl["found"] == len(erased_nl)
    assert crm["found"] == len(erased_crm)
    per_type = {}
    for r in erased_crm:
        per_type[r["record_type"]] = per_type.get(r["record_type"], 0) + 1
    assert {t: c["found"] for t, c in rep["systems"]["crm"]["record_types"].items() if c["found"]} == per_type
    # ... replayed all but the re-subscribed person and the held records ...
    assert (nl["replayed"], nl["left_alone_new"], nl["held"]) == (len(erased_nl) - 2, 1, 1)
    assert (crm["left_alone_new"], crm["held"], crm["left_alone_undated"]) == (1, 1, 0)
    assert crm["replayed"] == len(erased_crm) - 2
    assert not {"failed", "deferred", "already_gone"} & (set(nl) | set(crm))

    # ... and the systems hold what they held after the nightly run, checked independently.
    expected_members = dict(members_after)
    expected_members[resubscribed] = "subscribed"
    expected_members[held_member] = members_before[held_member]
    assert systems.members() == expected_members
    crm_now = systems.crm_rows()
    kept = {held_contact, new_contact}
    for table in CRM_TABLES:
        extra = crm_now[table] - crm_after[table]
        missing = crm_after[table] - crm_now[table]
        if table == "legal_hold":
            assert len(extra) == 1 and not missing
        elif table == "contact":
            assert extra == {(held_contact,), (new_contact,)} and not missing
        elif table in CHILDREN:
            # Only what belongs to the two contacts left alone (and whose own erasure, if any, is
            # not in the ledger) is back; a minimised contact's invoices are detached again.
            assert {cid for _, cid in extra} <= kept, table
            assert not missing, table
        else:
            assert crm_now[table] == crm_after[table], table

    # The replay's ledger run: write-ahead entries, completed, under replay:<rule>.
    replay_rows = [r for r in ledger_rows(retention_home) if r["run_id"].startswith("replay__")]
    assert {r["run_id"] for r in replay_rows} == {f"replay__{dr.run_id}"}
    assert all(r["rule_id"].startswith("replay:") and r["completed_at"] for r in replay_rows)
    assert {r["status"] for r in replay_rows} == {"erased", "held"}
    minimised = [r for r in replay_rows if r["action"] == "minimise"]
    assert len(minimised) == sum(r["action"] == "minimise" for r in erased_crm) > 0

    # No personal data or record ids in logs, XComs, the ledger or the replay's reports.
    members = generate_members(MEMBERS, seed=SEED, now=NOW)
    emails = {m["email_address"].lower() for m in members}
    text = " ".join(
        [
            *capfd.readouterr(),
            out.stdout,
            out.stderr,
            *xcom_values(dr),
            json.dumps(replay_rows, default=str),
            *(p.read_text() for p in (retention_home / "reports").glob("replay_erasures__*")),
        ]
    ).lower()
    assert not [e for e in emails if e in text], "an e-mail address leaked"
    assert not [h for h in gone_members if h in text], "a subscriber hash leaked"

    # -- replaying again erases nothing more: only the records left alone are found ----------
    again = replay.run_replay(["newsletter", "crm"])
    assert again["found"] == {"newsletter": 2, "crm": 2} and again["replayed"] == {"newsletter": 0, "crm": 0}
    assert systems.members() == expected_members and systems.crm_rows() == crm_now


class KilledAfter:
    """An adapter whose task 'dies' right after its n-th batch reached the provider."""

    def __init__(self, inner, batches: int):
        self.inner, self.left = inner, batches
        self.system, self.record_types, self.erase_batch = inner.system, inner.record_types, 40

    def erase(self, record_type, action, ids, *recheck):
        outcomes = list(self.inner.erase(record_type, action, ids, *recheck))  # the batch reached the provider
        self.left -= 1
        if self.left == 0:
            raise KeyboardInterrupt("task killed")  # before the engine heard of its outcomes
        yield from outcomes

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_killed_replay_resumes_from_the_ledger_and_erases_each_record_once(systems, retention_home):
    """The steps called directly: a replay killed mid-erasure is resumed under the same run id."""
    from retention.runs import nightly as pipeline
    from retention.runs import replay
    from retention.runs.nightly import RunInfo
    from retention.systems import adapter_for

    systems.backup()
    nightly = RunInfo.from_dict(pipeline.open_run("test", "nightly", None, dry_run=False, max_plan_share=0.5))
    adapter = adapter_for("newsletter")
    pipeline.extract(nightly, "newsletter", adapter)
    pipeline.plan(nightly, "newsletter")
    pipeline.validate(nightly, "newsletter")
    pipeline.erase(nightly, "newsletter", adapter)
    pipeline.verify(nightly, "newsletter", adapter)  # releases the system for the replay
    adapter.close()
    after = systems.members()
    erased = len(erased_in(ledger_rows(retention_home), "newsletter"))
    assert erased > 80

    systems.restore()
    run = RunInfo.from_dict(replay.open_run("replay__killed", dry_run=False))
    adapter = adapter_for("newsletter")
    assert replay.find(run, "newsletter", adapter)["found"] == erased
    with pytest.raises(KeyboardInterrupt):
        replay.erase(run, "newsletter", KilledAfter(adapter, batches=2))
    rows = [r for r in ledger_rows(retention_home) if r["run_id"] == "replay__killed"]
    assert len(rows) == erased, "every write-ahead entry is there before the first erasure"
    assert {r["status"] for r in rows} == {"erased", "submitted", "planned"}
    assert systems.permanent_deletes() == 80  # two batches of 40 reached the provider

    resumed = KilledAfter(adapter, batches=-1)  # same batch size, never dies
    replay.erase(run, "newsletter", resumed)
    assert replay.verify(run, "newsletter", adapter)["checked"] == erased
    result = replay.report(run, ("newsletter",))
    adapter.close()
    assert result["state"] == "success" and result["found"] == {"newsletter": erased}
    rows = [r for r in ledger_rows(retention_home) if r["run_id"] == "replay__killed"]
    # The killed batch went through before the kill: booked to this replay as erased.
    assert len(rows) == erased and {r["status"] for r in rows} == {"erased"}
    assert sum(r["detail"] == "erased by an earlier attempt of this run, killed before it heard back" for r in rows) == 40
    assert systems.permanent_deletes() == erased, "a member was erased twice or not at all"
    assert systems.members() == after


ZENDESK_LIMITS = (
    "--requests-per-minute", "1000000", "--incremental-per-minute", "100000",
    "--deleted-list-per-minute", "100000", "--user-deletes-per-10min", "1000000", "--job-seconds", "0.1",
)
ZENDESK_CLIENT = {
    "requests_per_minute": 1_000_000, "incremental_per_minute": 100_000, "deleted_list_per_minute": 100_000,
    "user_deletes_per_10min": 1_000_000, "job_poll_interval": 0.05,
}


def test_restored_ticketing_backup_is_cleaned_again(tmp_path, monkeypatch, retention_home):
    """Ticketing the same way, with the steps called directly: tickets and their requesters."""
    from retention.runs import nightly as pipeline
    from retention.runs import replay
    from retention.runs.nightly import RunInfo
    from retention.systems import adapter_for
    from retention_dev.standins import zendesk as zs

    state, backup = tmp_path / "zendesk.npz", tmp_path / "zendesk.backup"
    zs.State.generate(800, 5, 0.2, NOW, job_seconds=0.1).save(state)
    shutil.copyfile(state, backup)  # the backup, taken before the nightly run

    def start() -> StandIn:
        standin = StandIn("zendesk", "--port", "0", "--state-file", str(state), *ZENDESK_LIMITS).start()
        monkeypatch.setenv("AIRFLOW_CONN_RETENTION_ZENDESK", json.dumps({
            "conn_type": "retention_zendesk", "host": standin.base_url, "login": "agent@example.org", "password": "token",
            "extra": ZENDESK_CLIENT,
        }))
        return standin

    def held(standin) -> dict[str, set[int]]:
        """Ticket and user ids the stand-in still holds, read through its export API."""
        out = {}
        for name in ("tickets", "users"):
            ids, params = set(), {"start_time": 0}
            while True:
                body = requests.get(f"{standin.base_url}/api/v2/incremental/{name}/cursor.json", params=params,
                                    auth=("agent@example.org/token", "token"), timeout=30).json()
                ids |= {x["id"] for x in body[name]}
                if body["end_of_stream"]:
                    break
                params = {"cursor": body["after_cursor"]}
            out[name] = ids
        return out

    standin = start()
    try:
        before = held(standin)
        nightly = RunInfo.from_dict(pipeline.open_run("test", "nightly", None, dry_run=False, max_plan_share=0.5))
        adapter = adapter_for("ticketing")
        pipeline.extract(nightly, "ticketing", adapter)
        pipeline.plan(nightly, "ticketing")
        pipeline.validate(nightly, "ticketing")
        pipeline.erase(nightly, "ticketing", adapter)
        pipeline.verify(nightly, "ticketing", adapter)
        adapter.close()
        after = held(standin)
        erased = erased_in(ledger_rows(retention_home), "ticketing")
        kinds = {t: sum(r["record_type"] == t for r in erased) for t in ("support_ticket", "ticket_user")}
        assert kinds["support_ticket"] > 10 and kinds["ticket_user"] > 0
        assert after != before

        standin.stop()
        shutil.copyfile(backup, state)
        standin = start()
        assert held(standin) == before
        result = replay.run_replay(["ticketing"])
        assert result["state"] == "success"
        rep = replay_report(result["report"])["systems"]["ticketing"]["record_types"]
        assert {t: rep[t]["found"] for t in kinds} == kinds
        assert {t: rep[t]["replayed"] for t in kinds} == kinds
        assert held(standin) == after
    finally:
        standin.stop()
