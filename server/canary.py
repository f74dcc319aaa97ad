"""Canary rule and the production rule: which model version a run stands on, unattended.

**Production rule.** A run has a production model from its first evaluated round: when no model
version is production, the earliest candidate whose round has a federation accuracy is promoted
(actor ``canary``, audited ``production.first``). A person may promote another one later.

**Canary.** With ``canary_max_drop`` set, every newer candidate is judged when its evaluation
has arrived: on the canary sites (``canary_sites``; every site when empty) its mean accuracy is
compared with production's on the same sites and tasks. With canary sites the candidate goes to
them first (:func:`holds_at_canary_sites`); the other sites evaluate it only when it holds there,
so a candidate that is rolled back never reaches them. It is *promoted* (audited
``canary.promoted``; the old production is archived) when it holds, and *rolled back* (audited
``canary.rolled_back``; the next round starts again from production) when it dropped by more than
``max_drop`` — so a poisoned or diverged round is never rolled out and a resumed run does not
restart from it (``Registry.latest_model_version`` skips rolled-back versions). Only versions of
kind ``model`` take part: a Fisher is an EWC input, never a production model.

This is model-version policy, so it lives with the coordinator (``server/``), not in the web
package: the coordinator calls :func:`canary_step` after each round's evaluation is recorded,
without loading the dashboard, and the dashboard exposes the comparison as
``POST /api/runs/{id}/canary?max_drop=0.05`` (admin: rolls back, never promotes).
Accuracies are compared on the evaluation tasks both rounds measured, so a candidate evaluated
on more tasks (later in a continual run) is not penalised for tasks production never saw.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from fedcl.config.vocabulary import Metric, VersionKind, VersionState

from .registry import MetricRow, ModelVersionInfo, Registry, RegistryError

CanaryAction = Literal["rolled_back", "kept", "promoted", "skipped"]


@dataclass(frozen=True)
class CanaryDecision:
    """What the canary found and did; ``message`` is the human-readable summary."""

    run_id: str
    action: CanaryAction
    message: str
    max_drop: float
    candidate: ModelVersionInfo | None = None
    production: ModelVersionInfo | None = None
    candidate_accuracy: float | None = None
    production_accuracy: float | None = None


def _pick(
    versions: list[ModelVersionInfo],
) -> tuple[ModelVersionInfo | None, ModelVersionInfo | None]:
    """(production, newest candidate newer than production), among models only."""
    versions = [v for v in versions if v.kind == VersionKind.MODEL]
    production = next((v for v in reversed(versions) if v.status == VersionState.PRODUCTION), None)
    floor = production.server_round if production is not None else -1
    candidates = [
        v for v in versions if v.status == VersionState.CANDIDATE and v.server_round > floor
    ]
    return production, (candidates[-1] if candidates else None)


def site_accuracy_by_round(
    registry: Registry, run_id: str, sites: Sequence[str]
) -> dict[int, dict[int, float]]:
    """server round -> task -> mean accuracy over ``sites`` (the canary sites) that reported it."""
    sums: dict[int, dict[int, list[float]]] = {}
    for site in sites:
        for m in registry.list_metrics(run_id, name=Metric.ACCURACY, site_id=site):
            if m.server_round is None or m.task_index is None or m.value is None:
                continue
            sums.setdefault(m.server_round, {}).setdefault(m.task_index, []).append(m.value)
    return {r: {j: sum(vs) / len(vs) for j, vs in tasks.items()} for r, tasks in sums.items()}


def assess_canary(
    registry: Registry,
    run_id: str,
    *,
    max_drop: float,
    actor: str = "canary",
    sites: Sequence[str] = (),
    promote: bool = False,
) -> CanaryDecision:
    """Apply the canary rule to the run's newest candidate and say what happened.

    ``sites``: compare these sites' own accuracy (the canary sites) rather than the
    federation's. ``promote``: promote a candidate that holds (the unattended canary) instead of
    leaving it a candidate (the dashboard's manual check).

    Skips (changes nothing) when the run has no production version, no newer candidate, or the
    two rounds share no evaluated task yet — the coordinator may call this before the
    candidate's evaluation metrics arrived, and calling again later is harmless.
    """
    if not math.isfinite(max_drop) or max_drop < 0:
        raise RegistryError(f"max_drop must be a finite number >= 0, got {max_drop!r}")
    versions = registry.list_model_versions(run_id)
    production, candidate = _pick(versions)

    def skip(message: str) -> CanaryDecision:
        return CanaryDecision(run_id, "skipped", message, max_drop, candidate, production)

    if production is None:
        return skip(f"run {run_id!r} has no production version to compare with")
    if candidate is None:
        return skip(
            f"run {run_id!r} has no candidate newer than production version {production.id} "
            f"(server round {production.server_round})"
        )
    if sites:
        accuracy = site_accuracy_by_round(registry, run_id, sites)
    else:
        accuracy = registry.federation_accuracy_by_round(run_id)
    cand_acc = accuracy.get(candidate.server_round, {})
    prod_acc = accuracy.get(production.server_round, {})
    shared = sorted(set(cand_acc) & set(prod_acc))
    if not shared:
        return skip(
            f"no federation accuracy on a common task yet for candidate version {candidate.id} "
            f"(round {candidate.server_round}) and production version {production.id} "
            f"(round {production.server_round})"
        )
    cand_mean = sum(cand_acc[j] for j in shared) / len(shared)
    prod_mean = sum(prod_acc[j] for j in shared) / len(shared)
    drop = prod_mean - cand_mean
    where = f"at canary sites {', '.join(sites)}" if sites else "of the federation"
    summary = (
        f"candidate version {candidate.id} (round {candidate.server_round}) mean accuracy {where} "
        f"{cand_mean:.4f} vs production version {production.id} (round "
        f"{production.server_round}) {prod_mean:.4f} on tasks {shared}: drop {drop:+.4f}, "
        f"allowed {max_drop:.4f}"
    )
    if drop <= max_drop and promote:
        promoted = registry.set_version_status(candidate.id, VersionState.PRODUCTION, actor=actor)
        message = f"promoted: {summary}"
        registry.audit("canary.promoted", message, run_id=run_id, actor=actor)
        return CanaryDecision(
            run_id, "promoted", message, max_drop, promoted, production, cand_mean, prod_mean
        )
    if drop <= max_drop:
        return CanaryDecision(
            run_id,
            "kept",
            f"kept: {summary}",
            max_drop,
            candidate,
            production,
            cand_mean,
            prod_mean,
        )
    rolled = registry.set_version_status(candidate.id, VersionState.ROLLED_BACK, actor=actor)
    message = f"rolled back: {summary}"
    registry.audit("canary.rolled_back", message, run_id=run_id, actor=actor)
    return CanaryDecision(
        run_id, "rolled_back", message, max_drop, rolled, production, cand_mean, prod_mean
    )


def first_production(
    registry: Registry, run_id: str, *, actor: str = "canary"
) -> ModelVersionInfo | None:
    """The production rule: with no production model, promote the earliest evaluated candidate.

    Returns the version it promoted, or ``None`` when the run already has production or no
    model version has been evaluated yet.
    """
    if registry.has_production_model(run_id):
        return None
    models = [v for v in registry.list_model_versions(run_id) if v.kind == VersionKind.MODEL]
    evaluated = registry.federation_accuracy_by_round(run_id)
    first = next(
        (v for v in models if v.status == VersionState.CANDIDATE and v.server_round in evaluated),
        None,
    )
    if first is None:
        return None
    promoted = registry.set_version_status(first.id, VersionState.PRODUCTION, actor=actor)
    registry.audit(
        "production.first",
        f"version {first.id} (round {first.server_round}) is production: the run had none, and "
        "a run's first evaluated model version becomes production",
        run_id=run_id,
        actor=actor,
    )
    return promoted


def canary_step(
    registry: Registry,
    run_id: str,
    *,
    max_drop: float | None,
    sites: Sequence[str] = (),
    actor: str = "canary",
) -> CanaryDecision:
    """What the coordinator does after a round's evaluation: the production rule, then the
    canary (promote or roll back the newest candidate) when ``max_drop`` is set."""
    first = first_production(registry, run_id, actor=actor)
    if first is not None:
        return CanaryDecision(
            run_id, "promoted", f"first production: version {first.id}", max_drop or 0.0, first
        )
    if max_drop is None:
        return CanaryDecision(run_id, "skipped", "no canary configured", 0.0)
    return assess_canary(
        registry, run_id, max_drop=max_drop, actor=actor, sites=sites, promote=True
    )


def evaluate_canary(
    registry: Registry, run_id: str, *, max_drop: float, actor: str = "canary"
) -> str | None:
    """Roll back the run's newest candidate if its accuracy dropped more than ``max_drop``.

    Returns what it did (a message naming both versions and accuracies) when it rolled a
    candidate back, and ``None`` when it changed nothing. Every rollback is two audit events: the
    status change and a ``canary.rolled_back`` event with the numbers, both by ``actor``.
    """
    decision = assess_canary(registry, run_id, max_drop=max_drop, actor=actor)
    return decision.message if decision.action == "rolled_back" else None


def holds_at_canary_sites(
    registry: Registry,
    run_id: str,
    rows: Sequence[MetricRow],
    *,
    sites: Sequence[str],
    max_drop: float,
) -> bool | None:
    """Whether a candidate the canary sites just evaluated (their accuracy ``rows``) holds
    against production on the same sites and tasks; ``None`` when there is nothing to compare
    with yet (no production, no shared task), which rolls it out like a candidate that holds."""
    production, _ = _pick(registry.list_model_versions(run_id))
    if production is None:
        return None
    before = site_accuracy_by_round(registry, run_id, sites).get(production.server_round, {})
    now: dict[int, list[float]] = {}
    for row in rows:
        if row.name == Metric.ACCURACY and row.site_id in sites and row.task_index is not None:
            now.setdefault(row.task_index, []).append(row.value)
    shared = sorted(set(before) & set(now))
    if not shared:
        return None
    cand = sum(sum(now[j]) / len(now[j]) for j in shared) / len(shared)
    prod = sum(before[j] for j in shared) / len(shared)
    return prod - cand <= max_drop
