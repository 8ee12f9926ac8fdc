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
    """The system's adapter, built from its Airflow Connection, closed when the task is done. A
    user error on the way (a bad Connection field or setting, a host that cannot be reached)
    fails the task with its one line (:func:`user_errors_in_one_line`)."""
    from retention.systems.base import adapter_for

    with user_errors_in_one_line():
        adapter = adapter_for(system)
        try:
            yield adapter
        finally:
            adapter.close()


@contextlib.contextmanager
def user_errors_in_one_line() -> Iterator[None]:
    """A user error (:class:`~retention.config.ConfigError`) fails the task with its one line and
    no chained traceback of the driver or the HTTP library (which would name hosts and URLs): a
    host that cannot be reached for now (:class:`~retention.config.ConnectionFailed`, transient)
    as an ``AirflowException`` the task's retries may still fix; anything else (a bad field, a
    database that does not exist, a refused login) as an ``AirflowFailException``: no retry."""
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    from retention.config import ConfigError, ConnectionFailed

    try:
        yield
    except ConnectionFailed as exc:
        if exc.transient:
            raise AirflowException(str(exc)) from None
        raise AirflowFailException(str(exc)) from None
    except ConfigError as exc:
        raise AirflowFailException(str(exc)) from None


@contextlib.contextmanager
def fail_without_retry(*errors: type[BaseException]) -> Iterator[None]:
    """An error that no retry will fix (a broken policy, a bad param, address or setting: by
    default any ``ValueError`` or ``ConfigError``) fails the task at once, with its one line; a
    host that cannot be reached for now may still be retried (:func:`user_errors_in_one_line`)."""
    from airflow.sdk.exceptions import AirflowFailException

    from retention.config import ConfigError

    final: tuple[type[BaseException], ...] = errors or (ValueError, ConfigError)
    with user_errors_in_one_line():
        try:
            yield
        except final as exc:
            if isinstance(exc, ConfigError):
                raise  # to user_errors_in_one_line: retried when the host may come back
            raise AirflowFailException(str(exc)) from None
