"""A real nightly run (``dag.test``) reads only the CRM's candidates and erases what a whole read
would have: the plan in the ledger is the plan made from every row, held and quarantined rows
included, and the extract read a small part of the tables while the plan guard still weighed
the plan against all of them.
"""

from __future__ import annotations

import ast
import datetime as dt
import json
import sys
from pathlib import Path

import pandas as pd
import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_crm_pipeline import Crm, generate, ledger_rows, pg_url, reset_pg  # noqa: E402

from retention.domain.conform import conform  # noqa: E402
from retention.domain.planning import plan_system  # noqa: E402
from retention.domain.policy import load_policy  # noqa: E402
from retention.runs.context import pseudonymizer  # noqa: E402
from retention.systems.crm.adapter import CrmAdapter  # noqa: E402
from retention.systems.crm.client import CrmConnector  # noqa: E402

POLICY = load_policy(Path(__file__).resolve().parents[1] / "include" / "policies" / "retention.yaml")


def whole_read(url: str, now: dt.datetime) -> tuple[dict[str, pd.DataFrame], dict[str, int]]:
    adapter = CrmAdapter(CrmConnector(sa.create_engine(url)))
    parts: dict[str, list[pd.DataFrame]] = {}
    try:
        adapter.extract(lambda rt, f: parts.setdefault(rt, []).append(conform(rt, f)), now)
    finally:
        adapter.close()
    frames = {rt: pd.concat(fs, ignore_index=True) for rt, fs in parts.items()}
    return frames, {rt: len(f) for rt, f in frames.items()}


def _summary(dagrun, looks_like, what: str) -> dict:
    from airflow_run import xcom_values

    for value in xcom_values(dagrun):
        for parse in (json.loads, ast.literal_eval):
            try:
                data = parse(value)
            except (ValueError, SyntaxError):
                continue
            if isinstance(data, dict) and looks_like(data):
                return data
    raise AssertionError(f"no {what} summary among the run's XComs")


def extract_summary(dagrun) -> dict:
    return _summary(dagrun, lambda d: "read" in d and "extracted" in d, "extract")


def index_summary(dagrun) -> dict:
    return _summary(dagrun, lambda d: set(d) == {"mode", "index"}, "index")


def test_nightly_run_reads_the_candidates_and_erases_what_a_whole_read_would(retention_home, monkeypatch, request):
    from airflow_run import run_dag, task_states

    url = pg_url(request)
    engine = sa.create_engine(url)
    reset_pg(engine)
    try:
        crm = Crm("postgresql", url, engine)
        generate(crm, contacts=1500, malformed=True)
        with engine.begin() as conn:  # a hold in force on some due contacts: held, not erased
            conn.exec_driver_sql(
                "INSERT INTO legal_hold (record_type, record_id, reason, expires_at) "
                "SELECT 'crm_contact', id, 'audit', NULL FROM contact WHERE kind = 'lead' ORDER BY id LIMIT 5"
            )
        before = dt.datetime.now(dt.UTC)
        frames, sizes = whole_read(url, before)
        monkeypatch.setenv("AIRFLOW_CONN_RETENTION_CRM", json.dumps({"conn_type": "retention_crm", "extra": {"sqlalchemy_url": url}}))
        dr = run_dag({"systems": ["crm"]})
        states = task_states(dr)
        assert dr.state == "success", states
        for step in ("extract", "index", "plan", "validate", "erase", "verify"):
            assert states[f"crm.{step}"] == "success", states
        # The CRM keeps no record index: its index step had nothing to do.
        assert index_summary(dr) == {"mode": "candidates", "index": "nothing to do"}

        # The extract read far fewer rows than the tables hold, and counted all of them.
        summary = extract_summary(dr)
        assert summary["extracted"] == sizes
        read = summary["read"]
        assert summary["mode"] == "candidates"
        assert sum(read.values()) < 0.5 * sum(sizes.values()), (read, sizes)
        assert read["crm_event_participation"] < sizes["crm_event_participation"]
        assert read["crm_contact"] < sizes["crm_contact"]

        # The run's plan, as the ledger keeps it, is the whole read's plan as of the run's time.
        ledger = sa.create_engine(f"sqlite:///{retention_home / 'ledger.db'}")
        with ledger.connect() as conn:
            as_of = conn.execute(sa.text("SELECT as_of FROM erasure_run WHERE run_id = :r"), {"r": dr.run_id}).scalar_one()
        ledger.dispose()
        as_of = pd.Timestamp(as_of).tz_localize("UTC") if pd.Timestamp(as_of).tzinfo is None else pd.Timestamp(as_of)
        expected = plan_system(
            "crm", frames, POLICY, as_of, now=before, pseudonymizer=pseudonymizer()
        )
        want = {
            (r.record_type, r.record_key, r.rule_id, r.action) for r in expected.plan.itertuples()
        }
        rows = ledger_rows(retention_home, dr.run_id)
        got = {(r["record_type"], r["record_key"], r["rule_id"], r["action"]) for r in rows}
        assert got == want
        assert any(r["status"] == "held" for r in rows) and any(r["status"] == "erased" for r in rows)
        report = json.loads((retention_home / "reports" / "latest.json").read_text())
        assert report["systems"]["crm"]["extracted"] == sizes
        assert report["systems"]["crm"]["quarantined"] == expected.quarantine_counts
    finally:
        engine.dispose()
        reset_pg(engine)
        engine.dispose()
