"""The validate step's suites over a record type in partitions give the outcome of running them
over it whole (issue 12, item 5: the validate step's memory flat).

A record type with more rows than ``runs.validating.PART_ROWS`` is checked a partition at a time,
its rows split by a hash of their ids. What a partition could get wrong is what compares rows:
an id twice (in the extract, in the plan) must still be counted as a duplicate, and a plan row
must still find its record's protecting values in the extract. And what is judged per column
must come out as over the whole: counts summed, a clock's maximum the largest, a check over a
column with no values in one partition neither run there nor lost.
"""

from __future__ import annotations

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from retention.checks import data_docs
from retention.config import DEFAULT_POLICY
from retention.domain.holds import Holds
from retention.domain.keys import partitions
from retention.domain.policy import load_policy
from retention.domain.pseudonyms import Pseudonymizer
from retention.runs import validating
from retention.runs.context import Stopwatch
from retention.store.staging import RunStaging
from s3_server import s3_server

POLICY = load_policy(DEFAULT_POLICY)
NOW = pd.Timestamp("2026-06-01", tz="UTC")
AS_OF = pd.Timestamp("2026-06-01T12:00:00", tz="UTC")
PSEUDO = Pseudonymizer(b"v" * 32)
MEMBER_STATUSES = ["subscribed", "unsubscribed", "cleaned", "pending", "archived", "transactional"]


def _time(draw, *, future: bool = True):
    pick = draw(st.integers(0, 12))
    if pick == 0:
        return None
    if pick == 1 and future:
        return NOW + pd.Timedelta(days=draw(st.integers(1, 90)))
    return NOW - pd.Timedelta(days=draw(st.integers(1, 2000)), hours=draw(st.integers(0, 23)))


def _id(draw, pool: int) -> str | None:
    if draw(st.integers(0, 30)) == 0:
        return None
    n = draw(st.integers(0, pool))
    return f"{n:032x}" if draw(st.booleans()) else f"é-{n}"  # a subscriber hash, or text no fingerprint takes


@st.composite
def members(draw):
    pool = draw(st.integers(1, 40))
    signup_ever = draw(st.booleans())  # a clock with no values at all in some draws
    rows = [{
        "record_id": _id(draw, pool),
        "status": None if draw(st.integers(0, 25)) == 0 else draw(st.sampled_from(MEMBER_STATUSES)),
        "last_changed": _time(draw),
        "timestamp_signup": _time(draw) if signup_ever else None,
        "has_email": draw(st.integers(0, 15)) != 0,
    } for _ in range(draw(st.integers(0, 40)))]
    clean = pd.DataFrame(rows, columns=["record_id", "status", "last_changed", "timestamp_signup", "has_email"])
    clean = clean.astype({"record_id": "string", "status": "string"})
    for column in ("last_changed", "timestamp_signup"):
        clean[column] = pd.to_datetime(clean[column], utc=True)
    plan_rows = []
    for _ in range(draw(st.integers(0, 30))):
        record_id = _id(draw, pool + 5)  # now and then a record the extract does not have
        plan_rows.append({
            "record_type": "newsletter_member",
            "record_id": record_id,
            "action": draw(st.sampled_from(["erase", "erase", "erase", "hold", "purge"])),
            "rule_id": draw(st.sampled_from(["newsletter-unsubscribed", "newsletter-pending", "no-such-rule"])),
            "deadline": _time(draw, future=True),
        })
    plan = pd.DataFrame(plan_rows, columns=["record_type", "record_id", "action", "rule_id", "deadline"])
    plan = plan.astype({c: "string" for c in ("record_type", "record_id", "action", "rule_id")})
    plan["deadline"] = pd.to_datetime(plan["deadline"], utc=True)
    plan["record_key"] = PSEUDO.column(pd.Series("newsletter_member", index=plan.index), plan["record_id"].fillna("none")).astype("string")
    held = draw(st.lists(st.integers(0, pool + 5), max_size=3))
    holds = Holds(
        by_id={("newsletter_member", f"{n:032x}"): f"manual hold #{n}" for n in held},
        by_key={("newsletter_member", k): "manual hold #k" for k in draw(st.lists(st.sampled_from(list(plan["record_key"]) or ["x"]), max_size=2))},
    )
    return clean, plan, holds


