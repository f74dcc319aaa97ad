"""Response models of the dashboard's JSON API, kept apart from the registry's ORM and snapshots.

They are the API's published contract (they generate ``/openapi.json``): the registry's tables can
evolve without breaking a script that reads the API, as long as these stay. They are built from
the registry's snapshots by validation (``model_validate``), never by copying fields. Floats are
``FiniteOrNull`` (``float | None``) wherever the registry may hold NaN (a diverged loss): JSON
has no NaN, and the API sends ``null`` instead.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .floats import FiniteOrNull, FiniteOrZero


class _Out(BaseModel):
    # from_attributes: the registry's snapshots (info.py) validate straight into these, so a
    # field is never copied by hand; FiniteOrNull fields turn the registry's NaN into null.
    model_config = ConfigDict(frozen=True, from_attributes=True)


class RunOut(_Out):
    """A run as listed."""

    id: str
    name: str
    scenario: str
    status: str = Field(description="running, completed, failed or stopped")
    reason: str | None
    tasks: list[str] = Field(description="Continual-learning task names, in training order")
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    lost_site_rounds: int = Field(
        0,
        description="Train/consolidate site-rounds that did not contribute (failed, refused or "
        "rejected): a completed run with any is not a plain success",
    )
    health: str = Field(
        "",
        description="What the badge says: running; stale (running, but nothing recorded for "
        "longer than its rounds allow: the coordinator is gone); completed; degraded (completed, "
        "but sites failed or refused); failed; stopped",
    )
    idle_seconds: float | None = Field(None, description="Seconds since anything was recorded")
    method: str | None = Field(None, description="Continual method (continual.method)")
    dp: bool = Field(False, description="DP-SGD at the sites (dp.enabled)")
    he: bool = Field(False, description="CKKS-encrypted aggregation (he.enabled)")
    rounds_completed: int = 0
    avg_accuracy: float | None = Field(None, description="Mean accuracy after the last task (ACC)")
    bwt: float | None = Field(None, description="Backward transfer (negative = forgetting)")
    fwt: float | None = Field(None, description="Forward transfer")
    epsilon: float | None = Field(None, description="Largest ε one site spent in this run")


class RunPage(_Out):
    """One page of runs, newest first; ``total`` counts every run matching the filter."""

    items: list[RunOut]
    total: int
    limit: int
    offset: int


class RunDetail(RunOut):
    """A run with its configuration and a summary of its progress."""

    config: dict[str, Any]
    rounds_total: int
    rounds_completed: int
    rounds_failed: int
    last_server_round: int | None
    sites: list[str] = Field(description="Sites that took part (only your own for a site token)")
    versions: dict[str, int] = Field(description="Number of model versions per status")
    avg_accuracy: float | None = Field(description="Mean accuracy after the last task (ACC)")
    bwt: float | None = Field(description="Backward transfer (negative = forgetting)")
    fwt: float | None = Field(description="Forward transfer")


class TaskOut(_Out):
    """A continual-learning task of a run and the server rounds that trained it."""

    index: int
    name: str
    rounds: int
    first_server_round: int | None
    last_server_round: int | None
    consolidated: bool = Field(description="Whether a consolidation round ran for this task")


class ParticipationOut(_Out):
    """What one site did in one phase of a round."""

    site_id: str
    phase: str = Field(description="train, evaluate or consolidate")
    status: str = Field(description="ok, failed, refused (e.g. privacy budget) or rejected")
    num_examples: int
    detail: str | None


class RoundOut(_Out):
    """One server round with its participations (a site token sees only its own)."""

    id: int
    server_round: int
    task_index: int
    round_in_task: int
    kind: str
    status: str
    started_at: datetime
    finished_at: datetime | None
    seconds: FiniteOrZero
    bytes_up: int = Field(description="Bytes the sites sent to the coordinator")
    bytes_down: int = Field(description="Bytes the coordinator sent to the sites")
    num_participants: int
    num_failures: int
    num_refusals: int
    participations: list[ParticipationOut]


class MetricOut(_Out):
    """A metric value; ``site_id`` null is the federation aggregate."""

    id: int
    name: str
    value: FiniteOrNull = Field(description="null where the registry holds NaN")
    site_id: str | None
    task_index: int | None = Field(description="The task the metric is about")
    server_round: int | None = Field(description="null for run-level metrics (e.g. baseline)")
    round_task_index: int | None = Field(description="The task being trained in that round")
    created_at: datetime


class AccuracyMatrixOut(_Out):
    """R[i][j]: accuracy on evaluation task j after the last round of training task i."""

    run_id: str
    site_id: str | None = Field(description="null: the federation's matrix")
    tasks: list[str]
    eval_tasks: list[str]
    matrix: list[list[FiniteOrNull]]
    baseline: list[FiniteOrNull] = Field(description="Accuracy of the untrained model per task")
    avg_accuracy: FiniteOrNull
    bwt: FiniteOrNull
    fwt: FiniteOrNull


class PrivacyOut(_Out):
    """Differential-privacy spend one site reported after a round."""

    run_id: str
    site_id: str
    server_round: int | None
    epsilon_run: FiniteOrNull
    epsilon_lifetime: FiniteOrNull
    delta: FiniteOrNull
    budget: FiniteOrNull
    created_at: datetime


class HashAgreementOut(_Out):
    """What the registry records about a site's model-hash agreement, if anything.

    Sites report the SHA-256 of the model after applying an aggregate (docs/DESIGN.md §4); the
    dashboard shows whatever metric or audit event recorded the check, and nothing when none did.
    """

    metric: str | None = Field(description="Name of the latest hash-related metric, if any")
    value: FiniteOrNull
    run_id: str | None
    server_round: int | None
    audit_events: int = Field(description="Hash-related audit events about this site")
    last_event: str | None


class SiteOut(_Out):
    """A site, across all runs: when it was last seen, what it did, its reported privacy spend."""

    id: str
    first_seen: datetime
    last_seen: datetime
    runs: int
    rounds_ok: int
    rounds_failed: int
    rounds_refused: int
    last_run_id: str | None
    last_server_round: int | None
    epsilon_run: FiniteOrNull = Field(description="Latest reported ε of its latest run")
    epsilon_lifetime: FiniteOrNull = Field(description="Latest reported lifetime ε")
    budget: FiniteOrNull = Field(description="ε budget the site reported with it")
    budget_used: float | None = Field(description="epsilon_lifetime / budget, as reported")
    hash_agreement: HashAgreementOut | None


class SiteRunOut(_Out):
    """One site's part in one run."""

    run_id: str
    rounds_ok: int
    rounds_failed: int
    rounds_refused: int
    examples: int | None = Field(description="null under HE: the count travels encrypted")
    last_server_round: int | None
    errors: list[str]


