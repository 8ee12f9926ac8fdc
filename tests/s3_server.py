"""An S3-compatible server for the tests: moto's, on 127.0.0.1 and a free port, in a thread of
the test process (it stops with the test; no process is left behind)."""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

from moto.server import ThreadedMotoServer

from airflow_services import free_port

# moto accepts any key; these only have to be the same on both sides.
KEY, SECRET, REGION = "test-staging-key", "test-staging-secret", "eu-central-1"


@dataclass(frozen=True)
class S3Store:
    endpoint: str
    bucket: str

    def connection(self) -> str:
        """An ``aws`` Airflow Connection (JSON, for ``AIRFLOW_CONN_<ID>``) reaching the server."""
        return json.dumps({"conn_type": "aws", "login": KEY, "password": SECRET,
                           "extra": {"endpoint_url": self.endpoint, "region_name": REGION}})

    def fs(self):
        """An s3fs filesystem on the server, for the tests to look at what was staged."""
        from s3fs import S3FileSystem

        return S3FileSystem(key=KEY, secret=SECRET, endpoint_url=self.endpoint, use_listings_cache=False,
                            client_kwargs={"region_name": REGION})

    def keys(self, prefix: str = "") -> list[str]:
        return sorted(self.fs().find(f"{self.bucket}/{prefix}".rstrip("/")))


@contextlib.contextmanager
def s3_server() -> Iterator[S3Store]:
    port = free_port()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        store = S3Store(f"http://127.0.0.1:{port}", f"staging-{secrets.token_hex(4)}")
        store.fs().mkdir(store.bucket, region_name=REGION)
        yield store
    finally:
        server.stop()
