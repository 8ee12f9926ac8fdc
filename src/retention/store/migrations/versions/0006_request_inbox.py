"""The request inbox: erasure requests' addresses, encrypted, until the request completes.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02

An erasure request filed through the Airflow plugin (plugins/retention_requests.py) keeps its
e-mail address here, encrypted with the request key (Fernet, ``RETENTION_REQUEST_KEY``), under a
random request id; the DAG run's conf holds only that id. The row is deleted when the request's
run completes (``runs.request.report``) and kept while a retry may still need it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "request_inbox",
        sa.Column("request_id", sa.String(36), primary_key=True),
        sa.Column("address_token", sa.Text, nullable=False),
        sa.Column("filed_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("request_inbox")
