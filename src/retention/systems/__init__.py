"""Source systems behind the ``SourceSystem`` port (``base``), one folder per system."""

from retention.systems.base import SourceSystem, adapter_for, batch_size

__all__ = ["SourceSystem", "adapter_for", "batch_size"]
