"""Refuse cross-site state changes: every POST/PUT/PATCH/DELETE must come from the dashboard.

Login CSRF needs no cookie at all (another site's page auto-posts ``/login`` with the attacker's
token, and the victim is signed in as the attacker), so SameSite cookies and the dashboard's
custom write header cannot stop it; the browser's own statement of where a request comes from
can. Modern browsers send ``Sec-Fetch-Site`` on every request and ``Origin`` on every cross-origin
POST, so a request is refused when either says it comes from elsewhere. A request with neither
header is not from a browser page (curl, scripts with bearer tokens, Prometheus) and passes: it
carries no ambient credentials for CSRF to abuse.
"""

from __future__ import annotations

import html
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# "none": the user started it (address bar, bookmark), never another site's page.
_SAME_SITE_FETCH = frozenset({"same-origin", "none"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _authority(scheme: str, host: str) -> tuple[str, str, int] | None:
    parts = urlsplit(f"{scheme}://{host}")
    try:
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port or _DEFAULT_PORTS.get(scheme, 0)


def cross_site_reason(headers: Headers, scheme: str) -> str | None:
    """Why a state-changing request is cross-site, or ``None`` when it may proceed.

    The request's own origin is its scheme and ``Host`` header: a reverse proxy in front of the
    dashboard must pass ``Host`` through unchanged (nginx: ``proxy_set_header Host $host``) and
    the scheme (uvicorn ``--proxy-headers``), or every browser write is refused.
    """
    fetch_site = headers.get("sec-fetch-site")
    if fetch_site is not None and fetch_site.lower() not in _SAME_SITE_FETCH:
        return (
            f"cross-site request refused: the browser says it comes from another site "
            f"(Sec-Fetch-Site: {fetch_site}); sign in and act from the dashboard's own pages"
        )
    origin = headers.get("origin")
    if origin is None:
        return None
    own = _authority(scheme, headers.get("host", ""))
    parts = urlsplit(origin)
    theirs = _authority(parts.scheme, parts.netloc) if parts.scheme and parts.netloc else None
    if own is None or theirs is None or own != theirs:
        return (
            f"cross-site request refused: Origin {origin!r} is not this dashboard "
            f"({scheme}://{headers.get('host', '?')}); sign in and act from the dashboard's "
            "own pages"
        )
    return None


_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>Refused · fedcl</title><link rel="icon" href="/static/favicon.svg" type="image/svg+xml">
<link rel="stylesheet" href="/static/dashboard.css"></head><body><main>
<h1>Request refused (403)</h1><p class="error" id="refused">{reason}</p>
<p><a href="/runs">Back to the dashboard</a></p></main></body></html>"""


# The page loads the dashboard's stylesheet and icon and runs nothing.
_PAGE_POLICY = "default-src 'self'; script-src 'none'; frame-ancestors 'none'; base-uri 'none'"


def refusal(reason: str, accept: str) -> Response:
    """The 403: a page for a browser navigation (a posted form), JSON for everything else."""
    headers = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
    if "text/html" in accept:
        headers["Content-Security-Policy"] = _PAGE_POLICY
        headers["X-Frame-Options"] = "DENY"
        page = _PAGE.format(reason=html.escape(reason))
        return HTMLResponse(page, status_code=403, headers=headers)
    return JSONResponse({"detail": reason}, status_code=403, headers=headers)


class SameOriginWrites:
    """ASGI middleware: a 403 naming the reason for any cross-site state-changing request.

    Outermost, so a refused request never reaches the routes (nor their body or cookie parsing).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] not in SAFE_METHODS:
            headers = Headers(scope=scope)
            reason = cross_site_reason(headers, scope.get("scheme", "http"))
            if reason is not None:
                await refusal(reason, headers.get("accept", ""))(scope, receive, send)
                return
        await self.app(scope, receive, send)
