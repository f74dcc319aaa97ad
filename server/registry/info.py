"""Plain, frozen snapshots of registry rows.

The registry hands these out instead of ORM objects: every facade method is its own short
transaction, so an ORM object would be detached (and lazily-loaded attributes would fail) the
moment the method returns. Snapshots are also safe to pass between threads and to the dashboard.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True)
class RunInfo:
    """One federated run; ``tasks`` are the continual-learning task names in task-index order."""

    id: str
    name: str
    scenario: str
    config: dict[str, Any]
    status: str
    reason: str | None
    tasks: list[str]
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True)
class RoundInfo:
    """One server round; the counts are derived from its train/consolidate participations."""

    id: int
    run_id: str
    task_index: int
    round_in_task: int
    server_round: int
    kind: str
    status: str
    started_at: datetime
    finished_at: datetime | None
    seconds: float
    bytes_up: int
    bytes_down: int
    num_participants: int
    num_failures: int
    num_refusals: int


@dataclass(frozen=True)
class ParticipationInfo:
    """What one site did in one phase of one round."""

    id: int
    run_id: str
    round_id: int
    server_round: int
    site_id: str
    phase: str
    status: str
    num_examples: int
    detail: str | None
    created_at: datetime


@dataclass(frozen=True)
class SiteInfo:
    """A site the coordinator has heard from, across all runs."""

    id: str
    first_seen: datetime
    last_seen: datetime


@dataclass(frozen=True)
class MetricRow:
    """A metric to record; ``site_id=None`` is the federation aggregate.

    ``task_index`` is the task the metric is *about* (accuracy on task j after training task i),
    which differs from the task of the round it was measured in.
    """

    name: str
    value: float
    site_id: str | None = None
    task_index: int | None = None


@dataclass(frozen=True)
class MetricInfo:
    """A recorded metric joined with its round.

    ``round_task_index`` is the task being trained in that round; ``task_index`` is the task the
    metric is about. Both are needed to draw a continual-learning accuracy matrix.
    """

    id: int
    run_id: str
    round_id: int | None
    server_round: int | None
    round_task_index: int | None
    task_index: int | None
    site_id: str | None
    name: str
    value: float
    created_at: datetime


@dataclass(frozen=True)
class ModelVersionInfo:
    """A global model saved by the coordinator; ``path`` is relative to the artifacts folder."""

    id: int
    run_id: str
    round_id: int | None
    task_index: int
    server_round: int
    path: str
    sha256: str
    size_bytes: int
    encrypted: bool
    format: str
    status: str
    created_at: datetime


@dataclass(frozen=True)
class PrivacyInfo:
    """Differential-privacy spend a site reported (epsilon for this run and over its lifetime)."""

    id: int
    run_id: str
    round_id: int | None
    server_round: int | None
    site_id: str
    epsilon_run: float
    epsilon_lifetime: float
    delta: float
    budget: float | None
    created_at: datetime


@dataclass(frozen=True)
class AuditInfo:
    """An append-only audit log entry."""

    id: int
    run_id: str | None
    site_id: str | None
    kind: str
    message: str
    actor: str
    created_at: datetime


@dataclass(frozen=True)
class TokenInfo:
    """An API token's metadata; the plaintext token is never stored, so it is not here either."""

    id: int
    name: str
    role: str
    created_at: datetime
    revoked_at: datetime | None = field(default=None)
