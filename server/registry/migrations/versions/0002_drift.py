"""Drift: each site's drift report per round, and when and why each task began.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01 00:00:00

Written by hand like 0001 (constraint names from models.NAMING_CONVENTION).
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: Union[str, Sequence[str], None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def _created_at() -> sa.Column:
    return sa.Column(
        "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
    )


def upgrade() -> None:
    op.create_table(
        "drift_events",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(128), nullable=False),
        sa.Column("round_id", sa.Integer(), nullable=False),
        sa.Column("site_id", sa.String(128), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("alert", sa.Boolean(), nullable=False, server_default=sa.text("false")),
        sa.Column("rate_shift", sa.Float(), nullable=True),
        sa.Column("rate_alert", sa.Boolean(), nullable=False, server_default=sa.text("false")),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name="pk_drift_events"),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name="fk_drift_events_run_id_runs", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["round_id"], ["rounds.id"], name="fk_drift_events_round_id_rounds", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(["site_id"], ["sites.id"], name="fk_drift_events_site_id_sites"),
    )
    op.create_index("ix_drift_events_run_id_site_id", "drift_events", ["run_id", "site_id"])
    op.create_table(
        "task_starts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(128), nullable=False),
        sa.Column("task_index", sa.Integer(), nullable=False),
        sa.Column("server_round", sa.Integer(), nullable=False),
        sa.Column("trigger", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        _created_at(),
        sa.PrimaryKeyConstraint("id", name="pk_task_starts"),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name="fk_task_starts_run_id_runs", ondelete="CASCADE"
        ),
        sa.UniqueConstraint("run_id", "task_index", name="uq_task_starts_run_id_task_index"),
    )


def downgrade() -> None:
    op.drop_table("task_starts")
    op.drop_index("ix_drift_events_run_id_site_id", table_name="drift_events")
    op.drop_table("drift_events")
