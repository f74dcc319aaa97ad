"""``/api/versions``: model versions, their download, and promote/candidate/rollback (admin)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Response, status

from fedcl.server.registry import ModelVersionInfo, Registry, RegistryError

from .. import lifecycle, service
from ..deps import Admin, Reader, RegistryDep, RunFilter, VersionId
from ..schemas import Problem, VersionChangeOut, VersionOut

router = APIRouter(
    prefix="/api/versions",
    tags=["versions"],
    responses={401: {"model": Problem, "description": "Missing or invalid token"}},
)

# Spelled out for type checkers; test_dashboard.py checks it matches VERSION_STATUSES.
VersionStatus = Literal["candidate", "production", "archived", "rolled_back"]
_NOT_FOUND = {404: {"model": Problem, "description": "Unknown version"}}
_CHANGE = {
    **_NOT_FOUND,
    403: {"model": Problem, "description": "Token is not admin"},
    409: {"model": Problem, "description": "The change does not apply to this version"},
}


def _version_or_404(registry: Registry, version_id: int) -> ModelVersionInfo:
    version = registry.get_model_version(version_id)
    if version is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"model version {version_id} not found")
    return version


def _change_out(registry: Registry, change: lifecycle.VersionChange) -> VersionChangeOut:
    return VersionChangeOut(
        message=change.message,
        version=service.one_version(registry, change.version),
        restored=service.one_version(registry, change.restored) if change.restored else None,
    )


@router.get("", response_model=list[VersionOut], summary="Model versions (filter by run, status)")
def list_versions(
    registry: RegistryDep,
    _: Reader,
    run: RunFilter = None,
    status_: Annotated[
        VersionStatus | None, Query(alias="status", description="Only versions in this status")
    ] = None,
) -> list[VersionOut]:
    return service.version_list(registry, run_id=run, status=status_)


@router.get("/{version_id}", response_model=VersionOut, responses=_NOT_FOUND)
def get_version(version_id: VersionId, registry: RegistryDep, _: Reader) -> VersionOut:
    """One model version."""
    return service.one_version(registry, _version_or_404(registry, version_id))


@router.get(
    "/{version_id}/download",
    response_class=Response,
    responses={
        **_NOT_FOUND,
        200: {
            "content": {"application/octet-stream": {}},
            "description": "The artifact's bytes, exactly as stored",
        },
        409: {"model": Problem, "description": "Artifact missing or failing its SHA-256 check"},
    },
    summary="Download a model version's artifact",
    description=(
        "Plaintext versions (format `safetensors`) download as a safetensors file. Encrypted "
        "versions (format `ckks`) download only as the raw encrypted blob the coordinator "
        "stored: the coordinator holds no CKKS secret key (docs/DESIGN.md §4): it cannot decrypt "
        "them; a site decrypts with its secret context. The `X-Fedcl-Encrypted` and "
        "`X-Fedcl-Sha256` headers say which it is and what the bytes hash to."
    ),
)
def download_version(version_id: VersionId, registry: RegistryDep, _: Reader) -> Response:
    version = _version_or_404(registry, version_id)
    try:
        data = registry.load_artifact(version)
    except RegistryError as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    filename = f"{version.run_id}-round-{version.server_round:05d}.{version.format}"
    return Response(
        content=data,
        media_type="application/octet-stream",
        headers={
            "Content-Disposition": f'attachment; filename="{filename}"',
            "X-Fedcl-Sha256": version.sha256,
            "X-Fedcl-Encrypted": "true" if version.encrypted else "false",
            "X-Fedcl-Format": version.format,
        },
    )


@router.post(
    "/{version_id}/promote",
    response_model=VersionChangeOut,
    responses=_CHANGE,
    summary="Make this version the run's production model (admin)",
    description=(
        "The run's previous production version becomes `archived`. Audited. 409 for a version "
        "that is not of kind `model` (a Fisher, a release)."
    ),
)
def promote(version_id: VersionId, registry: RegistryDep, principal: Admin) -> VersionChangeOut:
    version = _version_or_404(registry, version_id)
    try:
        change = lifecycle.promote(registry, version, actor=principal.name)
    except lifecycle.VersionConflict as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    return _change_out(registry, change)


@router.post(
    "/{version_id}/candidate",
    response_model=VersionChangeOut,
    responses=_CHANGE,
    summary="Put this version back to candidate (admin)",
)
def make_candidate(
    version_id: VersionId, registry: RegistryDep, principal: Admin
) -> VersionChangeOut:
    version = _version_or_404(registry, version_id)
    return _change_out(registry, lifecycle.make_candidate(registry, version, actor=principal.name))


@router.post(
    "/{version_id}/rollback",
    response_model=VersionChangeOut,
    responses=_CHANGE,
    summary="Roll back this production version (admin)",
    description=(
        "Marks this (production) version `rolled_back` and restores the run's previous "
        "production version (the newest `archived` one) to production. 409 if this version is "
        "not production or there is nothing to restore. Audited with the token's name."
    ),
)
def rollback(version_id: VersionId, registry: RegistryDep, principal: Admin) -> VersionChangeOut:
    version = _version_or_404(registry, version_id)
    try:
        change = lifecycle.rollback(registry, version, actor=principal.name)
    except lifecycle.VersionConflict as exc:
        raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from None
    return _change_out(registry, change)
