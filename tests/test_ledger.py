import contextlib
import os
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime, timedelta

import pandas as pd
import pyarrow as pa
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from retention.domain.pseudonyms import Pseudonymizer
from retention.store import migrations
from retention.store.ledger import (
    HoldError,
    KeyChanged,
    Ledger,
    LockTimeout,
    SchemaError,
    erasure_entry,
    erasure_ledger,
    erasure_outcome,
    metadata,
    pseudonym_key,
    read_holds,
    system_lock,
)


def reset_schema(engine: sa.Engine) -> None:
    """An empty public schema: no ledger tables, no version table."""
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP SCHEMA IF EXISTS public CASCADE")
        conn.exec_driver_sql("CREATE SCHEMA public")


@pytest.fixture
def fresh_pg(postgres_url_for):
    """A function giving the URL of a newly created (empty) PostgreSQL database."""
    base = sa.engine.make_url(postgres_url_for("retention_ledger_test"))
    admin = sa.create_engine(base.set(database="postgres"), isolation_level="AUTOCOMMIT")

    made = []

    def make(name: str) -> str:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        made.append(name)
        return base.set(database=name).render_as_string(hide_password=False)

    yield make
    with admin.connect() as conn:
        for name in made:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger(request, tmp_path, postgres_url_for):
    if request.param == "sqlite":
        return Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    url = postgres_url_for("retention_ledger_test")
    engine = sa.create_engine(url)
    reset_schema(engine)
    return Ledger(engine)


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db(request, tmp_path, fresh_pg):
    """URL of an empty database of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    return fresh_pg("retention_ledger_fresh")


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


def test_entries_given_as_frames_are_the_entries_given_as_dicts(ledger):
    """The engine hands the plan's entries over as frames (a slice at a time) or, for the
    destructive rows it writes beside the erasure, as one Arrow table; the ledger writes both as
    it writes dicts, across its chunks."""
    for run in ("r1", "r2", "r3"):
        ledger.open_run(run, "d", NOW, "v1", "label", False)
    holds = [None, "", 'complaint, "urgent"', "line one\nline two", "åäö \\N", float("nan")]
    rows = [
        {"record_type": "crm_contact" if i % 2 else "crm_invoice", "record_key": f"k{i}", "rule_id": "lead",
         "action": "hold" if isinstance(h, str) and h else "erase", "hold": h}
        for i, h in enumerate(holds * 3)
    ]
    ledger.write_ahead("r1", "v1", "crm", [{**r, "hold": None if r["hold"] != r["hold"] else r["hold"]} for r in rows])
    frame = pd.DataFrame(rows)
    ledger.write_ahead("r2", "v1", "crm", (frame.iloc[i : i + 5] for i in range(0, len(frame), 5)))
    ledger.write_ahead("r3", "v1", "crm", pa.Table.from_pandas(frame.iloc[::-1], preserve_index=False))  # out of key order
    columns = ("record_type", "record_key", "rule_id", "action", "hold", "status", "completed_at")
    with ledger.engine.connect() as conn:
        got = {run: sorted(tuple(r[c] for c in columns) for r in conn.execute(sa.select(erasure_ledger).where(erasure_ledger.c.run_id == run)).mappings())
               for run in ("r1", "r2", "r3")}
    assert got["r1"] == got["r2"] == got["r3"] and len(got["r1"]) == len(rows)
    assert sorted({h for *_, h, _, _ in got["r2"]}, key=str) == sorted({None, *holds[2:5]}, key=str)


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


def test_a_lock_is_taken_over_at_once_when_its_run_no_longer_runs(ledger, caplog):
    """``is_running`` is the orchestrator's answer (Airflow's DagRun state): False takes the lock
    over at once and logs it; True waits however old the lock is; None (cannot tell) keeps the
    ledger's own rule, a lock older than ``stale_after``."""
    for run in ("killed", "alive", "unknown", "next"):
        ledger.open_run(run, "retention_nightly", NOW, "v", "l", False)
    asked = []

    def is_running(answers):
        def ask(dag_id, run_id):
            asked.append((dag_id, run_id))
            return answers[run_id]
        return ask

    ledger.acquire_system("crm", "killed")
    with ledger.engine.begin() as conn:  # held for an hour: not stale by the 12-hour rule
        conn.execute(sa.update(system_lock).values(acquired_at=datetime.now(UTC) - timedelta(hours=1)))
    with pytest.raises(LockTimeout):  # without an answer, today's rule: wait
        ledger.acquire_system("crm", "next", wait_seconds=0.2, poll_seconds=0.1)
    caplog.set_level("WARNING", logger="retention")
    ledger.acquire_system("crm", "next", wait_seconds=0, is_running=is_running({"killed": False}))
    assert asked == [("retention_nightly", "killed")]
    assert ledger_lock(ledger, "crm") == "next"
    (line,) = [r.getMessage() for r in caplog.records if "taken over" in r.getMessage()]
    assert line.startswith("crm: lock of run killed (held since ") and "taken over by run next" in line
    assert "no longer running in Airflow" in line
    ledger.release_system("crm", "next")

    ledger.acquire_system("ticketing", "alive")
    with ledger.engine.begin() as conn:  # long past the 12 hours
        conn.execute(sa.update(system_lock).values(acquired_at=datetime.now(UTC) - timedelta(days=3)))
    with pytest.raises(LockTimeout):
        ledger.acquire_system("ticketing", "next", wait_seconds=0.2, poll_seconds=0.1, is_running=is_running({"alive": True}))
    assert ledger_lock(ledger, "ticketing") == "alive", "a lock was taken from a run that still runs"

    ledger.acquire_system("newsletter", "unknown")
    with pytest.raises(LockTimeout):
        ledger.acquire_system("newsletter", "next", wait_seconds=0.2, poll_seconds=0.1, is_running=is_running({"unknown": None}))
    ledger.acquire_system("newsletter", "next", wait_seconds=0, stale_after=timedelta(0), is_running=is_running({"unknown": None}))
    assert ledger_lock(ledger, "newsletter") == "next"

    def broken(dag_id, run_id):
        raise ConnectionError("the API server is away")

    ledger.acquire_system("crm", "alive")
    with pytest.raises(LockTimeout):  # an error asking is "cannot tell": the lock stays
        ledger.acquire_system("crm", "next", wait_seconds=0.2, poll_seconds=0.1, is_running=broken)
    assert ledger_lock(ledger, "crm") == "alive"