class SiteDetail(SiteOut):
    """A site with its per-run participation and privacy history."""

    per_run: list[SiteRunOut]
    privacy: list[PrivacyOut]


class VersionOut(_Out):
    """A model version; ``encrypted`` ones can only be downloaded as the raw CKKS blob."""

    id: int
    run_id: str
    round_id: int | None
    task_index: int
    server_round: int
    sha256: str
    size_bytes: int
    encrypted: bool
    format: str
    status: str = Field(description="candidate, production, archived or rolled_back")
    kind: str = Field(
        "model",
        description="model (promotable); fisher (a task's summed Fisher, an EWC input); release "
        "(a site's decrypted copy of the encrypted version released_from)",
    )
    released_from: int | None = None
    created_at: datetime
    mean_accuracy: float | None = Field(
        description="Mean federation accuracy measured in the version's round, if recorded"
    )
    download_url: str


class VersionChangeOut(_Out):
    """The result of promote/candidate/rollback: every version whose status changed."""

    message: str
    version: VersionOut
    restored: VersionOut | None = Field(
        default=None, description="Rollback only: the version restored to production"
    )


class CanaryOut(_Out):
    """What the canary rule decided for a run."""

    run_id: str
    action: Literal["rolled_back", "kept", "promoted", "skipped"]
    message: str
    max_drop: float
    candidate_id: int | None
    production_id: int | None
    candidate_accuracy: float | None
    production_accuracy: float | None


class AuditOut(_Out):
    """An audit log entry; ``actor`` is the token name for changes made through the dashboard.

    ``hash`` chains it to the event before it (``prev_hash``): ``fedcl audit verify`` recomputes
    the chain. ``scope`` ``coordinator``: never shown to other sites' tokens.
    """

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


class TokenOut(_Out):
    """An API token's metadata (never the token); ``sessions``: live dashboard sign-ins."""

    id: int
    name: str
    role: str
    created_at: datetime
    revoked_at: datetime | None
    sessions: int


