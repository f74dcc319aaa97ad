"""Read models: registry snapshots turned into the API's response models, scoped to the caller.

The routers stay thin and the pages reuse the same functions, so the HTML and the JSON can never
disagree about what a site token may see. Everything is computed from the registry on every call
(the dashboard holds no state), using only the registry's public facade; where the facade has no
query for something (a status filter on runs, a site filter on the audit log) the filtering
happens here, which is fine at the scale of one federation's registry.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from fedcl.server.registry import (
    AuditInfo,
    MetricInfo,
    ModelVersionInfo,
    ParticipationInfo,
    PrivacyInfo,
    Registry,
    RoundInfo,
    RunInfo,
)
from fedcl.server.results import accuracy_matrix, build_results

from .auth import Principal
from .schemas import (
    AccuracyMatrixOut,
    AccuracySeries,
    AuditOut,
    EpsilonSeries,
    HashAgreementOut,
    MetricOut,
    ParticipationOut,
    PrivacyOut,
    RoundOut,
    RunCharts,
    RunDetail,
    RunOut,
    SiteDetail,
    SiteOut,
    SiteRunOut,
    TaskOut,
    VersionOut,
)

_RUN_PAGE = 500
_AUDIT_SCAN = 10_000
TRAIN_PHASES = ("train", "consolidate")


def finite(value: float | None) -> float | None:
    """``None`` for NaN/inf: JSON cannot carry them, and a chart should show a gap."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


# ---------------------------------------------------------------------------------------- runs


def all_runs(registry: Registry) -> list[RunInfo]:
    """Every run, newest first (the registry pages; a federation has hundreds of runs at most)."""
    runs: list[RunInfo] = []
    while True:
        page = registry.list_runs(limit=_RUN_PAGE, offset=len(runs))
        runs.extend(page)
        if len(page) < _RUN_PAGE:
            return runs


def run_out(run: RunInfo) -> RunOut:
    return RunOut(
        id=run.id,
        name=run.name,
        scenario=run.scenario,
        status=run.status,
        reason=run.reason,
        tasks=list(run.tasks),
        created_at=run.created_at,
        updated_at=run.updated_at,
        finished_at=run.finished_at,
    )


def list_runs(
    registry: Registry, *, status: str | None, limit: int, offset: int
) -> tuple[list[RunOut], int]:
    """One page of runs (newest first) and how many match ``status`` in total."""
    runs = all_runs(registry)
    if status is not None:
        runs = [r for r in runs if r.status == status]
    return [run_out(r) for r in runs[offset : offset + limit]], len(runs)


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
        matrix=[[finite(v) for v in row] for row in matrix],
        baseline=[finite(v) for v in baseline],
        avg_accuracy=finite(summary.get("avg_accuracy")),
        bwt=finite(summary.get("bwt")),
        fwt=finite(summary.get("fwt")),
    )


def federation_matrix(registry: Registry, run: RunInfo) -> AccuracyMatrixOut:
    """The federation's accuracy matrix (always defined, possibly all ``None``)."""
    matrix = matrix_out(registry, run)
    if matrix is None:  # matrix_out only returns None for a site
        raise RuntimeError(f"no federation accuracy matrix for run {run.id!r}")
    return matrix


def run_detail(registry: Registry, run: RunInfo, principal: Principal) -> RunDetail:
    rounds = registry.list_rounds(run.id)
    participations = registry.list_participations(run.id)
    sites = sorted(
        {p.site_id for p in participations if principal.may_see_site(p.site_id)},
    )
    versions: dict[str, int] = defaultdict(int)
    for v in registry.list_model_versions(run.id):
        versions[v.status] += 1
    matrix = federation_matrix(registry, run)
    return RunDetail(
        **run_out(run).model_dump(),
        config=run.config,
        rounds_total=len(rounds),
        rounds_completed=sum(r.status == "completed" for r in rounds),
        rounds_failed=sum(r.status == "failed" for r in rounds),
        last_server_round=max((r.server_round for r in rounds), default=None),
        sites=sites,
        versions=dict(versions),
        avg_accuracy=matrix.avg_accuracy,
        bwt=matrix.bwt,
        fwt=matrix.fwt,
    )


