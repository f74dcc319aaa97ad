"""Frozen snapshots of registry rows: what every facade method returns instead of ORM objects.

Every facade method is its own short transaction, so an ORM object would be detached (and its
lazily-loaded attributes would fail) the moment the method returns. Snapshots are also safe to
pass between threads and to the dashboard.

They are pydantic models validated once, straight from the ORM row or query row
(``from_attributes``), and the dashboard's response models validate straight from them the same
way: a field is named in the table, here and in the API schema, and never copied by hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, field_validator


class Record(BaseModel):
    """Base of the snapshots: immutable, and built from any object with the right attributes."""

    model_config = ConfigDict(frozen=True, from_attributes=True)


class RunFingerprint(NamedTuple):
    """What :meth:`~fedcl.server.registry.Registry.run_fingerprint` returns: the run's status
    fields and, per table a run's pages read, its row count and newest id. A tuple, so it
    compares and hashes as a cache key; named, so a reader (the dashboard's incremental rows)
    reads a table's marks by name rather than by position."""

    status: str | None
    updated_at: datetime | None
    reason: str | None
    newest_audit: int | None
    participations: int
    newest_participation: int | None
    rounds: int
    newest_round: int | None
    metrics: int
    newest_metric: int | None
    privacy: int
    newest_privacy: int | None
    drift: int
    newest_drift: int | None
    task_starts: int
    newest_task_start: int | None
    versions: int
    newest_version: int | None


class RunInfo(Record):
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

    @field_validator("tasks", mode="before")
    @classmethod
    def _task_names(cls, tasks: list[Any]) -> list[Any]:
        # The ORM row holds Task rows (ordered by index); the snapshot keeps only their names.
        return [getattr(task, "name", task) for task in tasks]


class RoundInfo(Record):
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


class ParticipationInfo(Record):
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


class SiteInfo(Record):
    """A site the coordinator has heard from, across all runs."""

    id: str
    first_seen: datetime
    last_seen: datetime


@dataclass(frozen=True)
class MetricRow:
    """A metric to record (an input, not a snapshot); ``site_id=None`` is the federation aggregate.

    ``task_index`` is the task the metric is *about* (accuracy on task j after training task i),
    which differs from the task of the round it was measured in.
    """

    name: str
    value: float
    site_id: str | None = None
    task_index: int | None = None


class MetricInfo(Record):
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

    @field_validator("value", mode="before")
    @classmethod
    def _nan_from_null(cls, value: float | None) -> float:
        # SQLite stores NaN as NULL, so the column is nullable; a diverged loss reads back as NaN.
        return math.nan if value is None else value


class ModelVersionInfo(Record):
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
    kind: str = "model"
    released_from: int | None = None
    created_at: datetime


class PrivacyInfo(Record):
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


class AuditInfo(Record):
    """An append-only audit log entry and its link in the hash chain."""

    id: int
    run_id: str | None
    site_id: str | None
    kind: str
    message: str
    actor: str
    scope: str
    created_at: datetime
    prev_hash: str
    hash: str


class TokenInfo(Record):
    """An API token's metadata; the plaintext token is never stored, so it is not here either."""

    id: int
    name: str
    role: str
    created_at: datetime
    revoked_at: datetime | None = None
    sessions: int = 0  # live dashboard sessions (filled by list_tokens only)


class SessionInfo(Record):
    """A live dashboard session: who it signs in as, and until when."""

    id: int
    token: TokenInfo
    created_at: datetime
    expires_at: datetime


class DriftInfo(Record):
    """A site's drift report for a round (scores NULL when the site refused or failed)."""

    id: int
    run_id: str
    round_id: int
    server_round: int
    task_index: int
    site_id: str
    status: str
    score: float | None
    alert: bool
    rate_shift: float | None
    rate_alert: bool
    created_at: datetime


class TaskStartInfo(Record):
    """When a task began (its first server round) and why: ``scheduled`` or opened by drift."""

    run_id: str
    task_index: int
    server_round: int
    trigger: str
    reason: str
    created_at: datetime