def _staged(tmp_path, clean: pd.DataFrame, plan: pd.DataFrame) -> RunStaging:
    """The frames staged under ``tmp_path``, or where the run stages (``RETENTION_STAGING_URL``)
    when it is None."""
    staging = RunStaging("retention_nightly", "manual__parts", root=tmp_path)
    staging.write_frame("newsletter", "clean_newsletter_member", clean)
    # A row of another record type among the plan's: never the member suites' business.
    other = pd.DataFrame({
        "record_type": ["crm_contact"], "record_id": [f"{0:032x}"], "action": ["purge"], "rule_id": ["lead"],
        "deadline": [NOW + pd.Timedelta(days=400)], "record_key": ["other"],
    }).astype({c: "string" for c in ("record_type", "record_id", "action", "rule_id", "record_key")})
    staging.write_frame("newsletter", "plan", pd.concat([plan, other], ignore_index=True) if len(plan) else other)
    return staging


def _validated(staging: RunStaging, holds: Holds, parts_of: int):
    plan_rows = staging.rows("newsletter", "plan")
    clean_rows = staging.rows("newsletter", "clean_newsletter_member")
    old = validating.PART_ROWS
    validating.PART_ROWS = parts_of
    try:
        return validating.validate_record_type(
            clean_rows, plan_rows, [(0, plan_rows.num_rows)], plan_rows.num_rows, "newsletter_member",
            NOW, POLICY, AS_OF, holds, Stopwatch(), (staging, "newsletter"),
        )
    finally:
        validating.PART_ROWS = old


def _judged(outcome) -> dict:
    """What an outcome says: pass or fail, and per check its verdict, and for a failing check
    its count and observed value (those of a passing check are only reported when its suite
    failed, and then, in parts, from the failing parts: not compared)."""
    out = {"success": outcome.success}
    for c in outcome.checks:
        key = (c["expectation"], "record_id" if c["column"] == "record_id_fingerprint" else c["column"])
        assert key not in out, f"{key} twice"
        out[key] = (c["success"],) if c["success"] else (False, c["unexpected_count"], c["observed"])
    return out


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(case=members(), rows_per_part=st.integers(2, 12))
def test_suites_in_partitions_judge_as_the_suites_over_the_whole(tmp_path_factory, case, rows_per_part):
    clean, plan, holds = case
    staging = _staged(tmp_path_factory.mktemp("parts"), clean, plan)
    whole = _validated(staging, holds, 10_000)
    parts = _validated(staging, holds, rows_per_part)
    assert [o.name for o in parts] == [o.name for o in whole] == ["extract_newsletter_member", "plan_newsletter_member"]
    for w, p in zip(whole, parts):
        assert _judged(p) == _judged(w), w.name
    # The partitions staged while they were checked are gone.
    assert sorted(p.name for p in staging.system_dir("newsletter").iterdir()) == ["clean_newsletter_member.parquet", "plan.parquet"]


def test_a_duplicate_id_and_a_protected_record_are_found_in_partitions(tmp_path):
    """The ids that matter land in different partitions from their neighbours; the duplicates
    and the plan row whose record is subscribed are still found, and the Data Docs of the
    combined outcomes are written."""
    clean, plan, ids = _duplicate_case()
    assert len(set(partitions(pd.Series([ids[3], ids[50], ids[59]]), 6))) > 1  # not all in one partition
    staging = _staged(tmp_path, clean, plan)
    extract, planned = _validated(staging, Holds(), 10)
    failed = {(c["expectation"], c["column"]): c["unexpected_count"] for o in (extract, planned) for c in o.failures()}
    assert failed == DUPLICATE_CASE_FAILURES
    observed = {c["column"]: c["observed"] for c in extract.failures()}
    assert observed["last_changed"].startswith(str((NOW + pd.Timedelta(days=10)).date()))
    # timestamp_signup has no values: checked nowhere, as over the whole.
    assert not any(c["column"] == "timestamp_signup" for c in extract.checks)
    # The GX result kept for Data Docs says what the combined outcome says.
    statistics = planned.result.statistics
    assert statistics["unsuccessful_expectations"] == len(planned.failures()) == 2
    assert [r.success for r in planned.result.results] == [c["success"] for c in planned.checks]
    page = data_docs.keep([extract, planned], tmp_path / "docs", "manual__parts", "newsletter")
    assert (tmp_path / "docs" / page).is_file()


