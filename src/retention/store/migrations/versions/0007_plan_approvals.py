"""Decisions on plans over the plan-size guard: who approved or rejected which plan.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02

One row per decision (approved, rejected, timed out) on a plan over the guard: the DAG and run,
the system, the plan's content hash and the policy version the approval is bound to, who decided
(an Airflow user; none on a timeout) and when, and the guard's counts (planned, allowed,
extracted). The erase step erases such a plan only when the newest decision on its hash and
policy version is an approval. A ledger from before this revision has no decisions.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "plan_approval",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("dag_id", sa.String(250), nullable=False),
        sa.Column("run_id", sa.String(250), nullable=False),
        sa.Column("system", sa.String(20), nullable=False),
        sa.Column("plan_hash", sa.String(64), nullable=False),
        sa.Column("policy_version", sa.String(64), nullable=False),
        sa.Column("decision", sa.String(20), nullable=False),
        sa.Column("decided_by", sa.String(250)),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("planned", sa.Integer, nullable=False),
        sa.Column("allowed", sa.Integer, nullable=False),
        sa.Column("extracted", sa.Integer, nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_plan_approval_plan", "plan_approval", ["system", "plan_hash", "policy_version"])


def downgrade() -> None:
    op.drop_index("ix_plan_approval_plan", table_name="plan_approval")
    op.drop_table("plan_approval")
