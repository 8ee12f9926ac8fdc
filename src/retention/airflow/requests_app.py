"""The request form: erasure requests filed without leaving the address in Airflow.

A FastAPI app the api-server serves under ``/retention-requests`` (registered by the plugin
plugins/retention_requests.py). It checks the address (``domain.addresses``: a malformed one is
refused in one line that does not repeat it), stores it encrypted in the request inbox
(``store.inbox``, the ledger database, key ``RETENTION_REQUEST_KEY``) and triggers
``erasure_request`` with ``{"request_id": ...}`` only, through Airflow's own ``trigger_dag`` (what
``airflow dags trigger`` uses), so the DAG run's conf and Airflow's audit log hold the request id,
never the address. Answers the request id and the DAG run id.

* ``GET /retention-requests/``: the HTML form; ``POST /retention-requests/``: the form's post.
* ``POST /retention-requests/api/requests``: JSON ``{"email": "...", "dry_run": false}`` -> 201
  ``{"request_id", "dag_run_id", "dag_id", "paused"}``.

Both need what Airflow's REST API needs to trigger ``erasure_request`` (its FastAPI security
dependency ``requires_access_dag("POST", RUN)``): a JWT as ``Authorization: Bearer`` (``POST
/auth/token``) or the UI's session cookie. The cookie is ``SameSite=Lax``, so another site's page
cannot post the form with it. The body is read here, never logged: the api-server's access log
names the path only.
"""

from __future__ import annotations

import html
import json
from typing import Any
from urllib.parse import parse_qs

from airflow.api_fastapi.auth.managers.models.base_user import BaseUser
from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_dag
from fastapi import Depends, FastAPI, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, StrictBool, StrictStr
from starlette.concurrency import run_in_threadpool

DAG_ID = "erasure_request"
URL_PREFIX = "/retention-requests"
AUDIT_EVENT = "retention_erasure_request"
_FIELDS = ("email", "dry_run")

app = FastAPI(
    title="Erasure requests",
    description="File an erasure request; the address is kept encrypted outside Airflow and triggers erasure_request by request id.",
)
# Whoever may trigger erasure_request through Airflow's REST API may file a request.
CanTrigger = Depends(requires_access_dag(method="POST", access_entity=DagAccessEntity.RUN, param_dag_id=DAG_ID))


class RequestBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    email: StrictStr
    dry_run: StrictBool = False


class Filed(BaseModel):
    request_id: str
    dag_id: str
    dag_run_id: str
    paused: bool
    note: str


@app.exception_handler(RequestValidationError)
async def _refused(request: Request, exc: RequestValidationError) -> JSONResponse:
    # FastAPI's own answer repeats the input (the address); this one names fields, never values
    # nor unknown keys (a key may be an address too).
    named = sorted({str(loc[1]) for e in exc.errors() if len(loc := e.get("loc", ())) > 1 and loc[1] in _FIELDS})
    unknown = any(e.get("type") == "extra_forbidden" for e in exc.errors())
    what = ", ".join(named + (["a key that is not email or dry_run"] if unknown else [])) or "the body"
    return JSONResponse(
        status_code=422,
        content={"detail": f'erasure request: expected a JSON object {{"email": "...", "dry_run": false}}; wrong: {what} (values are not repeated)'},
    )


