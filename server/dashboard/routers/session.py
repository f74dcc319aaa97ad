"""Login and logout: the page where a token is pasted and a session begins.

Browsers cannot send a bearer header on page navigations, so the pages authenticate with a
cookie. It holds a random session id, not the token: the registry keeps the id's hash, the
session expires after :data:`SESSION_LIFETIME`, and logout (or revoking the token) ends it. The
cookie is HTTP-only (page scripts cannot read it), SameSite=Strict (never sent on cross-site
requests) and Secure when the dashboard is served over HTTPS. Both routes are POSTs that
``origin.SameOriginWrites`` refuses from other sites (login and logout CSRF).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated
from urllib.parse import parse_qs

from fastapi import APIRouter, Query, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from ..auth import SESSION_COOKIE
from ..deps import RegistryDep

router = APIRouter(include_in_schema=False)

SESSION_LIFETIME = timedelta(hours=12)
_MAX_FORM_BYTES = 8192


def safe_next(target: str | None) -> str:
    """Only same-site paths: an open redirect would let a phishing link bounce through us."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return "/runs"
    return target


def _login_page(request: Request, next_url: str, error: str | None, code: int) -> HTMLResponse:
    templates = request.app.state.templates
    return templates.TemplateResponse(
        request,
        "login.html",
        {"user": None, "next": next_url, "error": error},
        status_code=code,
    )


@router.get("/login", response_class=HTMLResponse)
def login_form(
    request: Request, next: Annotated[str | None, Query(max_length=2048)] = None
) -> HTMLResponse:
    return _login_page(request, safe_next(next), None, status.HTTP_200_OK)


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request, registry: RegistryDep) -> Response:
    body = b""
    async for chunk in request.stream():  # bounded: never buffer an arbitrarily large body
        body += chunk
        if len(body) > _MAX_FORM_BYTES:
            return _login_page(
                request, "/runs", "Form too large.", status.HTTP_413_CONTENT_TOO_LARGE
            )
    form = parse_qs(body.decode("utf-8", errors="replace"), max_num_fields=10)
    token = (form.get("token") or [""])[0].strip()
    next_url = safe_next((form.get("next") or [None])[0])
    started = None
    if token:
        started = await run_in_threadpool(
            lambda: registry.start_session(token, lifetime=SESSION_LIFETIME)
        )
    if started is None:
        return _login_page(
            request,
            next_url,
            "That token is not valid (unknown or revoked).",
            status.HTTP_401_UNAUTHORIZED,
        )
    response = RedirectResponse(next_url, status_code=status.HTTP_303_SEE_OTHER)
    session_id, _ = started
    response.set_cookie(
        SESSION_COOKIE,
        session_id,
        max_age=int(SESSION_LIFETIME.total_seconds()),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


@router.post("/logout")
def logout(request: Request, registry: RegistryDep) -> Response:
    """End the session in the registry (so a copied cookie is dead too), then drop the cookie."""
    registry.end_session(request.cookies.get(SESSION_COOKIE, ""))
    response = RedirectResponse("/login", status_code=status.HTTP_303_SEE_OTHER)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response
