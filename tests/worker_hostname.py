"""The host name a Celery worker of tests/test_celery_workers.py reports for its task instances
(Airflow's ``[core] hostname_callable``): two workers on one machine, told apart as two machines'."""

from __future__ import annotations

import os


def hostname() -> str:
    return os.environ["RETENTION_TEST_WORKER_HOSTNAME"]