def task_list(registry: Registry, run: RunInfo) -> list[TaskOut]:
    rounds = registry.list_rounds(run.id)
    out = []
    for index, name in enumerate(run.tasks):
        train = [r.server_round for r in rounds if r.task_index == index and r.kind == "train"]
        out.append(
            TaskOut(
                index=index,
                name=name,
                rounds=len(train),
                first_server_round=min(train, default=None),
                last_server_round=max(train, default=None),
                consolidated=any(
                    r.task_index == index and r.kind == "consolidate" and r.status == "completed"
                    for r in rounds
                ),
            )
        )
    return out


# -------------------------------------------------------------------------------------- rounds


def _participation_out(p: ParticipationInfo) -> ParticipationOut:
    return ParticipationOut.model_validate(p)


def _round_out(r: RoundInfo, parts: Iterable[ParticipationInfo]) -> RoundOut:
    return RoundOut(
        id=r.id,
        server_round=r.server_round,
        task_index=r.task_index,
        round_in_task=r.round_in_task,
        kind=r.kind,
        status=r.status,
        started_at=r.started_at,
        finished_at=r.finished_at,
        seconds=finite(r.seconds) or 0.0,
        bytes_up=r.bytes_up,
        bytes_down=r.bytes_down,
        num_participants=r.num_participants,
        num_failures=r.num_failures,
        num_refusals=r.num_refusals,
        participations=[_participation_out(p) for p in parts],
    )


def round_list(registry: Registry, run_id: str, principal: Principal) -> list[RoundOut]:
    """Rounds with participations; a site token sees the counts but only its own rows."""
    by_round: dict[int, list[ParticipationInfo]] = defaultdict(list)
    for p in registry.list_participations(run_id, site_id=principal.site_id):
        by_round[p.round_id].append(p)
    return [_round_out(r, by_round.get(r.id, [])) for r in registry.list_rounds(run_id)]


# ------------------------------------------------------------------------------------- metrics


def _metric_out(m: MetricInfo) -> MetricOut:
    return MetricOut(
        id=m.id,
        name=m.name,
        value=finite(m.value),
        site_id=m.site_id,
        task_index=m.task_index,
        server_round=m.server_round,
        round_task_index=m.round_task_index,
        created_at=m.created_at,
    )


def metric_list(
    registry: Registry,
    run_id: str,
    principal: Principal,
    *,
    site_id: str | None,
    federation_only: bool,
    name: str | None,
    task_index: int | None,
    server_round: int | None,
) -> list[MetricOut]:
    """Metrics filtered as asked; without ``site`` a site token gets federation + its own rows."""
    if federation_only:
        rows = registry.list_metrics(run_id, name=name, site_id=None)
    elif site_id is not None:
        rows = registry.list_metrics(run_id, name=name, site_id=site_id)
    else:
        rows = [
            m for m in registry.list_metrics(run_id, name=name) if principal.may_see_site(m.site_id)
        ]
    return [
        _metric_out(m)
        for m in rows
        if (task_index is None or m.task_index == task_index)
        and (server_round is None or m.server_round == server_round)
    ]


def federation_accuracy_by_round(registry: Registry, run_id: str) -> dict[int, dict[int, float]]:
    """server round -> task index -> federation accuracy (NaN-free)."""
    out: dict[int, dict[int, float]] = defaultdict(dict)
    for m in registry.list_metrics(run_id, name="accuracy", site_id=None):
        value = finite(m.value)
        if m.server_round is not None and m.task_index is not None and value is not None:
            out[m.server_round][m.task_index] = value
    return out


def mean_accuracy(by_task: dict[int, float] | None) -> float | None:
    if not by_task:
        return None
    return sum(by_task.values()) / len(by_task)


# ------------------------------------------------------------------------------------- privacy


def privacy_out(p: PrivacyInfo) -> PrivacyOut:
    return PrivacyOut(
        run_id=p.run_id,
        site_id=p.site_id,
        server_round=p.server_round,
        epsilon_run=finite(p.epsilon_run),
        epsilon_lifetime=finite(p.epsilon_lifetime),
        delta=finite(p.delta),
        budget=finite(p.budget),
        created_at=p.created_at,
    )


