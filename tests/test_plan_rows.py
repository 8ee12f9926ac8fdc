"""The order a plan is staged and erased in, and how the engine finds each record type and
action in it (``domain.planning.erase_order``, ``runs.plan_rows``)."""

from __future__ import annotations

import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retention.domain.planning import erase_order
from retention.runs.plan_rows import FramePlan, Run, layout
from retention.store.staging import RunStaging

TYPES = ("crm_invoice", "crm_contact")


def _plan(rows: list[tuple[str, str, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["record_type", "action", "record_id"]).astype("string")


def test_the_erase_order_is_type_then_action_then_id():
    plan = _plan([
        ("crm_contact", "erase", "10"), ("crm_contact", "hold", "1"), ("crm_invoice", "erase", "9"),
        ("crm_contact", "minimise", "300"), ("crm_contact", "erase", "9"), ("other", "erase", "1"),
        ("crm_contact", "erase", "100"), ("crm_contact", "minimise", "20"), ("crm_contact", "erase", "abc"),
    ])
    ordered = plan.iloc[erase_order(plan, TYPES)]
    assert list(ordered.itertuples(index=False, name=None)) == [
        ("crm_invoice", "erase", "9"),
        ("crm_contact", "minimise", "20"), ("crm_contact", "minimise", "300"),
        ("crm_contact", "erase", "9"), ("crm_contact", "erase", "10"), ("crm_contact", "erase", "100"), ("crm_contact", "erase", "abc"),
        ("crm_contact", "hold", "1"),
        ("other", "erase", "1"),  # a record type the system does not name: last
    ]
    shape = layout(FramePlan(plan, TYPES))
    assert shape.runs == [
        Run("crm_invoice", "erase", 0, 1), Run("crm_contact", "minimise", 1, 3), Run("crm_contact", "erase", 3, 7),
        Run("crm_contact", "hold", 7, 8), Run("other", "erase", 8, 9),
    ]
    assert shape.types == ["crm_invoice", "crm_contact", "other"] and shape.actions == {"erase", "minimise", "hold"}
    assert shape.rows("crm_contact") == 7 and shape.rows(actions=["erase", "minimise"]) == 8


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(("crm_contact", "crm_invoice", "x")), st.sampled_from(("erase", "minimise", "hold", "defer")),
                          st.integers(0, 10**6).map(str)), max_size=60),
       st.integers(1, 9))
def test_a_plan_in_erase_order_is_one_run_per_type_and_action_read_in_any_slices(rows, chunk_rows):
    """Whatever the plan, its erase order holds each record type and action in one run, read
    apart in slices of any size; the runs cover the plan, and each run is in id order."""
    plan = _plan(rows)
    ordered = FramePlan(plan, TYPES)
    assert sorted(map(tuple, ordered.frame.itertuples(index=False))) == sorted(rows)
    shape = layout(ordered, chunk_rows=chunk_rows)
    assert shape is not None
    assert sorted({(r.record_type, r.action) for r in shape.runs}) == sorted({(t, a) for t, a, _ in rows})
    assert sum(len(r) for r in shape.runs) == len(rows) and [r.start for r in shape.runs] == sorted(r.start for r in shape.runs)
    for run in shape.runs:
        ids = ordered.frame["record_id"].iloc[run.start : run.stop].astype(int).tolist()
        assert ids == sorted(ids)
        assert set(ordered.frame["record_type"].iloc[run.start : run.stop]) == {run.record_type}


def test_a_plan_out_of_erase_order_has_no_layout(tmp_path):
    """A staged plan whose record type and action come in two runs (staged in another order, by
    an older version) is found out: the engine then reads it whole and orders it itself."""
    staging = RunStaging("retention_nightly", "manual__1", root=tmp_path)
    plan = _plan([("crm_contact", "erase", "1"), ("crm_invoice", "erase", "2"), ("crm_contact", "erase", "3")])
    staging.write_frame("crm", "plan", plan)
    assert layout(staging.rows("crm", "plan"), chunk_rows=1) is None
    staging.write_frame("crm", "plan", plan, order=erase_order(plan, TYPES))
    assert layout(staging.rows("crm", "plan"), chunk_rows=1).runs == [Run("crm_invoice", "erase", 0, 1), Run("crm_contact", "erase", 1, 3)]


@pytest.mark.parametrize("missing", ["action", "record_type"])
def test_a_missing_type_or_action_is_a_value_of_its_own(missing):
    """A row without an action is not taken for the row before it: the engine refuses it."""
    plan = _plan([("crm_contact", "erase", "1"), ("crm_contact", "erase", "2")])
    plan.loc[1, missing] = pd.NA
    shape = layout(FramePlan(plan, TYPES))
    assert len(shape.runs) == 2
    assert ("<missing>" in shape.actions) == (missing == "action")
