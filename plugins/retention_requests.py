"""Airflow plugin: the erasure request form, served by the api-server.

``/retention-requests/`` (an HTML form, "Erasure request" in the UI's menu) and
``/retention-requests/api/requests`` (JSON) file an erasure request without leaving the address in
Airflow: it is kept encrypted in the request inbox and ``erasure_request`` is triggered with the
request id only. The app lives in the package (``retention.airflow.requests_app``); this file only
registers it. Needs ``RETENTION_REQUEST_KEY`` (or ``_FILE``) in the api-server's and the workers'
environment.
"""

from __future__ import annotations

from airflow.plugins_manager import AirflowPlugin

from retention.airflow.requests_app import URL_PREFIX, app


class RetentionRequestsPlugin(AirflowPlugin):
    name = "retention_requests"
    fastapi_apps = [{"app": app, "url_prefix": URL_PREFIX, "name": "Erasure requests"}]
    external_views = [
        {"name": "Erasure request", "href": f"{URL_PREFIX}/", "destination": "nav", "category": "browse", "url_route": "erasure-request"},
    ]
