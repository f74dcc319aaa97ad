"""The run page's data in one response: accuracy over rounds, ε per site, the rounds table.

One endpoint rather than several so the page can poll a single URL while the run is running.
"""

from __future__ import annotations

from collections import defaultdict

from fedcl.config.vocabulary import RunStatus
from fedcl.server.registry import PrivacyInfo, Registry, RunInfo

from ..auth import Principal
from ..schemas import AccuracySeries, EpsilonSeries, RunCharts
from .rounds import federation_accuracy_by_round, round_list
from .runs import federation_matrix, run_out


def epsilon_series(registry: Registry, run_id: str, principal: Principal) -> list[EpsilonSeries]:
    """Each visible site's reported ε by server round, with the latest budget it reported."""
    by_site: dict[str, list[PrivacyInfo]] = defaultdict(list)
    for p in registry.list_privacy(run_id, site_id=principal.site_id):
        by_site[p.site_id].append(p)
    series = []
    for site_id in sorted(by_site):
        rows = sorted(by_site[site_id], key=lambda p: (p.server_round is None, p.server_round))
        budgets = [p.budget for p in rows if p.budget is not None]
        series.append(
            EpsilonSeries(
                site_id=site_id,
                server_rounds=[p.server_round for p in rows],
                epsilon_run=[p.epsilon_run for p in rows],
                budget=budgets[-1] if budgets else None,
            )
        )
    return series


def run_charts(registry: Registry, run: RunInfo, principal: Principal) -> RunCharts:
    """All data of the run page; polled every few seconds while the run is running."""
    matrix = federation_matrix(registry, run)
    by_round = federation_accuracy_by_round(registry, run.id)
    baseline = matrix.baseline
    series = []
    for j, name in enumerate(matrix.eval_tasks):
        rounds = sorted(r for r, accs in by_round.items() if j in accs)
        xs = ([0] if baseline[j] is not None else []) + rounds
        ys = ([baseline[j]] if baseline[j] is not None else []) + [by_round[r][j] for r in rounds]
        if rounds:
            series.append(AccuracySeries(task_index=j, task=name, server_rounds=xs, values=ys))
    rounds = round_list(registry, run.id, principal)
    first_of_task: dict[int, int] = {}
    for r in rounds:
        first_of_task.setdefault(r.task_index, r.server_round)
    return RunCharts(
        run=run_out(registry, run),
        poll=run.status == RunStatus.RUNNING,
        eval_tasks=matrix.eval_tasks,
        task_boundaries=sorted(v for k, v in first_of_task.items() if k > 0),
        accuracy=series,
        matrix=matrix,
        privacy=epsilon_series(registry, run.id, principal),
        rounds=rounds,
    )