class AccuracySeries(_Out):
    """Federation accuracy on one evaluation task over server rounds (round 0 = baseline)."""

    task_index: int
    task: str
    server_rounds: list[int]
    values: list[float | None]


class EpsilonSeries(_Out):
    """One site's reported ε over server rounds."""

    site_id: str
    server_rounds: list[int | None]
    epsilon_run: list[FiniteOrNull] = Field(description="ε spent in this run")
    epsilon_lifetime: list[FiniteOrNull] = Field(
        default_factory=list, description="The site's lifetime ε (all runs) after each round"
    )
    budget: FiniteOrNull = Field(description="The site's lifetime ε budget")


class DriftEventOut(_Out):
    """A site's drift report for a round: the two scores and alert bits it released."""

    server_round: int
    task_index: int
    site_id: str
    status: str = Field(description="The report's status: ok, refused (budget, policy), failed")
    score: FiniteOrNull = Field(description="Calibrated drift score: the site alerts above 1")
    alert: bool
    rate_shift: FiniteOrNull = Field(description="Largest move of one predicted class's rate")
    rate_alert: bool


class TaskStartOut(_Out):
    """When a task began and why: ``scheduled``, or opened by ``drift`` / a class ``rate``."""

    task_index: int
    server_round: int
    trigger: str
    reason: str


class DriftMap(_Out):
    """The run's drift at a glance: score per site (rows) and server round (columns)."""

    sites: list[str] = Field(default_factory=list)
    server_rounds: list[int] = Field(default_factory=list)
    scores: list[list[FiniteOrNull]] = Field(
        default_factory=list, description="scores[i][j]: site i in server round j (null: none)"
    )
    alerts: list[DriftEventOut] = Field(default_factory=list, description="Reports that alerted")
    task_starts: list[TaskStartOut] = Field(default_factory=list)


class FailureGroup(_Out):
    """One kind of failure (same status, phase and error), with every site and round it hit."""

    status: str
    phase: str
    detail: str | None
    sites: list[str]
    server_rounds: list[int]
    count: int = Field(description="Site-rounds in the group")


class AlertOut(_Out):
    """Something a coordinator should act on (also exported as ``fedcl_run_alert``)."""

    kind: Literal["accuracy_drop", "budget", "site_failing"]
    severity: Literal["warning", "critical"]
    message: str
    site_id: str | None = None
    server_round: int | None = None


class RunSiteOut(_Out):
    """One site in one run (the run page's per-site table)."""

    site_id: str
    rounds_trained: int
    failed_rounds: int
    refused_rounds: int
    examples: int | None = Field(description="null under HE: the count travels encrypted")
    avg_accuracy: FiniteOrNull
    bwt: FiniteOrNull
    epsilon: FiniteOrNull = Field(description="ε spent in this run")
    epsilon_lifetime: FiniteOrNull
    budget: FiniteOrNull


class ModelHashOut(_Out):
    """Whether the sites held the same global model (their SHA-256 reports, docs/DESIGN.md §4)."""

    rounds_checked: int
    rounds_agreed: int
    disagreed_rounds: list[int]


class RunCharts(_Out):
    """Everything the run page draws, in one response so the page can poll a single endpoint.

    ``rounds`` carry only the participations that were not ``ok`` (the incidents: a 30-site run
    has 60 rows per round); ``/api/runs/{id}/rounds`` has them all.
    """

    run: RunOut
    poll: bool = Field(description="True while the run is running: poll again for updates")
    eval_tasks: list[str]
    task_boundaries: list[int] = Field(description="First server round of each task after the 1st")
    accuracy: list[AccuracySeries]
    matrix: AccuracyMatrixOut
    privacy: list[EpsilonSeries]
    rounds: list[RoundOut]
    drift: DriftMap = Field(default_factory=DriftMap)
    failures: list[FailureGroup] = Field(default_factory=list)
    alerts: list[AlertOut] = Field(default_factory=list)
    sites: list[RunSiteOut] = Field(default_factory=list)
    model_hash: ModelHashOut | None = None
    examples_hidden: bool = Field(False, description="HE: example counts are encrypted")


class Problem(_Out):
    """Error body: FastAPI's usual ``{"detail": ...}``."""

    detail: str
