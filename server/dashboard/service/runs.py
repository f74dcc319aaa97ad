"""Runs as the API shows them: the list, one run's summary, its tasks and accuracy matrices."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from fedcl.config.vocabulary import RoundKind, RoundStatus
from fedcl.server.losses import lost_site_rounds
from fedcl.server.registry import Registry, RunInfo
from fedcl.server.results import accuracy_matrix, build_results

from ..auth import Principal
from ..schemas import AccuracyMatrixOut, RunDetail, RunOut, TaskOut

_RUN_PAGE = 500


def all_runs(registry: Registry) -> list[RunInfo]:
    """Every run, newest first (the registry pages; a federation has hundreds of runs at most)."""
    runs: list[RunInfo] = []
    while True:
        page = registry.list_runs(limit=_RUN_PAGE, offset=len(runs))
        runs.extend(page)
        if len(page) < _RUN_PAGE:
            return runs


def lost_count(registry: Registry, run_id: str) -> int:
    """Site-rounds the run lost (``fedcl.server.losses``: the count results.json reports)."""
    return lost_site_rounds(registry.list_participations(run_id)).total


def run_out(registry: Registry, run: RunInfo) -> RunOut:
    """A run as listed, with the site-rounds it lost (the badge tells a lossy run apart)."""
    return RunOut.model_validate({**dict(run), "lost_site_rounds": lost_count(registry, run.id)})


def list_runs(
    registry: Registry, *, status: str | None, limit: int, offset: int
) -> tuple[list[RunOut], int]:
    """One page of runs (newest first) and how many match ``status`` in total."""
    runs = all_runs(registry)
    if status is not None:
        runs = [r for r in runs if r.status == status]
    return [run_out(registry, r) for r in runs[offset : offset + limit]], len(runs)


def matrix_out(
    registry: Registry,
    run: RunInfo,
    *,
    site_id: str | None = None,
    results: dict[str, Any] | None = None,
) -> AccuracyMatrixOut | None:
    """The accuracy matrix of the federation (``site_id=None``) or of one site of the run.

    Built from :func:`fedcl.server.results.build_results`, the contract ``results.json`` follows,
    so the dashboard and the reports agree on evaluation tasks (joint runs evaluate on more tasks
    than they train) and on when transfer metrics are undefined. ``None``: the site took no part.
    """
    results = results if results is not None else build_results(registry, run.id)
    eval_tasks = list(results["eval_tasks"])
    if site_id is None:
        summary = results
        matrix, baseline = results["accuracy_matrix"], results["baseline_accuracy"]
    else:
        summary = results["sites"].get(site_id)
        if summary is None:
            return None
        matrix = summary["accuracy_matrix"]
        _, baseline = accuracy_matrix(
            registry, run.id, site_id=site_id, num_eval_tasks=len(eval_tasks)
        )
    return AccuracyMatrixOut(
        run_id=run.id,
        site_id=site_id,
        tasks=list(run.tasks),
        eval_tasks=eval_tasks,
        matrix=matrix,
        baseline=baseline,
        avg_accuracy=summary.get("avg_accuracy"),
        bwt=summary.get("bwt"),
        fwt=summary.get("fwt"),
    )


def federation_matrix(registry: Registry, run: RunInfo) -> AccuracyMatrixOut:
    """The federation's accuracy matrix (always defined, possibly all ``None``)."""
    matrix = matrix_out(registry, run)
    if matrix is None:  # matrix_out only returns None for a site
        raise RuntimeError(f"no federation accuracy matrix for run {run.id!r}")
    return matrix


def run_detail(registry: Registry, run: RunInfo, principal: Principal) -> RunDetail:
    """The run with its config and progress; a site token sees only itself among the sites."""
    rounds = registry.list_rounds(run.id)
    participations = registry.list_participations(run.id)
    sites = sorted({p.site_id for p in participations if principal.may_see_site(p.site_id)})
    versions: dict[str, int] = defaultdict(int)
    for v in registry.list_model_versions(run.id):
        versions[v.status] += 1
    matrix = federation_matrix(registry, run)
    progress = {
        "rounds_total": len(rounds),
        "rounds_completed": sum(r.status == RoundStatus.COMPLETED for r in rounds),
        "rounds_failed": sum(r.status == RoundStatus.FAILED for r in rounds),
        "last_server_round": max((r.server_round for r in rounds), default=None),
        "sites": sites,
        "versions": dict(versions),
        "avg_accuracy": matrix.avg_accuracy,
        "bwt": matrix.bwt,
        "fwt": matrix.fwt,
        "lost_site_rounds": lost_site_rounds(participations).total,
    }
    return RunDetail.model_validate({**dict(run), **progress})


def task_list(registry: Registry, run: RunInfo) -> list[TaskOut]:
    """The run's tasks with the server rounds that trained them."""
    rounds = registry.list_rounds(run.id)
    out = []
    for index, name in enumerate(run.tasks):
        train = [
            r.server_round for r in rounds if r.task_index == index and r.kind == RoundKind.TRAIN
        ]
        out.append(
            TaskOut(
                index=index,
                name=name,
                rounds=len(train),
                first_server_round=min(train, default=None),
                last_server_round=max(train, default=None),
                consolidated=any(
                    r.task_index == index
                    and r.kind == RoundKind.CONSOLIDATE
                    and r.status == RoundStatus.COMPLETED
                    for r in rounds
                ),
            )
        )
    return out
