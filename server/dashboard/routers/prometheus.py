"""``/metrics``: Prometheus exposition of the registry (see :mod:`..collector`).

Protected like the API by default — an admin or viewer bearer token, which is how Prometheus
scrapes (``authorization: {type: Bearer, credentials_file: ...}`` in the scrape config); site
tokens get 403 because the figures cover every site. ``create_app(..., public_metrics=True)``
(``fedcl dashboard --public-metrics``) opens it for a scraper on a trusted network.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..auth import Principal
from ..deps import RegistryDep, bearer_scheme, cookie_scheme, get_principal
from ..schemas import Problem

router = APIRouter(tags=["prometheus"])


def metrics_access(
    request: Request,
    registry: RegistryDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
    cookie: Annotated[str | None, Depends(cookie_scheme)],
) -> Principal | None:
    """Nobody when /metrics is public; otherwise an admin or viewer token."""
    if request.app.state.public_metrics:
        return None
    principal = get_principal(request, registry, bearer, cookie)
    if not principal.sees_all_sites:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"token {principal.name!r} is scoped to site {principal.site_id!r}; /metrics covers "
            "every site and needs an admin or viewer token",
        )
    return principal


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}, "description": "Metrics"},
        401: {"model": Problem, "description": "Missing or invalid token"},
        403: {"model": Problem, "description": "A site token"},
    },
    summary="Prometheus metrics (rounds, durations, participants, failures, ε, bytes)",
)
def metrics(request: Request, _: Annotated[Principal | None, Depends(metrics_access)]) -> Response:
    data = generate_latest(request.app.state.prometheus)
    return Response(content=data, media_type=CONTENT_TYPE_LATEST)
