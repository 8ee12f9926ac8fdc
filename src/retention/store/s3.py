"""``s3://`` for Airflow's ``ObjectStoragePath`` without the Amazon provider.

Airflow resolves a URL's scheme to a filesystem that a provider registers (the ``filesystems``
of its provider info). The Amazon provider registers ``s3`` but brings some thirty packages
(Athena, Redshift, SageMaker...); staging needs only ``s3fs``. The project's provider info
(:mod:`retention.airflow.provider`) lists this module when the Amazon provider is not installed,
and steps aside when it is.

The Connection is read the way the Amazon provider reads an ``aws`` Connection: login and
password are the access key, the extra's ``endpoint_url`` (an S3-compatible store such as MinIO)
and ``region_name``. Without a Connection, s3fs and botocore read their own environment
(``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``).
"""

from __future__ import annotations

from typing import Any

from retention.config import SettingError, connection_extras, quiet_extra_parse_noise

schemes = ["s3", "s3a"]


def storage_options(conn_id: str | None) -> dict[str, Any]:
    """s3fs's options from the Airflow Connection ``conn_id`` (none: the environment's)."""
    if not conn_id:
        return {}
    from airflow.sdk import BaseHook

    quiet_extra_parse_noise()
    try:
        conn = BaseHook.get_connection(conn_id)
    except Exception:  # Airflow's message may quote the URI, password and all
        raise SettingError(f"connection {conn_id!r} (the staging store's): not defined or unreadable") from None
    extra = connection_extras(conn, conn_id)
    options: dict[str, Any] = {}
    if conn.login:
        options["key"] = conn.login
    if conn.password:
        options["secret"] = conn.password
    client: dict[str, Any] = {}
    if endpoint := extra.get("endpoint_url") or extra.get("host"):
        options["endpoint_url"] = endpoint
    if region := extra.get("region_name"):
        client["region_name"] = region
    if client:
        options["client_kwargs"] = client
    return options


def get_fs(conn_id: str | None, storage_options_: dict[str, Any] | None = None):
    """The filesystem Airflow's ``ObjectStoragePath`` uses for ``s3://`` URLs."""
    from s3fs import S3FileSystem

    # Listings are read fresh: another worker may have written since (staging is shared).
    return S3FileSystem(**{**storage_options(conn_id), **(storage_options_ or {})}, use_listings_cache=False)
