"""The audit log as the API shows it: filtered by run, site and kind, scoped to the caller."""

from __future__ import annotations

from fedcl.server.registry import Registry

from ..auth import Principal
from ..schemas import AuditOut

# How many newest events the site pages scan for model-hash events (service/sites.py).
AUDIT_SCAN = 10_000


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
    """Audit events, newest first; a site token sees federation events and its own site's.

    The registry filters (``reader_site``), so paging counts only what the caller may see and
    coordinator-scoped events (token names and roles, sign-ins) never reach a site token.
    """
    events = registry.list_audit(
        run_id=run_id,
        site_id=site_id,
        kind=kind,
        reader_site=principal.site_id,
        limit=limit,
        offset=offset,
    )
    return [AuditOut.model_validate(e) for e in events]
