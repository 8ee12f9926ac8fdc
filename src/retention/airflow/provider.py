"""The project as an Airflow provider: its connection types, so their forms appear in the UI.

Registered through the ``apache_airflow_provider`` entry point in ``pyproject.toml``; Airflow's
providers manager calls :func:`get_provider_info` in every process that discovers providers, so
it reads the forms as data (``retention.systems.forms``) and imports no hook. The connection
types carry the project's own names: ``zendesk`` belongs to the official Zendesk provider, which
means something else by it.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec

from retention.systems.forms import connection_types

PACKAGE = "iis-retention"


def get_provider_info() -> dict:
    try:
        versions = [version(PACKAGE)]
    except PackageNotFoundError:  # imported from a checkout that was never installed
        versions = []
    return {
        "package-name": PACKAGE,
        "name": "IIS retention enforcement",
        "description": "Retention rules of the IIS privacy notice, enforced in a CRM, Mailchimp and Zendesk.",
        "versions": versions,
        "connection-types": connection_types(),
        # s3:// for ObjectStoragePath (the staging store): the Amazon provider's own when it is
        # installed, else the project's on plain s3fs (retention.store.s3).
        "filesystems": [] if _has_amazon_provider() else ["retention.store.s3"],
    }


def _has_amazon_provider() -> bool:
    try:
        return find_spec("airflow.providers.amazon") is not None
    except ModuleNotFoundError:  # airflow.providers itself missing
        return False