def file_request(email: object, *, dry_run: bool, user: BaseUser, from_ui: bool) -> Filed:
    """Store the address encrypted, trigger the DAG with the request id, write Airflow's audit
    log entry (the id, not the address). Nothing is left in the inbox when the trigger fails."""
    from airflow.api.common.trigger_dag import trigger_dag
    from airflow.exceptions import DagNotFound, DagRunAlreadyExists
    from airflow.models.dag import DagModel
    from airflow.models.log import Log
    from airflow.utils.session import create_session
    from airflow.utils.types import DagRunTriggeredByType

    from retention.config import ConfigError
    from retention.domain.addresses import InvalidRequest
    from retention.store.inbox import RequestInbox

    try:
        box = RequestInbox.configured()
        request_id = box.file(email)
    except InvalidRequest as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from None
    except ConfigError as exc:  # no or a bad request key, the ledger unreachable: the operator's to fix
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, str(exc)) from None
    conf: dict[str, Any] = {"request_id": request_id, **({"dry_run": True} if dry_run else {})}
    try:
        with create_session() as session:
            run = trigger_dag(
                DAG_ID, conf=conf, session=session, triggering_user_name=user.get_name(),
                triggered_by=DagRunTriggeredByType.UI if from_ui else DagRunTriggeredByType.REST_API,
            )
            run_id = run.run_id
            session.add(Log(
                event=AUDIT_EVENT, owner=user.get_name(), owner_display_name=user.get_name(), dag_id=DAG_ID, run_id=run_id,
                extra=json.dumps({"request_id": request_id, "dry_run": dry_run}),
            ))
            paused = bool(session.get(DagModel, DAG_ID).is_paused)
    except (DagNotFound, DagRunAlreadyExists, ValueError) as exc:
        box.forget(request_id)
        why = f"{DAG_ID} is not known to Airflow yet" if isinstance(exc, DagNotFound) else f"Airflow refused the run ({type(exc).__name__})"
        raise HTTPException(status.HTTP_409_CONFLICT, f"erasure request not filed: {why}; nothing was kept") from None
    except BaseException:
        box.forget(request_id)
        raise
    note = (
        f"{DAG_ID} is paused: the run waits, queued, until it is unpaused" if paused
        else "the run is queued; the address is deleted from the inbox once the request is complete"
    )
    return Filed(request_id=request_id, dag_id=DAG_ID, dag_run_id=run_id, paused=paused, note=note)


@app.post("/api/requests", status_code=status.HTTP_201_CREATED, dependencies=[CanTrigger], response_model=Filed)
def post_request(body: RequestBody, user: GetUserDep) -> Filed:
    return file_request(body.email, dry_run=body.dry_run, user=user, from_ui=False)


# --------------------------------------------------------------------------------- the form
_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Erasure request</title>
<style>body{{font-family:system-ui,sans-serif;max-width:44rem;margin:2rem auto;padding:0 1rem;line-height:1.5}}
input[type=email]{{width:100%;padding:.4rem;font-size:1rem}} .ok{{background:#e8f5e9;padding:1rem}} .err{{background:#fdecea;padding:1rem}}
code{{background:#f4f4f4;padding:0 .2rem}}</style></head>
<body><h1>Erasure request</h1>
{result}
<p>The person who asked to be erased, by their e-mail address. It is checked, kept encrypted outside
Airflow (the request inbox in the ledger database) and deleted once the request is complete;
<code>erasure_request</code> is triggered with a request id only, so Airflow's metadata database never
holds the address.</p>
<form method="post" action="{action}" autocomplete="off">
<p><label for="email">E-mail address</label><br><input type="email" id="email" name="email" required maxlength="254"></p>
<p><label><input type="checkbox" name="dry_run" value="true"> Dry run: find and count, erase nothing
(the address stays in the inbox for the real run)</label></p>
<p><button type="submit">File the request</button></p>
</form></body></html>
"""


def _page(result: str = "", status_code: int = 200) -> HTMLResponse:
    return HTMLResponse(_PAGE.format(result=result, action=f"{URL_PREFIX}/"), status_code=status_code)


@app.get("/", response_class=HTMLResponse, dependencies=[CanTrigger])
def form() -> HTMLResponse:
    return _page()


@app.post("/", response_class=HTMLResponse, dependencies=[CanTrigger])
async def post_form(request: Request, user: GetUserDep) -> HTMLResponse:
    fields = parse_qs((await request.body()).decode("utf-8", "replace"), keep_blank_values=True)
    email = (fields.get("email") or [None])[0]
    dry_run = (fields.get("dry_run") or [""])[0] == "true"
    try:
        filed = await run_in_threadpool(file_request, email, dry_run=dry_run, user=user, from_ui=True)
    except HTTPException as exc:
        return _page(f'<p class="err">{html.escape(str(exc.detail))}</p>', exc.status_code)
    run_link = f"/dags/{DAG_ID}/runs/{filed.dag_run_id}"
    return _page(
        f'<div class="ok"><p>Filed: request id <code>{html.escape(filed.request_id)}</code>, DAG run '
        f'<a href="{html.escape(run_link)}" target="_top"><code>{html.escape(filed.dag_run_id)}</code></a>'
        f"{' (dry run)' if dry_run else ''}.</p><p>{html.escape(filed.note)}.</p></div>",
        status.HTTP_201_CREATED,
    )