def ledger_lock(ledger, system: str) -> str | None:
    with ledger.engine.connect() as conn:
        return conn.execute(sa.select(system_lock.c.run_id).where(system_lock.c.system == system)).scalar()


def test_the_ledger_keeps_the_key_fingerprint_and_refuses_another(ledger):
    from retention import config

    a, b = config.key_fingerprint(b"first-key-" + b"0123456789abcdefghijklmnop"), config.key_fingerprint(b"second-key-0123456789abcdefghijklmnop")
    ledger.check_key(a)  # first use: recorded
    ledger.check_key(a)
    with pytest.raises(KeyChanged, match="pseudonym key has changed") as refused:
        ledger.check_key(b)
    assert isinstance(refused.value, config.ConfigError)
    message = str(refused.value)
    assert "\n" not in message and a in message and b in message and "first-key" not in message
    with ledger.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(pseudonym_key)).scalar() == 1
    ledger.check_key(a)


def test_a_hold_needs_a_reason(ledger):
    for reason, message in (("", "reason is required"), ("  \t", "reason is required"), ("x" * 201, "at most 200")):
        with pytest.raises(HoldError, match=message):
            ledger.add_hold("crm_contact", "k1", reason, None)
    assert ledger.holds() == []
    ledger.add_hold("crm_contact", "k1", "  dispute  ", None)
    assert [h["reason"] for h in ledger.holds()] == ["dispute"]


def test_a_ledger_at_0003_gets_the_key_table_and_keeps_its_rows(empty_db):
    engine = sa.create_engine(empty_db)
    migrations.upgrade(engine, "0003")
    assert "pseudonym_key" not in sa.inspect(engine).get_table_names()
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO legal_hold (record_type, record_key, reason, created_at) VALUES ('crm_contact', 'k7', 'audit', :t)"), {"t": NOW})
    ledger = Ledger(engine)
    assert migrations.stored_versions(engine) == {migrations.head()}
    assert schema_diff(engine) == []
    assert [h["record_key"] for h in ledger.holds()] == ["k7"]
    ledger.check_key("0123456789abcdef")
    with pytest.raises(KeyChanged):
        ledger.check_key("fedcba9876543210")


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


