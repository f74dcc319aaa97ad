"""SQLAlchemy ORM models of the coordinator registry.

The schema itself is created only by the Alembic migrations in ``migrations/versions``; these
classes must stay in step with them (``tests/test_registry.py`` compares the two). Enum-like
columns (statuses, phases, kinds) are plain strings validated by the facade rather than database
CHECK constraints, so a later feature can add a value without rebuilding tables on SQLite.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

from fedcl.config.vocabulary import VersionKind, VersionState

# Deterministic constraint names: Alembic needs names to drop or alter constraints later, and
# SQLite batch migrations cannot reflect unnamed ones.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Current time as an aware UTC datetime (the only kind the registry stores)."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """``TIMESTAMP WITH TIME ZONE`` that always round-trips as an aware UTC datetime.

    PostgreSQL stores the instant and returns it in the session time zone; SQLite has no time zone
    support and returns naive values. Normalising here means callers never compare naive with
    aware datetimes, whichever backend the coordinator uses.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"registry timestamps must be timezone-aware, got naive {value!r}")
        value = value.astimezone(UTC)
        # SQLite's DATETIME storage format has no offset field; store naive UTC.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base carrying the naming convention shared with the migrations."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _created_at() -> Mapped[datetime]:
    return mapped_column(UTCDateTime(), default=utcnow, server_default=func.now())


class Run(Base):
    """A federated run; the primary key is the user-visible run id (also the artifacts folder)."""

    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    scenario: Mapped[str] = mapped_column(String(200))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created_at()
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    tasks: Mapped[list[Task]] = relationship(
        order_by="Task.index", cascade="all, delete-orphan", passive_deletes=True
    )


