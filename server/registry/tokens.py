"""API tokens for the dashboard: only a hash is stored, the plaintext is shown once.

A token's name is the audit actor of everything done with it, so names are unique (a revoked
token keeps its name: the history still says who it was). Token events are coordinator-scoped:
a site token sees its own token's events, never other tokens' names and roles.
"""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from .audit import add_audit
from .audit_chain import SCOPE_COORDINATOR
from .core import RegistryCore
from .errors import RegistryError
from .info import TokenInfo
from .models import ApiToken, DashboardSession, utcnow

TOKEN_PREFIX = "fedcl_"
_SITE_ROLE_PREFIX = "site:"


def hash_secret(secret: str) -> str:
    """SHA-256 hex of a token or session id, the only form the registry stores.

    Plain SHA-256 is enough: both are 256-bit random, so there is nothing to brute-force and a
    slow KDF would only slow down every dashboard request.
    """
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def role_site(role: str) -> str | None:
    """The site a ``site:<id>`` role is scoped to (the site its audit events belong to)."""
    return role[len(_SITE_ROLE_PREFIX) :] if role.startswith(_SITE_ROLE_PREFIX) else None


def _duplicate(name: str, existing: ApiToken) -> RegistryError:
    state = "revoked" if existing.revoked_at is not None else "active"
    return RegistryError(
        f"an API token named {name!r} already exists (id {existing.id}, role {existing.role!r}, "
        f"{state}): token names are unique because they are the audit actor; choose another name"
    )


class Tokens(RegistryCore):
    """Creating, listing, checking and revoking API tokens."""

    def create_token(self, name: str, role: str, *, actor: str = "cli") -> str:
        """Create an API token and return its plaintext, the only time it is ever available."""
        if not name or not role:
            raise RegistryError("an API token needs a non-empty name and role")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        try:
            with self._tx() as s:
                existing = s.scalar(select(ApiToken).where(ApiToken.name == name))
                if existing is not None:
                    raise _duplicate(name, existing)
                s.add(
                    ApiToken(
                        name=name, role=role, token_hash=hash_secret(token), created_at=utcnow()
                    )
                )
                add_audit(
                    s,
                    "token.created",
                    f"API token {name!r} created with role {role!r}",
                    site_id=role_site(role),
                    actor=actor,
                    scope=SCOPE_COORDINATOR,
                )
        except IntegrityError:  # a concurrent create of the same name won the race
            with self._tx() as s:
                existing = s.scalar(select(ApiToken).where(ApiToken.name == name))
            if existing is None:
                raise
            raise _duplicate(name, existing) from None
        return token

    def verify_token(self, token: str) -> TokenInfo | None:
        """The token's metadata if it exists and is not revoked, else ``None``."""
        if not token:
            return None
        with self._tx() as s:
            row = s.scalar(select(ApiToken).where(ApiToken.token_hash == hash_secret(token)))
            if row is None or row.revoked_at is not None:
                return None
            return TokenInfo.model_validate(row)

    def list_tokens(self) -> list[TokenInfo]:
        """Every token (revoked ones too) with its number of live sessions, oldest first."""
        now = utcnow()
        live = (
            select(DashboardSession.token_id, func.count().label("n"))
            .where(DashboardSession.ended_at.is_(None), DashboardSession.expires_at > now)
            .group_by(DashboardSession.token_id)
            .subquery()
        )
        with self._tx() as s:
            rows = s.execute(
                select(ApiToken, func.coalesce(live.c.n, 0))
                .outerjoin(live, live.c.token_id == ApiToken.id)
                .order_by(ApiToken.id)
            ).all()
            return [
                TokenInfo.model_validate(row).model_copy(update={"sessions": n}) for row, n in rows
            ]

    def revoke_token(
        self, token_id: int | None = None, *, name: str | None = None, actor: str
    ) -> TokenInfo:
        """Revoke a token by id or by name (idempotent) and audit who did it.

        Its sessions end with it: a session is only valid while its token is.
        """
        if (token_id is None) == (name is None):
            raise RegistryError("revoke a token by its id or by its name (exactly one)")
        with self._tx() as s:
            if token_id is not None:
                row = s.get(ApiToken, token_id)
                missing = f"unknown API token id {token_id}"
            else:
                row = s.scalar(select(ApiToken).where(ApiToken.name == name))
                missing = f"unknown API token name {name!r}"
            if row is None:
                raise RegistryError(missing)
            if row.revoked_at is None:
                now = utcnow()
                row.revoked_at = now
                for session in s.scalars(
                    select(DashboardSession).where(
                        DashboardSession.token_id == row.id, DashboardSession.ended_at.is_(None)
                    )
                ):
                    session.ended_at = now
                add_audit(
                    s,
                    "token.revoked",
                    f"API token {row.name!r} (id {row.id}, role {row.role!r}) revoked",
                    site_id=role_site(row.role),
                    actor=actor,
                    scope=SCOPE_COORDINATOR,
                )
            return TokenInfo.model_validate(row)
