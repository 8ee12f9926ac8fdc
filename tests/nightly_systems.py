"""The three systems a nightly run reaches, as stand-ins on 127.0.0.1: the Mailchimp and
Zendesk stand-in servers and a CRM in SQLite, generated from a seed and a "now", and the Airflow
Connections (``AIRFLOW_CONN_*``) that reach them. The same seed and now give the same systems,
so two deployments (a LocalExecutor one and a Celery one) can be compared on the same data."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import sqlalchemy as sa

from retention.systems.crm import schema as crm_schema
from retention_dev.standins.process import StandIn
from retention_dev.synthetic.crm import generate as generate_crm


@contextlib.contextmanager
def standin_systems(directory: Path, now: str, seed: int = 5) -> Iterator[dict]:
    """Yields ``{"mailchimp", "zendesk", "crm" (an engine), "connections" (env name -> JSON)}``;
    the stand-ins stop when the block ends."""
    directory.mkdir(parents=True, exist_ok=True)
    mailchimp = StandIn("mailchimp", "--port", "0", "--members", "600", "--seed", str(seed), "--now", now, "--state-file", str(directory / "mc.state")).start()
    try:
        zendesk = StandIn(
            "zendesk", "--port", "0", "--tickets", "400", "--seed", str(seed), "--now", now, "--job-seconds", "0.1",
            "--incremental-per-minute", "600", "--user-deletes-per-10min", "7000", "--state-file", str(directory / "zd.state"),
        ).start()
    except BaseException:
        mailchimp.stop()
        raise
    crm_url = f"sqlite:///{directory / 'crm.db'}"
    engine = sa.create_engine(crm_url)
    try:
        crm_schema.create_schema(engine)
        generate_crm(engine, contacts=300, seed=seed, now=datetime.fromisoformat(now))
        conns = {
            "AIRFLOW_CONN_RETENTION_MAILCHIMP": {"conn_type": "retention_mailchimp", "host": f"{mailchimp.base_url}/3.0", "password": "standin-key-us0", "extra": {"list_id": "demo-list"}},
            "AIRFLOW_CONN_RETENTION_ZENDESK": {
                "conn_type": "retention_zendesk", "host": zendesk.base_url, "login": "agent@example.org", "password": "t",
                "extra": {"incremental_per_minute": 600, "user_deletes_per_10min": 7000, "job_poll_interval": 0.1},
            },
            "AIRFLOW_CONN_RETENTION_CRM": {"conn_type": "retention_crm", "extra": {"sqlalchemy_url": crm_url}},
        }
        yield {"mailchimp": mailchimp, "zendesk": zendesk, "crm": engine, "connections": {k: json.dumps(v) for k, v in conns.items()}}
    finally:
        mailchimp.stop()
        zendesk.stop()
        engine.dispose()
