"""API tokens for the dashboard: only a hash is stored, the plaintext is shown once."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select

from .audit import add_audit
from .core import RegistryCore
from .errors import RegistryError
from .info import TokenInfo
from .models import ApiToken, utcnow

TOKEN_PREFIX = "fedcl_"


def _hash_token(token: str) -> str:
    # Plain SHA-256 is enough: tokens are 256-bit random, so there is nothing to brute-force and a
    # slow KDF would only slow down every dashboard request.
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class Tokens(RegistryCore):
    """Creating, checking and revoking API tokens."""

    def create_token(self, name: str, role: str) -> str:
        """Create an API token and return its plaintext, the only time it is ever available."""
        if not name or not role:
            raise RegistryError("an API token needs a non-empty name and role")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._tx() as s:
            row = ApiToken(name=name, role=role, token_hash=_hash_token(token), created_at=utcnow())
            s.add(row)
            add_audit(s, "token.created", f"API token {name!r} created with role {role!r}")
        return token

    def verify_token(self, token: str) -> TokenInfo | None:
        """The token's metadata if it exists and is not revoked, else ``None``."""
        if not token:
            return None
        with self._tx() as s:
            row = s.scalar(select(ApiToken).where(ApiToken.token_hash == _hash_token(token)))
            if row is None or row.revoked_at is not None:
                return None
            return TokenInfo.model_validate(row)

    def revoke_token(self, token_id: int, *, actor: str) -> TokenInfo:
        """Revoke a token by id (idempotent) and audit who did it."""
        with self._tx() as s:
            row = s.get(ApiToken, token_id)
            if row is None:
                raise RegistryError(f"unknown API token id {token_id}")
            if row.revoked_at is None:
                row.revoked_at = utcnow()
                add_audit(s, "token.revoked", f"API token {row.name!r} revoked", actor=actor)
            return TokenInfo.model_validate(row)
