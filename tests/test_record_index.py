"""The record index in the ledger database (store/record_index.py), on SQLite and PostgreSQL:
changes and gone records applied set-based, the cursor stored with them in one transaction, a
full read rebuilding the index and counting its drift, frames read back exactly as written."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest
import sqlalchemy as sa
from test_ledger import reset_schema

from retention.domain.conform import from_rows
from retention.domain.records import UNREADABLE
from retention.store import record_index as ri
from retention.store.ledger import Ledger

T0 = datetime(2026, 12, 1, 3, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def index(request, tmp_path, postgres_url_for):
    if request.param == "sqlite":
        ledger = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}")
    else:
        engine = sa.create_engine(postgres_url_for("retention_ledger_test"))
        reset_schema(engine)
        ledger = Ledger(engine)
    yield ri.RecordIndex(ledger.engine, "ticketing")
    ledger.engine.dispose()


def tickets(*rows: tuple) -> pd.DataFrame:
    return from_rows("support_ticket", [
        {"id": i, "status": s, "requester_id": 1000 + i, "solved_at": solved, "created_at": "2024-01-01T00:00:00Z",
         "updated_at": "2024-02-01T10:00:00.123456Z", "cc_ids": cc}
        for i, s, solved, cc in rows
    ])


def users(*rows: tuple) -> pd.DataFrame:
    return from_rows("ticket_user", [{"id": i, "role": r, "created_at": "2023-05-05T00:00:00Z", "updated_at": None} for i, r in rows])


def gone(*ids) -> pd.DataFrame:
    return pd.DataFrame({"record_id": pd.array([str(i) for i in ids], dtype="string")})


def read(index: ri.RecordIndex, record_type: str) -> pd.DataFrame:
    frames = list(index.frames(record_type))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def same(a: pd.DataFrame, b: pd.DataFrame) -> None:
    a = a.sort_values("record_id").reset_index(drop=True)
    b = b.sort_values("record_id").reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)


def test_a_full_read_then_changes_and_gone_records_are_applied_with_the_cursor(index):
    assert index.state() is None
    first = tickets((1, "open", None, ""), (2, "closed", "2024-03-01T00:00:00Z", "7 8"), (3, "solved", "2024-03-02T00:00:00Z", ""))
    with index.update(full=True) as up:
        up.write("support_ticket", first)
        up.write("ticket_user", users((1001, "end-user"), (1002, "agent")))
        summary = up.finish("c1", T0)
    assert summary["drift"] == {"support_ticket": {"missing": 3, "extra": 0, "different": 0},
                                "ticket_user": {"missing": 2, "extra": 0, "different": 0}}
    assert index.state() == ri.FeedState("c1", T0, T0)
    same(read(index, "support_ticket"), first)

    later = T0 + timedelta(days=1)
    with index.update(full=False) as up:
        up.write("support_ticket", tickets((1, "solved", "2024-06-01T00:00:00Z", ""), (4, "new", None, "")))
        up.write("support_ticket:gone", gone(3))
        up.write("ticket_user:gone", gone(1002))
        summary = up.finish("c2", later)
    assert summary == {"changed": {"support_ticket": 2}, "gone": {"support_ticket": 1, "ticket_user": 1}}
    assert index.state() == ri.FeedState("c2", later, T0)  # no reconciliation: its time stays
    expected = tickets((1, "solved", "2024-06-01T00:00:00Z", ""), (2, "closed", "2024-03-01T00:00:00Z", "7 8"), (4, "new", None, ""))
    same(read(index, "support_ticket"), expected)
    same(read(index, "ticket_user"), users((1001, "end-user")))
    assert index.counts() == {"support_ticket": 3, "ticket_user": 1}


def test_a_full_read_counts_missing_extra_and_different_rows_and_rebuilds(index):
    with index.update(full=True) as up:
        up.write("support_ticket", tickets((1, "open", None, ""), (2, "closed", None, ""), (3, "closed", None, "")))
        up.finish("c1", T0)
    truth = tickets((1, "open", None, ""), (2, "solved", None, ""), (5, "new", None, ""), (6, "new", None, ""))
    with index.update(full=True) as up:
        up.write("support_ticket", truth)
        summary = up.finish("c9", T0 + timedelta(days=7))
    assert summary["drift"] == {"support_ticket": {"missing": 2, "extra": 1, "different": 1}}
    same(read(index, "support_ticket"), truth)
    assert index.state().reconciled_at == T0 + timedelta(days=7)


def test_a_failed_extract_leaves_the_old_cursor_and_index(index):
    with index.update(full=True) as up:
        up.write("support_ticket", tickets((1, "open", None, "")))
        up.finish("c1", T0)
    with pytest.raises(RuntimeError, match="feed broke"), index.update(full=False) as up:
        up.write("support_ticket", tickets((1, "closed", None, ""), (2, "new", None, "")))
        up.write("support_ticket:gone", gone(1))
        raise RuntimeError("feed broke")
    assert index.state().cursor == "c1"
    same(read(index, "support_ticket"), tickets((1, "open", None, "")))
    with index.update(full=False) as up:  # and the next update starts clean
        up.write("support_ticket", tickets((3, "new", None, "")))
        assert up.finish("c2", T0)["changed"] == {"support_ticket": 1}
    assert index.counts() == {"support_ticket": 2}


def test_a_column_outside_the_record_schema_is_never_stored(index):
    frame = tickets((1, "open", None, "")).assign(email="someone@example.org")
    with pytest.raises(ValueError, match="email"), index.update(full=True) as up:
        up.write("support_ticket", frame)
    with pytest.raises(ValueError, match="no record type of ticketing"), index.update(full=True) as up:
        up.write("crm_contact", frame)
    assert index.counts() == {}


def test_odd_values_round_trip_exactly_and_the_last_word_on_a_record_wins(index, monkeypatch):
    monkeypatch.setattr(ri, "CHUNK_ROWS", 7)  # several chunks, a record repeated across them
    many = tickets(*[(i, "closed", "2024-03-01T00:00:00Z", "") for i in range(1, 30)])
    odd = tickets((5, "solved", "0001-01-01T00:00:00Z", "3 4"), (6, None, "9999-12-31T23:59:59.999999Z", ""))
    odd[UNREADABLE] = pd.array(["solved_at", pd.NA], dtype="string")
    with index.update(full=True) as up:
        up.write("support_ticket", many)
        up.write("support_ticket", odd)
        summary = up.finish("c1", T0)
    assert summary["records"] == {"support_ticket": 29}
    back = read(index, "support_ticket").set_index("record_id")
    assert back.loc["5", "solved_at"] == pd.Timestamp("0001-01-01", tz=UTC)
    assert back.loc["6", "solved_at"] == pd.Timestamp("9999-12-31T23:59:59.999999", tz=UTC)
    assert pd.isna(back.loc["6", "status"]) and back.loc["5", "cc_ids"] == "3 4"
    assert back.loc["5", UNREADABLE] == "solved_at" and pd.isna(back.loc["6", UNREADABLE])
    assert back.loc["7", "status"] == "closed"
    with index.update(full=True) as up:  # the same records again: no drift
        up.write("support_ticket", many)
        up.write("support_ticket", odd)
        assert up.finish("c2", T0)["drift"] == {}


def test_within_one_update_the_last_word_wins_changed_or_gone(index, monkeypatch):
    """A record listed changed and then gone (or gone and then changed again) in one extract, in
    one chunk or across chunks: what came last is what the index keeps."""
    with index.update(full=True) as up:
        up.write("support_ticket", tickets((1, "open", None, ""), (2, "open", None, ""), (3, "open", None, "")))
        up.finish("c1", T0)
    for chunk_rows in (1000, 1):  # all in one chunk; a chunk per write
        monkeypatch.setattr(ri, "CHUNK_ROWS", chunk_rows)
        with index.update(full=False) as up:
            up.write("support_ticket", tickets((1, "solved", None, ""), (2, "pending", None, "")))
            up.write("support_ticket:gone", gone(1))
            up.write("support_ticket:gone", gone(3))
            up.write("support_ticket", tickets((3, "new", None, "")))
            summary = up.finish("c2", T0)
        assert summary == {"changed": {"support_ticket": 2}, "gone": {"support_ticket": 1}}, chunk_rows
        same(read(index, "support_ticket"), tickets((2, "pending", None, ""), (3, "new", None, "")))
        with index.update(full=True) as up:  # back to the start for the next round
            up.write("support_ticket", tickets((1, "open", None, ""), (2, "open", None, ""), (3, "open", None, "")))
            up.finish("c1", T0)
