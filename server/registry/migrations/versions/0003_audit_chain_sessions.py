"""Audit hash chain, audit scopes, unique token names, dashboard sessions.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 14:30:00

Written by hand like 0001 (constraint names from models.NAMING_CONVENTION). Existing databases
keep working: repeated token names are renamed ``<name>#<id>`` (all but the oldest, each rename
audited), token events become coordinator-scoped (they name tokens and roles a site must not
see), and every existing audit event is hashed onto the chain in id order, so a log that was
intact before the upgrade verifies after it.
"""

from datetime import UTC, datetime
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op

from fedcl.server.registry.audit_chain import GENESIS_HASH, SCOPE_COORDINATOR, event_hash

revision: str = "0003"
down_revision: Union[str, Sequence[str], None] = "0002"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

_events = sa.table(
    "audit_events",
    sa.column("id", sa.Integer()),
    sa.column("run_id", sa.String()),
    sa.column("site_id", sa.String()),
    sa.column("kind", sa.String()),
    sa.column("message", sa.Text()),
    sa.column("actor", sa.String()),
    sa.column("scope", sa.String()),
    sa.column("created_at", sa.DateTime(timezone=True)),
    sa.column("prev_hash", sa.String()),
    sa.column("hash", sa.String()),
)
_tokens = sa.table("api_tokens", sa.column("id", sa.Integer()), sa.column("name", sa.String()))


def _rename_repeated_token_names(bind: sa.Connection) -> None:
    rows = bind.execute(sa.select(_tokens.c.id, _tokens.c.name).order_by(_tokens.c.id)).all()
    taken = {name for _, name in rows}
    seen: set[str] = set()
    for token_id, name in rows:
        if name not in seen:
            seen.add(name)
            continue
        suffix = f"#{token_id}"
        new = name[: 128 - len(suffix)] + suffix
        while new in taken:
            suffix += "_"
            new = name[: 128 - len(suffix)] + suffix
        taken.add(new)
        bind.execute(sa.update(_tokens).where(_tokens.c.id == token_id).values(name=new))
        bind.execute(
            sa.insert(_events).values(
                kind="token.renamed",
                message=f"API token {token_id} renamed {name!r} -> {new!r}: token names are unique",
                actor="migration 0003",
                scope=SCOPE_COORDINATOR,
                created_at=datetime.now(UTC),
            )
        )


def _backfill_chain(bind: sa.Connection) -> None:
    prev = GENESIS_HASH
    last_id = None
    query = sa.select(*[c for c in _events.c if c.name not in ("prev_hash", "hash")])
    for row in bind.execute(query.order_by(_events.c.id)).mappings().all():
        digest = event_hash(row, prev)
        bind.execute(
            sa.update(_events).where(_events.c.id == row["id"]).values(prev_hash=prev, hash=digest)
        )
        prev, last_id = digest, row["id"]
    bind.execute(
        sa.text("INSERT INTO audit_chain_head (id, last_event_id, last_hash) VALUES (1, :e, :h)"),
        {"e": last_id, "h": prev},
    )


def upgrade() -> None:
    op.create_table(
        "audit_chain_head",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("last_event_id", sa.Integer(), nullable=True),
        sa.Column("last_hash", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_chain_head"),
    )
    op.create_table(
        "dashboard_sessions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_id", sa.Integer(), nullable=False),
        sa.Column("session_hash", sa.String(64), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_dashboard_sessions"),
        sa.ForeignKeyConstraint(
            ["token_id"],
            ["api_tokens.id"],
            name="fk_dashboard_sessions_token_id_api_tokens",
            ondelete="CASCADE",
        ),
        sa.UniqueConstraint("session_hash", name="uq_dashboard_sessions_session_hash"),
    )
    op.create_index("ix_dashboard_sessions_token_id", "dashboard_sessions", ["token_id"])
    with op.batch_alter_table("audit_events") as batch:
        batch.add_column(
            sa.Column("scope", sa.String(16), nullable=False, server_default="federation")
        )
        batch.add_column(sa.Column("prev_hash", sa.String(64), nullable=True))
        batch.add_column(sa.Column("hash", sa.String(64), nullable=True))

    bind = op.get_bind()
    _rename_repeated_token_names(bind)
    bind.execute(
        sa.update(_events).where(_events.c.kind.like("token.%")).values(scope=SCOPE_COORDINATOR)
    )
    _backfill_chain(bind)

    with op.batch_alter_table("audit_events") as batch:
        batch.alter_column("prev_hash", existing_type=sa.String(64), nullable=False)
        batch.alter_column("hash", existing_type=sa.String(64), nullable=False)
    with op.batch_alter_table("api_tokens") as batch:
        batch.create_unique_constraint("uq_api_tokens_name", ["name"])


def downgrade() -> None:
    with op.batch_alter_table("api_tokens") as batch:
        batch.drop_constraint("uq_api_tokens_name", type_="unique")
    with op.batch_alter_table("audit_events") as batch:
        batch.drop_column("hash")
        batch.drop_column("prev_hash")
        batch.drop_column("scope")
    op.drop_index("ix_dashboard_sessions_token_id", table_name="dashboard_sessions")
    op.drop_table("dashboard_sessions")
    op.drop_table("audit_chain_head")
