"""The run reports in Airflow's UI: a FastAPI app the api-server serves (``plugins/retention_reports.py``).

``/retention/reports/``: the runs of every retention DAG with their counts, and a chart of the
erasures per rule and the due backlog over the last runs; ``runs/<dag>/<run>``: one run's
report; ``data_docs/<path>``: the Great Expectations Data Docs under ``RETENTION_HOME/data_docs``,
read-only. Every page needs Airflow's own authentication (the api-server's JWT, from the
``_token`` cookie the UI's login sets or an ``Authorization: Bearer`` header), checked by
Airflow's FastAPI security dependency ``get_user``; a run is shown only to a user the auth
manager lets read that DAG's runs. Without a login: 401 and a link to the login page.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

from airflow.api_fastapi.core_api.security import get_user
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, Response

from retention import config
from retention.airflow import report_html
from retention.airflow.run_reports import all_runs, find_run, note_for

log = logging.getLogger("retention")

URL_PREFIX = "/retention/reports"
HISTORY_DAG = "retention_nightly"
# The pages load nothing but themselves: no script at all, styles inline, images inline SVG.
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'self'; base-uri 'none'; form-action 'none'"


User = Annotated[object, Depends(get_user)]


def dag_filter(user: User) -> Callable[[str], bool]:
    """Which DAGs' runs ``user`` may read, as Airflow's auth manager decides."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails

    manager = get_auth_manager()

    def readable(dag_id: str) -> bool:
        return manager.is_authorized_dag(method="GET", access_entity=DagAccessEntity.RUN, details=DagDetails(id=dag_id), user=user)

    return readable


Readable = Annotated[Callable[[str], bool], Depends(dag_filter)]


def _base(request: Request) -> str:
    return request.scope.get("root_path", "").rstrip("/") + "/"


def _html(text: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(text, status_code=status, headers={"Content-Security-Policy": CSP, "Cache-Control": "no-store"})


def create_app() -> FastAPI:
    app = FastAPI(title="Retention run reports", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(HTTPException)
    async def refused(request: Request, exc: HTTPException) -> Response:
        if exc.status_code in (401, 403):
            login = _login_url(request)
            text = "Log in to Airflow to see the retention reports." if exc.status_code == 401 else "Your Airflow user may not read these runs."
            return _html(report_html.message_page("Not logged in" if exc.status_code == 401 else "Not allowed", text, (login, "Log in")), exc.status_code)
        return _html(report_html.message_page("Not found" if exc.status_code == 404 else "Error", str(exc.detail)), exc.status_code)

    @app.get("/", response_class=HTMLResponse)
    def runs_list(request: Request, readable: Readable, dag_id: str | None = None, n: Annotated[int, Query(ge=1, le=200)] = 30) -> HTMLResponse:
        runs = [r for r in all_runs() if readable(r.dag_id)]
        dags = sorted({r.dag_id for r in runs})
        shown = [r for r in runs if dag_id is None or r.dag_id == dag_id]
        history_dag = dag_id or (HISTORY_DAG if HISTORY_DAG in dags else (dags[0] if dags else HISTORY_DAG))
        history = [r for r in runs if r.dag_id == history_dag][:n][::-1]
        return _html(report_html.list_page(_base(request), shown, history, dag_id, dags, n))

    @app.get("/runs/{dag_id}/{run_id:path}", response_class=HTMLResponse)
    def run_report(request: Request, dag_id: str, run_id: str, readable: Readable, n: Annotated[int, Query(ge=1, le=200)] = 30) -> HTMLResponse:
        if not readable(dag_id):
            raise HTTPException(403, "not allowed")
        report = find_run(dag_id, run_id)
        if report is None:
            raise HTTPException(404, f"No report for run {run_id} of {dag_id}: a run writes its report when it ends.")
        runs = all_runs(dag_id)
        older = [r for r in runs if r.written <= report.written]
        return _html(report_html.run_page(_base(request), report, older[:n][::-1], note_for(report)))

    @app.get("/data_docs/{path:path}")
    def data_docs(path: str, _user: User) -> FileResponse:
        target = data_docs_file(path)
        if target is None:
            raise HTTPException(404, "No such Data Docs page.")
        return FileResponse(target)

    return app


def data_docs_file(path: str) -> Path | None:
    """The file ``path`` names under ``RETENTION_HOME/data_docs``, or None: nothing outside it
    (``..``, an absolute path, a symbolic link out) and nothing that is not a file."""
    root = (config.retention_home() / "data_docs").resolve()
    try:
        target = (root / path).resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    if not target.is_relative_to(root) or not target.is_file():
        return None
    return target


def _login_url(request: Request) -> str:
    try:
        from airflow.api_fastapi.app import get_auth_manager

        return get_auth_manager().get_url_login(next_url=str(request.url))
    except Exception:  # noqa: BLE001 - no auth manager (a test client): the UI's root logs in
        return "/"
