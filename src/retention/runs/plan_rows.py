"""A plan as the erasure engine reads it: a slice of rows at a time, in the order it erases them.

The nightly erase step hands the engine its staged plan (``RunStaging.rows``), which the plan
step wrote in erase order (``domain.planning.erase_order``): every record type and action is
one run of rows, in id order, and the engine reads a batch's rows when the batch goes. Holding
the whole plan instead made the step's memory grow with the plan (536 MB at a million CRM
contacts against 389 MB at a quarter of a million). An erasure request's or a replay's plan is a
frame in memory (:class:`FramePlan`), put in the same order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pandas as pd

from retention.domain.planning import erase_order


class PlanRows(Protocol):
    """A plan read a slice at a time (``store.staging.StagedRows`` is one)."""

    columns: list[str]
    num_rows: int

    def chunks(
        self, columns: Sequence[str], start: int = 0, stop: int | None = None, rows: int = 50_000,
        categories: Sequence[str] = (),
    ) -> Iterator[pd.DataFrame]: ...

    def whole(self, columns: Sequence[str] | None = None, categories: Sequence[str] = ()) -> pd.DataFrame: ...


class FramePlan:
    """A plan held in memory, in erase order (``record_types``: the system's order)."""

    def __init__(self, frame: pd.DataFrame, record_types: Sequence[str]):
        order = erase_order(frame, record_types)
        in_order = bool((order == np.arange(len(order))).all())
        self.frame = frame if in_order else frame.iloc[order].reset_index(drop=True)
        self.columns = list(self.frame.columns)
        self.num_rows = len(self.frame)

    def chunks(
        self, columns: Sequence[str], start: int = 0, stop: int | None = None, rows: int = 50_000,
        categories: Sequence[str] = (),
    ) -> Iterator[pd.DataFrame]:
        wanted = [c for c in columns if c in self.frame]
        stop = self.num_rows if stop is None else min(stop, self.num_rows)
        for at in range(start, stop, rows):
            yield self.frame.iloc[at : min(at + rows, stop)][wanted]

    def whole(self, columns: Sequence[str] | None = None, categories: Sequence[str] = ()) -> pd.DataFrame:
        return self.frame if columns is None else self.frame[[c for c in columns if c in self.frame]]


@dataclass(frozen=True)
class Run:
    """Rows ``start`` to ``stop`` of the plan: all of one record type and action."""

    record_type: str
    action: str
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass
class Layout:
    """Where each record type and action is in a plan, and which actions it names."""

    runs: list[Run] = field(default_factory=list)
    actions: set[str] = field(default_factory=set)

    @property
    def types(self) -> list[str]:
        """The record types, in the order they first appear."""
        return list(dict.fromkeys(r.record_type for r in self.runs))

    def of(self, record_type: str, action: str | None = None) -> list[Run]:
        return [r for r in self.runs if r.record_type == record_type and (action is None or r.action == action)]

    def rows(self, record_type: str | None = None, actions: Sequence[str] | None = None) -> int:
        return sum(
            len(r) for r in self.runs
            if (record_type is None or r.record_type == record_type) and (actions is None or r.action in actions)
        )


def layout(rows: PlanRows, chunk_rows: int = 200_000) -> Layout | None:
    """The plan's runs of one record type and action, read a slice at a time (two columns, as
    codes); ``None`` when a record type and action come in more than one run (a plan not in
    erase order, as an older version staged it)."""
    found = Layout()
    at = 0
    for chunk in rows.chunks(["record_type", "action"], rows=chunk_rows, categories=("record_type", "action")):
        types, type_names = _codes(chunk["record_type"])
        actions, action_names = _codes(chunk["action"])
        found.actions.update(str(action_names[c]) for c in np.unique(actions))
        change = np.flatnonzero((types[1:] != types[:-1]) | (actions[1:] != actions[:-1])) + 1
        starts = np.concatenate([[0], change])
        ends = np.concatenate([change, [len(chunk)]])
        for a, b in zip(starts.tolist(), ends.tolist()):
            record_type, action = str(type_names[types[a]]), str(action_names[actions[a]])
            last = found.runs[-1] if found.runs else None
            if last is not None and (last.record_type, last.action) == (record_type, action) and last.stop == at + a:
                found.runs[-1] = Run(record_type, action, last.start, at + b)
            else:
                found.runs.append(Run(record_type, action, at + a, at + b))
        at += len(chunk)
    seen = [(r.record_type, r.action) for r in found.runs]
    return found if len(seen) == len(set(seen)) else None


def _codes(column: pd.Series) -> tuple[np.ndarray, pd.Index]:
    """A text column's codes and values (a missing value is its own value, never -1)."""
    if not isinstance(column.dtype, pd.CategoricalDtype):
        column = column.astype("category")
    codes = column.cat.codes.to_numpy().astype(np.int64)
    names = pd.Index([*column.cat.categories.astype(str), "<missing>"])
    codes[codes < 0] = len(names) - 1
    return codes, names