# -- schema migrations ----------------------------------------------------------------------


def old_metadata() -> sa.MetaData:
    """The ledger's tables as Ledger created them (create_all) before b1ae054 and 3cebe6a: an
    index on status, the default fillfactor, no system_lock, no lifts."""
    m = sa.MetaData()
    sa.Table(
        "erasure_run", m,
        sa.Column("run_id", sa.String(250), primary_key=True),
        sa.Column("dag_id", sa.String(250), nullable=False),
        sa.Column("as_of", sa.DateTime(timezone=True), nullable=False),
        sa.Column("policy_version", sa.String(64), nullable=False),
        sa.Column("policy_label", sa.String(100)),
        sa.Column("dry_run", sa.Boolean, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("state", sa.String(20), nullable=False, default="running"),
        sa.Column("report", sa.Text),
    )
    sa.Table(
        "erasure_ledger", m,
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(250), nullable=False),
        sa.Column("policy_version", sa.String(64), nullable=False),
        sa.Column("system", sa.String(20), nullable=False),
        sa.Column("record_type", sa.String(40), nullable=False),
        sa.Column("record_key", sa.String(64), nullable=False),
        sa.Column("rule_id", sa.String(60), nullable=False),
        sa.Column("action", sa.String(20), nullable=False),
        sa.Column("hold", sa.String(200)),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("planned_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("completed_at", sa.DateTime(timezone=True)),
        sa.Column("detail", sa.String(200)),
        sa.UniqueConstraint("run_id", "system", "record_type", "record_key", name="uq_ledger_run_record"),
        sa.Index("ix_ledger_record_key", "record_key"),
        sa.Index("ix_ledger_status", "status"),
    )
    sa.Table(
        "legal_hold", m,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("record_type", sa.String(40), nullable=False),
        sa.Column("record_key", sa.String(64), nullable=False),
        sa.Column("reason", sa.String(200), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True)),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Index("ix_hold_key", "record_type", "record_key"),
    )
    return m


def old_ledger(engine: sa.Engine) -> None:
    """An old ledger with a run, three entries and a hold."""
    m = old_metadata()
    m.create_all(engine)
    t = m.tables
    with engine.begin() as conn:
        conn.execute(t["erasure_run"].insert().values(
            run_id="old", dag_id="d", as_of=NOW, policy_version="v0", dry_run=False, started_at=NOW, state="success",
        ))
        conn.execute(t["erasure_ledger"].insert(), [
            {"run_id": "old", "policy_version": "v0", "system": "crm", "record_type": "crm_contact", "record_key": f"k{i}",
             "rule_id": "lead", "action": "erase", "status": s, "planned_at": NOW, "completed_at": NOW}
            for i, s in enumerate(("erased", "already_gone", "failed"))
        ])
        conn.execute(t["legal_hold"].insert().values(record_type="crm_contact", record_key="k9", reason="dispute", created_at=NOW))


def schema_diff(engine: sa.Engine) -> list:
    """What autogenerate finds between the tables in ledger.py and the database: nothing, when
    the migrations and the model agree."""
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table": migrations.VERSION_TABLE})
        return compare_metadata(ctx, metadata)


def pg_physical(engine: sa.Engine, table: str = "erasure_entry") -> tuple[set[str], list[str] | None]:
    with engine.connect() as conn:
        indexes = set(conn.exec_driver_sql(f"SELECT indexname FROM pg_indexes WHERE tablename = '{table}'").scalars())
        options = conn.exec_driver_sql(f"SELECT reloptions FROM pg_class WHERE oid = '{table}'::regclass").scalar()
    return indexes, options


def submission_keys_storage(engine: sa.Engine) -> str:
    """How PostgreSQL stores a submission's keys: 'x' compressed when large (its default), 'e' not."""
    with engine.connect() as conn:
        return conn.exec_driver_sql(
            "SELECT attstorage FROM pg_attribute WHERE attrelid = 'erasure_submission'::regclass AND attname = 'record_keys'"
        ).scalar()


def count_statements(engine: sa.Engine) -> list[str]:
    statements: list[str] = []
    sa.event.listen(engine, "before_cursor_execute", lambda conn, cursor, sql, *rest: statements.append(sql))
    return statements


