"""The audit log as the API shows it: filtered by run, site and kind, scoped to the caller."""

from __future__ import annotations

from fedcl.server.registry import Registry

from ..auth import Principal
from ..schemas import AuditOut

# The registry filters the log by run only; other filters scan at most this many newest events.
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
    """Audit events, newest first; a site token sees federation events and its own."""
    want = offset + limit
    scan = want if site_id is None and kind is None and principal.sees_all_sites else AUDIT_SCAN
    events = [
        e
        for e in registry.list_audit(run_id=run_id, limit=min(scan, AUDIT_SCAN))
        if principal.may_see_site(e.site_id)
        and (site_id is None or e.site_id == site_id)
        and (kind is None or e.kind == kind or e.kind.startswith(kind + "."))
    ]
    return [AuditOut.model_validate(e) for e in events[offset:want]]
