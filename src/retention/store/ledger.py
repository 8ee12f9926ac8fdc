"""The erasure ledger: a write-ahead record of every erasure, keyed by pseudonyms.

Before the pipeline touches a batch of records it writes one ``planned`` entry per record
(``erasure_entry``) and commits; after the source system answers it books each entry's outcome
(``erased``, ``already_gone``, ``failed``, ``held``, ``deferred``, ``carried_over``), appended
to ``erasure_outcome``. The view ``erasure_ledger`` reads both as one row per entry with its
current status. A run that is killed in between is resumed by the task's retry: finished
entries are skipped, ``planned`` ones are tried again (erasure is idempotent, so a record that
did go counts as ``already_gone``). Nothing in the ledger identifies a person without the
pseudonym key.

The schema is kept by Alembic revisions in ``store/migrations`` (not by ``create_all``): opening
a ``Ledger`` brings its database to the newest revision.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, date, datetime, timedelta

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from retention.config import ConfigError, create_engine
from retention.domain.statuses import DONE as DONE_STATUSES
from retention.domain.statuses import GONE, Status
from retention.store import migrations

log = logging.getLogger("retention")

# The current schema. Databases get it through the migrations (store/migrations/versions),
# never through metadata.create_all: a change here needs a revision there too.
metadata = sa.MetaData()

STATUSES = tuple(str(s) for s in Status)
DONE = tuple(str(s) for s in DONE_STATUSES)
_OPEN = (str(Status.PLANNED), str(Status.SUBMITTED))  # entries not completed yet
_PLANNED, _SUBMITTED = _OPEN

erasure_run = sa.Table(
    "erasure_run",
    metadata,
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

# An erasure's entry, written ahead (before its record is touched) with the status it starts in:
# ``planned`` for what goes to the system, ``held`` or ``deferred`` for what does not. How it
# ended is in ``erasure_outcome``; ``erasure_ledger`` (a view) gives both as one row per entry.
# (Ledgers from before revision 0011 keep their entries' final statuses here.)
erasure_entry = sa.Table(
    "erasure_entry",
    metadata,
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
    # Key first (revision 0012): one index refuses an entry twice and finds an erasure by key
    # (across runs, or a run's given keys); a second, small one finds a run's entries. Two
    # indexes on the key cost the write-ahead half again as much. Pages are full (PostgreSQL's
    # default): an entry is never updated.
    sa.UniqueConstraint("record_key", "record_type", "system", "run_id", name="uq_entry_record"),
    sa.Index("ix_entry_run", "run_id", "system"),
)

# An outcome booked: one row per entry and booking, appended (``COPY`` on PostgreSQL) and never
# updated, which costs about a third of updating the entry (revision 0011). An entry tried again by a
# retry has several; the last (highest ``id``) counts.
erasure_outcome = sa.Table(
    "erasure_outcome",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(250), nullable=False),
    sa.Column("system", sa.String(20), nullable=False),
    sa.Column("record_type", sa.String(40), nullable=False),
    sa.Column("record_key", sa.String(64), nullable=False),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("completed_at", sa.DateTime(timezone=True)),
    sa.Column("detail", sa.String(200)),
    sa.Index("ix_outcome_run", "run_id", "system"),
)

# The ledger as it reads: every entry with its current status (its last outcome, else its own).
# A view (revision 0011, ``view_sql``), so it is described in a metadata of its own: the schema's
# ``metadata`` holds the tables Alembic compares.
erasure_ledger = sa.Table(
    "erasure_ledger",
    sa.MetaData(),
    *(sa.Column(c.name, c.type) for c in erasure_entry.columns),
)

# A destructive batch handed to its system, its outcomes not all booked yet: one row per batch,
# committed right before the batch goes (the batch's keys as a JSON array), instead of an UPDATE
# of each entry to ``submitted``, which cost as much as booking the outcomes. An entry still
# ``planned`` whose key is in a submission of its run reads as ``submitted``. Deleted once the
# batch's outcomes are booked (``forget_submission``); a killed step leaves them for its retry.
erasure_submission = sa.Table(
    "erasure_submission",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(250), nullable=False),
    sa.Column("system", sa.String(20), nullable=False),
    sa.Column("record_type", sa.String(40), nullable=False),
    sa.Column("record_keys", sa.Text, nullable=False),
    sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_submission_run", "run_id", "system"),
)

legal_hold = sa.Table(
    "legal_hold",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("record_type", sa.String(40), nullable=False),
    sa.Column("record_key", sa.String(64), nullable=False),
    sa.Column("reason", sa.String(200), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True)),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_hold_key", "record_type", "record_key"),
)

# A hold lifted by a person (``retention hold remove``), at most once; the hold's own row stays
# as it was. Holds with a lift are no longer in force.
legal_hold_lift = sa.Table(
    "legal_hold_lift",
    metadata,
    sa.Column("hold_id", sa.Integer, sa.ForeignKey("legal_hold.id", name="fk_hold_lift_hold"), primary_key=True),
    sa.Column("lifted_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("reason", sa.String(200), nullable=False),
)


# One run at a time per system, across the nightly schedule, backfills and manual runs (Airflow
# counts backfill runs apart from the DAG's max_active_runs). Held from extract to verify, so a
# run plans against what the previous run left.
system_lock = sa.Table(
    "system_lock",
    metadata,
    sa.Column("system", sa.String(20), primary_key=True),
    sa.Column("run_id", sa.String(250), nullable=False),
    sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
)


# The fingerprint of the pseudonym key the ledger's pseudonyms were made with (one row, id 1),
# recorded on first use: under another key no hold and no erased record would match any more.
# ``config.key_fingerprint``: an HMAC of a fixed label under the key, never the key.
pseudonym_key = sa.Table(
    "pseudonym_key",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("fingerprint", sa.String(64), nullable=False),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
)


# Erasure requests filed through the request inbox (plugins/retention_requests.py): the address,
# encrypted with the request key (store/inbox.py), under a random request id that is all the DAG
# run's conf holds. Deleted when the request's run completes; kept while a retry may need it.
request_inbox = sa.Table(
    "request_inbox",
    metadata,
    sa.Column("request_id", sa.String(36), primary_key=True),
    sa.Column("address_token", sa.Text, nullable=False),
    sa.Column("filed_at", sa.DateTime(timezone=True), nullable=False),
)


# Records seen quarantined, per system, record type and pseudonym (never a value): the first and
# the last night (the run's as-of date) and run that saw it, how many nights, and the reason's
# category. Each nightly plan step replaces its system's set (``observe_quarantine``): a record
# that left quarantine (fixed, or erased) drops out. ``seen_run_id``: the last run that saw it.
quarantine_seen = sa.Table(
    "quarantine_seen",
    metadata,
    sa.Column("system", sa.String(20), primary_key=True),
    sa.Column("record_type", sa.String(40), primary_key=True),
    sa.Column("record_key", sa.String(64), primary_key=True),
    sa.Column("reason", sa.String(100), nullable=False),
    sa.Column("first_night", sa.Date, nullable=False),
    sa.Column("last_night", sa.Date, nullable=False),
    sa.Column("nights", sa.Integer, nullable=False),
    sa.Column("first_run_id", sa.String(250), nullable=False),
    sa.Column("last_run_id", sa.String(250), nullable=False),
    sa.Column("seen_run_id", sa.String(250), nullable=False),
)


# Decisions on plans over the plan-size guard (``domain/approval.py``): who approved, rejected or
# let time out which plan (its content hash) under which policy version, with the guard's
# counts. The erase step erases such a plan only when the newest decision on its hash and the
# run's policy version is an approval. Written once per decision, never updated.
plan_approval = sa.Table(
    "plan_approval",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("dag_id", sa.String(250), nullable=False),
    sa.Column("run_id", sa.String(250), nullable=False),
    sa.Column("system", sa.String(20), nullable=False),
    sa.Column("plan_hash", sa.String(64), nullable=False),
    sa.Column("policy_version", sa.String(64), nullable=False),
    sa.Column("decision", sa.String(20), nullable=False),
    sa.Column("decided_by", sa.String(250)),  # the Airflow user; none when the request timed out
    sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("planned", sa.Integer, nullable=False),
    sa.Column("allowed", sa.Integer, nullable=False),
    sa.Column("extracted", sa.Integer, nullable=False),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_plan_approval_plan", "system", "plan_hash", "policy_version"),
)


# The record index (``store/record_index.py``): per system, the records as the last extract left
# them, so that a night can read only what changed (``systems.base.ChangeFeed``) and still plan
# from every record. A row holds the record's id and its columns of the domain's record schema
# (``domain.records``: ids, statuses, clocks, flags, never a name or an address) as one JSON
# object, so a column added to the schema needs no migration here.
record_index = sa.Table(
    "record_index",
    metadata,
    sa.Column("system", sa.String(20), primary_key=True),
    sa.Column("record_type", sa.String(40), primary_key=True),
    sa.Column("record_id", sa.String(250), primary_key=True),
    sa.Column("fields", sa.Text, nullable=False),
)

# Per system, where its change feed stands: the adapter's opaque cursor (``None`` until a full
# read stored one), when that cursor was read, and when the index was last rebuilt from a full read.
record_cursor = sa.Table(
    "record_cursor",
    metadata,
    sa.Column("system", sa.String(20), primary_key=True),
    sa.Column("cursor", sa.Text),
    sa.Column("read_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("reconciled_at", sa.DateTime(timezone=True), nullable=False),
)


# One plan step's quarantined records, for the set-based update of ``quarantine_seen`` (a
# temporary table of the transaction; not part of the schema).
_quarantine_now = sa.Table(
    "quarantine_now",
    sa.MetaData(),
    sa.Column("record_type", sa.String(40), nullable=False),
    sa.Column("record_key", sa.String(64), nullable=False),
    sa.Column("reason", sa.String(100), nullable=False),
    prefixes=["TEMPORARY"],
)


class LockTimeout(RuntimeError):
    pass


class KeyChanged(ConfigError):
    """The configured pseudonym key is not the one the ledger was written under."""


class HoldError(ValueError):
    """A manual hold cannot be lifted as asked (no such hold, already lifted, no reason)."""


SchemaError = migrations.SchemaError


def utcnow() -> datetime:
    return datetime.now(UTC)


def _chunks(seq: Sequence, size: int) -> Iterable[Sequence]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


def _batched(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


_COPY_COLUMNS = (
    "run_id", "policy_version", "system", "status", "planned_at", "completed_at",
    "record_type", "record_key", "rule_id", "action", "hold",
)


def _copy_frame(conn: sa.Connection, fixed: dict, frame: pd.DataFrame) -> None:
    """New entries from a frame's columns through COPY, in the caller's transaction (a dict and
    a Python row per entry cost as much as the COPY)."""
    hold = frame["hold"].astype(object).where(frame["hold"].notna() & (frame["hold"].astype(str) != ""), None)
    texts = [pa.array(frame[c].astype(str).to_numpy(dtype=object), pa.string()) for c in ("record_type", "record_key", "rule_id", "action")]
    _copy_entries(conn, fixed, [*texts, pa.array(hold.to_numpy(dtype=object), pa.string())])


def _copy_entries(conn: sa.Connection, fixed: dict, texts: list[pa.Array]) -> None:
    """New entries through COPY: ``fixed``'s run, version, system, status and times for every
    one, ``texts`` their record_type, record_key, rule_id, action and hold (null: none)."""
    n = len(texts[0])
    head = [fixed[c] for c in _COPY_COLUMNS[:6]]
    head = [None if v is None else (v.isoformat() if isinstance(v, datetime) else str(v)) for v in head]
    columns = [pa.array([v] * n, pa.string()) if v is not None else pa.nulls(n, pa.string()) for v in head]
    _copy_arrays(conn, erasure_entry.name, _COPY_COLUMNS, columns + list(texts))


def _copy_arrays(conn: sa.Connection, table: str, names: Sequence[str], columns: list[pa.Array]) -> None:
    """Rows given column by column (Arrow arrays of text) through COPY, in the caller's
    transaction: the CSV made by Arrow in one go."""
    buffer = io.BytesIO()
    # Arrow quotes every text and leaves a null empty and unquoted, which COPY reads as NULL
    # (completed_at, hold, detail).
    pa_csv.write_csv(
        pa.Table.from_arrays(columns, names=list(names)), buffer,
        pa_csv.WriteOptions(include_header=False, quoting_style="needed"),
    )
    buffer.seek(0)
    _copy(conn, buffer, table, names)


def _copy(conn: sa.Connection, buffer, table: str, columns: Sequence[str]) -> None:
    sql = f"COPY {table} ({', '.join(columns)}) FROM STDIN WITH (FORMAT csv)"
    dbapi = conn.dialect.loaded_dbapi
    try:
        with conn.connection.dbapi_connection.cursor() as cursor:
            cursor.copy_expert(sql, buffer)
    except dbapi.Error as exc:  # as SQLAlchemy's own errors (IntegrityError for a duplicate entry)
        raise sa.exc.DBAPIError.instance(sql, None, exc, dbapi.Error) from exc


_OUTCOME_COLUMNS = ("run_id", "system", "record_type", "record_key", "status", "completed_at", "detail")


def _copy_outcomes(
    conn: sa.Connection, fixed: tuple[str, str, str], keys: list[str], statuses: list[str],
    done: list[str | None], texts: list[str | None],
) -> None:
    """Outcomes through COPY, in the caller's transaction; ``done``: when each was completed,
    in ISO format, or None for an open status."""
    n = len(keys)
    columns = [pa.array([v] * n, pa.string()) for v in fixed]
    columns += [pa.array(values, pa.string()) for values in (keys, statuses, done, texts)]
    _copy_arrays(conn, erasure_outcome.name, _OUTCOME_COLUMNS, columns)


# A new entry's own columns. Entries go in sorted by record type and key: the unique index
# (key first, revision 0012) then takes a chunk in one sweep instead of at random pages (half
# the server's work of a COPY), and a chunk's entries share heap pages.
_ENTRY_COLUMNS = ("record_type", "record_key", "rule_id", "action", "hold")


def _entry_frames(rows: Iterable[dict] | pd.DataFrame | Iterable[pd.DataFrame], size: int) -> Iterator[pd.DataFrame]:
    """New entries as frames of at most ``size`` rows, whether given as dicts or as frames."""
    if isinstance(rows, pd.DataFrame):
        rows = [rows]
    rows = iter(rows)
    first = next(rows, None)
    if first is None:
        return
    if isinstance(first, pd.DataFrame):
        for frame in itertools.chain([first], rows):
            for start in range(0, len(frame), size):
                yield frame.iloc[start : start + size].reindex(columns=list(_ENTRY_COLUMNS))
        return
    for chunk in _batched(itertools.chain([first], rows), size):
        yield pd.DataFrame.from_records(chunk, columns=list(_ENTRY_COLUMNS))


#: Where a ledger is set, for the one line that says it cannot be reached.
LEDGER_WHERE = "the ledger database (connection 'retention_ledger', else RETENTION_LEDGER_URL)"


class Ledger:
    def __init__(self, url_or_engine: str | sa.Engine):
        if isinstance(url_or_engine, sa.Engine):
            self.engine = url_or_engine
        else:
            kwargs = {"connect_args": {"timeout": 60}} if str(url_or_engine).startswith("sqlite") else {}
            # Failures to connect are one line naming where the ledger is set, never its URL.
            self.engine = create_engine(url_or_engine, LEDGER_WHERE, **kwargs)
        # To the newest schema revision: one query when it is there already; otherwise once,
        # under a lock, however many tasks open the ledger at the same moment.
        migrations.upgrade_to_head(self.engine)
        # Bulk paths on PostgreSQL through psycopg2: COPY for new entries, arrays for keys.
        self._postgres = self.engine.dialect.name == "postgresql" and self.engine.dialect.driver == "psycopg2"

    # -- runs ---------------------------------------------------------------------------
    def open_run(self, run_id: str, dag_id: str, as_of: datetime, policy_version: str, policy_label: str, dry_run: bool) -> None:
        """Record the run (idempotent: a retried task finds it already there)."""
        with self.engine.begin() as conn:
            exists = conn.execute(sa.select(erasure_run.c.run_id).where(erasure_run.c.run_id == run_id)).first()
            if exists:
                conn.execute(
                    erasure_run.update().where(erasure_run.c.run_id == run_id).values(state="running", finished_at=None)
                )
                return
            conn.execute(
                erasure_run.insert().values(
                    run_id=run_id, dag_id=dag_id, as_of=as_of, policy_version=policy_version,
                    policy_label=policy_label, dry_run=dry_run, started_at=utcnow(), state="running",
                )
            )

    def close_run(self, run_id: str, state: str, report: dict) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                erasure_run.update()
                .where(erasure_run.c.run_id == run_id)
                .values(state=state, finished_at=utcnow(), report=json.dumps(report, default=str))
            )

    def run(self, run_id: str) -> dict | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(erasure_run).where(erasure_run.c.run_id == run_id)).mappings().first()
        return dict(row) if row else None

    # -- entries ------------------------------------------------------------------------
    def statuses(self, run_id: str, system: str) -> dict[tuple[str, str], str]:
        """(record_type, record_key) -> status for this run and system."""
        q = sa.select(erasure_ledger.c.record_type, erasure_ledger.c.record_key, erasure_ledger.c.status).where(
            erasure_ledger.c.run_id == run_id, erasure_ledger.c.system == system
        )
        with self.engine.connect() as conn:
            out = {(t, k): s for t, k, s in conn.execute(q)}
            sent = self._submissions(conn, run_id, system)
        for (_, _, record_type), keys in sent.items():
            for key in keys:
                if out.get((record_type, key)) == _PLANNED:
                    out[(record_type, key)] = _SUBMITTED
        return out

    def entries(self, run_id: str | None = None) -> list[dict]:
        """Every entry (of one run, or of all), each as a dict of its columns, in the order
        written; an entry of a batch handed to its system without its outcome booked reads
        ``submitted``, as in :meth:`statuses`."""
        q = sa.select(erasure_ledger).order_by(erasure_ledger.c.id)
        if run_id is not None:
            q = q.where(erasure_ledger.c.run_id == run_id)
        with self.engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(q).mappings()]
            sent = self._submissions(conn, run_id)
        if sent:
            for row in rows:
                if row["status"] == _PLANNED and row["record_key"] in sent.get((row["run_id"], row["system"], row["record_type"]), ()):
                    row["status"] = _SUBMITTED
        return rows

    def submit(self, run_id: str, system: str, record_type: str, keys: Sequence[str]) -> int:
        """Record, committed before it goes, that a batch of entries (by key) is handed to the
        system now: until their outcomes are booked they read ``submitted``, and a retry after a
        kill books a record it then finds gone as erased by this run. One row per batch; returns
        its id, for :meth:`forget_submission`."""
        with self.engine.begin() as conn:
            inserted = conn.execute(
                erasure_submission.insert().values(
                    run_id=run_id, system=system, record_type=record_type,
                    record_keys=json.dumps(list(keys), separators=(",", ":")), submitted_at=utcnow(),
                )
            )
            return int(inserted.inserted_primary_key[0])

    def forget_submission(self, submission_id: int) -> None:
        """Drop one batch's record of being handed over: its outcomes are booked."""
        t = erasure_submission
        with self.engine.begin() as conn:
            conn.execute(t.delete().where(t.c.id == submission_id))

    def forget_submissions(self, run_id: str, system: str) -> None:
        """Drop the run's submissions for the system: for an erase step that has booked the
        outcome of every batch it handed over (none of their entries is ``planned`` any more)."""
        t = erasure_submission
        with self.engine.begin() as conn:
            conn.execute(t.delete().where(t.c.run_id == run_id, t.c.system == system))

    @staticmethod
    def _submissions(conn: sa.Connection, run_id: str | None, system: str | None = None) -> dict[tuple[str, str, str], set[str]]:
        """(run, system, record type) -> the keys of the batches handed over and not forgotten."""
        t = erasure_submission
        q = sa.select(t.c.run_id, t.c.system, t.c.record_type, t.c.record_keys)
        if run_id is not None:
            q = q.where(t.c.run_id == run_id)
        if system is not None:
            q = q.where(t.c.system == system)
        out: dict[tuple[str, str, str], set[str]] = {}
        for run, sys_, record_type, keys in conn.execute(q):
            out.setdefault((run, sys_, record_type), set()).update(json.loads(keys))
        return out

    def statuses_of(self, run_id: str, system: str, record_type: str, keys: Sequence[str]) -> dict[str, str]:
        """record_key -> status of the given entries of this run and system (keys the ledger
        has not are left out). For a chunk of keys at a time: a verify step that asks this per
        chunk holds a chunk's statuses, not a whole run's as :meth:`statuses` does.

        From the two tables, not the view (which would sort the run's every outcome): first the
        run's outcomes of those keys in the order booked (the last one counts), then the entries
        of the keys without one, by key (unique index). An outcome is only ever booked for an
        entry written ahead (the erase engine books nothing before a batch's entries are
        committed), so a key with an outcome needs no look at its entry: a verify after an erase
        that went through reads the outcomes alone. They have no index on the key (it would double
        the cost of booking them), so they are read in one pass over the
        run's outcomes of the type, not one per chunk of keys: on PostgreSQL with every key as one
        array (compared through a hash), on SQLite (no such array) filtered here."""
        e, o = erasure_entry, erasure_outcome
        wanted = set(keys)
        out: dict[str, str] = {}
        with self.engine.connect() as conn:
            q = sa.select(o.c.record_key, o.c.status).where(o.c.run_id == run_id, o.c.system == system, o.c.record_type == record_type)
            params = {}
            if self._postgres:
                q, params = q.where(self._key_in(o.c.record_key)), {"keys": list(wanted)}
            for key, status in conn.execute(q.order_by(o.c.id), params):
                if key in wanted:
                    out[key] = status
            rest = [k for k in wanted if k not in out]
            mine = (e.c.run_id == run_id, e.c.system == system, e.c.record_type == record_type)
            for chunk in _chunks(rest, 50_000 if self._postgres else 900):
                q = sa.select(e.c.record_key, e.c.status).where(*mine, self._key_in(e.c.record_key))
                for key, status in conn.execute(q, {"keys": list(chunk)}):
                    out[key] = status
            if _PLANNED in out.values():
                sent = self._submissions(conn, run_id, system).get((run_id, system, record_type), set())
                out.update({k: _SUBMITTED for k, s in out.items() if s == _PLANNED and k in sent})
        return out

    def write_ahead(
        self, run_id: str, policy_version: str, system: str,
        rows: Iterable[dict] | pd.DataFrame | Iterable[pd.DataFrame] | pa.Table,
        status: str = "planned", analyze: bool = True,
    ) -> None:
        """Insert entries (record_type, record_key, rule_id, action, hold) before acting on them,
        all in one transaction. ``rows``: dicts with those keys, or frames with those columns (a
        generator is consumed as it goes, so that a few hundred thousand entries never sit in
        memory at once), or one Arrow table with those columns (the erase engine's write-ahead:
        sorted and copied without a pandas step). A hold of ``None`` or ``""`` is stored as no
        hold (NULL).

        Set-based: each chunk in key order (``_ENTRY_COLUMNS``), through COPY on PostgreSQL (a frame's
        chunk as Arrow's CSV), one executemany elsewhere. ``analyze``: refresh the table's
        statistics after ten thousand entries or more (a caller writing a plan in parts does so
        once, with :meth:`analyze`)."""
        now = utcnow()
        fixed = {
            "run_id": run_id, "policy_version": policy_version, "system": system, "status": status,
            "planned_at": now, "completed_at": now if status in DONE else None,
        }
        written = 0
        if isinstance(rows, pa.Table):
            with self.engine.begin() as conn:
                self._write_table(conn, fixed, rows)
                if analyze and rows.num_rows >= 10_000:
                    self._analyze(conn)
            return
        with self.engine.begin() as conn:
            for frame in _entry_frames(rows, 50_000 if self._postgres else 5000):
                frame = frame.sort_values(["record_type", "record_key"])  # see _ENTRY_COLUMNS
                if self._postgres:
                    _copy_frame(conn, fixed, frame)
                else:
                    conn.execute(erasure_entry.insert(), [
                        {**fixed, "record_type": t, "record_key": k, "rule_id": r, "action": a, "hold": h if isinstance(h, str) and h else None}
                        for t, k, r, a, h in zip(*(frame[c].tolist() for c in _ENTRY_COLUMNS))
                    ])
                written += len(frame)
            if analyze and written >= 10_000:
                self._analyze(conn)

    def _write_table(self, conn: sa.Connection, fixed: dict, table: pa.Table) -> None:
        """:meth:`write_ahead`'s entries from an Arrow table, a chunk at a time in key order."""
        size = 50_000 if self._postgres else 5000
        for start in range(0, table.num_rows, size):
            part = table.slice(start, size).select(list(_ENTRY_COLUMNS))
            part = part.take(pc.sort_indices(part, sort_keys=[("record_type", "ascending"), ("record_key", "ascending")]))
            texts = [pc.cast(part.column(c), pa.string()) for c in _ENTRY_COLUMNS]
            hold = texts[-1]
            texts[-1] = pc.if_else(pc.equal(hold, ""), pa.scalar(None, pa.string()), hold)  # no hold: NULL
            if self._postgres:
                _copy_entries(conn, fixed, texts)
                continue
            conn.execute(erasure_entry.insert(), [
                {**fixed, **dict(zip(_ENTRY_COLUMNS, values))} for values in zip(*(c.to_pylist() for c in texts))
            ])

    def analyze(self) -> None:
        """Fresh statistics of the entries (PostgreSQL), so that completing and verifying them
        batch by batch finds them through an index rather than by scanning the table each time."""
        with self.engine.begin() as conn:
            self._analyze(conn)

    def _analyze(self, conn: sa.Connection) -> None:
        if self._postgres:
            conn.exec_driver_sql(f"ANALYZE {erasure_entry.name}, {erasure_outcome.name}")

    def complete(self, run_id: str, system: str, record_type: str, outcomes: dict[str, str], detail: dict[str, str] | None = None) -> None:
        """Book the outcome of entries: ``outcomes`` maps record_key -> status; ``detail``
        (record_key -> text, at most 200 characters kept) says why, for some of them.

        Appended to ``erasure_outcome`` in one transaction, never updating the entry: through
        COPY on PostgreSQL (the rows as Arrow's CSV), one executemany elsewhere. The last outcome
        booked for an entry is its status (``erasure_ledger``)."""
        if not outcomes:
            return
        # Lists made in C where the outcomes allow (no detail, no open status): this runs in the
        # booking thread beside the erase loop, a million outcomes a night.
        keys = list(outcomes)
        statuses = list(map(str, outcomes.values()))
        distinct = set(statuses)
        unknown = distinct - set(STATUSES)
        if unknown:
            raise ValueError(f"unknown ledger status {sorted(unknown)[0]!r}")
        now = utcnow()
        texts = [None if (d := detail.get(k)) is None else str(d)[:200] for k in keys] if detail else [None] * len(keys)
        at = now.isoformat() if self._postgres else now
        done = [None if s in _OPEN else at for s in statuses] if distinct & set(_OPEN) else [at] * len(keys)
        with self.engine.begin() as conn:
            for start in range(0, len(keys), 50_000 if self._postgres else 5000):
                part = slice(start, start + (50_000 if self._postgres else 5000))
                if self._postgres:
                    _copy_outcomes(conn, (run_id, system, record_type), keys[part], statuses[part], done[part], texts[part])
                    continue
                conn.execute(erasure_outcome.insert(), [
                    {"run_id": run_id, "system": system, "record_type": record_type, "record_key": k, "status": s,
                     "completed_at": c, "detail": d}
                    for k, s, c, d in zip(keys[part], statuses[part], done[part], texts[part])
                ])

    def _key_in(self, column: sa.ColumnElement | None = None):
        """``column`` (default the ledger's key) is one of the keys given at execution as
        ``{"keys": [...]}``. Not bound into the statement: SQLAlchemy kept the keys of statements
        bound with them alive after use (25,000 keys a call, about 7 MB, in a verify step that
        asks the ledger a chunk at a time)."""
        column = erasure_ledger.c.record_key if column is None else column
        if self._postgres:
            return column == sa.any_(sa.bindparam("keys", type_=postgresql.ARRAY(sa.String)))
        return column.in_(sa.bindparam("keys", expanding=True))

    def counts(self, run_id: str) -> list[dict]:
        """The run's entries counted by system, rule and status: dicts of system, rule_id,
        status and n, in that order."""
        return [
            {"system": system, "rule_id": rule, "status": status, "n": n}
            for system, rules in self.status_counts(run_id).items()
            for rule, statuses in rules.items()
            for status, n in statuses.items()
        ]

    def status_counts(self, run_id: str, by: str = "rule_id") -> dict[str, dict[str, dict[str, int]]]:
        """``{system: {rule (or the column ``by``): {status: n}}}`` of the run's entries, sorted;
        those of a batch handed over without its outcomes booked count as ``submitted``."""
        t = erasure_ledger
        group = t.c[by]
        q = (
            sa.select(t.c.system, group, t.c.status, sa.func.count().label("n"))
            .where(t.c.run_id == run_id)
            .group_by(t.c.system, group, t.c.status)
        )
        found: dict[tuple[str, str, str], int] = {}
        size = 50_000 if self._postgres else 900
        with self.engine.connect() as conn:
            for system, name, status, n in conn.execute(q):
                found[(system, name, status)] = int(n)
            sent = self._submissions(conn, run_id) if any(s == _PLANNED for _, _, s in found) else {}
            for (_, system, record_type), keys in sent.items():
                mine = (t.c.run_id == run_id, t.c.system == system, t.c.record_type == record_type, t.c.status == _PLANNED)
                for chunk in _chunks(sorted(keys), size):
                    q = sa.select(group, sa.func.count()).where(*mine, self._key_in()).group_by(group)
                    for name, n in conn.execute(q, {"keys": list(chunk)}):
                        # Another system's erase step may write entries ahead between the two
                        # reads (the nightly run's systems erase side by side): never below zero.
                        planned = found.get((system, name, _PLANNED), 0)
                        found[(system, name, _PLANNED)] = max(planned - int(n), 0)
                        found[(system, name, _SUBMITTED)] = found.get((system, name, _SUBMITTED), 0) + int(n)
        out: dict[str, dict[str, dict[str, int]]] = {}
        for (system, name, status), n in sorted(found.items()):
            if n > 0:
                out.setdefault(system, {}).setdefault(name, {})[status] = n
        return out

    def carried_over(self, system: str, record_type: str, exclude_run: str | None = None) -> set[str]:
        """The keys of ``record_type`` an earlier run left ``carried_over`` and no run has
        finished since (erased, gone or held): the backlog the next erase step takes first.

        Finished since: an entry written finished (a hold) no earlier than the carried-over one
        was planned, or an outcome booked finished since then."""
        t, e, o = erasure_ledger, erasure_entry, erasure_outcome
        mine = (t.c.system == system, t.c.record_type == record_type)
        written = sa.select(e.c.id).where(
            e.c.system == t.c.system, e.c.record_type == t.c.record_type, e.c.record_key == t.c.record_key,
            e.c.status.in_(DONE), e.c.planned_at >= t.c.planned_at,
        )
        booked = sa.select(o.c.id).where(
            o.c.system == t.c.system, o.c.record_type == t.c.record_type, o.c.record_key == t.c.record_key,
            o.c.status.in_(DONE), o.c.completed_at >= t.c.planned_at,
        )
        q = sa.select(t.c.record_key).where(*mine, t.c.status == str(Status.CARRIED_OVER), ~written.exists(), ~booked.exists())
        if exclude_run:
            q = q.where(t.c.run_id != exclude_run)
        with self.engine.connect() as conn:
            return {k for (k,) in conn.execute(q.distinct())}

    def erased_keys(self, record_type: str | None = None) -> set[tuple[str, str]]:
        """Every (record_type, record_key) any run has erased: for replay after a restore."""
        t = erasure_ledger
        q = sa.select(t.c.record_type, t.c.record_key).where(t.c.status.in_([str(s) for s in GONE])).distinct()
        if record_type:
            q = q.where(t.c.record_type == record_type)
        with self.engine.connect() as conn:
            return {(a, b) for a, b in conn.execute(q)}

    # -- records stuck in quarantine --------------------------------------------------------
    def observe_quarantine(
        self, system: str, run_id: str, night: date, records: Iterable[tuple[str, str, str]]
    ) -> None:
        """This run's quarantined records of ``system`` (record_type, record_key, reason
        category) as of ``night``: each one's count of nights goes up when ``night`` lies outside
        the nights it was seen before (so a retried task, or a second run the same night, counts
        once), and the system's records not among them leave the table.

        Set-based, in one transaction, for hundreds of thousands of records: the set goes into a
        temporary table (COPY on PostgreSQL), then one upsert from it and one delete."""
        t = quarantine_seen
        unique = {(rt, key): reason for rt, key, reason in records}  # a duplicate key is one record
        with self.engine.begin() as conn:
            _quarantine_now.create(conn)
            try:
                self._fill_quarantine_now(conn, [(rt, key, reason) for (rt, key), reason in unique.items()])
                now = _quarantine_now
                insert = postgresql.insert if self.engine.dialect.name == "postgresql" else sqlite_insert
                cols = ["system", "record_type", "record_key", "reason", "first_night", "last_night", "nights",
                        "first_run_id", "last_run_id", "seen_run_id"]
                select = sa.select(
                    sa.literal(system, sa.String), now.c.record_type, now.c.record_key, now.c.reason,
                    sa.literal(night, sa.Date), sa.literal(night, sa.Date), sa.literal(1, sa.Integer),
                    sa.literal(run_id, sa.String), sa.literal(run_id, sa.String), sa.literal(run_id, sa.String),
                ).where(sa.true())  # SQLite: an upsert from a SELECT needs its WHERE
                stmt = insert(t).from_select(cols, select)
                new = stmt.excluded
                later, earlier = new.last_night > t.c.last_night, new.first_night < t.c.first_night
                conn.execute(
                    stmt.on_conflict_do_update(
                        index_elements=[t.c.system, t.c.record_type, t.c.record_key],
                        set_={
                            "reason": new.reason,
                            "seen_run_id": new.seen_run_id,
                            "nights": sa.case((sa.or_(later, earlier), t.c.nights + 1), else_=t.c.nights),
                            "last_night": sa.case((later, new.last_night), else_=t.c.last_night),
                            "last_run_id": sa.case((later, new.last_run_id), else_=t.c.last_run_id),
                            "first_night": sa.case((earlier, new.first_night), else_=t.c.first_night),
                            "first_run_id": sa.case((earlier, new.first_run_id), else_=t.c.first_run_id),
                        },
                    )
                )
                conn.execute(t.delete().where(t.c.system == system, t.c.seen_run_id != run_id))
            finally:
                _quarantine_now.drop(conn)

    def _fill_quarantine_now(self, conn: sa.Connection, rows: list[tuple[str, str, str]]) -> None:
        if not rows:
            return
        if self._postgres:
            buffer = io.StringIO()
            csv.writer(buffer, lineterminator="\n").writerows(rows)
            buffer.seek(0)
            with conn.connection.dbapi_connection.cursor() as cursor:
                cursor.copy_expert(f"COPY {_quarantine_now.name} (record_type, record_key, reason) FROM STDIN WITH (FORMAT csv)", buffer)
            return
        for chunk in _chunks(rows, 50_000):
            conn.execute(_quarantine_now.insert(), [{"record_type": a, "record_key": b, "reason": c} for a, b, c in chunk])

    def quarantined(self, system: str) -> list[dict]:
        """The system's records seen quarantined, as ``observe_quarantine`` keeps them."""
        t = quarantine_seen
        with self.engine.connect() as conn:
            q = sa.select(t).where(t.c.system == system).order_by(t.c.record_type, t.c.record_key)
            return [dict(r) for r in conn.execute(q).mappings()]

    def stuck_in_quarantine(self, systems: Iterable[str], more_than: int) -> dict[str, dict[str, dict[str, int]]]:
        """``{system: {record type: {reason: n}}}`` of the records seen quarantined on more than
        ``more_than`` nights: counts only, no keys."""
        t = quarantine_seen
        q = (
            sa.select(t.c.system, t.c.record_type, t.c.reason, sa.func.count().label("n"))
            .where(t.c.system.in_(list(systems)), t.c.nights > more_than)
            .group_by(t.c.system, t.c.record_type, t.c.reason)
            .order_by(t.c.system, t.c.record_type, t.c.reason)
        )
        out: dict = {}
        with self.engine.connect() as conn:
            for system, record_type, reason, n in conn.execute(q):
                out.setdefault(system, {}).setdefault(record_type, {})[reason] = int(n)
        return out

    # -- one run per system at a time ------------------------------------------------------
    def acquire_system(
        self, system: str, run_id: str, *, wait_seconds: float = 6 * 3600, poll_seconds: float = 5.0,
        stale_after: timedelta = timedelta(hours=12), on_wait=None,
        is_running: Callable[[str | None, str], bool | None] | None = None,
    ) -> None:
        """Take the system for this run, waiting while another running run holds it.

        Re-entrant for the same run (a retried task). The lock of another run is taken over at
        once when that run has ended in the ledger (its report released nothing because it was
        killed), or when ``is_running(dag_id, run_id)`` (the orchestrator's answer: Airflow's
        DagRun state) says it is no longer running. When ``is_running`` cannot tell (``None``,
        or no callback), a lock older than ``stale_after`` is taken over; while it says the run
        is running, the lock is waited for, however old. Every takeover is logged: which run
        held the lock, since when, and why it was taken.
        """
        deadline = time.monotonic() + wait_seconds
        while True:
            holder = None
            try:
                with self.engine.begin() as conn:
                    row = conn.execute(sa.select(system_lock).where(system_lock.c.system == system)).mappings().first()
                    if row is None:
                        conn.execute(system_lock.insert().values(system=system, run_id=run_id, acquired_at=utcnow()))
                        return
                    if row["run_id"] == run_id:
                        return
                    held = conn.execute(
                        sa.select(erasure_run.c.state, erasure_run.c.dag_id).where(erasure_run.c.run_id == row["run_id"])
                    ).first()
                holder = row["run_id"]
                acquired = row["acquired_at"] if row["acquired_at"].tzinfo else row["acquired_at"].replace(tzinfo=UTC)
                # Asked outside the transaction: the answer may take a request to Airflow.
                why = _takeover_reason(held, holder, acquired, stale_after, is_running)
                if why:
                    with self.engine.begin() as conn:
                        taken = conn.execute(
                            system_lock.update()
                            .where(system_lock.c.system == system, system_lock.c.run_id == holder)
                            .values(run_id=run_id, acquired_at=utcnow())
                        ).rowcount
                    if taken:
                        log.warning(
                            "%s: lock of run %s (held since %s) taken over by run %s: %s",
                            system, holder, f"{acquired:%Y-%m-%d %H:%M:%S} UTC", run_id, why,
                        )
                        return
            except sa.exc.IntegrityError:
                pass  # another run inserted first: look again
            if time.monotonic() > deadline:
                raise LockTimeout(f"{system} is still held by run {holder} after {wait_seconds:.0f}s")
            if on_wait and holder:
                on_wait(holder)
            time.sleep(poll_seconds)

    def release_system(self, system: str, run_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(system_lock.delete().where(system_lock.c.system == system, system_lock.c.run_id == run_id))

    def release_run(self, run_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(system_lock.delete().where(system_lock.c.run_id == run_id))

    # -- the pseudonym key ----------------------------------------------------------------
    def check_key(self, fingerprint: str) -> None:
        """Refuse a pseudonym key other than the one this ledger was written under.

        ``fingerprint`` is ``config.key_fingerprint`` of the configured key. The first use
        records it; every later one must bring the same, else :class:`KeyChanged` (a
        ``ConfigError``: one line, the two fingerprints, what to do; never the key).
        """
        recorded = self._key_fingerprint()
        if recorded is None:
            try:
                with self.engine.begin() as conn:
                    conn.execute(pseudonym_key.insert().values(id=1, fingerprint=fingerprint, recorded_at=utcnow()))
                return
            except sa.exc.IntegrityError:  # recorded at the same moment by another task
                recorded = self._key_fingerprint()
        if recorded is not None and recorded[0] != fingerprint:
            since = recorded[1] if recorded[1].tzinfo else recorded[1].replace(tzinfo=UTC)
            raise KeyChanged(
                f"the pseudonym key has changed: this ledger's pseudonyms were made with the key of fingerprint "
                f"{recorded[0]} (in use since {since:%Y-%m-%d}), the configured key has fingerprint {fingerprint}; "
                "under another key no manual hold and no erased record is recognised, so nothing runs: configure "
                "the ledger's key again (RETENTION_PSEUDONYM_KEY, RETENTION_PSEUDONYM_KEY_FILE or the Airflow "
                "Variable retention_pseudonym_key, e.g. restore the key file from its backup)"
            )

    def _key_fingerprint(self) -> tuple[str, datetime] | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(pseudonym_key.c.fingerprint, pseudonym_key.c.recorded_at).where(pseudonym_key.c.id == 1)).first()
        return (row[0], row[1]) if row else None

    # -- approvals of plans over the guard --------------------------------------------------
    def record_approval(
        self, *, dag_id: str, run_id: str, system: str, plan_hash: str, policy_version: str, decision: str,
        decided_by: str | None, decided_at: datetime, planned: int, allowed: int, extracted: int,
    ) -> None:
        """Record a decision on a plan over the guard (one row per decision)."""
        with self.engine.begin() as conn:
            conn.execute(
                plan_approval.insert().values(
                    dag_id=dag_id, run_id=run_id, system=system, plan_hash=plan_hash, policy_version=policy_version,
                    decision=str(decision), decided_by=decided_by, decided_at=decided_at, planned=planned,
                    allowed=allowed, extracted=extracted, recorded_at=utcnow(),
                )
            )

    def approvals(
        self, *, system: str | None = None, plan_hash: str | None = None, policy_version: str | None = None,
        run_id: str | None = None,
    ) -> list[dict]:
        """Decisions on plans over the guard, oldest first, optionally for one system, plan
        hash, policy version or run."""
        t = plan_approval
        q = sa.select(t).order_by(t.c.decided_at, t.c.id)
        for column, value in ((t.c.system, system), (t.c.plan_hash, plan_hash), (t.c.policy_version, policy_version), (t.c.run_id, run_id)):
            if value is not None:
                q = q.where(column == value)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q).mappings()]

    # -- manual holds -------------------------------------------------------------------
    def add_hold(self, record_type: str, record_key: str, reason: str, expires_at: datetime | None) -> None:
        """Put a record (by pseudonym) on the manual hold list. Raises :class:`HoldError` for an
        empty reason or one over 200 characters; the reason is stored trimmed."""
        reason = (reason or "").strip()
        if not reason:
            raise HoldError("a reason is required to add a hold")
        if len(reason) > 200:
            raise HoldError(f"the reason is {len(reason)} characters long; at most 200")
        with self.engine.begin() as conn:
            conn.execute(
                legal_hold.insert().values(
                    record_type=record_type, record_key=record_key, reason=reason, expires_at=expires_at, created_at=utcnow()
                )
            )

    def holds(self, include_lifted: bool = False) -> list[dict]:
        """The manual holds in force (not lifted; expiry is the caller's to judge), each with its
        ``id``, record_type, record_key, reason, expires_at and created_at. With
        ``include_lifted``, lifted holds too, and every hold has ``lifted_at`` and
        ``lifted_reason`` (``None`` while in force)."""
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(_holds_query(include_lifted)).mappings()]

    def lift_hold(self, hold_id: int, reason: str) -> dict:
        """Lift a manual hold, recording when and why; the hold stops applying to later plans.

        Raises :class:`HoldError` for an empty reason (or one over 200 characters), a hold id
        that does not exist, or a hold lifted already. Returns the hold as ``holds(True)`` does.
        """
        reason = (reason or "").strip()
        if isinstance(hold_id, bool) or not isinstance(hold_id, int) or not 0 < hold_id < 2**31:
            raise HoldError(f"no manual hold with id {hold_id}")  # ids are positive 32-bit integers
        if not reason:
            raise HoldError("a reason is required to lift a hold")
        if len(reason) > 200:
            raise HoldError(f"the reason is {len(reason)} characters long; at most 200")
        try:
            with self.engine.begin() as conn:
                hold = conn.execute(_holds_query(True).where(legal_hold.c.id == hold_id)).mappings().first()
                if hold is None:
                    raise HoldError(f"no manual hold with id {hold_id}")
                if hold["lifted_at"] is not None:
                    raise HoldError(f"hold {hold_id} was lifted already, at {hold['lifted_at']:%Y-%m-%d %H:%M}: {hold['lifted_reason']}")
                lifted_at = utcnow()
                conn.execute(legal_hold_lift.insert().values(hold_id=hold_id, lifted_at=lifted_at, reason=reason))
        except sa.exc.IntegrityError:  # lifted at the same moment by someone else
            raise HoldError(f"hold {hold_id} was lifted already") from None
        return {**hold, "lifted_at": lifted_at, "lifted_reason": reason}


