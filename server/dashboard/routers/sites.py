"""``/api/sites``: every site the coordinator has heard from, across runs."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status

from .. import service
from ..deps import Reader, RegistryDep, SiteId, check_site_visible
from ..schemas import Problem, SiteDetail, SiteOut

router = APIRouter(
    prefix="/api/sites",
    tags=["sites"],
    responses={401: {"model": Problem, "description": "Missing or invalid token"}},
)


@router.get(
    "",
    response_model=list[SiteOut],
    summary="Sites: last seen, rounds, ε spent vs budget (as reported), hash agreement",
    description=(
        "Privacy figures are what each site reported with its updates; the coordinator cannot "
        "verify them. `hash_agreement` is filled only if a metric or audit event about the "
        "site's model hash exists. A site token sees only its own site."
    ),
)
def list_sites(registry: RegistryDep, principal: Reader) -> list[SiteOut]:
    return service.site_list(registry, principal)


@router.get(
    "/{site_id}",
    response_model=SiteDetail,
    responses={
        403: {"model": Problem, "description": "A site token asking for another site"},
        404: {"model": Problem, "description": "Unknown site"},
    },
    summary="One site with its per-run participation and privacy history",
)
def get_site(site_id: SiteId, registry: RegistryDep, principal: Reader) -> SiteDetail:
    check_site_visible(principal, site_id)
    detail = service.site_detail(registry, site_id)
    if detail is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"site {site_id!r} not found")
    return detail
