"""``/api/tokens`` and the Tokens page: who can sign in, and revoking them (admin).

A site token may not list tokens: names and roles of other sites' administrators are the
coordinator's business. Revoking ends the token's sessions at once (the registry checks the
token on every session lookup) and is audited under the revoking admin's name.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Request, status
from fastapi.responses import HTMLResponse

from fedcl.server.registry import Registry, RegistryError

from ..auth import Principal
from ..deps import MAX_DB_INT, Admin, PageUser, Reader, RegistryDep
from ..schemas import Problem, TokenOut
from .pages import error_page, render

router = APIRouter(
    prefix="/api/tokens",
    tags=["tokens"],
    responses={
        401: {"model": Problem, "description": "Missing or invalid token"},
        403: {"model": Problem, "description": "A site token, or a write by a non-admin"},
    },
)
pages = APIRouter(include_in_schema=False)

TokenId = Annotated[int, Path(ge=1, le=MAX_DB_INT, description="API token id")]


def _refuse_site(principal: Principal) -> str | None:
    if principal.sees_all_sites:
        return None
    return (
        f"token {principal.name!r} is scoped to site {principal.site_id!r}; only admin and "
        "viewer tokens may list API tokens"
    )


def _tokens(registry: Registry) -> list[TokenOut]:
    return [TokenOut.model_validate(t) for t in registry.list_tokens()]


@router.get("", response_model=list[TokenOut], summary="API tokens (admin and viewer)")
def list_tokens(registry: RegistryDep, principal: Reader) -> list[TokenOut]:
    """Every token, revoked ones too, with its live sessions; never the token itself."""
    refused = _refuse_site(principal)
    if refused:
        raise HTTPException(status.HTTP_403_FORBIDDEN, refused)
    return _tokens(registry)


@router.post(
    "/{token_id}/revoke",
    response_model=TokenOut,
    summary="Revoke a token and end its sessions (admin)",
    responses={404: {"model": Problem, "description": "Unknown token id"}},
)
def revoke_token(token_id: TokenId, registry: RegistryDep, principal: Admin) -> TokenOut:
    """Idempotent: revoking a revoked token changes nothing and is not audited again."""
    try:
        info = registry.revoke_token(token_id, actor=principal.name)
    except RegistryError as exc:
        if "unknown API token" in str(exc):
            raise HTTPException(status.HTTP_404_NOT_FOUND, str(exc)) from None
        raise
    return next(TokenOut.model_validate(t) for t in registry.list_tokens() if t.id == info.id)


@pages.get("/tokens", response_class=HTMLResponse)
def tokens_page(request: Request, registry: RegistryDep, user: PageUser) -> HTMLResponse:
    refused = _refuse_site(user)
    if refused:
        return error_page(request, user, status.HTTP_403_FORBIDDEN, refused)
    return render(request, "tokens.html", user, nav="tokens", tokens=_tokens(registry))
