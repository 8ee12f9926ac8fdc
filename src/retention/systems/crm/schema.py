"""Reference schema of the CRM (customer register) described in the privacy notice, clauses 1, 3, 4.

SQLAlchemy Core only, portable between SQLite (the embedded default) and PostgreSQL
(production). An existing CRM with other table or column names does not need this schema: it
is described to the connector by ``include/crm_mapping.yaml`` (see ``retention.systems.crm.mapping``),
whose defaults are exactly the names below.

Conventions:

* ``*_on`` / ``event_date`` / ``course_end`` / ``financial_year_end`` are calendar dates;
  ``*_at`` are timezone-aware timestamps (stored UTC; SQLite keeps them as naive UTC text).
* ``membership.ends_on IS NULL`` is an open (running) membership period; several periods per
  organisation are renewals.
* ``contact.organisation_id IS NULL`` for leads (``kind = 'lead'``).
* ``invoice.contact_id`` becomes NULL when the person behind an invoice is minimised: the invoice
  keeps only what the bookkeeping law needs.
* ``legal_hold.record_type`` uses the connector's record types (``crm_contact``,
  ``crm_invoice``, ...); ``expires_at IS NULL`` means the hold has no expiry.

Foreign keys are declared without ``ON DELETE CASCADE`` on purpose: the connector deletes
children explicitly (a foreign CRM may not cascade), and a missing cascade makes an accidental
delete of a contact with invoices fail instead of silently taking the invoices with it.
"""

from __future__ import annotations

import sqlalchemy as sa

# Autoincrementing 64-bit keys on PostgreSQL (BIGSERIAL); SQLite needs "INTEGER PRIMARY KEY".
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Ts = sa.DateTime(timezone=True)

metadata = sa.MetaData()

organisation = sa.Table(
    "organisation",
    metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
)

membership = sa.Table(
    "membership",
    metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("organisation_id", Id, sa.ForeignKey("organisation.id"), nullable=False, index=True),
    sa.Column("starts_on", sa.Date, nullable=False),
    sa.Column("ends_on", sa.Date, nullable=True, index=True),  # NULL = open period
)

contact = sa.Table(
    "contact",
    metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("organisation_id", Id, sa.ForeignKey("organisation.id"), nullable=True, index=True),
    sa.Column("kind", sa.String(10), nullable=False),
    sa.Column("first_name", sa.String(100)),
    sa.Column("last_name", sa.String(100)),
    sa.Column("email", sa.String(254)),
    sa.Column("phone", sa.String(40)),
    sa.Column("workplace", sa.String(200)),
    sa.Column("address", sa.String(300)),
    sa.Column("role", sa.String(100)),
    sa.Column("last_interaction_at", Ts, index=True),
    sa.Column("opted_out", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("created_at", Ts, index=True),
    sa.CheckConstraint("kind IN ('member', 'lead')", name="ck_contact_kind"),
)
# Erasure requests look contacts up by e-mail, case-insensitively.
sa.Index("ix_contact_email_lower", sa.func.lower(contact.c.email))

communication_note = sa.Table(
    "communication_note",
    metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("contact_id", Id, sa.ForeignKey("contact.id"), nullable=False, index=True),
    sa.Column("noted_at", Ts, index=True),
    sa.Column("body", sa.Text),
)

event_participation = sa.Table(
    "event_participation",
    metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("contact_id", Id, sa.ForeignKey("contact.id"), nullable=False, index=True),
    sa.Column("event_name", sa.String(200)),
    sa.Column("event_date", sa.Date, index=True),
    sa.Column("kind", sa.String(10), nullable=False, server_default="event"),
    sa.CheckConstraint("kind IN ('event', 'service')", name="ck_event_participation_kind"),
)

course_registration = sa.Table(
    "course_registration",
    metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("contact_id", Id, sa.ForeignKey("contact.id"), nullable=False, index=True),
    sa.Column("course_name", sa.String(200)),
    sa.Column("course_end", sa.Date, index=True),
)

survey_response = sa.Table(
    "survey_response",
    metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("contact_id", Id, sa.ForeignKey("contact.id"), nullable=False, index=True),
    sa.Column("survey_name", sa.String(200)),
    sa.Column("survey_closed_at", Ts, index=True),
    sa.Column("answers", sa.Text),
)

invoice = sa.Table(
    "invoice",
    metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("contact_id", Id, sa.ForeignKey("contact.id"), nullable=True, index=True),
    sa.Column("invoice_number", sa.String(40), nullable=False),
    sa.Column("issued_on", sa.Date, nullable=False),
    sa.Column("financial_year_end", sa.Date, index=True),
    sa.Column("amount", sa.Numeric(14, 2), nullable=False),
    sa.Column("billing_name", sa.String(200)),
    sa.Column("billing_address", sa.String(300)),
)

legal_hold = sa.Table(
    "legal_hold",
    metadata,
    sa.Column("id", Id, primary_key=True),
    sa.Column("record_type", sa.String(40), nullable=False),
    sa.Column("record_id", sa.BigInteger, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("expires_at", Ts, nullable=True, index=True),  # NULL = no expiry
    sa.Index("ix_legal_hold_record", "record_type", "record_id"),
)

TABLES: dict[str, sa.Table] = {t.name: t for t in metadata.sorted_tables}


def create_schema(engine: sa.Engine) -> None:
    """Create the reference tables and indexes that do not exist yet."""
    metadata.create_all(engine, checkfirst=True)


def drop_schema(engine: sa.Engine) -> None:
    """Drop the reference tables (children first); missing tables are ignored."""
    metadata.drop_all(engine, checkfirst=True)