DUPLICATE_CASE_FAILURES = {
    ("expect_column_values_to_be_unique", "record_id_fingerprint"): 2,
    ("expect_column_max_to_be_between", "last_changed"): None,
    ("expect_column_values_to_be_unique", "record_id"): 2,
    ("expect_column_values_to_not_be_in_set", "status"): 1,
}


def _duplicate_case() -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """60 members, one id twice, the last subscribed and changed in the future; a plan of 21
    rows, one id twice, one row the subscribed member's."""
    ids = [f"{i:032x}" for i in range(60)]
    ids[41] = ids[3]  # an id twice in the extract
    clean = pd.DataFrame({
        "record_id": pd.Series(ids, dtype="string"),
        "status": pd.Series(["unsubscribed"] * 59 + ["subscribed"], dtype="string"),
        "last_changed": [NOW - pd.Timedelta(days=400)] * 59 + [NOW + pd.Timedelta(days=10)],
        "timestamp_signup": [pd.NaT] * 60,
        "has_email": [True] * 60,
    })
    plan = pd.DataFrame({
        "record_type": pd.Series(["newsletter_member"] * 21, dtype="string"),
        "record_id": pd.Series([ids[i] for i in range(40, 60)] + [ids[50]], dtype="string"),  # 50 twice; 59 is subscribed
        "action": pd.Series(["erase"] * 21, dtype="string"),
        "rule_id": pd.Series(["newsletter-unsubscribed"] * 21, dtype="string"),
        "deadline": [NOW - pd.Timedelta(days=1)] * 21,
    })
    plan["record_key"] = PSEUDO.column(plan["record_type"], plan["record_id"]).astype("string")
    return clean, plan, ids


@pytest.fixture(scope="module")
def s3():
    with s3_server() as store:
        yield store


def test_partitions_are_staged_on_object_storage_and_removed(s3, monkeypatch, retention_home):
    """A run staging on S3 (workers beyond one machine) stages the validate step's partitions
    there too: the suites in partitions find what they find over the whole, and no partition
    is left in the bucket."""
    # A Connection of this module's own: Airflow keeps a store per connection id, and another
    # module's, made for its own S3 server (gone by now), would be used again.
    monkeypatch.setenv("AIRFLOW_CONN_VALIDATE_PARTS_STORE", s3.connection())
    monkeypatch.setenv("RETENTION_STAGING_URL", f"s3://{s3.bucket}/validate-parts")
    monkeypatch.setenv("RETENTION_STAGING_CONN_ID", "validate_parts_store")
    clean, plan, _ = _duplicate_case()
    staging = _staged(None, clean, plan)
    assert staging.root.protocol == "s3"
    staged = s3.keys("validate-parts")
    spilled = []
    real_spill = validating._spill

    def spill(*args, **kwargs):
        out = real_spill(*args, **kwargs)
        spilled.append([k for k in s3.keys("validate-parts") if "validating_" in k])
        return out

    monkeypatch.setattr(validating, "_spill", spill)
    whole = _validated(staging, Holds(), 10_000)
    parts = _validated(staging, Holds(), 10)
    failed = {(c["expectation"], c["column"]): c["unexpected_count"] for o in parts for c in o.failures()}
    assert failed == DUPLICATE_CASE_FAILURES
    for w, p in zip(whole, parts):
        assert _judged(p) == _judged(w), w.name
    # Six partitions of each frame were in the bucket while checked, and none is left.
    assert [len(keys) for keys in spilled] == [6, 12]
    assert s3.keys("validate-parts") == staged


