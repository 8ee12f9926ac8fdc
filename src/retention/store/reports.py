"""The one report writer: every run (nightly, erasure request, replay) ends here.

A report holds counts, pseudonyms and the run's facts (as-of time, policy version, dry run,
state), never names, addresses or record ids. Writing it means: ``<stem>.json`` and
``<stem>.txt`` under ``RETENTION_HOME/reports`` (and ``latest.json`` for the nightly run), each
line of the text in the task log, the run closed in the ledger with its report, the run's
system locks released whatever failed on the way, and the staging area removed when the run
succeeded (``RETENTION_KEEP_STAGING`` keeps it).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

from retention import config
from retention.store.ledger import Ledger
from retention.store.staging import RunStaging

log = logging.getLogger("retention")


def report_stem(dag_id: str, run_id: str) -> str:
    return f"{dag_id}__{run_id}".replace(":", "_").replace("+", "_")


def ledger_counts(ledger: Ledger, run_id: str, by: str = "rule_id") -> dict[str, dict[str, dict[str, int]]]:
    """``{system: {rule or record type: {status: n}}}`` of the run's ledger entries."""
    return ledger.status_counts(run_id, by)


def write_report(
    ledger: Ledger, staging: RunStaging, report: dict, text: str, *, latest: bool = False
) -> Path:
    """Write, log and record the run's report (``report`` has run_id, dag_id and state)."""
    out = config.reports_dir()
    stem = report_stem(report["dag_id"], report["run_id"])
    body = json.dumps(report, indent=2, default=str)
    path = out / f"{stem}.json"
    path.write_text(body)
    (out / f"{stem}.txt").write_text(text)
    if latest:
        (out / "latest.json").write_text(body)
    for line in text.splitlines():
        log.info("%s", line)
    ledger.close_run(report["run_id"], report["state"], report)
    ledger.release_run(report["run_id"])  # whatever failed on the way, the systems are free again
    if report["state"] == "success" and not os.environ.get("RETENTION_KEEP_STAGING"):
        staging.remove()
    return path


def status_line(label: str, statuses: dict[str, int], width: int = 26) -> str:
    """``    label                      erased 3, held 1``."""
    return f"    {label:<{width}} " + ", ".join(f"{k} {v}" for k, v in sorted(statuses.items()))


def total(counts: Iterable[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in counts:
        for k, v in c.items():
            out[k] = out.get(k, 0) + int(v)
    return dict(sorted(out.items()))
