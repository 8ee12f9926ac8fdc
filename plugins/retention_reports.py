"""The run reports in Airflow's UI, and the DAG runs' notes (issue 11, item 1).

A FastAPI app served by the api-server under ``/retention/reports`` (Airflow's authentication
required: ``retention.airflow.report_view``), reachable from the UI's Browse menu and from each
DAG run's tab "Retention report"; and a listener that writes each retention DAG run's note
("DRY RUN ..." or "erased N, held M, ...") when the run ends (``retention.airflow.run_notes``).
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from retention.airflow import run_notes
from retention.airflow.report_view import URL_PREFIX, create_app

_HREF = URL_PREFIX.lstrip("/")  # relative to the UI's base URL


class RetentionReportsPlugin(AirflowPlugin):
    name = "retention_reports"
    fastapi_apps = [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "Retention run reports"}]
    external_views = [
        {"name": "Retention reports", "href": f"{_HREF}/", "destination": "nav", "category": "browse", "url_route": "retention-reports"},
        {"name": "Retention report", "href": f"{_HREF}/runs/{{DAG_ID}}/{{RUN_ID}}", "destination": "dag_run", "url_route": "retention-run-report"},
    ]
    listeners = [run_notes]
