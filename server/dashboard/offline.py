"""What an air-gapped site's browser needs from the dashboard itself: /docs assets and HEAD.

FastAPI's Swagger UI loads its JavaScript and CSS from a CDN, which a site without internet
access cannot reach; the assets come from the ``swagger-ui-bundle-v2`` wheel instead and are
served under ``/docs-assets``. HEAD is answered like GET without a body (FastAPI's routes answer
only the methods they declare, so monitors and link checkers got 405).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import DashboardError

DOCS_ASSETS = "/docs-assets"


def swagger_ui_dir() -> Path:
    """The Swagger UI folder shipped in the ``swagger-ui-bundle-v2`` wheel."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        raise DashboardError(
            "the dashboard's /docs needs the swagger-ui-bundle-v2 package "
            "(pip install 'swagger-ui-bundle-v2>=5.31')"
        ) from None
    path = Path(swagger_ui_path)
    if not (path / "swagger-ui-bundle.js").is_file():
        raise DashboardError(f"swagger-ui-bundle.js not found in {path}: reinstall the package")
    return path


def install_docs(app: FastAPI) -> None:
    """``/docs`` (Swagger UI over ``/openapi.json``) with every asset served locally."""
    app.mount(DOCS_ASSETS, StaticFiles(directory=swagger_ui_dir()), name="docs_assets")

    @app.get("/docs", include_in_schema=False, response_class=HTMLResponse)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} - API",
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_favicon_url="/static/favicon.svg",
        )


class HeadAsGet:
    """ASGI middleware: a HEAD request is routed as GET and its response body dropped."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def no_body(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, no_body)