@pytest.mark.parametrize("parts", [1, 2, 7])
def test_partitions_are_by_id_whatever_the_frame(parts):
    a = pd.Series(["x", "é", None, "12", "x"], dtype="string")
    b = pd.Series(["12", None, "x", "é"], dtype=object)
    pa_, pb = partitions(a, parts), partitions(b, parts)
    assert pa_.max() < parts
    assert dict(zip(a.fillna("<none>"), pa_)) == dict(zip(b.fillna("<none>"), pb))


def test_the_guards_counts_from_the_plans_layout_or_read_alike(tmp_path):
    """The guard's destructive rows per record type: from the layout of a plan in erase order,
    or read a slice at a time (a plan staged out of order), the same."""
    from retention.runs.plan_rows import FramePlan, layout

    plan = pd.DataFrame({
        "record_type": ["crm_contact", "crm_contact", "crm_invoice", "crm_contact", "crm_invoice"],
        "action": ["erase", "hold", "minimise", "erase", "hold"],
        "record_key": list("abcde"), "record_id": ["1", "2", "3", "4", "5"],
    })
    rows = FramePlan(plan, ["crm_invoice", "crm_contact"])
    expected = (3, {"crm_contact": 2, "crm_invoice": 1})
    assert validating.destructive_rows(rows, layout(rows)) == expected
    assert validating.destructive_rows(rows) == expected
    assert validating.carried_over_rows(rows, {"crm_contact": {"a", "b"}, "crm_invoice": set()}) == 1  # b is held


@pytest.mark.parametrize("fails", ["the plan's spill", "a suite"])
def test_a_validation_that_stops_on_the_way_leaves_no_partition_behind(tmp_path, monkeypatch, fails):
    """Both frames are staged in partitions before the first is read back: whether the plan's
    spill or a suite stops the step, the extract's partitions staged already are removed."""
    ids = [f"{i:032x}" for i in range(30)]
    clean = pd.DataFrame({
        "record_id": pd.Series(ids, dtype="string"), "status": pd.Series(["unsubscribed"] * 30, dtype="string"),
        "last_changed": [NOW - pd.Timedelta(days=400)] * 30, "timestamp_signup": [pd.NaT] * 30, "has_email": [True] * 30,
    })
    plan = pd.DataFrame({
        "record_type": pd.Series(["newsletter_member"] * 10, dtype="string"), "record_id": pd.Series(ids[:10], dtype="string"),
        "action": pd.Series(["erase"] * 10, dtype="string"), "rule_id": pd.Series(["newsletter-unsubscribed"] * 10, dtype="string"),
        "deadline": [NOW - pd.Timedelta(days=1)] * 10,
    })
    plan["record_key"] = PSEUDO.column(plan["record_type"], plan["record_id"]).astype("string")
    staging = _staged(tmp_path, clean, plan)
    spills = []

    def spill(*args, **kwargs):
        spills.append(args[-1].name)
        if fails == "the plan's spill" and args[-1].name.startswith("validating_plan"):
            raise OSError("disk full")
        return real_spill(*args, **kwargs)

    def suite(*args, **kwargs):
        raise RuntimeError("GX broke")

    real_spill = validating._spill
    monkeypatch.setattr(validating, "_spill", spill)
    if fails == "a suite":
        monkeypatch.setattr(validating, "validate_extract", suite)
    with pytest.raises((OSError, RuntimeError)):
        _validated(staging, Holds(), 8)
    assert spills == ["validating_clean_newsletter_member", "validating_plan_newsletter_member"]
    assert sorted(p.name for p in staging.system_dir("newsletter").iterdir()) == ["clean_newsletter_member.parquet", "plan.parquet"]
