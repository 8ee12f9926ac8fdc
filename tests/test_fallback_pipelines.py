"""Fallback clocks through the nightly pipeline's own steps (issue 10, item 6): a merged ticket
closed without ``solved_at`` (the Zendesk stand-in, real HTTP) and a lead without any recorded
interaction (a SQL CRM) are erased once their fallback period is over, instead of staying in
quarantine for ever (an invoice without its financial-year end stays: tests/test_fallback_clocks.py)."""

from __future__ import annotations

import datetime as dt
import json
import os
from datetime import UTC, datetime

import numpy as np
import pytest
import requests
import sqlalchemy as sa

from retention.domain.pseudonyms import Pseudonymizer
from retention.runs import nightly as pipeline
from retention.runs.context import open_ledger

DAY = 86_400


def _steps(run_id: str, system: str, adapter) -> tuple[pipeline.RunInfo, dict, dict]:
    """open_run … report, in process, as of now; returns (run, plan summary, report)."""
    run = pipeline.RunInfo.from_dict(pipeline.open_run("retention_nightly", run_id, None, dry_run=False, max_plan_share=1.0))
    pipeline.extract(run, system, adapter)
    summary = pipeline.plan(run, system)
    pipeline.validate(run, system)
    pipeline.erase(run, system, adapter)
    pipeline.verify(run, system, adapter)
    rep = pipeline.report(run, (system,))
    return run, summary, rep


# --- ticketing ---------------------------------------------------------------------------------


@pytest.fixture
def zendesk(tmp_path, retention_home):
    from retention_dev.standins import zendesk as zs
    from retention_dev.standins import zendesk_data as zd
    from retention_dev.standins.process import StandIn

    now = datetime.now(UTC).replace(microsecond=0)
    now_s = int(now.timestamp())
    state = zs.State.generate(60, 3, 0.2, now, job_seconds=0.05)
    rows = np.arange(6, 60)  # 0..5: the generator's edge cases
    closed = rows[state.t_status[rows] == zd.STATUS_CODE["closed"]]
    # Two merged tickets: closed, never solved. One last updated two years ago, one a month ago.
    merged_old, merged_new = int(closed[0]), int(closed[1])
    for row, updated in ((merged_old, now_s - 730 * DAY), (merged_new, now_s - 30 * DAY)):
        state.t_solved[row] = zd.NO_TIME
        state.t_created[row] = updated - 5 * DAY
        state.t_updated[row] = updated
    path = tmp_path / "zendesk.npz"
    state.save(path)
    limits = ("--requests-per-minute", "1000000", "--incremental-per-minute", "100000",
              "--deleted-list-per-minute", "100000", "--user-deletes-per-10min", "1000000", "--job-seconds", "0.05")
    standin = StandIn("zendesk", "--port", "0", "--state-file", str(path), *limits).start()
    standin.merged = {"old": merged_old + 1, "new": merged_new + 1}  # ticket ids are rows + 1
    yield standin
    standin.stop()


AUTH = ("agent@example.org/token", "token")


def _ticket_ids(base_url: str) -> dict[int, str]:
    out, params = {}, {"start_time": 0}
    while True:
        body = requests.get(f"{base_url}/api/v2/incremental/tickets/cursor.json", params=params, auth=AUTH, timeout=30).json()
        out.update({t["id"]: t["status"] for t in body["tickets"]})
        if body["end_of_stream"]:
            return out
        params = {"cursor": body["after_cursor"]}


def test_a_merged_ticket_without_solved_at_is_erased_a_year_after_its_last_update(zendesk):
    from retention.systems.ticketing.adapter import TicketingAdapter
    from retention.systems.ticketing.client import ZendeskClient

    before = _ticket_ids(zendesk.base_url)
    assert before[zendesk.merged["old"]] == "closed" and before[zendesk.merged["new"]] == "closed"
    adapter = TicketingAdapter(ZendeskClient(
        base_url=zendesk.base_url, email="agent@example.org", api_token="token", requests_per_minute=1_000_000,
        incremental_per_minute=100_000, deleted_list_per_minute=100_000, user_deletes_per_10min=1_000_000,
        job_poll_interval=0.05,
    ))
    try:
        run, summary, rep = _steps("merged", "ticketing", adapter)
    finally:
        adapter.close()
    pseudo = Pseudonymizer(os.environ["RETENTION_PSEUDONYM_KEY"].encode())
    statuses = open_ledger().statuses(run.run_id, "ticketing")
    assert statuses[("support_ticket", pseudo.key_for("support_ticket", str(zendesk.merged["old"])))] == "erased", (
        "a merged ticket closed two years ago stayed for ever"
    )
    assert ("support_ticket", pseudo.key_for("support_ticket", str(zendesk.merged["new"]))) not in statuses
    assert requests.get(f"{zendesk.base_url}/api/v2/tickets/{zendesk.merged['old']}.json", auth=AUTH, timeout=30).status_code == 404
    assert _ticket_ids(zendesk.base_url)[zendesk.merged["new"]] == "closed", "the fallback year runs from the last update"
    assert summary["fallback_clock"] == {"support-ticket": 1}
    assert not summary["quarantined"], "a merged ticket sat in quarantine"
    assert rep["state"] == "success" and rep["alarm"] is None


# --- the CRM -----------------------------------------------------------------------------------


@pytest.fixture
def crm(tmp_path, monkeypatch, retention_home):
    from retention.systems.crm import schema

    engine = sa.create_engine(f"sqlite:///{tmp_path / 'crm.db'}")
    schema.create_schema(engine)
    now = datetime.now(UTC)
    base = {"first_name": "Ada", "last_name": "Example", "email": "ada@example.org", "opted_out": False, "organisation_id": None,
            "kind": "lead"}
    with engine.begin() as c:
        c.execute(
            schema.contact.insert(),
            [
                {**base, "id": 1, "created_at": now - dt.timedelta(days=800), "last_interaction_at": None},  # due by created_at
                {**base, "id": 2, "created_at": now - dt.timedelta(days=100), "last_interaction_at": None},  # not yet
                {**base, "id": 3, "created_at": now - dt.timedelta(days=800), "last_interaction_at": now - dt.timedelta(days=10)},
            ],
        )
    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_CRM", json.dumps({"conn_type": "retention_crm", "extra": {"sqlalchemy_url": str(engine.url)}}))
    return engine


def test_a_lead_without_any_interaction_is_erased_a_year_after_it_was_created(crm):
    from retention.systems.crm import schema
    from retention.systems.crm.adapter import CrmAdapter
    from retention.systems.crm.client import CrmConnector

    _, summary, rep = _steps("lead", "crm", CrmAdapter(CrmConnector(crm)))
    with crm.connect() as c:
        left = {r[0] for r in c.execute(sa.select(schema.contact.c.id))}
    assert left == {2, 3}, "a lead without any interaction stayed for ever"
    assert summary["fallback_clock"] == {"lead": 1}
    assert not summary["quarantined"], "a lead without interactions sat in quarantine"
    assert rep["state"] == "success" and rep["alarm"] is None