class Task(Base):
    """A continual-learning task of a run, in the order the federation trains them."""

    __tablename__ = "tasks"
    __table_args__ = (UniqueConstraint("run_id", "index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(200))


class Round(Base):
    """One server round; ``server_round`` is Flower's global counter within the run."""

    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("run_id", "server_round"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    task_index: Mapped[int] = mapped_column(Integer)
    round_in_task: Mapped[int] = mapped_column(Integer)
    server_round: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    seconds: Mapped[float] = mapped_column(Float, default=0.0, server_default=text("0"))
    bytes_up: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    bytes_down: Mapped[int] = mapped_column(BigInteger, default=0, server_default=text("0"))
    num_participants: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    num_failures: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    num_refusals: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))


class Site(Base):
    """A site (Flower SuperNode) identified by its stable site id, shared across runs."""

    __tablename__ = "sites"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    first_seen: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Participation(Base):
    """What one site did in one phase of one round (trained, refused, failed, ...)."""

    __tablename__ = "participations"
    __table_args__ = (UniqueConstraint("round_id", "site_id", "phase"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"))
    site_id: Mapped[str] = mapped_column(ForeignKey("sites.id"), index=True)
    phase: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16))
    num_examples: Mapped[int] = mapped_column(Integer, default=0, server_default=text("0"))
    detail: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created_at()


class Metric(Base):
    """A metric value; ``site_id`` NULL means the federation aggregate.

    ``value`` is nullable only because SQLite silently stores NaN as NULL; the facade maps NULL
    back to NaN so a diverged loss is still recorded rather than rejected.
    """

    __tablename__ = "metrics"
    __table_args__ = (Index("ix_metrics_run_id_name", "run_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    round_id: Mapped[int | None] = mapped_column(
        ForeignKey("rounds.id", ondelete="CASCADE"), index=True
    )
    site_id: Mapped[str | None] = mapped_column(ForeignKey("sites.id"))
    task_index: Mapped[int | None] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(128))
    value: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = _created_at()


class ModelVersion(Base):
    """A saved global model; the bytes live on disk at ``path`` (relative to the artifacts dir)."""

    __tablename__ = "model_versions"
    __table_args__ = (
        UniqueConstraint("path"),
        Index("ix_model_versions_run_id_server_round", "run_id", "server_round"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    round_id: Mapped[int | None] = mapped_column(ForeignKey("rounds.id", ondelete="SET NULL"))
    task_index: Mapped[int] = mapped_column(Integer)
    server_round: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(512))
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    encrypted: Mapped[bool] = mapped_column(Boolean)
    format: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(
        String(16), default=VersionState.CANDIDATE, server_default=VersionState.CANDIDATE
    )
    #: ``model`` (a global model: only these can be promoted), ``fisher`` (a consolidated
    #: task's summed Fisher, an EWC input) or ``release`` (a site's decrypted copy of an
    #: encrypted model version, ``released_from``).
    kind: Mapped[str] = mapped_column(
        String(16), default=VersionKind.MODEL, server_default=VersionKind.MODEL
    )
    released_from: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = _created_at()


class PrivacySpend(Base):
    """Differential-privacy spend a site reported after a round."""

    __tablename__ = "privacy_spend"
    __table_args__ = (Index("ix_privacy_spend_run_id_site_id", "run_id", "site_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    # SET NULL: privacy spent at a site is never refunded, even if its round is deleted.
    round_id: Mapped[int | None] = mapped_column(ForeignKey("rounds.id", ondelete="SET NULL"))
    site_id: Mapped[str] = mapped_column(ForeignKey("sites.id"))
    epsilon_run: Mapped[float] = mapped_column(Float)
    epsilon_lifetime: Mapped[float] = mapped_column(Float)
    delta: Mapped[float] = mapped_column(Float)
    budget: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = _created_at()


class DriftEvent(Base):
    """A site's drift report for one round: the two scores and alert bits it released.

    ``status`` is the reply's (a site may refuse a report its budget or policy does not allow,
    then the scores are NULL).
    """

    __tablename__ = "drift_events"
    __table_args__ = (Index("ix_drift_events_run_id_site_id", "run_id", "site_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"))
    site_id: Mapped[str] = mapped_column(ForeignKey("sites.id"))
    status: Mapped[str] = mapped_column(String(16))
    score: Mapped[float | None] = mapped_column(Float)
    alert: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    rate_shift: Mapped[float | None] = mapped_column(Float)
    rate_alert: Mapped[bool] = mapped_column(Boolean, default=False, server_default=text("false"))
    created_at: Mapped[datetime] = _created_at()


class TaskStart(Base):
    """When and why a task of a run began: on schedule, or opened by drift (and by whom)."""

    __tablename__ = "task_starts"
    __table_args__ = (UniqueConstraint("run_id", "task_index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    task_index: Mapped[int] = mapped_column(Integer)
    server_round: Mapped[int] = mapped_column(Integer)
    trigger: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = _created_at()


class AuditEvent(Base):
    """Append-only audit log, each event chained to the one before it by hash (audit_chain.py).

    ``run_id``/``site_id`` deliberately have no foreign keys: the log must be able to record events
    about things that do not (or no longer) exist, such as a rejected unknown site. ``scope`` says
    who may read an event without a site: ``federation`` (every token) or ``coordinator`` (admin
    and viewer tokens only); an event with a site is also readable by that site's tokens.
    """

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[str | None] = mapped_column(String(128), index=True)
    site_id: Mapped[str | None] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(String(128), default="system", server_default="system")
    scope: Mapped[str] = mapped_column(
        String(16), default="federation", server_default="federation"
    )
    created_at: Mapped[datetime] = mapped_column(
        UTCDateTime(), default=utcnow, server_default=func.now(), index=True
    )
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditChainHead(Base):
    """The chain's last event (one row, id 1): the lock every audit writer takes, and the check
    that no event was cut off the end of the log (which no link inside the chain can show)."""

    __tablename__ = "audit_chain_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    last_event_id: Mapped[int | None] = mapped_column(Integer)
    last_hash: Mapped[str] = mapped_column(String(64))


class ApiToken(Base):
    """A dashboard/API token; only the SHA-256 of the token is stored. Names are unique: a name
    is the audit actor of everything done with the token."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    role: Mapped[str] = mapped_column(String(32))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = _created_at()
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class DashboardSession(Base):
    """A signed-in browser: the cookie holds a random session id, the registry its SHA-256.

    A session ends at ``expires_at``, at logout (``ended_at``) or when its token is revoked; the
    token itself never travels in a cookie.
    """

    __tablename__ = "dashboard_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_id: Mapped[int] = mapped_column(
        ForeignKey("api_tokens.id", ondelete="CASCADE"), index=True
    )
    session_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = _created_at()
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
