"""Model versions as the API shows them: with the accuracy measured in their round."""

from __future__ import annotations

from fedcl.server.registry import ModelVersionInfo, Registry

from ..schemas import VersionOut
from .rounds import federation_accuracy_by_round


def mean_accuracy(by_task: dict[int, float] | None) -> float | None:
    """Mean over the tasks measured, ``None`` when none was."""
    if not by_task:
        return None
    return sum(by_task.values()) / len(by_task)


def version_out(v: ModelVersionInfo, accuracy: dict[int, dict[int, float]]) -> VersionOut:
    """``accuracy``: the run's :func:`federation_accuracy_by_round`."""
    return VersionOut.model_validate(
        {
            **dict(v),
            "mean_accuracy": mean_accuracy(accuracy.get(v.server_round)),
            "download_url": f"/api/versions/{v.id}/download",
        }
    )


def version_list(registry: Registry, *, run_id: str | None, status: str | None) -> list[VersionOut]:
    """Versions of one run or all runs, optionally in one status (server-round order)."""
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
