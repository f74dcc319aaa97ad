"""The append-only audit log: who changed what, including things the registry has no row for.

Other aggregates write their audit events with :func:`add_audit` inside their own transaction,
so a change and its audit event commit (or roll back) together. Every event is chained onto the
one before it by hash (``audit_chain.py``), so an edit or deletion of history shows.
"""

from __future__ import annotations

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from .audit_chain import AUDIT_SCOPES, SCOPE_FEDERATION, ChainReport, queue_event, verify_chain
from .core import RegistryCore
from .errors import RegistryError
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
    scope: str = SCOPE_FEDERATION,
) -> None:
    """Add an audit event to ``session``'s transaction: chained onto the log as it commits.

    ``scope`` ``coordinator`` keeps an event without a site from site tokens (token names and
    roles, sign-ins); one with a site is always readable by that site's tokens too.
    """
    if scope not in AUDIT_SCOPES:
        raise RegistryError(f"invalid audit scope {scope!r}; expected one of {AUDIT_SCOPES}")
    queue_event(
        session,
        AuditEvent(
            kind=kind,
            message=message,
            run_id=run_id,
            site_id=site_id,
            actor=actor,
            scope=scope,
            created_at=utcnow(),
        ),
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

    def list_audit(
        self,
        *,
        run_id: str | None = None,
        site_id: str | None = None,
        kind: str | None = None,
        reader_site: str | None = None,
        limit: int = 200,
        offset: int = 0,
    ) -> list[AuditInfo]:
        """Audit events, newest first.

        ``kind`` matches exactly or as a dotted prefix (``model_version`` matches
        ``model_version.status``). ``reader_site``: what a token of that site may read — its own
        site's events and federation-scoped events without a site.
        """
        with self._tx() as s:
            query = select(AuditEvent)
            if run_id is not None:
                query = query.where(AuditEvent.run_id == run_id)
            if site_id is not None:
                query = query.where(AuditEvent.site_id == site_id)
            if kind is not None:
                query = query.where(
                    or_(
                        AuditEvent.kind == kind,
                        AuditEvent.kind.startswith(kind + ".", autoescape=True),
                    )
                )
            if reader_site is not None:
                query = query.where(
                    or_(
                        AuditEvent.site_id == reader_site,
                        and_(AuditEvent.site_id.is_(None), AuditEvent.scope == SCOPE_FEDERATION),
                    )
                )
            query = query.order_by(AuditEvent.id.desc()).limit(limit).offset(offset)
            return [AuditInfo.model_validate(a) for a in s.scalars(query)]

    def verify_audit(self, *, anchor: str | None = None) -> ChainReport:
        """Check the audit log's hash chain end to end (see ``audit_chain.verify_chain``)."""
        with self._tx() as s:
            return verify_chain(s, anchor=anchor)
