"""``/api/runs``: runs, their tasks, rounds, metrics, accuracy matrix, chart data and canary."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Response, status

from fedcl.server.canary import assess_canary

from .. import service
from ..deps import (
    MAX_DB_INT,
    TEXT_PATTERN,
    Admin,
    Limit,
    Offset,
    Reader,
    RegistryDep,
    RunId,
    SiteFilter,
    check_site_visible,
    get_run_or_404,
)
from ..schemas import (
    AccuracyMatrixOut,
    CanaryOut,
    DriftMap,
    MetricOut,
    Problem,
    RoundOut,
    RunCharts,
    RunDetail,
    RunPage,
    TaskOut,
)

router = APIRouter(
    prefix="/api/runs",
    tags=["runs"],
    responses={
        401: {"model": Problem, "description": "Missing or invalid token"},
        404: {"model": Problem, "description": "Unknown run"},
    },
)

# Spelled out for type checkers; test_dashboard.py checks it matches the registry's RUN_STATUSES.
RunStatus = Literal["running", "completed", "failed", "stopped"]
_FORBIDDEN = {403: {"model": Problem, "description": "Another site's rows, or not admin"}}


@router.get("", response_model=RunPage, summary="List runs (newest first)")
def list_runs(
    registry: RegistryDep,
    _: Reader,
    status: Annotated[RunStatus | None, Query(description="Only runs in this status")] = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> RunPage:
    items, total = service.list_runs(registry, status=status, limit=limit, offset=offset)
    return RunPage(items=items, total=total, limit=limit, offset=offset)


@router.get("/{run_id}", response_model=RunDetail, summary="One run with its progress summary")
def get_run(run_id: RunId, registry: RegistryDep, principal: Reader) -> RunDetail:
    return service.run_detail(registry, get_run_or_404(registry, run_id), principal)


@router.get("/{run_id}/tasks", response_model=list[TaskOut], summary="The run's tasks")
def list_tasks(run_id: RunId, registry: RegistryDep, _: Reader) -> list[TaskOut]:
    return service.task_list(registry, get_run_or_404(registry, run_id))


@router.get(
    "/{run_id}/rounds",
    response_model=list[RoundOut],
    summary="Rounds: participants, failures, refusals, seconds, bytes",
    description="A site token sees every round's counts but only its own participation rows.",
)
def list_rounds(run_id: RunId, registry: RegistryDep, principal: Reader) -> list[RoundOut]:
    get_run_or_404(registry, run_id)
    return service.round_list(registry, run_id, principal)


@router.get(
    "/{run_id}/metrics",
    response_model=list[MetricOut],
    responses=_FORBIDDEN,
    summary="Metrics, filtered by site, task, name and round",
    description=(
        "Without `site`, admin and viewer tokens get every row and a site token gets the "
        "federation aggregates plus its own rows. Names include `accuracy`, `loss`, "
        "`train_loss` and `baseline_accuracy` (round null: the untrained model)."
    ),
)
def list_metrics(
    run_id: RunId,
    registry: RegistryDep,
    principal: Reader,
    site: SiteFilter = None,
    federation_only: Annotated[
        bool, Query(description="Only federation aggregates (site null)")
    ] = False,
    name: Annotated[
        str | None, Query(pattern=TEXT_PATTERN, max_length=128, description="Metric name")
    ] = None,
    task: Annotated[
        int | None, Query(ge=0, le=MAX_DB_INT, description="Task index the metric is about")
    ] = None,
    round: Annotated[int | None, Query(ge=0, le=MAX_DB_INT, description="Server round")] = None,
) -> list[MetricOut]:
    get_run_or_404(registry, run_id)
    check_site_visible(principal, site)
    return service.metric_list(
        registry,
        run_id,
        principal,
        site_id=site,
        federation_only=federation_only,
        name=name,
        task_index=task,
        server_round=round,
    )


@router.get(
    "/{run_id}/accuracy-matrix",
    response_model=AccuracyMatrixOut,
    responses=_FORBIDDEN,
    summary="Accuracy matrix R[i][j] of the federation, or of one site",
    description="404 if the run is unknown or the site took no part in it.",
)
def get_accuracy_matrix(
    run_id: RunId, registry: RegistryDep, principal: Reader, site: SiteFilter = None
) -> AccuracyMatrixOut:
    run = get_run_or_404(registry, run_id)
    check_site_visible(principal, site)
    matrix = service.matrix_out(registry, run, site_id=site)
    if matrix is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"site {site!r} took no part in run {run_id!r}"
        )
    return matrix


@router.get(
    "/{run_id}/charts",
    response_model=RunCharts,
    summary="Everything the run page draws (polled while the run is running)",
)
def get_charts(run_id: RunId, registry: RegistryDep, principal: Reader) -> Response:
    # Serialised once per change of the run (service.run_charts_json), not once per poll.
    body = service.run_charts_json(registry, get_run_or_404(registry, run_id), principal)
    return Response(content=body, media_type="application/json")


@router.get(
    "/{run_id}/drift",
    response_model=DriftMap,
    summary="Drift: score per site and round, the alerts, and why each task began",
    description="A site token sees only its own reports; task starts are the run's.",
)
def get_drift(run_id: RunId, registry: RegistryDep, principal: Reader) -> DriftMap:
    get_run_or_404(registry, run_id)
    return service.drift_map(registry, run_id, principal)


def _attachment(body: str, media_type: str, filename: str) -> Response:
    return Response(
        content=body,
        media_type=media_type,
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )


@router.get(
    "/{run_id}/results.json",
    response_class=Response,
    responses={200: {"content": {"application/json": {}}}},
    summary="Download the run's results.json",
    description=(
        "The document `fedcl simulate` writes (built from the registry alone: "
        "`fedcl.server.results.build_results`). A site token gets its own site's entry only."
    ),
)
def download_results(run_id: RunId, registry: RegistryDep, principal: Reader) -> Response:
    run = get_run_or_404(registry, run_id)
    return _attachment(
        service.results_json(registry, run, principal), "application/json", f"{run_id}-results.json"
    )


@router.get(
    "/{run_id}/metrics.csv",
    response_class=Response,
    responses={200: {"content": {"text/csv": {}}}},
    summary="Download the run's metrics as CSV",
    description="One row per metric value the token may see: round, task, site, name, value.",
)
def download_metrics(run_id: RunId, registry: RegistryDep, principal: Reader) -> Response:
    get_run_or_404(registry, run_id)
    return _attachment(
        service.metrics_csv(registry, run_id, principal), "text/csv", f"{run_id}-metrics.csv"
    )


@router.get(
    "/{run_id}/ledger.csv",
    response_class=Response,
    responses={200: {"content": {"text/csv": {}}}},
    summary="Download the run's privacy-ledger summary as CSV",
    description=(
        "Per site: ε spent in this run, lifetime ε, δ and budget as the site last reported "
        "them, the budget's used share, and the rounds it trained, failed and refused."
    ),
)
def download_ledger(run_id: RunId, registry: RegistryDep, principal: Reader) -> Response:
    run = get_run_or_404(registry, run_id)
    return _attachment(
        service.ledger_csv(registry, run, principal), "text/csv", f"{run_id}-ledger.csv"
    )


@router.post(
    "/{run_id}/canary",
    response_model=CanaryOut,
    responses=_FORBIDDEN,
    summary="Apply the canary rule (admin)",
    description=(
        "Compares the mean federation accuracy of the run's newest candidate version's round "
        "with that of the production version's round (on the tasks both evaluated). If it "
        "dropped by more than `max_drop`, the candidate is marked `rolled_back` and audited "
        "with the token's name as actor. The coordinator applies the same rule "
        "(`fedcl.server.dashboard.evaluate_canary`) when evaluation metrics arrive."
    ),
)
def run_canary(
    run_id: RunId,
    registry: RegistryDep,
    principal: Admin,
    max_drop: Annotated[
        float,
        Query(ge=0.0, le=1.0, allow_inf_nan=False, description="Largest tolerated drop"),
    ] = 0.05,
) -> CanaryOut:
    get_run_or_404(registry, run_id)
    decision = assess_canary(registry, run_id, max_drop=max_drop, actor=principal.name)
    return CanaryOut(
        run_id=run_id,
        action=decision.action,
        message=decision.message,
        max_drop=max_drop,
        candidate_id=decision.candidate.id if decision.candidate else None,
        production_id=decision.production.id if decision.production else None,
        candidate_accuracy=decision.candidate_accuracy,
        production_accuracy=decision.production_accuracy,
    )
