"""Runs as the API shows them: the list, one run's summary, its tasks and accuracy matrices."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

from fedcl.config.vocabulary import RoundKind, RoundStatus
from fedcl.server.registry import Registry, RunInfo

from ..auth import Principal
from ..schemas import AccuracyMatrixOut, RunDetail, RunOut, TaskOut
from .cache import cached, results_of
from .health import idle_seconds, run_health

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
    return int(results_of(registry, run_id)["lost_site_rounds"]["total"])


def _summary(results: dict[str, Any]) -> dict[str, Any]:
    """What the run list shows of a run, from its results document."""
    config = results.get("config") or {}
    eps = [s["epsilon"] for s in results["sites"].values() if s.get("epsilon") is not None]
    return {
        "lost_site_rounds": int(results["lost_site_rounds"]["total"]),
        "method": (config.get("continual") or {}).get("method"),
        "dp": bool((config.get("dp") or {}).get("enabled")),
        "he": bool((config.get("he") or {}).get("enabled")),
        "rounds_completed": sum(r["status"] == RoundStatus.COMPLETED for r in results["rounds"]),
        "avg_accuracy": results.get("avg_accuracy"),
        "bwt": results.get("bwt"),
        "fwt": results.get("fwt"),
        "epsilon": max(eps, default=None),
    }


def run_out(registry: Registry, run: RunInfo) -> RunOut:
    """A run as listed: its configuration, ACC/BWT/ε and a badge that does not mislead."""
    summary = cached(registry, run.id, "summary", lambda: _summary(results_of(registry, run.id)))
    return RunOut.model_validate(
        {
            **dict(run),
            **summary,
            "health": run_health(run, summary["lost_site_rounds"]),
            "idle_seconds": idle_seconds(run),
        }
    )


def list_runs(
    registry: Registry,
    *,
    status: str | None,
    limit: int,
    offset: int,
    where: Callable[[RunOut], bool] | None = None,
) -> tuple[list[RunOut], int]:
    """One page of runs (newest first) and how many match in total.

    ``status`` filters on the registry's status, or on the badge (``stale``, ``degraded``).
    ``where`` filters on anything else a listed run shows (scenario, method, DP, HE).
    """
    runs = all_runs(registry)
    if status is not None and where is None and status in {r.status for r in runs}:
        runs = [r for r in runs if r.status == status]
        return [run_out(registry, r) for r in runs[offset : offset + limit]], len(runs)
    listed = [run_out(registry, r) for r in runs]
    if status is not None:
        listed = [r for r in listed if status in (r.status, r.health)]
    if where is not None:
        listed = [r for r in listed if where(r)]
    return listed[offset : offset + limit], len(listed)


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
    results = results if results is not None else results_of(registry, run.id)
    eval_tasks = list(results["eval_tasks"])
    if site_id is None:
        summary = results
        matrix, baseline = results["accuracy_matrix"], results["baseline_accuracy"]
    else:
        summary = results["sites"].get(site_id)
        if summary is None:
            return None
        matrix, baseline = summary["accuracy_matrix"], summary["baseline_accuracy"]
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
    results = results_of(registry, run.id)
    rounds = results["rounds"]

    def versions() -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for v in registry.list_model_versions(run.id):
            counts[v.status] += 1
        return dict(counts)

    progress = {
        "rounds_total": len(rounds),
        "rounds_failed": sum(r["status"] == RoundStatus.FAILED for r in rounds),
        "last_server_round": max((r["server_round"] for r in rounds), default=None),
        "sites": [s for s in sorted(results["sites"]) if principal.may_see_site(s)],
        "versions": cached(registry, run.id, "versions", versions),
    }
    listed = run_out(registry, run)
    return RunDetail.model_validate({**dict(run), **dict(listed), **progress})


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
