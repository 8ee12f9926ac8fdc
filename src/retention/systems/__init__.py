"""Source systems behind the ``SourceSystem`` port (``base``), one folder per system.

The port's names are loaded on first use, so that importing a light module of a system (its
connection form, for Airflow's providers manager) does not load pandas and the adapters."""

_PORT = ("SourceSystem", "adapter_for", "batch_size")


def __getattr__(name: str):
    if name in _PORT:
        from retention.systems import base

        return getattr(base, name)
    raise AttributeError(f"module 'retention.systems' has no attribute {name!r}")


__all__ = list(_PORT)
