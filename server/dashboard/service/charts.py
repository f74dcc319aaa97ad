"""The run page's data in one response: accuracy over rounds, ε per site, the rounds table,
failures grouped, alerts, the per-site table and the sites' model-hash agreement.

One endpoint rather than several so the page can poll a single URL while the run is running;
built once per change of the run (:mod:`.cache`), so a poll between rounds is one small query.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from fedcl.config import protocol as P
from fedcl.config.vocabulary import RunStatus, SiteStatus
from fedcl.server.registry import (
    MetricInfo,
    ParticipationInfo,
    PrivacyInfo,
    Registry,
    RoundInfo,
    RunInfo,
)

from ..auth import Principal
from ..schemas import (
    AccuracySeries,
    DriftEventOut,
    DriftMap,
    EpsilonSeries,
    FailureGroup,
    ModelHashOut,
    RoundOut,
    RunCharts,
    RunSiteOut,
    TaskStartOut,
)
from .alerts import run_alerts
from .cache import cached, results_of
from .rows import run_rows
from .runs import federation_matrix, run_out

MODEL_AGREEMENT = f"{P.MODEL_SHA256}-agreement"  # server/recording.py: 1.0 when all sites agree


def epsilon_series(
    registry: Registry,
    run_id: str,
    principal: Principal,
    privacy: Sequence[PrivacyInfo] | None = None,
) -> list[EpsilonSeries]:
    """Each visible site's reported ε by server round, with the latest budget it reported.

    ``privacy``: the run's reports (all sites, by id) when the caller holds them.
    """
    if privacy is None:
        privacy = registry.list_privacy(run_id, site_id=principal.site_id)
    by_site: dict[str, list[PrivacyInfo]] = defaultdict(list)
    for p in privacy:
        if principal.site_id is None or p.site_id == principal.site_id:
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
                epsilon_lifetime=[p.epsilon_lifetime for p in rows],
                budget=budgets[-1] if budgets else None,
            )
        )
    return series


def drift_map(registry: Registry, run_id: str, principal: Principal) -> DriftMap:
    """The site x round drift scores, the alerts and the task starts (a site sees only itself)."""
    events = registry.list_drift(run_id, site_id=principal.site_id)
    sites = sorted({e.site_id for e in events})
    rounds = sorted({e.server_round for e in events})
    col = {r: j for j, r in enumerate(rounds)}
    scores: list[list[float | None]] = [[None] * len(rounds) for _ in sites]
    for e in events:
        scores[sites.index(e.site_id)][col[e.server_round]] = e.score
    return DriftMap(
        sites=sites,
        server_rounds=rounds,
        scores=scores,
        alerts=[DriftEventOut.model_validate(e) for e in events if e.alert or e.rate_alert],
        task_starts=[TaskStartOut.model_validate(t) for t in registry.list_task_starts(run_id)],
    )


def failure_groups(rounds: list[RoundOut]) -> list[FailureGroup]:
    """Participations that were not ok, grouped by (status, phase, error): one line per cause,
    naming every site and round it hit, instead of the same error once per site-round."""
    groups: dict[tuple[str, str, str | None], tuple[set[str], set[int], list[int]]] = {}
    for r in rounds:
        for p in r.participations:
            if p.status == SiteStatus.OK:
                continue
            sites, rounds_hit, count = groups.setdefault(
                (p.status, p.phase, p.detail), (set(), set(), [0])
            )
            sites.add(p.site_id)
            rounds_hit.add(r.server_round)
            count[0] += 1
    out = [
        FailureGroup(
            status=status,
            phase=phase,
            detail=detail,
            sites=sorted(sites),
            server_rounds=sorted(rounds_hit),
            count=count[0],
        )  # fmt: skip
        for (status, phase, detail), (sites, rounds_hit, count) in groups.items()
    ]
    return sorted(out, key=lambda g: (-g.count, g.status, g.phase))


def model_hash(
    registry: Registry, run_id: str, metrics: Sequence[MetricInfo] | None = None
) -> ModelHashOut | None:
    """The sites' agreement on the global model they hold, round by round (None: not checked).

    ``metrics``: the run's metrics when the caller holds them.
    """
    if metrics is None:
        metrics = registry.list_metrics(run_id, name=MODEL_AGREEMENT, site_id=None)
    rows = [m for m in metrics if m.name == MODEL_AGREEMENT and m.site_id is None]
    rows = [m for m in rows if m.server_round is not None and m.value is not None]
    if not rows:
        return None
    return ModelHashOut(
        rounds_checked=len(rows),
        rounds_agreed=sum(m.value >= 1.0 for m in rows),
        disagreed_rounds=sorted(m.server_round for m in rows if m.value < 1.0),
    )


def incident_rounds(
    rounds: Sequence[RoundInfo],
    participations: Sequence[ParticipationInfo],
    principal: Principal,
) -> list[RoundOut]:
    """Every round with only its participations that were not ok (what the page lists and
    :func:`failure_groups` groups): a site token sees the counts but only its own rows.

    Only those rows become response models: validating all 12,000 of a 200-round, 30-site
    run to keep a few was a third of the page's time.
    """
    by_round: dict[int, list[ParticipationInfo]] = defaultdict(list)
    for p in participations:
        if p.status != SiteStatus.OK and principal.may_see_site(p.site_id):
            by_round[p.round_id].append(p)
    return [
        RoundOut.model_validate({**dict(r), "participations": by_round.get(r.id, [])})
        for r in rounds
    ]


def site_rows(results: dict[str, Any], principal: Principal) -> list[RunSiteOut]:
    """The per-site table of the run page (a site token sees its own row only)."""
    he = bool((results.get("config") or {}).get("he", {}).get("enabled"))
    return [
        RunSiteOut(
            site_id=site,
            rounds_trained=s["rounds_trained"],
            failed_rounds=len(s["failed_rounds"]),
            refused_rounds=len(s["refused_rounds"]),
            examples=None if he else s["examples"],
            avg_accuracy=s.get("avg_accuracy"),
            bwt=s.get("bwt"),
            epsilon=s.get("epsilon"),
            epsilon_lifetime=s.get("epsilon_lifetime"),
            budget=s.get("budget"),
        )
        for site, s in sorted(results["sites"].items())
        if principal.may_see_site(site)
    ]


def run_charts(registry: Registry, run: RunInfo, principal: Principal) -> RunCharts:
    """All data of the run page; polled every few seconds while the run is running."""
    charts, _ = _cached_charts(registry, run, principal)
    # The badge ages without any new row (a run goes stale by *not* changing): always fresh.
    return charts.model_copy(update={"run": run_out(registry, run)})


def run_charts_json(registry: Registry, run: RunInfo, principal: Principal) -> str:
    """:func:`run_charts` as JSON, serialised once per change of the run (the poll's body and
    the page's embedded data: a 200-round, 30-site run is ~1 MB of JSON)."""
    _, rest = _cached_charts(registry, run, principal)
    return '{"run":' + run_out(registry, run).model_dump_json() + "," + rest


def _cached_charts(registry: Registry, run: RunInfo, principal: Principal) -> tuple[RunCharts, str]:
    def build() -> tuple[RunCharts, str]:
        charts = _charts(registry, run, principal)
        return charts, charts.model_dump_json(exclude={"run"})[1:]  # '{' dropped: run goes first

    return cached(registry, run.id, ("charts", principal.site_id), build)


def _charts(registry: Registry, run: RunInfo, principal: Principal) -> RunCharts:
    results = results_of(registry, run.id)
    matrix = federation_matrix(registry, run)
    by_round: dict[int, dict[int, float]] = {}
    for r in results["rounds"]:
        accs = {j: a for j, a in enumerate(r["accuracy"]) if a is not None}
        if accs:
            by_round[r["server_round"]] = accs
    baseline = matrix.baseline
    series = []
    for j, name in enumerate(matrix.eval_tasks):
        rounds = sorted(r for r, accs in by_round.items() if j in accs)
        xs = ([0] if baseline[j] is not None else []) + rounds
        ys = ([baseline[j]] if baseline[j] is not None else []) + [by_round[r][j] for r in rounds]
        if rounds:
            series.append(AccuracySeries(task_index=j, task=name, server_rounds=xs, values=ys))
    rows = run_rows(registry, run.id)  # the rows results_of was built from
    incidents = incident_rounds(rows.rounds, rows.participations, principal)
    failures = failure_groups(incidents)
    first_of_task: dict[int, int] = {}
    for r in incidents:
        first_of_task.setdefault(r.task_index, r.server_round)
    he = bool((run.config.get("he") or {}).get("enabled"))
    return RunCharts(
        run=run_out(registry, run),
        poll=run.status == RunStatus.RUNNING,
        eval_tasks=matrix.eval_tasks,
        task_boundaries=sorted(v for k, v in first_of_task.items() if k > 0),
        accuracy=series,
        matrix=matrix,
        privacy=epsilon_series(registry, run.id, principal, rows.privacy),
        rounds=incidents,
        drift=drift_map(registry, run.id, principal),
        failures=failures,
        alerts=run_alerts(results, principal.may_see_site),
        sites=site_rows(results, principal),
        model_hash=model_hash(registry, run.id, rows.metrics),
        examples_hidden=he,
    )
