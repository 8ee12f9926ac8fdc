"""Source systems behind the ``SourceSystem`` interface, and how the pipeline builds them."""

from __future__ import annotations

import pandas as pd


def derive_frame(record_type: str, frame: pd.DataFrame, plan_so_far: pd.DataFrame, frames: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Complete a frame from the frames and plan of the record types planned before it.

    Ticket requesters can only be judged once their tickets are: a requester is erasable when
    none of their tickets will remain after this run.
    """
    if record_type == "support_ticket":
        from retention.systems.ticketing.adapter import latest_tickets

        return latest_tickets(frame)
    if record_type == "ticket_user":
        from retention.systems.ticketing.adapter import derive_ticket_users

        return derive_ticket_users(frame, plan_so_far, frames)
    return frame


def build_adapter(system: str):
    """The adapter for a system, built from its Airflow Connection (task run time only)."""
    if system == "newsletter":
        from retention.systems.newsletter.hook import MailchimpHook
        from retention.systems.newsletter.adapter import NewsletterAdapter

        hook = MailchimpHook()
        return NewsletterAdapter(hook.get_conn(), hook.list_id)
    if system == "crm":
        from retention.systems.crm.hook import CrmHook
        from retention.systems.crm.adapter import CrmAdapter

        return CrmAdapter(CrmHook().get_conn())
    if system == "ticketing":
        from retention.systems.ticketing.hook import ZendeskHook
        from retention.systems.ticketing.adapter import TicketingAdapter

        return TicketingAdapter(ZendeskHook().get_conn())
    raise ValueError(f"unknown system {system!r}")
