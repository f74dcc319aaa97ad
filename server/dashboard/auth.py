"""Dashboard roles and who a request is acting as.

Three roles (docs/DESIGN.md §4): ``admin`` is the coordinator operator and may do everything;
``viewer`` may read everything and change nothing; ``site:<id>`` is a site administrator, who may
read federation-level data (runs, aggregates, model versions) plus the detail rows of its own site
only — participations, per-site metrics and privacy spend of other sites stay hidden, because a
site must not learn how another site's data behaves.

Roles are stored as plain strings on the registry's ``api_tokens`` rows; this module is the one
place that parses them, so the CLI can refuse a misspelt role before a token is created with it.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedcl.config import FedclError

ADMIN = "admin"
VIEWER = "viewer"
SITE_PREFIX = "site:"
# The registry's api_tokens.role column is VARCHAR(32); PostgreSQL enforces it.
MAX_ROLE_LENGTH = 32
# The sign-in cookie holds a random session id (the registry stores its hash), never the token.
SESSION_COOKIE = "fedcl_session"
# Header the dashboard pages add to their fetch() calls. Browsers only let same-origin scripts set
# custom headers (cross-site forms cannot, and cross-origin fetch needs a CORS preflight that this
# app never grants), so requiring it on cookie-authenticated writes stops cross-site requests.
CSRF_HEADER = "X-Fedcl-Dashboard"


class DashboardError(FedclError, ValueError):
    """A dashboard setting or request an operator can fix (bad role, bad token name, ...)."""


def parse_role(role: str) -> str:
    """Return ``role`` if it is one the dashboard understands, else raise :class:`DashboardError`.

    Checked when a token is created (not only when it is used), so an operator never hands a site
    a token that silently grants nothing.
    """
    if role in (ADMIN, VIEWER):
        return role
    if role.startswith(SITE_PREFIX) and role[len(SITE_PREFIX) :].strip():
        if len(role) > MAX_ROLE_LENGTH:
            raise DashboardError(
                f"role {role!r} is too long: the registry stores roles of at most "
                f"{MAX_ROLE_LENGTH} characters, so site ids for tokens can have at most "
                f"{MAX_ROLE_LENGTH - len(SITE_PREFIX)}"
            )
        return role
    raise DashboardError(
        f"invalid role {role!r}: use 'admin' (coordinator: everything), 'viewer' (read-only) "
        "or 'site:<site id>' (one site's own rows plus federation aggregates)"
    )


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: the token's name (the audit actor) and role."""

    token_id: int
    name: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN

    @property
    def site_id(self) -> str | None:
        """The site a ``site:<id>`` token is scoped to; ``None`` for admin and viewer."""
        if self.role.startswith(SITE_PREFIX):
            return self.role[len(SITE_PREFIX) :]
        return None

    @property
    def sees_all_sites(self) -> bool:
        return self.site_id is None

    def may_see_site(self, site_id: str | None) -> bool:
        """Whether rows about ``site_id`` are visible (``None`` = federation aggregate: always)."""
        return site_id is None or self.sees_all_sites or site_id == self.site_id

    @property
    def label(self) -> str:
        """How the pages show the signed-in token."""
        return f"{self.name} ({self.role})"
