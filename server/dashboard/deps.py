"""FastAPI dependencies: the registry, who is asking, and validated path/query parameters.

Authentication happens here and nowhere else, so a new router cannot forget it: every API route
declares a :data:`Reader` or :data:`Admin` parameter. Parameter types carry their limits (id
ranges, the registry's run-id alphabet, no control characters) so that malformed input is a 422
from validation, never a database error turned into a 500 — SQLite cannot bind integers beyond
64 bits and PostgreSQL rejects NUL characters, for example.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Path, Query, Request, status
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer

from fedcl.server.registry import Registry, RunInfo
from fedcl.server.registry.info import TokenInfo

from .auth import ADMIN, CSRF_HEADER, SESSION_COOKIE, SITE_PREFIX, VIEWER, Principal

# The registry's run-id alphabet (server/registry/validation.py, _RUN_ID).
RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
# Site ids and metric names are free text in the registry; refuse control characters (NUL cannot
# be stored by PostgreSQL) and anything longer than the columns.
TEXT_PATTERN = r"^[^\x00-\x1f\x7f]+$"
MAX_DB_INT = 2**31 - 1  # INTEGER columns on PostgreSQL
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

bearer_scheme = HTTPBearer(
    auto_error=False,
    description="A dashboard token: `fedcl dashboard token create --role admin|viewer|site:<id>`",
)
cookie_scheme = APIKeyCookie(
    name=SESSION_COOKIE,
    auto_error=False,
    description=(
        "A session id set by the login page (expires; ends at logout or when its token is "
        "revoked); writes also need the X-Fedcl-Dashboard header"
    ),
)


class LoginRequired(Exception):
    """Raised by page dependencies; the app turns it into a redirect to the login page."""

    def __init__(self, next_url: str) -> None:
        super().__init__(next_url)
        self.next_url = next_url


def get_registry(request: Request) -> Registry:
    """The registry the app was created over (opened once by :func:`..app.create_app`)."""
    return request.app.state.registry


RegistryDep = Annotated[Registry, Depends(get_registry)]


def _principal(info: TokenInfo | None) -> Principal | None:
    if info is None:
        return None
    return Principal(token_id=info.id, name=info.name, role=info.role)


def _principal_from_token(registry: Registry, token: str | None) -> Principal | None:
    return _principal(registry.verify_token(token)) if token else None


def _principal_from_session(registry: Registry, session_id: str | None) -> Principal | None:
    return _principal(registry.verify_session(session_id)) if session_id else None


def _check_role(principal: Principal) -> None:
    role = principal.role
    if role in (ADMIN, VIEWER) or (role.startswith(SITE_PREFIX) and principal.site_id):
        return
    raise HTTPException(
        status.HTTP_403_FORBIDDEN, f"token {principal.name!r} has an unknown role {role!r}"
    )


def get_principal(
    request: Request,
    registry: RegistryDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
    cookie: Annotated[str | None, Depends(cookie_scheme)],
) -> Principal:
    """The caller, from ``Authorization: Bearer`` (scripts, Prometheus) or the session cookie.

    Cookie-authenticated writes must carry the dashboard's CSRF header: a browser sends cookies
    with cross-site form posts, but never lets another site's page set a custom header.
    """
    if bearer is not None:
        principal = _principal_from_token(registry, bearer.credentials)
    else:
        principal = _principal_from_session(registry, cookie)
        forgeable = principal is not None and request.method not in SAFE_METHODS
        if forgeable and request.headers.get(CSRF_HEADER) is None:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                f"cookie-authenticated {request.method} requests need the {CSRF_HEADER} "
                "header (sent by the dashboard pages); scripts should use a bearer token",
            )
    if principal is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing or invalid token: send 'Authorization: Bearer <token>' or sign in at /login",
            headers={"WWW-Authenticate": "Bearer"},
        )
    _check_role(principal)
    return principal


Reader = Annotated[Principal, Depends(get_principal)]


def require_admin(principal: Reader) -> Principal:
    """Only the coordinator's admin tokens may change anything (viewer and site: read-only)."""
    if not principal.is_admin:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"token {principal.name!r} has role {principal.role!r}; this needs role 'admin'",
        )
    return principal


Admin = Annotated[Principal, Depends(require_admin)]


def page_principal(request: Request, registry: RegistryDep) -> Principal:
    """The signed-in user of an HTML page; anyone else is sent to the login page."""
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        principal = _principal_from_token(registry, header[7:].strip())
    else:
        principal = _principal_from_session(registry, request.cookies.get(SESSION_COOKIE))
    if principal is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequired(target)
    _check_role(principal)
    return principal


PageUser = Annotated[Principal, Depends(page_principal)]


def check_site_visible(principal: Principal, site_id: str | None) -> None:
    """403 when a site token asks for another site's rows."""
    if not principal.may_see_site(site_id):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"token {principal.name!r} is scoped to site {principal.site_id!r} and cannot read "
            f"rows of site {site_id!r}",
        )


def get_run_or_404(registry: Registry, run_id: str) -> RunInfo:
    """The run, or a 404 that names it."""
    run = registry.get_run(run_id)
    if run is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"run {run_id!r} not found")
    return run


RunId = Annotated[
    str,
    Path(
        pattern=RUN_ID_PATTERN,
        max_length=128,
        description="Run id: 1-128 letters, digits, '.', '_' or '-'",
    ),
]
VersionId = Annotated[int, Path(ge=1, le=MAX_DB_INT, description="Model version id")]
SiteId = Annotated[str, Path(pattern=TEXT_PATTERN, max_length=128, description="Site id")]
SiteFilter = Annotated[
    str | None,
    Query(
        pattern=TEXT_PATTERN,
        max_length=128,
        description="Only rows of this site (a site token may only name its own site)",
    ),
]
RunFilter = Annotated[
    str | None,
    Query(pattern=RUN_ID_PATTERN, max_length=128, description="Only rows of this run"),
]
Limit = Annotated[int, Query(ge=1, le=500, description="Page size")]
Offset = Annotated[int, Query(ge=0, le=MAX_DB_INT, description="Rows to skip")]
