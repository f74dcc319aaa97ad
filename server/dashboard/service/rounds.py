"""Rounds with their participations, and metrics: filtered by what the caller may see."""

from __future__ import annotations

from collections import defaultdict

from fedcl.server.registry import ParticipationInfo, Registry

from ..auth import Principal
from ..schemas import MetricOut, RoundOut


def round_list(registry: Registry, run_id: str, principal: Principal) -> list[RoundOut]:
    """Rounds with participations; a site token sees the counts but only its own rows."""
    by_round: dict[int, list[ParticipationInfo]] = defaultdict(list)
    for p in registry.list_participations(run_id, site_id=principal.site_id):
        by_round[p.round_id].append(p)
    return [
        RoundOut.model_validate({**dict(r), "participations": by_round.get(r.id, [])})
        for r in registry.list_rounds(run_id)
    ]


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
        MetricOut.model_validate(m)
        for m in rows
        if (task_index is None or m.task_index == task_index)
        and (server_round is None or m.server_round == server_round)
    ]


def federation_accuracy_by_round(registry: Registry, run_id: str) -> dict[int, dict[int, float]]:
    """server round -> task index -> federation accuracy (NaN-free); the registry's query."""
    return registry.federation_accuracy_by_round(run_id)
