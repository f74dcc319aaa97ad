"""The dashboard's app factory.

``create_app`` opens the registry once and wires routers, templates, static files, Prometheus
and error handling. The dashboard is its own process over the coordinator's registry database
(docs/DESIGN.md §2): it reads and, for model-version decisions only, writes through the registry
facade, and holds no state of its own.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from datetime import datetime
from importlib import resources
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, Request, status
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from jinja2 import Environment, PackageLoader, select_autoescape
from prometheus_client import CollectorRegistry

from fedcl.server.registry import Registry, RegistryError

from .auth import DashboardError
from .collector import RegistryCollector
from .deps import LoginRequired
from .offline import HeadAsGet, install_docs
from .origin import SameOriginWrites
from .routers import audit, pages, prometheus, runs, session, sites, tokens, versions
from .service.cache import ReadScope

# Pages only load our own files. Plotly injects <style> elements and inline style attributes, and
# renders heatmaps through data: URLs, hence those two allowances; scripts stay 'self' only.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; connect-src 'self'; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'self'"
)
# Swagger UI (/docs) runs an inline script, so it keeps FastAPI's defaults; its assets are served
# by the dashboard itself (offline.py): nothing loads from a CDN.
_NO_CSP = ("/docs",)

DESCRIPTION = """
Runs, rounds, sites, privacy spend and model versions of a fedcl federation, read from the
coordinator's registry.

**Authentication.** Every `/api/` call needs a token: `Authorization: Bearer <token>` (scripts,
Prometheus) or the session cookie the login page sets (pages; their writes also send the
`X-Fedcl-Dashboard` header). Create tokens with
`fedcl dashboard token create --db URL --role ROLE --name NAME`; list and revoke them with
`fedcl dashboard token list|revoke` or `/api/tokens`. State-changing requests whose `Origin` or
`Sec-Fetch-Site` says they come from another site get 403 (login and logout included).

**Roles.** `admin`: everything. `viewer`: read-only (POST → 403). `site:<id>`: federation-level
data plus its own site's rows (participations, per-site metrics, privacy); asking for another
site's rows → 403.

**Errors.** 401 without a valid token, 403 for a role that may not, 404 with a `detail` naming
the unknown id, 409 for a change that does not apply, 422 for malformed parameters, 503 when the
registry database cannot be read.
"""

TAGS = [
    {"name": "runs", "description": "Runs, tasks, rounds, metrics, accuracy matrix, canary"},
    {"name": "sites", "description": "Sites across runs, with their reported privacy spend"},
    {"name": "versions", "description": "Model versions: list, download, promote, roll back"},
    {"name": "audit", "description": "The hash-chained audit log"},
    {"name": "tokens", "description": "API tokens: list (admin, viewer), revoke (admin)"},
    {"name": "prometheus", "description": "Prometheus exposition, computed at scrape time"},
]


def _fedcl_version() -> str:
    try:
        return version("fedcl")
    except PackageNotFoundError:  # a source tree without an install
        return "0+unknown"


def plotly_js_path() -> Path:
    """The ``plotly.min.js`` bundled in the installed ``plotly`` Python package.

    Served by the dashboard itself because sites are air-gapped: no CDN can be reached.
    """
    path = Path(str(resources.files("plotly") / "package_data" / "plotly.min.js"))
    if not path.is_file():
        raise DashboardError(
            f"plotly.min.js not found at {path}: reinstall the 'plotly' package "
            "(pip install --force-reinstall plotly)"
        )
    return path


# ------------------------------------------------------------------------- template filters


def _dt(value: datetime | None) -> str:
    return "–" if value is None else value.strftime("%Y-%m-%d %H:%M:%S UTC")


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def _signed_pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:+.1f} pp"


def _num(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _bytes(value: int | None) -> str:
    if value is None:
        return "–"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _templates() -> Jinja2Templates:
    env = Environment(
        loader=PackageLoader("fedcl.server.dashboard", "templates"),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(dt=_dt, pct=_pct, signed_pct=_signed_pct, num=_num, bytes=_bytes)
    return Jinja2Templates(env=env)


# --------------------------------------------------------------------------------- factory


def create_app(
    registry_url: str,
    *,
    artifacts_dir: str | os.PathLike[str] | None = None,
    public_metrics: bool = False,
    poll_seconds: float = 5.0,
    recent_runs: int = 20,
) -> FastAPI:
    """Build the dashboard app over the registry at ``registry_url``.

    The registry is opened (and migrated) here, so a bad URL fails at startup with a
    :class:`~fedcl.server.registry.RegistryError` rather than on the first request; it stays open
    for the app's life (``app.state.registry``; close it when done serving). ``artifacts_dir``
    defaults as in :meth:`Registry.open` (beside a SQLite file). ``public_metrics`` serves
    ``/metrics`` without a token; ``poll_seconds`` is how often a running run's page refreshes;
    ``recent_runs`` bounds the runs exported to Prometheus (running runs always are).
    """
    if poll_seconds <= 0:
        raise DashboardError(f"poll_seconds must be > 0, got {poll_seconds}")
    registry = Registry.open(registry_url, artifacts_dir=artifacts_dir)
    plotly_js = plotly_js_path()

    app = FastAPI(
        title="fedcl dashboard",
        version=_fedcl_version(),
        description=DESCRIPTION,
        openapi_tags=TAGS,
        docs_url=None,  # offline.install_docs: the same page with local assets
        redoc_url=None,
    )
    install_docs(app)
    app.state.registry = registry
    app.state.templates = _templates()
    app.state.public_metrics = public_metrics
    app.state.poll_seconds = poll_seconds
    prom = CollectorRegistry(auto_describe=False)
    prom.register(RegistryCollector(registry, recent_runs=recent_runs))
    app.state.prometheus = prom

    for module in (runs, sites, versions, audit, tokens, prometheus, session, pages):
        app.include_router(module.router)
    app.include_router(tokens.pages)

    @app.get("/static/plotly.min.js", include_in_schema=False, name="plotly_js")
    def plotly_asset() -> FileResponse:
        return FileResponse(
            plotly_js,
            media_type="text/javascript",
            headers={"Cache-Control": "public, max-age=86400"},
        )

    app.mount(
        "/static",
        StaticFiles(packages=[("fedcl.server.dashboard", "static")]),
        name="static",
    )

    @app.exception_handler(LoginRequired)
    async def _to_login(request: Request, exc: LoginRequired) -> Response:
        target = f"/login?next={quote(exc.next_url, safe='/')}"
        return RedirectResponse(target, status_code=status.HTTP_303_SEE_OTHER)

    @app.exception_handler(RegistryError)
    async def _registry_down(request: Request, exc: RegistryError) -> Response:
        # Input is validated before it reaches the registry, so what is left is the database
        # itself (unreachable, locked, a missing artifact folder): the service is unavailable.
        return JSONResponse(
            {"detail": f"registry unavailable: {exc}"},
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        )

    @app.middleware("http")
    async def _security_headers(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        response = await call_next(request)
        if not request.url.path.startswith(_NO_CSP):
            response.headers.setdefault("Content-Security-Policy", CONTENT_SECURITY_POLICY)
            response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        if not request.url.path.startswith("/static/"):
            # Registry data (and signed-in pages) must not linger in shared or browser caches.
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    # Outermost: a cross-site write is refused before anything reads its body or cookie.
    app.add_middleware(SameOriginWrites)
    app.add_middleware(ReadScope)  # a read request reads each run's fingerprint once
    app.add_middleware(HeadAsGet)  # outermost: HEAD is GET for every route and mount
    return app