def test_a_new_ledger_is_at_head_and_matches_the_model(empty_db):
    engine = sa.create_engine(empty_db)
    ledger = Ledger(engine)
    assert migrations.stored_versions(engine) == {migrations.head()}
    assert schema_diff(engine) == []
    assert set(sa.inspect(engine).get_table_names()) == {*metadata.tables, migrations.VERSION_TABLE}
    if engine.dialect.name == "postgresql":
        # Key first, one small index per run, full pages (revision 0012).
        assert pg_physical(engine) == ({"erasure_entry_pkey", "uq_entry_record", "ix_entry_run"}, None)
        assert pg_physical(engine, "erasure_outcome") == ({"erasure_outcome_pkey", "ix_outcome_run"}, None)
        assert submission_keys_storage(engine) == "e"  # external: uncompressed (revision 0010)
    # Opened again (the next task): one query, the version, and nothing written.
    statements = count_statements(engine)
    Ledger(engine)
    assert statements == [f"SELECT version_num FROM {migrations.VERSION_TABLE}"]
    ledger.open_run("r", "d", NOW, "v", "l", False)
    assert ledger.run("r")["state"] == "running"


def test_an_old_postgres_ledger_is_upgraded_when_opened(fresh_pg):
    engine = sa.create_engine(fresh_pg("retention_ledger_old"))
    old_ledger(engine)
    indexes, options = pg_physical(engine, "erasure_ledger")
    assert "ix_ledger_status" in indexes and options is None  # the old design, default fillfactor
    assert migrations.stored_versions(engine) is None

    ledger = Ledger(engine)
    indexes, options = pg_physical(engine)
    assert "ix_ledger_status" not in indexes and {"uq_entry_record", "ix_entry_run"} <= indexes
    assert "ix_ledger_record_key" not in indexes and "uq_ledger_run_record" not in indexes
    assert options is None  # half full from revision 0002 to 0012
    assert submission_keys_storage(engine) == "e"
    assert migrations.stored_versions(engine) == {migrations.head()}
    assert schema_diff(engine) == []
    # Every row kept, and the ledger works on them.
    assert ledger.run("old")["state"] == "success"
    assert ledger.statuses("old", "crm") == {
        ("crm_contact", "k0"): "erased", ("crm_contact", "k1"): "already_gone", ("crm_contact", "k2"): "failed",
    }
    assert ledger.erased_keys() == {("crm_contact", "k0"), ("crm_contact", "k1")}
    assert [(h["id"], h["record_key"], h["reason"]) for h in ledger.holds()] == [(1, "k9", "dispute")]
    ledger.open_run("new", "d", NOW, "v1", "l", False)
    ledger.acquire_system("crm", "new")  # system_lock, missing in the oldest ledgers, was created
    ledger.write_ahead("new", "v1", "crm", [{"record_type": "crm_contact", "record_key": "k2", "rule_id": "lead", "action": "erase"}])
    ledger.complete("new", "crm", "crm_contact", {"k2": "erased"})
    assert ledger.erased_keys() == {("crm_contact", "k0"), ("crm_contact", "k1"), ("crm_contact", "k2")}

    statements = count_statements(engine)
    Ledger(engine)  # at head: a no-op
    assert len(statements) == 1
    assert pg_physical(engine) == (indexes, options)


def test_an_old_sqlite_ledger_is_adopted_with_its_rows(tmp_path):
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    old_ledger(engine)
    ledger = Ledger(engine)
    assert migrations.stored_versions(engine) == {migrations.head()}
    assert ledger.statuses("old", "crm")[("crm_contact", "k0")] == "erased"
    assert [h["reason"] for h in ledger.holds()] == ["dispute"]
    assert {"system_lock", "legal_hold_lift"} <= set(sa.inspect(engine).get_table_names())
    # SQLite keeps the old status index: revision 0002 changes PostgreSQL only.
    assert "ix_ledger_status" in {i["name"] for i in sa.inspect(engine).get_indexes("erasure_entry")}


