"""What the DAG files share, light enough to import at parse time (the heavy imports happen
inside the task that needs them)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from retention.runs.context import RunInfo
    from retention.systems.base import SourceSystem


def run_info(run: dict) -> RunInfo:
    """The run's facts, from the small dict the first task returned through XCom."""
    from retention.runs.context import RunInfo

    return RunInfo.from_dict(run)


@contextlib.contextmanager
def system_adapter(system: str) -> Iterator[SourceSystem]:
    """The system's adapter, built from its Airflow Connection, closed when the task is done."""
    from retention.systems.base import adapter_for

    adapter = adapter_for(system)
    try:
        yield adapter
    finally:
        adapter.close()


@contextlib.contextmanager
def fail_without_retry(*errors: type[BaseException]) -> Iterator[None]:
    """An error that no retry will fix (a broken policy, a bad param, address or setting: by
    default any ``ValueError`` or ``ConfigError``) fails the task at once, with its one line."""
    from airflow.sdk.exceptions import AirflowFailException

    from retention.config import ConfigError

    final: tuple[type[BaseException], ...] = errors or (ValueError, ConfigError)
    try:
        yield
    except final as exc:
        raise AirflowFailException(str(exc)) from None
