"""``/api/audit``: the hash-chained audit log, newest first, scoped to the caller."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from .. import service
from ..deps import (
    TEXT_PATTERN,
    Limit,
    Offset,
    Reader,
    RegistryDep,
    RunFilter,
    SiteFilter,
    check_site_visible,
)
from ..schemas import AuditOut, Problem

router = APIRouter(
    prefix="/api/audit",
    tags=["audit"],
    responses={
        401: {"model": Problem, "description": "Missing or invalid token"},
        403: {"model": Problem, "description": "A site token asking for another site"},
    },
)


@router.get(
    "",
    response_model=list[AuditOut],
    summary="Audit events, filtered by run, site and kind",
    description=(
        "A site token sees federation-wide events (no site) and events about its own site, "
        "never coordinator-scoped ones (other tokens' creation, revocation, sign-ins). Each "
        "event carries its link in the hash chain (`prev_hash`, `hash`; `fedcl audit verify`). "
        "`kind` matches exactly or as a prefix (`model_version` matches "
        "`model_version.status`)."
    ),
)
def list_audit(
    registry: RegistryDep,
    principal: Reader,
    run: RunFilter = None,
    site: SiteFilter = None,
    kind: Annotated[
        str | None, Query(pattern=TEXT_PATTERN, max_length=64, description="Event kind")
    ] = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> list[AuditOut]:
    check_site_visible(principal, site)
    return service.audit_list(
        registry, principal, run_id=run, site_id=site, kind=kind, limit=limit, offset=offset
    )
