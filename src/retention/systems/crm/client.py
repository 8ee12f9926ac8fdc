"""CRM connector: chunked frames in, set-based erasure out.

The rule engine decides what is due; this module only

* reads the CRM into pandas frames that carry what the rules need and nothing else (no names,
  e-mail addresses, phone numbers or addresses ever leave the database through a frame), and
* erases (or minimises) the records the engine hands back, idempotently and set-based.

Frames (``iter_frames``) — every clock column is ``datetime64[us, UTC]``; calendar dates come
through as midnight Europe/Stockholm of that date; NULL, impossible or unparsable stored values come
through as ``NaT`` (the pipeline quarantines them) instead of failing the extract:

=========================== =================================================================
record type                 columns (dtype)
=========================== =================================================================
crm_contact                 record_id int64, kind str, organisation_id Int64,
                            membership_active bool, membership_end ts, is_customer bool,
                            last_interaction_at ts, opted_out bool, has_email bool,
                            created_at ts, has_invoice bool
crm_event_participation     record_id int64, contact_id Int64, event_date ts,
                            membership_active bool, membership_end ts, is_customer bool,
                            opted_out bool
crm_course_registration     record_id int64, contact_id Int64, course_end ts
crm_survey_response         record_id int64, contact_id Int64, survey_closed_at ts
crm_invoice                 record_id int64, contact_id Int64, financial_year_end ts
crm_legal_hold              record_type str, record_id Int64, reason str, expires_at ts
=========================== =================================================================

``membership_active``: the contact's organisation has a period with ``ends_on`` NULL or
``ends_on >= today``, where *today* is the calendar date of ``now`` in Europe/Stockholm (a
period ending today is still active today). ``membership_end``: the latest ``ends_on`` of the
organisation when it is not active, else NaT (always NaT for contacts without organisation,
i.e. leads). ``is_customer``: the organisation ever had a membership period. NULL booleans read
as False.

Erasure outcomes (``erase`` / ``minimise_contacts``), per distinct id:

* ``"erased"`` — deleted by this call;
* ``"already_gone"`` — not there (idempotent success);
* ``"minimised"`` — ``minimise_contacts`` only: the contact and all its personal data were
  deleted and its invoice(s) detached (``contact_id`` set NULL), keeping the bookkeeping fields;
* ``"held_invoice"`` — ``erase("crm_contact")`` only: the contact still has an invoice, so it
  is **refused** (nothing of it is touched); use ``minimise_contacts``;
* ``"held_legal_hold"`` — refused because a live manual hold (``legal_hold`` row with this
  record type and id, ``expires_at`` NULL or in the future at the time of the call) covers the
  record, or for a contact, covers one of the child records the erasure would delete.

Each call is one transaction with a fixed number of statements, whatever the batch size (the
caller batches, e.g. 5,000 ids): one hold/invoice check, then one set-based ``DELETE`` per
table. Ids are passed as one array parameter (``= ANY(:ids)`` on PostgreSQL, ``json_each`` on
SQLite), so statement text and planning do not grow with the batch. Children of a contact are
deleted explicitly (no reliance on ``ON DELETE CASCADE``).

The connector is put together from its concerns: the reads (:mod:`~retention.systems.crm.reads`),
the erasure (:mod:`~retention.systems.crm.erasure`), the SQL both share
(:mod:`~retention.systems.crm.sql`) and the conversion of values into frames
(:mod:`~retention.systems.crm.values`). Its names are all importable from here.
"""

from __future__ import annotations

from zoneinfo import ZoneInfo

import sqlalchemy as sa

from retention.systems.crm.erasure import (
    ALREADY_GONE,
    CONTACT_CHILDREN,
    ERASABLE,
    ERASED,
    HELD_INVOICE,
    HELD_LEGAL_HOLD,
    HOLDABLE_CHILDREN,
    MINIMISED,
    Erasure,
)
from retention.systems.crm.mapping import CrmMapping
from retention.systems.crm.reads import FRAME_COLUMNS, RECORD_TYPES, FrameReads
from retention.systems.crm.values import LOCAL_TZ, TS
from retention.systems.forms import CRM_ERASE_CONNECTIONS


class CrmConnector(FrameReads, Erasure):
    """Read the CRM as frames and erase what the rule engine decided is due.

    ``engine`` is any SQLAlchemy engine (PostgreSQL in production, SQLite embedded). ``mapping``
    names the physical tables/columns (default: the reference schema); it is checked against
    the database once, before the first operation (``check()`` does it explicitly).
    """

    def __init__(
        self,
        engine: sa.Engine,
        mapping: CrmMapping | None = None,
        *,
        chunk_size: int = 50_000,
        local_tz: str = LOCAL_TZ,
        erase_connections: int = CRM_ERASE_CONNECTIONS,
    ):
        if chunk_size < 1:
            raise ValueError("chunk_size must be positive")
        if erase_connections < 1:
            raise ValueError("erase_connections must be positive")
        self.engine = engine
        self.mapping = mapping or CrmMapping.default()
        self.chunk_size = int(chunk_size)
        # Parts of one erase call run side by side, each its own transaction (PostgreSQL only).
        self.erase_connections = int(erase_connections)
        self.local_tz = ZoneInfo(local_tz)
        self._checked = False


__all__ = [
    "ALREADY_GONE",
    "CONTACT_CHILDREN",
    "ERASABLE",
    "ERASED",
    "FRAME_COLUMNS",
    "HELD_INVOICE",
    "HELD_LEGAL_HOLD",
    "HOLDABLE_CHILDREN",
    "LOCAL_TZ",
    "MINIMISED",
    "RECORD_TYPES",
    "TS",
    "CrmConnector",
]