def _takeover_reason(
    held, holder: str, acquired: datetime, stale_after: timedelta, is_running: Callable[[str | None, str], bool | None] | None,
) -> str | None:
    """Why the lock of run ``holder`` may be taken over now, or ``None`` while it must be waited for.
    ``held``: the holder's (state, dag_id) in the ledger, ``None`` when it has no ledger run."""
    state, dag_id = held if held is not None else (None, None)
    if state != "running":
        return f"its run is {state} in the ledger" if state else "its run is not in the ledger"
    try:
        alive = is_running(dag_id, holder) if is_running is not None else None
    except Exception:  # noqa: BLE001 - an answer we cannot get is "cannot tell"
        log.warning("whether run %s still runs could not be asked", holder, exc_info=True)
        alive = None
    if alive is False:
        return "its run is no longer running in Airflow"
    if alive is None and utcnow() - acquired > stale_after:
        return f"held for longer than {stale_after} and whether its run still runs cannot be told"
    return None


def _holds_query(include_lifted: bool) -> sa.Select:
    if not include_lifted:
        lifted = sa.exists().where(legal_hold_lift.c.hold_id == legal_hold.c.id)
        return sa.select(legal_hold).where(~lifted).order_by(legal_hold.c.id)
    return (
        sa.select(legal_hold, legal_hold_lift.c.lifted_at, legal_hold_lift.c.reason.label("lifted_reason"))
        .select_from(legal_hold.outerjoin(legal_hold_lift, legal_hold_lift.c.hold_id == legal_hold.c.id))
        .order_by(legal_hold.c.id)
    )


def read_holds(engine: sa.Engine) -> list[dict]:
    """The manual holds in force, read only: for readers that must not create or migrate the
    ledger (policy preview). A ledger without holds yet gives ``[]``; one from before lifts
    existed (revision 0003) gives every hold."""
    inspector = sa.inspect(engine)
    if not inspector.has_table(legal_hold.name):
        return []
    query = _holds_query(False) if inspector.has_table(legal_hold_lift.name) else sa.select(legal_hold).order_by(legal_hold.c.id)
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(query).mappings()]
