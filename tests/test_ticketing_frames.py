import pandas as pd

from retention.config import DEFAULT_POLICY
from retention.domain.derive import derive_ticket_users, latest_tickets
from retention.domain.engine import plan_record_type
from retention.domain.policy import load_policy
from retention.systems.ticketing.adapter import tickets_frame, users_frame

POLICY = load_policy(DEFAULT_POLICY)
AS_OF = pd.Timestamp("2026-11-25T12:00:00Z")


def _tickets():
    return tickets_frame(
        [
            {"id": 1, "status": "closed", "requester_id": 10, "solved_at": "2025-01-01T10:00:00Z", "created_at": "2024-12-01T10:00:00Z", "updated_at": "2025-01-05T10:00:00Z"},
            {"id": 2, "status": "open", "requester_id": 11, "solved_at": None, "created_at": "2024-01-01T10:00:00Z", "updated_at": "2024-01-01T10:00:00Z"},
            {"id": 3, "status": "solved", "requester_id": 11, "solved_at": "2025-02-01T10:00:00Z", "created_at": "2024-12-01T10:00:00Z", "updated_at": "2025-02-01T10:00:00Z"},
            {"id": 4, "status": "closed", "requester_id": 12, "solved_at": "2026-06-01T10:00:00Z", "created_at": "2026-05-01T10:00:00Z", "updated_at": "2026-06-05T10:00:00Z"},
            {"id": 5, "status": "deleted", "requester_id": 13, "solved_at": None, "created_at": "2026-01-01T10:00:00Z", "updated_at": "2026-09-01T10:00:00Z"},
            {"id": 6, "status": "pending", "requester_id": 14, "solved_at": "", "created_at": "2020-01-01T10:00:00Z", "updated_at": "garbage"},
            # the export lists a ticket again after it changed: the last occurrence wins
            {"id": 4, "status": "closed", "requester_id": 12, "solved_at": "2026-06-01T10:00:00Z", "created_at": "2026-05-01T10:00:00Z", "updated_at": "2026-06-06T10:00:00Z"},
        ]
    )


def _users():
    return users_frame(
        [{"id": u, "role": "end-user", "created_at": "2020-01-01T00:00:00Z", "updated_at": "2020-01-01T00:00:00Z"} for u in (10, 11, 12, 13, 14, 15)]
        + [{"id": 99, "role": "agent", "created_at": "2020-01-01T00:00:00Z", "updated_at": "2020-01-01T00:00:00Z"}]
    )


def test_ticket_rules_and_requesters():
    tickets = latest_tickets(_tickets())
    assert len(tickets) == 6 and tickets["record_id"].is_unique
    plan = plan_record_type(tickets, "support_ticket", POLICY, AS_OF)
    assert dict(zip(plan["record_id"], plan["rule_id"])) == {"1": "support-ticket", "3": "support-ticket", "5": "soft-deleted-ticket"}
    users = derive_ticket_users(_users(), plan[["record_type", "record_id", "action", "deadline"]], {"support_ticket": tickets})
    remaining = dict(zip(users["record_id"], users["tickets_remaining"]))
    assert remaining == {"10": 0, "11": 1, "12": 1, "13": 0, "14": 1, "15": 0, "99": 0}
    user_plan = plan_record_type(users, "ticket_user", POLICY, AS_OF)
    # 11 still has an open ticket, 12 a recent one, 14 a pending one; agents are never erased.
    assert set(user_plan["record_id"]) == {"10", "13", "15"}
    assert users.set_index("record_id").loc["10", "last_ticket_gone_at"] == plan.set_index("record_id").loc["1", "deadline"]


def test_requesters_when_nothing_is_planned():
    tickets = latest_tickets(_tickets())
    empty = plan_record_type(tickets, "support_ticket", POLICY, pd.Timestamp("2021-01-01T00:00:00Z"))
    users = derive_ticket_users(_users(), empty[["record_type", "record_id", "action", "deadline"]], {"support_ticket": tickets})
    assert users["last_ticket_gone_at"].notna().all()
    assert dict(zip(users["record_id"], users["tickets_remaining"]))["10"] == 1


def test_unparsable_times_become_nat():
    t = _tickets()
    row = t[t["record_id"] == "6"].iloc[0]
    assert pd.isna(row["updated_at"]) and pd.isna(row["solved_at"])


def test_requesters_go_in_small_batches_tickets_in_large_ones():
    # A requester batch is committed to the ledger when its call returns: at Zendesk's pace of
    # user deletions a ticket-sized batch would hold that back for days.
    from retention.systems.base import batch_size
    from retention.systems.newsletter.adapter import NewsletterAdapter
    from retention.systems.ticketing.adapter import TicketingAdapter

    adapter = TicketingAdapter(client=None)
    assert batch_size(adapter, "ticket_user") == 1000
    assert batch_size(adapter, "support_ticket") == adapter.erase_batch == 50_000
    assert batch_size(NewsletterAdapter(client=None, list_id="x"), "newsletter_member") == 1000  # no overrides


def test_a_ticket_planned_twice_counts_its_latest_deadline():
    """Two plan rows for one ticket (with unique tickets): the requester's last ticket went at the
    later deadline, whichever row comes first (the parties are looked up by their first row)."""
    tickets = latest_tickets(_tickets())
    plan = plan_record_type(tickets, "support_ticket", POLICY, AS_OF)[["record_type", "record_id", "action", "deadline"]]
    one = plan[plan["record_id"] == "1"]
    later = one.assign(deadline=one["deadline"] + pd.Timedelta(days=30))
    for twice in (pd.concat([plan, later]), pd.concat([later, plan])):
        users = derive_ticket_users(_users(), twice.reset_index(drop=True), {"support_ticket": tickets})
        assert users.set_index("record_id").loc["10", "last_ticket_gone_at"] == later["deadline"].iloc[0]
        assert dict(zip(users["record_id"], users["tickets_remaining"]))["10"] == 0
