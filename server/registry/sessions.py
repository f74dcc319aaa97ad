"""Dashboard sign-in sessions: the browser holds a random id, the registry only its hash.

A session replaces the raw token in the cookie, so a stolen cookie is worth at most one session
until it expires or its user signs out, and never the token that made it. A session is valid
only while its token is (revoking the token ends every session of it).
"""

from __future__ import annotations

import secrets
from datetime import timedelta

from sqlalchemy import select

from .audit import add_audit
from .audit_chain import SCOPE_COORDINATOR
from .core import RegistryCore
from .errors import RegistryError
from .info import SessionInfo, TokenInfo
from .models import ApiToken, DashboardSession, utcnow
from .tokens import hash_secret, role_site

SESSION_PREFIX = "fedcls_"


class Sessions(RegistryCore):
    """Starting, checking and ending dashboard sessions."""

    def start_session(self, token: str, *, lifetime: timedelta) -> tuple[str, SessionInfo] | None:
        """Sign in with ``token``: a new session id (plaintext, for the cookie) and its record.

        ``None`` when the token is unknown or revoked. The sign-in is audited under the token's
        name (coordinator-scoped, and under its site for a site token).
        """
        if lifetime <= timedelta(0):
            raise RegistryError(f"a session lifetime must be positive, got {lifetime}")
        if not token:
            return None
        session_id = SESSION_PREFIX + secrets.token_urlsafe(32)
        now = utcnow()
        with self._tx() as s:
            row = s.scalar(select(ApiToken).where(ApiToken.token_hash == hash_secret(token)))
            if row is None or row.revoked_at is not None:
                return None
            record = DashboardSession(
                token_id=row.id,
                session_hash=hash_secret(session_id),
                created_at=now,
                expires_at=now + lifetime,
            )
            s.add(record)
            add_audit(
                s,
                "session.started",
                f"dashboard sign-in with API token {row.name!r} until "
                f"{record.expires_at:%Y-%m-%d %H:%M} UTC",
                site_id=role_site(row.role),
                actor=row.name,
                scope=SCOPE_COORDINATOR,
            )
            s.flush()
            return session_id, _info(record, row)

    def verify_session(self, session_id: str) -> TokenInfo | None:
        """The signed-in token, if the session exists, has not ended or expired, and its token
        is not revoked; else ``None``. Reads only: checking a session never writes."""
        if not session_id:
            return None
        with self._tx() as s:
            found = _find_session(s, session_id)
            if found is None:
                return None
            record, token = found
            if record.ended_at is not None or token.revoked_at is not None:
                return None
            if record.expires_at <= utcnow():
                return None
            return TokenInfo.model_validate(token)

    def end_session(self, session_id: str) -> bool:
        """Sign out: end the session (audited); ``False`` if it was not live."""
        if not session_id:
            return False
        with self._tx() as s:
            found = _find_session(s, session_id)
            if found is None or found[0].ended_at is not None:
                return False
            record, token = found
            record.ended_at = utcnow()
            add_audit(
                s,
                "session.ended",
                f"dashboard sign-out of API token {token.name!r}",
                site_id=role_site(token.role),
                actor=token.name,
                scope=SCOPE_COORDINATOR,
            )
            return True


def _info(record: DashboardSession, token: ApiToken) -> SessionInfo:
    return SessionInfo(
        id=record.id,
        token=TokenInfo.model_validate(token),
        created_at=record.created_at,
        expires_at=record.expires_at,
    )


def _find_session(s, session_id: str) -> tuple[DashboardSession, ApiToken] | None:
    """The session row with the id's hash and its token (only the hash is stored)."""
    return s.execute(
        select(DashboardSession, ApiToken)
        .join(ApiToken, ApiToken.id == DashboardSession.token_id)
        .where(DashboardSession.session_hash == hash_secret(session_id))
    ).first()
