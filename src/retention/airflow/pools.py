"""The providers' Airflow pools (``retention.systems.pools``): which slots a task takes, and the
set-up step that creates the pools (``retention pools``; compose's init runs it too)."""

from __future__ import annotations

from typing import Any

from retention.systems.pools import BULK_SLOTS, POOLS, REQUEST_SLOTS, ProviderPool


def provider_pool(system: str, slots: int = BULK_SLOTS) -> dict[str, Any]:
    """Task arguments that put a task talking to ``system`` in its provider's pool with
    ``slots`` slots; none for a system without a provider limit (the CRM)."""
    pool = POOLS.get(system)
    return {} if pool is None else {"pool": pool.name, "pool_slots": min(slots, pool.slots)}


def ensure_pools() -> list[ProviderPool]:
    """Create the providers' pools, or set them back to their slots and description: running it
    again changes nothing. Needs Airflow's metadata database (after ``airflow db migrate``)."""
    from airflow.models.pool import Pool

    pools = list(POOLS.values())
    for pool in pools:
        Pool.create_or_update_pool(pool.name, pool.slots, pool.description, include_deferred=False)
    return pools


__all__ = ["BULK_SLOTS", "REQUEST_SLOTS", "ensure_pools", "provider_pool"]
