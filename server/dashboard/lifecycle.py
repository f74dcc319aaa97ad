"""Model-version lifecycle: promote, back to candidate, roll back — each audited with its actor.

Kept out of the router so the rules (what may be rolled back, which version comes back) are
plain functions, testable and reusable by a CLI. Status changes go through
``Registry.set_version_status``, which archives the previous production version on promotion and
writes the audit events; this module adds the rollback rule on top.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedcl.config.vocabulary import VersionKind, VersionState
from fedcl.server.registry import ModelVersionInfo, Registry

from .auth import DashboardError


class VersionConflict(DashboardError):
    """The change does not apply to the version's current status (the API answers 409)."""


@dataclass(frozen=True)
class VersionChange:
    """Versions whose status changed and a one-line summary for the user."""

    message: str
    version: ModelVersionInfo
    restored: ModelVersionInfo | None = None


def promote(registry: Registry, version: ModelVersionInfo, *, actor: str) -> VersionChange:
    """Make ``version`` the run's production model (the previous one is archived).

    Refuses (``VersionConflict``) anything but a model: a Fisher promoted to production once
    archived the real production model while the coordinator ignored the Fisher.
    """
    if version.kind != VersionKind.MODEL:
        raise VersionConflict(
            f"version {version.id} is a {version.kind} ({version.format}), not a model: only "
            "model versions can be promoted to production"
            + (
                f"; it is the plaintext release of version {version.released_from}: promote that"
                if version.released_from
                else ""
            )
        )
    if version.status == VersionState.PRODUCTION:
        return VersionChange(f"version {version.id} is already production", version)
    updated = registry.set_version_status(version.id, VersionState.PRODUCTION, actor=actor)
    return VersionChange(
        f"version {version.id} (run {version.run_id!r}, round {version.server_round}): "
        f"{version.status} -> {VersionState.PRODUCTION}",
        updated,
    )


def make_candidate(registry: Registry, version: ModelVersionInfo, *, actor: str) -> VersionChange:
    """Put ``version`` back to candidate (e.g. to retry a rolled-back one through the canary)."""
    if version.status == VersionState.CANDIDATE:
        return VersionChange(f"version {version.id} is already a candidate", version)
    updated = registry.set_version_status(version.id, VersionState.CANDIDATE, actor=actor)
    return VersionChange(
        f"version {version.id} (run {version.run_id!r}, round {version.server_round}): "
        f"{version.status} -> {VersionState.CANDIDATE}",
        updated,
    )


def previous_production(registry: Registry, version: ModelVersionInfo) -> ModelVersionInfo | None:
    """The version a rollback of ``version`` restores.

    Only a superseded production model becomes ``archived``, so the newest archived version of
    the run from before ``version``'s round is the production model it replaced (falling back to
    the newest archived one if production went backwards in rounds).
    """
    archived = [
        v
        for v in registry.list_model_versions(version.run_id)
        if v.status == VersionState.ARCHIVED and v.id != version.id and v.kind == VersionKind.MODEL
    ]
    older = [v for v in archived if v.server_round < version.server_round]
    pool = older or archived
    return max(pool, key=lambda v: (v.server_round, v.id), default=None)


def rollback(registry: Registry, version: ModelVersionInfo, *, actor: str) -> VersionChange:
    """Mark production ``version`` rolled_back and restore the previous production version.

    Refuses (``VersionConflict``) when ``version`` is not production, or when no archived version
    exists to restore: leaving a run silently without a production model is worse than asking the
    operator to decide (they can demote it to candidate explicitly).
    """
    if version.status != VersionState.PRODUCTION:
        raise VersionConflict(
            f"version {version.id} is {version.status}, not production: only the production "
            "version can be rolled back (to drop a candidate, use the canary or mark it so)"
        )
    previous = previous_production(registry, version)
    if previous is None:
        raise VersionConflict(
            f"version {version.id} is the only production version run {version.run_id!r} has "
            "had: there is no archived version to restore; demote it to candidate instead"
        )
    rolled = registry.set_version_status(version.id, VersionState.ROLLED_BACK, actor=actor)
    restored = registry.set_version_status(previous.id, VersionState.PRODUCTION, actor=actor)
    message = (
        f"rolled back version {version.id} (round {version.server_round}) of run "
        f"{version.run_id!r}; restored version {previous.id} (round {previous.server_round}) "
        "to production"
    )
    registry.audit("model_version.rollback", message, run_id=version.run_id, actor=actor)
    return VersionChange(message, rolled, restored)