def epsilon_series(registry: Registry, run_id: str, principal: Principal) -> list[EpsilonSeries]:
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
                epsilon_run=[finite(p.epsilon_run) for p in rows],
                budget=finite(budgets[-1]) if budgets else None,
            )
        )
    return series


# --------------------------------------------------------------------------------------- sites


def _is_hash_related(name: str) -> bool:
    return "hash" in name.lower()


class _SiteFacts:
    """Everything the registry says about sites, gathered once per request across all runs."""

    def __init__(self, registry: Registry, site_ids: set[str]) -> None:
        self.runs = all_runs(registry)
        self.parts: dict[str, dict[str, list[ParticipationInfo]]] = defaultdict(dict)
        self.privacy: dict[str, list[PrivacyInfo]] = defaultdict(list)
        self.hash_metric: dict[str, MetricInfo] = {}
        self.hash_events: dict[str, list[AuditInfo]] = defaultdict(list)
        for run in reversed(self.runs):  # oldest first, so "latest" wins below
            by_site: dict[str, list[ParticipationInfo]] = defaultdict(list)
            for p in registry.list_participations(run.id):
                if p.site_id in site_ids:
                    by_site[p.site_id].append(p)
            for site_id, rows in by_site.items():
                self.parts[site_id][run.id] = rows
            for p in registry.list_privacy(run.id):
                if p.site_id in site_ids:
                    self.privacy[p.site_id].append(p)
            for m in registry.list_metrics(run.id):
                if m.site_id in site_ids and _is_hash_related(m.name):
                    self.hash_metric[m.site_id] = m
        for event in reversed(registry.list_audit(limit=_AUDIT_SCAN)):
            if event.site_id in site_ids and _is_hash_related(event.kind + " " + event.message):
                self.hash_events[event.site_id].append(event)

    def hash_agreement(self, site_id: str) -> HashAgreementOut | None:
        metric = self.hash_metric.get(site_id)
        events = self.hash_events.get(site_id, [])
        if metric is None and not events:
            return None
        return HashAgreementOut(
            metric=metric.name if metric else None,
            value=finite(metric.value) if metric else None,
            run_id=metric.run_id if metric else None,
            server_round=metric.server_round if metric else None,
            audit_events=len(events),
            last_event=f"{events[-1].kind}: {events[-1].message}" if events else None,
        )


def _site_counts(parts: Iterable[ParticipationInfo]) -> tuple[int, int, int]:
    """(ok, failed, refused) rounds: distinct rounds in the train/consolidate phases."""
    by_status: dict[str, set[tuple[str, int]]] = defaultdict(set)
    for p in parts:
        if p.phase in TRAIN_PHASES:
            key = "failed" if p.status == "rejected" else p.status
            by_status[key].add((p.run_id, p.server_round))
    return len(by_status["ok"]), len(by_status["failed"]), len(by_status["refused"])


def _site_out(facts: _SiteFacts, site: Any) -> dict[str, Any]:
    per_run = facts.parts.get(site.id, {})
    everything = [p for rows in per_run.values() for p in rows]
    ok, failed, refused = _site_counts(everything)
    last = max(everything, key=lambda p: p.created_at, default=None)
    privacy = facts.privacy.get(site.id, [])
    latest = max(privacy, key=lambda p: (p.created_at, p.id), default=None)
    lifetime = finite(latest.epsilon_lifetime) if latest else None
    budget = finite(latest.budget) if latest else None
    return {
        "id": site.id,
        "first_seen": site.first_seen,
        "last_seen": site.last_seen,
        "runs": len(per_run),
        "rounds_ok": ok,
        "rounds_failed": failed,
        "rounds_refused": refused,
        "last_run_id": last.run_id if last else None,
        "last_server_round": last.server_round if last else None,
        "epsilon_run": finite(latest.epsilon_run) if latest else None,
        "epsilon_lifetime": lifetime,
        "budget": budget,
        "budget_used": lifetime / budget if lifetime is not None and budget else None,
        "hash_agreement": facts.hash_agreement(site.id),
    }


