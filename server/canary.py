"""Canary rule: roll a candidate model back when it evaluates clearly worse than production.

A new global model is saved as a ``candidate``; the operator (or an automation) promotes it to
``production``. The canary compares the mean federation accuracy measured in the candidate's
round with the one measured in the production version's round, and marks the candidate
``rolled_back`` when it dropped by more than ``max_drop`` — so a model that regressed (a poisoned
or diverged round, a forgotten task) can never be promoted by accident, and a resumed run does
not restart from it (``Registry.latest_model_version`` skips rolled-back versions).

This is model-version policy, so it lives with the coordinator (``server/``), not in the web
package: the coordinator calls :func:`evaluate_canary` after it records a round's evaluation
metrics without loading the dashboard, and the dashboard exposes the same rule as
``POST /api/runs/{id}/canary?max_drop=0.05`` (admin).
Accuracies are compared on the evaluation tasks both rounds measured, so a candidate evaluated
on more tasks (later in a continual run) is not penalised for tasks production never saw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from fedcl.config.vocabulary import VersionState

from .registry import ModelVersionInfo, Registry, RegistryError

CanaryAction = Literal["rolled_back", "kept", "skipped"]


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
    """(production, newest candidate newer than production)."""
    production = next((v for v in reversed(versions) if v.status == VersionState.PRODUCTION), None)
    floor = production.server_round if production is not None else -1
    candidates = [
        v for v in versions if v.status == VersionState.CANDIDATE and v.server_round > floor
    ]
    return production, (candidates[-1] if candidates else None)


def assess_canary(
    registry: Registry, run_id: str, *, max_drop: float, actor: str = "canary"
) -> CanaryDecision:
    """Apply the canary rule to the run's newest candidate and say what happened.

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
    summary = (
        f"candidate version {candidate.id} (round {candidate.server_round}) mean accuracy "
        f"{cand_mean:.4f} vs production version {production.id} (round "
        f"{production.server_round}) {prod_mean:.4f} on tasks {shared}: drop {drop:+.4f}, "
        f"allowed {max_drop:.4f}"
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
