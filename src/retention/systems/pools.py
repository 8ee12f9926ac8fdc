"""The providers' limits shared by every DAG: one Airflow pool per provider.

A provider's limit is per account, not per task: two DAG runs at once (the nightly run beside an
erasure request, a preview beside a replay) must share it. Each task that talks to a provider
runs in the provider's pool and takes some of its slots; the scheduler never runs more tasks in
a pool than its slots allow, and the task's client uses only the share its slots stand for:

* ``retention_mailchimp``, 10 slots: **one slot is one simultaneous connection** (Mailchimp
  allows 10 per user). A task holding N slots opens at most N connections (the Connection's
  ``max_connections``, capped to N).
* ``retention_zendesk``, 10 slots: **one slot is a tenth of the account's request budget**. A
  task holding N slots paces itself to N/10 of each of the Connection's per-account limits
  (``requests_per_minute``, ``incremental_per_minute``, ``deleted_list_per_minute``,
  ``user_deletes_per_10min``, ``max_jobs_in_flight``).

A task reading or erasing a whole system takes :data:`BULK_SLOTS` (8), an erasure request's part
:data:`REQUEST_SLOTS` (2): two whole-system tasks never run at once, and a request always fits
beside one. Outside Airflow (the ``retention`` command) no pool is held and the Connection's
limits apply as configured. Light on purpose: the DAG files' glue reads it at parse time.
"""

from __future__ import annotations

from dataclasses import dataclass

from retention.systems.forms import MAILCHIMP_MAX_CONNECTIONS


@dataclass(frozen=True)
class ProviderPool:
    name: str
    slots: int
    description: str


MAILCHIMP_POOL = ProviderPool(
    "retention_mailchimp", MAILCHIMP_MAX_CONNECTIONS,
    "Mailchimp: one slot is one of the 10 simultaneous connections per user (retention DAGs)",
)
ZENDESK_POOL = ProviderPool(
    "retention_zendesk", 10, "Zendesk: one slot is a tenth of the account's request budget (retention DAGs)",
)
# system -> its provider's pool; a system not here (the CRM, our own database) needs none.
POOLS: dict[str, ProviderPool] = {"newsletter": MAILCHIMP_POOL, "ticketing": ZENDESK_POOL}

BULK_SLOTS = 8  # a task that reads or erases a whole system (extract, erase, verify, preview, replay)
REQUEST_SLOTS = 2  # one erasure request's part in a system (a look-up and a few erasures)


def held_slots(pool: ProviderPool) -> int | None:
    """The slots of ``pool`` the running Airflow task holds; None outside a task, or when the
    task runs in another pool (then nothing is shared through this pool)."""
    try:
        from airflow.sdk import get_current_context

        task = get_current_context().get("task")
    except (ImportError, RuntimeError):  # not inside an Airflow task: the retention command
        return None
    if task is None or getattr(task, "pool", None) != pool.name:
        return None
    return max(1, min(int(getattr(task, "pool_slots", 1) or 1), pool.slots))


__all__ = ["BULK_SLOTS", "MAILCHIMP_POOL", "POOLS", "REQUEST_SLOTS", "ZENDESK_POOL", "ProviderPool", "held_slots"]
