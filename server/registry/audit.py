"""The append-only audit log: who changed what, including things the registry has no row for.

Other aggregates write their audit events with :func:`add_audit` inside their own transaction,
so a change and its audit event commit (or roll back) together.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from .core import RegistryCore
from .info import AuditInfo
from .models import AuditEvent, utcnow


def add_audit(
    session: Session,
    kind: str,
    message: str,
    *,
    run_id: str | None = None,
    site_id: str | None = None,
    actor: str = "system",
) -> None:
    """Add an audit event to ``session``'s transaction."""
    session.add(
        AuditEvent(
            kind=kind,
            message=message,
            run_id=run_id,
            site_id=site_id,
            actor=actor,
            created_at=utcnow(),
        )
    )


class AuditLog(RegistryCore):
    """Appending to and reading the audit log."""

    def audit(
        self,
        kind: str,
        message: str,
        *,
        run_id: str | None = None,
        site_id: str | None = None,
        actor: str = "system",
    ) -> None:
        """Append an audit event (ids are not checked: the log may mention unknown things)."""
        with self._tx() as s:
            add_audit(s, kind, message, run_id=run_id, site_id=site_id, actor=actor)

    def list_audit(self, *, run_id: str | None = None, limit: int = 200) -> list[AuditInfo]:
        """Audit events, newest first."""
        with self._tx() as s:
            query = select(AuditEvent)
            if run_id is not None:
                query = query.where(AuditEvent.run_id == run_id)
            query = query.order_by(AuditEvent.created_at.desc(), AuditEvent.id.desc()).limit(limit)
            return [AuditInfo.model_validate(a) for a in s.scalars(query)]
