import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from retention.store.ledger import Ledger, LockTimeout, erasure_ledger
from retention.domain.pseudonyms import Pseudonymizer


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request, tmp_path, postgres_url_for):
    if request.param == "sqlite":
        return Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    url = postgres_url_for("retention_ledger_test")
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        for t in ("erasure_ledger", "erasure_run", "legal_hold", "system_lock"):
            conn.execute(sa.text(f"drop table if exists {t}"))
    return Ledger(engine)


NOW = datetime(2026, 11, 25, tzinfo=UTC)


def test_write_ahead_then_complete(ledger):
    ledger.open_run("r1", "d", NOW, "v1", "label", False)
    rows = [{"record_type": "newsletter_member", "record_key": f"k{i}", "rule_id": "x", "action": "erase", "hold": None} for i in range(3)]
    ledger.write_ahead("r1", "v1", "newsletter", rows)
    assert set(ledger.statuses("r1", "newsletter").values()) == {"planned"}
    ledger.complete("r1", "newsletter", "newsletter_member", {"k0": "erased", "k1": "already_gone", "k2": "failed"})
    assert ledger.statuses("r1", "newsletter") == {
        ("newsletter_member", "k0"): "erased", ("newsletter_member", "k1"): "already_gone", ("newsletter_member", "k2"): "failed",
    }
    assert ledger.erased_keys() == {("newsletter_member", "k0"), ("newsletter_member", "k1")}
    with pytest.raises(ValueError):
        ledger.complete("r1", "newsletter", "newsletter_member", {"k2": "vanished"})
    with pytest.raises(sa.exc.IntegrityError):  # one entry per record and run
        ledger.write_ahead("r1", "v1", "newsletter", rows[:1])


def test_entries_keep_every_value_as_written(ledger):
    # PostgreSQL takes new entries through COPY (CSV): awkward text, NULLs and times survive it.
    ledger.open_run("r1", "d", NOW, "v1", "label", False)
    holds = [None, "", 'complaint, "urgent"', "line one\nline two", "åäö \\N"]
    rows = [
        {"record_type": "crm_contact", "record_key": f"k{i}", "rule_id": "lead", "action": "hold" if h else "erase", "hold": h}
        for i, h in enumerate(holds)
    ]
    before = datetime.now(UTC)
    ledger.write_ahead("r1", "v1", "crm", rows[:2])
    ledger.write_ahead("r1", "v1", "crm", rows[2:], status="held")
    with ledger.engine.connect() as conn:
        got = {r["record_key"]: r for r in conn.execute(sa.select(erasure_ledger)).mappings()}
    assert [got[f"k{i}"]["hold"] for i in range(5)] == [None, None, *holds[2:]]  # "" is no hold
    assert {r["status"] for k, r in got.items() if k in ("k0", "k1")} == {"planned"}
    assert {r["status"] for k, r in got.items() if k not in ("k0", "k1")} == {"held"}
    for r in got.values():
        planned = r["planned_at"] if r["planned_at"].tzinfo else r["planned_at"].replace(tzinfo=UTC)
        assert before - timedelta(seconds=1) <= planned <= datetime.now(UTC)
        assert (r["completed_at"] is None) == (r["status"] == "planned")
        assert (r["run_id"], r["policy_version"], r["system"], r["rule_id"]) == ("r1", "v1", "crm", "lead")
    many = {f"k{i}": "erased" for i in range(2)}
    ledger.complete("r1", "crm", "crm_contact", many)
    assert ledger.statuses("r1", "crm")[("crm_contact", "k0")] == "erased"


def test_one_run_per_system_at_a_time(ledger):
    ledger.open_run("a", "d", NOW, "v", "l", False)
    ledger.open_run("b", "d", NOW, "v", "l", False)
    ledger.acquire_system("crm", "a")
    ledger.acquire_system("crm", "a")  # re-entrant for a retried task
    ledger.acquire_system("newsletter", "b")  # other systems are free
    with pytest.raises(LockTimeout):
        ledger.acquire_system("crm", "b", wait_seconds=0.3, poll_seconds=0.1)
    got = []
    waiter = threading.Thread(target=lambda: (ledger.acquire_system("crm", "b", wait_seconds=10, poll_seconds=0.05), got.append(time.monotonic())))
    waiter.start()
    time.sleep(0.3)
    assert not got, "b must wait while a holds the CRM"
    released = time.monotonic()
    ledger.release_system("crm", "a")
    waiter.join(5)
    assert got and got[0] >= released


def test_lock_of_a_finished_or_stale_run_is_taken_over(ledger):
    ledger.open_run("dead", "d", NOW, "v", "l", False)
    ledger.open_run("next", "d", NOW, "v", "l", False)
    ledger.acquire_system("ticketing", "dead")
    ledger.close_run("dead", "failed", {})  # its report never released the lock
    ledger.acquire_system("ticketing", "next", wait_seconds=1)
    ledger.open_run("third", "d", NOW, "v", "l", False)
    ledger.acquire_system("ticketing", "third", wait_seconds=1, stale_after=timedelta(0))


def test_pseudonyms_are_keyed_and_stable():
    a = Pseudonymizer(b"k" * 32)
    b = Pseudonymizer(b"j" * 32)
    assert a.key_for("crm_contact", 1) == a.key_for("crm_contact", "1")
    assert a.key_for("crm_contact", 1) != a.key_for("crm_invoice", 1)
    assert a.key_for("crm_contact", 1) != b.key_for("crm_contact", 1)
    assert len(a.key_for("x", "y")) == 32
    assert a.keys_for("crm_contact", [1, 2]) == [a.key_for("crm_contact", 1), a.key_for("crm_contact", 2)]
    assert "k" * 32 not in repr(a)
    with pytest.raises(ValueError):
        Pseudonymizer(b"short")