def site_list(registry: Registry, principal: Principal) -> list[SiteOut]:
    """Every site the registry has seen (a site token: only itself)."""
    sites = [s for s in registry.list_sites() if principal.may_see_site(s.id)]
    facts = _SiteFacts(registry, {s.id for s in sites})
    return [SiteOut(**_site_out(facts, s)) for s in sites]


def site_detail(registry: Registry, site_id: str) -> SiteDetail | None:
    site = next((s for s in registry.list_sites() if s.id == site_id), None)
    if site is None:
        return None
    facts = _SiteFacts(registry, {site_id})
    per_run = []
    for run in facts.runs:
        rows = facts.parts.get(site_id, {}).get(run.id)
        if not rows:
            continue
        ok, failed, refused = _site_counts(rows)
        train_ok = [p for p in rows if p.phase == "train" and p.status == "ok"]
        per_run.append(
            SiteRunOut(
                run_id=run.id,
                rounds_ok=ok,
                rounds_failed=failed,
                rounds_refused=refused,
                examples=max((p.num_examples for p in train_ok), default=0),
                last_server_round=max(p.server_round for p in rows),
                errors=sorted({p.detail for p in rows if p.status != "ok" and p.detail}),
            )
        )
    privacy = sorted(facts.privacy.get(site_id, []), key=lambda p: (p.created_at, p.id))
    return SiteDetail(
        **_site_out(facts, site),
        per_run=per_run,
        privacy=[privacy_out(p) for p in privacy],
    )


# ------------------------------------------------------------------------------------ versions


def version_out(v: ModelVersionInfo, accuracy: dict[int, dict[int, float]]) -> VersionOut:
    return VersionOut(
        id=v.id,
        run_id=v.run_id,
        round_id=v.round_id,
        task_index=v.task_index,
        server_round=v.server_round,
        sha256=v.sha256,
        size_bytes=v.size_bytes,
        encrypted=v.encrypted,
        format=v.format,
        status=v.status,
        created_at=v.created_at,
        mean_accuracy=mean_accuracy(accuracy.get(v.server_round)),
        download_url=f"/api/versions/{v.id}/download",
    )


def version_list(registry: Registry, *, run_id: str | None, status: str | None) -> list[VersionOut]:
    versions = registry.list_model_versions(run_id)
    if status is not None:
        versions = [v for v in versions if v.status == status]
    accuracy: dict[str, dict[int, dict[int, float]]] = {}
    out = []
    for v in versions:
        if v.run_id not in accuracy:
            accuracy[v.run_id] = federation_accuracy_by_round(registry, v.run_id)
        out.append(version_out(v, accuracy[v.run_id]))
    return out


def one_version(registry: Registry, v: ModelVersionInfo) -> VersionOut:
    return version_out(v, federation_accuracy_by_round(registry, v.run_id))


# --------------------------------------------------------------------------------------- audit


def _audit_out(a: AuditInfo) -> AuditOut:
    return AuditOut.model_validate(a)


def audit_list(
    registry: Registry,
    principal: Principal,
    *,
    run_id: str | None,
    site_id: str | None,
    kind: str | None,
    limit: int,
    offset: int,
) -> list[AuditOut]:
    """Audit events, newest first; a site token sees federation events and its own."""
    want = offset + limit
    scan = want if site_id is None and kind is None and principal.sees_all_sites else _AUDIT_SCAN
    events = [
        e
        for e in registry.list_audit(run_id=run_id, limit=min(scan, _AUDIT_SCAN))
        if principal.may_see_site(e.site_id)
        and (site_id is None or e.site_id == site_id)
        and (kind is None or e.kind == kind or e.kind.startswith(kind + "."))
    ]
    return [_audit_out(e) for e in events[offset:want]]


# -------------------------------------------------------------------------------------- charts


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
        run=run_out(run),
        poll=run.status == "running",
        eval_tasks=matrix.eval_tasks,
        task_boundaries=sorted(v for k, v in first_of_task.items() if k > 0),
        accuracy=series,
        matrix=matrix,
        privacy=epsilon_series(registry, run.id, principal),
        rounds=rounds,
    )