def test_a_ledger_from_newer_code_is_refused(tmp_path):
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    Ledger(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE {migrations.VERSION_TABLE} SET version_num = '0999'")
    with pytest.raises(SchemaError, match="0999"):
        Ledger(engine)


_OPEN_AT = """
import sys, time
from retention.store.ledger import Ledger
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
Ledger(sys.argv[1])
"""


def test_tasks_opening_a_new_ledger_at_once_all_succeed(empty_db):
    """Several processes open the same empty ledger at the same moment: one migrates it, the
    others wait for the lock and find it at head."""
    start = time.time() + 4  # after every process has imported the package
    procs = [
        subprocess.Popen([sys.executable, "-c", _OPEN_AT, empty_db, str(start)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    results = [(p.wait(60), p.stderr.read()) for p in procs]
    assert [rc for rc, _ in results] == [0] * 4, [err for _, err in results]
    engine = sa.create_engine(empty_db)
    assert migrations.stored_versions(engine) == {migrations.head()}
    assert schema_diff(engine) == []


def test_a_postgres_migration_waits_for_the_lock(fresh_pg):
    url = fresh_pg("retention_ledger_locked")
    engine = sa.create_engine(url)
    with engine.connect() as holder:
        holder.execute(sa.select(sa.func.pg_advisory_lock(migrations.LOCK_KEY)))
        proc = subprocess.Popen([sys.executable, "-c", _OPEN_AT, url, "0"], stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            waiting = 0
            while not waiting and time.monotonic() < deadline and proc.poll() is None:
                time.sleep(0.1)
                waiting = holder.exec_driver_sql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted").scalar()
            assert waiting == 1, "the migration must wait for the advisory lock"
            assert migrations.stored_versions(engine) is None
        finally:
            holder.execute(sa.select(sa.func.pg_advisory_unlock(migrations.LOCK_KEY)))
            holder.commit()
        assert proc.wait(60) == 0, proc.stderr.read()
    assert migrations.stored_versions(engine) == {migrations.head()}


# -- lifting manual holds ---------------------------------------------------------------------


def test_a_lifted_hold_no_longer_applies_and_keeps_its_record(ledger):
    expires = datetime(2027, 1, 1, tzinfo=UTC)
    ledger.add_hold("crm_contact", "k1", "dispute 2026-4", None)
    ledger.add_hold("support_ticket", "k2", "audit", expires)
    first, second = ledger.holds()
    assert {k: first[k] for k in ("record_type", "record_key", "reason", "expires_at")} == {
        "record_type": "crm_contact", "record_key": "k1", "reason": "dispute 2026-4", "expires_at": None,
    }
    assert set(first) == {"id", "record_type", "record_key", "reason", "expires_at", "created_at"}

    before = datetime.now(UTC)
    lifted = ledger.lift_hold(first["id"], "  dispute settled  ")
    assert lifted["lifted_reason"] == "dispute settled" and lifted["record_key"] == "k1"
    assert [h["id"] for h in ledger.holds()] == [second["id"]]
    every = {h["id"]: h for h in ledger.holds(include_lifted=True)}
    assert set(every) == {first["id"], second["id"]}
    record = every[first["id"]]
    at = record["lifted_at"] if record["lifted_at"].tzinfo else record["lifted_at"].replace(tzinfo=UTC)
    assert before - timedelta(seconds=1) <= at <= datetime.now(UTC)
    assert record["lifted_reason"] == "dispute settled" and record["reason"] == "dispute 2026-4"
    assert every[second["id"]]["lifted_at"] is None and every[second["id"]]["lifted_reason"] is None
    assert [h["id"] for h in read_holds(ledger.engine)] == [second["id"]]

    for bad_id, reason, message in [
        (first["id"], "again", "lifted already"),
        (9999, "no such", "no manual hold with id 9999"),
        (second["id"], "", "reason is required"),
        (second["id"], "   ", "reason is required"),
        (second["id"], "x" * 201, "at most 200"),
        (2**40, "no such", "no manual hold with id"),
    ]:
        with pytest.raises(HoldError, match=message):
            ledger.lift_hold(bad_id, reason)
    assert [h["id"] for h in ledger.holds()] == [second["id"]]


def test_read_holds_reads_a_ledger_of_any_revision(tmp_path):
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    assert read_holds(engine) == []
    old_ledger(engine)  # before lifts existed: every hold is in force
    assert [h["reason"] for h in read_holds(engine)] == ["dispute"]
    assert migrations.stored_versions(engine) is None  # read only: nothing migrated


def _cli(ledger_url: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}  # no Airflow connection lookup
    env["RETENTION_LEDGER_URL"] = ledger_url
    return subprocess.run([sys.executable, "-m", "retention.cli", *args], env=env, capture_output=True, text=True, timeout=120)


def test_cli_hold_remove(tmp_path):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = Ledger(url)
    ledger.add_hold("crm_contact", "k41", "dispute 41", None)
    ledger.add_hold("crm_contact", "k42", "dispute 42", None)
    listed = _cli(url, "hold", "list")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert [line.split()[:3] for line in lines] == [["1", "crm_contact", "k41"], ["2", "crm_contact", "k42"]]

    removed = _cli(url, "hold", "remove", "--hold-id", "1", "--reason", "dispute settled 2026-12-01")
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout == "hold 1 lifted: crm_contact k41 (dispute settled 2026-12-01)\n"
    assert [line.split()[0] for line in _cli(url, "hold", "list").stdout.splitlines()] == ["2"]
    every = _cli(url, "hold", "list", "--all").stdout.splitlines()
    assert len(every) == 2 and "[lifted " in every[0] and every[0].endswith(": dispute settled 2026-12-01]")

    for args, message in [
        (("--hold-id", "1", "--reason", "again"), "hold 1 was lifted already"),
        (("--hold-id", "77", "--reason", "x"), "no manual hold with id 77"),
        (("--hold-id", "2", "--reason", "  "), "a reason is required"),
    ]:
        refused = _cli(url, "hold", "remove", *args)
        assert refused.returncode == 2, (args, refused.stdout, refused.stderr)
        assert len(refused.stderr.splitlines()) == 1 and refused.stderr.startswith("hold remove: ")
        assert message in refused.stderr and refused.stdout == ""
    assert [h["reason"] for h in ledger.holds()] == ["dispute 42"]


def test_migrations_command_line(tmp_path):
    """``python -m retention.store.migrations``: Alembic's commands without an alembic.ini."""
    run = [sys.executable, "-m", "retention.store.migrations"]
    history = subprocess.run([*run, "history"], capture_output=True, text=True, timeout=120)
    assert history.returncode == 0, history.stderr
    assert f"-> {migrations.head()} (head)" in history.stdout and "<base> -> 0001" in history.stdout
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    Ledger(url).add_hold("crm_contact", "k", "r", None)
    current = subprocess.run([*run, "-x", f"url={url}", "current"], capture_output=True, text=True, timeout=120)
    assert current.returncode == 0, current.stderr
    assert current.stdout.split() == [migrations.head(), "(head)"]


@contextlib.contextmanager
def updates_on(engine: sa.Engine):
    """The UPDATE statements sent to ``engine`` inside the block, as a list filled as they go."""
    updates: list[str] = []

    def seen(conn, cursor, statement, parameters, context, executemany):
        if statement.lstrip().upper().startswith("UPDATE"):
            updates.append(statement)

    sa.event.listen(engine, "before_cursor_execute", seen)
    try:
        yield updates
    finally:
        sa.event.remove(engine, "before_cursor_execute", seen)


def test_completion_is_set_based_and_finds_every_entry(ledger):
    """Completion appends the outcomes (no UPDATE of the entries: revision 0011), whichever
    ledger object wrote the entries, and new entries go in whatever order they come."""
    ledger.open_run("r1", "d", NOW, "v1", "label", False)
    row = lambda k: {"record_type": "crm_contact", "record_key": k, "rule_id": "lead", "action": "erase", "hold": None}  # noqa: E731
    earlier = Ledger(ledger.engine)  # an earlier attempt of the task wrote these
    earlier.write_ahead("r1", "v1", "crm", (row(f"e{i}") for i in range(3)))
    # In two chunks and out of key order: the ledger sorts each chunk before writing it.
    ledger.write_ahead("r1", "v1", "crm", (row(f"n{i}") for i in (4, 2, 0, 3, 1)))
    ledger.write_ahead("r1", "v1", "crm", [row("n9")], status="held")

    with updates_on(ledger.engine) as updates:
        outcomes = {"e0": "erased", "e1": "failed", "e2": "erased", "n0": "erased", "n1": "failed", "n2": "erased",
                    "n3": "erased", "n4": "already_gone", "n9": "deferred"}
        details = {"e1": "timed out", "n1": "refused, then 'timed out'", "n9": "a ticket of theirs is not erased yet"}
        ledger.complete("r1", "crm", "crm_contact", outcomes, details)
    with ledger.engine.connect() as conn:
        got = {r.record_key: (r.status, r.detail, r.completed_at is not None) for r in conn.execute(sa.select(erasure_ledger))}
    assert got == {k: (s, details.get(k), True) for k, s in outcomes.items()}
    assert updates == []
    with ledger.engine.connect() as conn:
        booked = conn.execute(sa.select(erasure_outcome.c.record_key, erasure_outcome.c.status)).all()
        entries = conn.execute(sa.select(erasure_entry.c.record_key, erasure_entry.c.status)).all()
    assert sorted(booked) == sorted(outcomes.items())
    assert sorted(entries) == sorted({**dict.fromkeys(outcomes, "planned"), "n9": "held"}.items())  # as written ahead

    ledger.complete("r1", "crm", "crm_contact", dict.fromkeys(["e0", "n0"], "submitted"))
    assert {k: v for (_, k), v in ledger.statuses("r1", "crm").items() if k in ("e0", "n0")} == {"e0": "submitted", "n0": "submitted"}
    with ledger.engine.connect() as conn:
        open_ = conn.execute(sa.select(erasure_ledger.c.completed_at).where(erasure_ledger.c.record_key.in_(["e0", "n0"]))).scalars()
        assert list(open_) == [None, None]


def test_the_last_outcome_booked_is_the_status_in_every_reader(ledger):
    """A retry books an entry again (failed, then erased): the last outcome is its status, its
    completion time and its detail, in the view, statuses, statuses of some keys, counts and
    entries; an outcome of a key the run never wrote ahead is not an entry."""
    ledger.open_run("r1", "d", NOW, "v1", "label", False)
    row = lambda k: {"record_type": "crm_contact", "record_key": k, "rule_id": "lead", "action": "erase", "hold": None}  # noqa: E731
    ledger.write_ahead("r1", "v1", "crm", [row("a"), row("b"), row("c")])
    ledger.complete("r1", "crm", "crm_contact", {"a": "failed", "b": "failed", "c": "deferred"}, {"a": "timed out", "c": "later"})
    ledger.complete("r1", "crm", "crm_contact", {"a": "erased", "c": "carried_over"})
    ledger.complete("r1", "crm", "crm_contact", {"zz": "erased"})  # no entry of this run has that key
    expected = {"a": "erased", "b": "failed", "c": "carried_over"}
    assert {k: v for (_, k), v in ledger.statuses("r1", "crm").items()} == expected
    # (statuses_of trusts an outcome to have its entry, as the engine books none before it)
    assert ledger.statuses_of("r1", "crm", "crm_contact", ["a", "b", "c", "nope"]) == expected
    assert ledger.status_counts("r1") == {"crm": {"lead": {"carried_over": 1, "erased": 1, "failed": 1}}}
    got = {e["record_key"]: (e["status"], e["detail"]) for e in ledger.entries("r1")}
    assert got == {"a": ("erased", None), "b": ("failed", None), "c": ("carried_over", None)}
    assert ledger.erased_keys() == {("crm_contact", "a")}
    # The next run: what this one carried over is the backlog, until a later run finishes it.
    assert ledger.carried_over("crm", "crm_contact") == {"c"}
    ledger.open_run("r2", "d", NOW, "v1", "label", False)
    ledger.write_ahead("r2", "v1", "crm", [row("c")])
    assert ledger.carried_over("crm", "crm_contact", exclude_run="r2") == {"c"}
    ledger.complete("r2", "crm", "crm_contact", {"c": "erased"})
    assert ledger.carried_over("crm", "crm_contact", exclude_run="r2") == set()
    # A key with no outcome yet reads its entry's own status.
    ledger.write_ahead("r1", "v1", "crm", [row("d")])
    assert ledger.statuses_of("r1", "crm", "crm_contact", ["a", "d"]) == {"a": "erased", "d": "planned"}


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_a_ledger_upgraded_through_0011_keeps_its_statuses_and_goes_back(dialect, tmp_path, fresh_pg):
    """Entries completed before outcomes were appended keep their statuses (read through the
    view), new outcomes add to them, and a downgrade puts each entry's last status back."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}" if dialect == "sqlite" else fresh_pg("retention_ledger_0010")
    engine = sa.create_engine(url)
    migrations.upgrade(engine, "0010")
    with engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO erasure_ledger (run_id, policy_version, system, record_type, record_key, rule_id, action, status, planned_at, completed_at, detail) "
            "VALUES ('old', 'v0', 'crm', 'crm_contact', :k, 'lead', 'erase', :s, :t, :t, :d)"
        ), [{"k": "k0", "s": "erased", "t": NOW, "d": None}, {"k": "k1", "s": "failed", "t": NOW, "d": "timed out"}])
    ledger = Ledger(engine)
    assert schema_diff(engine) == []
    assert ledger.statuses_of("old", "crm", "crm_contact", ["k0", "k1"]) == {"k0": "erased", "k1": "failed"}
    ledger.complete("old", "crm", "crm_contact", {"k1": "erased"})  # the old run's retry
    assert {e["record_key"]: (e["status"], e["detail"]) for e in ledger.entries("old")} == {"k0": ("erased", None), "k1": ("erased", None)}
    from alembic import command  # the downgrade as a person would run it, under the migration lock

    with engine.connect() as conn:
        migrations.lock(conn)
        command.downgrade(migrations.alembic_config(conn), "0010")
        conn.commit()
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT record_key, status FROM erasure_ledger ORDER BY record_key")).all()
        tables = set(sa.inspect(conn).get_table_names())
    assert [tuple(r) for r in rows] == [("k0", "erased"), ("k1", "erased")]
    assert "erasure_outcome" not in tables and "erasure_entry" not in tables


def test_a_batch_handed_over_reads_submitted_until_its_outcomes_are_booked(ledger):
    """A batch handed to the system is one row, not an update of its entries; its entries still
    ``planned`` read ``submitted`` in every reader (statuses, statuses of some keys, counts,
    entries, the report's counts) until booked, and once the run's submissions are forgotten
    what is still planned reads planned again. Other runs and systems are not touched."""
    from retention.store.reports import ledger_counts

    ledger.open_run("r1", "d", NOW, "v1", "label", False)
    ledger.open_run("r2", "d", NOW, "v1", "label", False)
    row = lambda k, rule="lead": {"record_type": "crm_contact", "record_key": k, "rule_id": rule, "action": "erase", "hold": None}  # noqa: E731
    ledger.write_ahead("r1", "v1", "crm", [row(f"k{i}", "lead" if i < 3 else "former") for i in range(6)])
    ledger.write_ahead("r2", "v1", "crm", [row(f"k{i}") for i in range(6)])
    ledger.write_ahead("r1", "v1", "newsletter", [{**row("k0"), "record_type": "newsletter_member"}])

    with updates_on(ledger.engine) as updates:
        ledger.submit("r1", "crm", "crm_contact", ["k0", "k1", "k3"])
    assert updates == []
    ledger.complete("r1", "crm", "crm_contact", {"k0": "erased"})  # k0's outcome is booked

    statuses = {k: s for (_, k), s in ledger.statuses("r1", "crm").items()}
    assert statuses == {"k0": "erased", "k1": "submitted", "k2": "planned", "k3": "submitted", "k4": "planned", "k5": "planned"}
    assert ledger.statuses_of("r1", "crm", "crm_contact", ["k0", "k1", "k2", "k9"]) == {"k0": "erased", "k1": "submitted", "k2": "planned"}
    assert {r["record_key"]: r["status"] for r in ledger.entries("r1") if r["system"] == "crm"} == statuses
    assert set(ledger.statuses("r2", "crm").values()) == {"planned"}
    assert set(ledger.statuses("r1", "newsletter").values()) == {"planned"}
    expected = {
        "crm": {"former": {"planned": 2, "submitted": 1}, "lead": {"erased": 1, "planned": 1, "submitted": 1}},
        "newsletter": {"lead": {"planned": 1}},
    }
    assert ledger.status_counts("r1") == expected
    assert ledger_counts(ledger, "r1") == expected
    assert ledger_counts(ledger, "r1", by="record_type")["crm"] == {"crm_contact": {"erased": 1, "planned": 3, "submitted": 2}}
    assert [c for c in ledger.counts("r1") if c["system"] == "crm" and c["rule_id"] == "lead"] == [
        {"system": "crm", "rule_id": "lead", "status": s, "n": 1} for s in ("erased", "planned", "submitted")
    ]

    ledger.forget_submissions("r1", "crm")
    assert {k: s for (_, k), s in ledger.statuses("r1", "crm").items()} == {**dict.fromkeys(statuses, "planned"), "k0": "erased"}
