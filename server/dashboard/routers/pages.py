"""Server-rendered HTML pages: runs, one run (charts), sites, versions, audit log.

Tables are rendered here from the same read models as the JSON API (``service``), so a page
shows exactly what the API would give the same token. Charts are drawn in the browser by
Plotly from the run's ``/api/runs/{id}/charts`` data, embedded in the page for the first paint
and polled while the run is running.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, status
from fastapi.responses import HTMLResponse, RedirectResponse
from markupsafe import Markup

from fedcl.server.registry import RUN_STATUSES

from .. import service
from ..auth import Principal
from ..deps import (
    RUN_ID_PATTERN,
    TEXT_PATTERN,
    Offset,
    PageUser,
    RegistryDep,
    RunId,
    SiteId,
)
from ..schemas import RunOut
from ..service.health import DEGRADED, STALE

router = APIRouter(include_in_schema=False)

RUNS_PER_PAGE = 25
AUDIT_PER_PAGE = 100
VERSIONS_PER_PAGE = 200


def script_safe(text: str) -> Markup:
    """JSON for a <script type="application/json"> element: what Jinja's tojson escapes."""
    for char, escaped in (("&", "\\u0026"), ("<", "\\u003c"), (">", "\\u003e"), ("'", "\\u0027")):
        text = text.replace(char, escaped)
    return Markup(text)


def render(
    request: Request, name: str, user: Principal | None, code: int = 200, **context: Any
) -> HTMLResponse:
    templates = request.app.state.templates
    return templates.TemplateResponse(request, name, {"user": user, **context}, status_code=code)


def error_page(request: Request, user: Principal, code: int, detail: str) -> HTMLResponse:
    return render(request, "error.html", user, code, status_code=code, detail=detail)


@router.get("/")
def home() -> RedirectResponse:
    return RedirectResponse("/runs", status_code=status.HTTP_303_SEE_OTHER)


BADGES = (*RUN_STATUSES, STALE, DEGRADED)
Text = Annotated[str | None, Query(max_length=128)]


def _run_filter(
    scenario: str | None, method: str | None, dp: str | None, he: str | None
) -> Callable[[RunOut], bool] | None:
    """The run list's filters other than status ("" or None: any)."""
    wanted = {"on": True, "off": False}
    checks: list[Callable[[RunOut], bool]] = []
    if scenario:
        checks.append(lambda r: r.scenario == scenario)
    if method:
        checks.append(lambda r: (r.method or "none") == method)
    if dp in wanted:
        checks.append(lambda r: r.dp == wanted[dp])
    if he in wanted:
        checks.append(lambda r: r.he == wanted[he])
    return (lambda r: all(c(r) for c in checks)) if checks else None


@router.get("/runs", response_class=HTMLResponse)
def runs_page(
    request: Request,
    registry: RegistryDep,
    user: PageUser,
    status_: Annotated[str | None, Query(alias="status", max_length=32)] = None,
    scenario: Text = None,
    method: Text = None,
    dp: Text = None,
    he: Text = None,
    offset: Offset = 0,
) -> HTMLResponse:
    wanted = status_ if status_ in BADGES else None
    where = _run_filter(scenario, method, dp, he)
    items, total = service.list_runs(
        registry, status=wanted, limit=RUNS_PER_PAGE, offset=offset, where=where
    )
    every = [service.run_out(registry, r) for r in service.all_runs(registry)]
    filters = {"status": wanted, "scenario": scenario, "method": method, "dp": dp, "he": he}
    page = {
        "rows": items,
        "offset": offset,
        "limit": RUNS_PER_PAGE,
        "shown": len(items),
        "more": offset + RUNS_PER_PAGE < total,
        "total": total,
    }
    return render(
        request,
        "runs.html",
        user,
        nav="runs",
        page=page,
        filters={k: v for k, v in filters.items() if v},
        statuses=BADGES,
        scenarios=sorted({r.scenario for r in every}),
        methods=sorted({r.method or "none" for r in every}),
    )


@router.get("/compare", response_class=HTMLResponse)
def compare_page(
    request: Request,
    registry: RegistryDep,
    user: PageUser,
    run: Annotated[list[str] | None, Query(max_length=8)] = None,
) -> HTMLResponse:
    """Runs side by side: ACC/BWT/FWT/ε, configuration, and their accuracy matrices."""
    wanted = [r for r in dict.fromkeys(run or []) if re.fullmatch(RUN_ID_PATTERN, r)]
    found = [registry.get_run(r) for r in wanted]
    missing = [r for r, info in zip(wanted, found, strict=True) if info is None]
    if missing:
        return error_page(
            request, user, status.HTTP_404_NOT_FOUND, f"run(s) not found: {', '.join(missing)}"
        )
    runs = [info for info in found if info is not None]
    columns = [
        {
            "run": service.run_out(registry, info),
            "matrix": service.matrix_out(registry, info),
            "sites": len(service.results_of(registry, info.id)["sites"]),
        }
        for info in runs
    ]
    return render(request, "compare.html", user, nav="runs", columns=columns)


@router.get("/runs/{run_id}", response_class=HTMLResponse)
def run_page(
    request: Request, run_id: RunId, registry: RegistryDep, user: PageUser
) -> HTMLResponse:
    run = registry.get_run(run_id)
    if run is None:
        return error_page(request, user, status.HTTP_404_NOT_FOUND, f"run {run_id!r} not found")
    return render(
        request,
        "run.html",
        user,
        nav="runs",
        run=service.run_detail(registry, run, user),
        charts=service.run_charts(registry, run, user),
        charts_json=script_safe(service.run_charts_json(registry, run, user)),
        poll_seconds=request.app.state.poll_seconds,
    )


@router.get("/sites", response_class=HTMLResponse)
def sites_page(request: Request, registry: RegistryDep, user: PageUser) -> HTMLResponse:
    return render(request, "sites.html", user, nav="sites", sites=service.site_list(registry, user))


@router.get("/sites/{site_id}", response_class=HTMLResponse)
def site_page(
    request: Request, site_id: SiteId, registry: RegistryDep, user: PageUser
) -> HTMLResponse:
    if not user.may_see_site(site_id):
        return error_page(
            request,
            user,
            status.HTTP_403_FORBIDDEN,
            f"your token is scoped to site {user.site_id!r}; site {site_id!r} is not yours",
        )
    detail = service.site_detail(registry, site_id)
    if detail is None:
        return error_page(request, user, status.HTTP_404_NOT_FOUND, f"site {site_id!r} not found")
    return render(request, "site.html", user, nav="sites", s=detail)


@router.get("/versions", response_class=HTMLResponse)
def versions_page(
    request: Request,
    registry: RegistryDep,
    user: PageUser,
    run: Annotated[str | None, Query(max_length=128)] = None,
) -> HTMLResponse:
    runs = service.all_runs(registry)
    run_id = run if run and any(r.id == run for r in runs) else None
    versions = service.version_list(registry, run_id=run_id, status=None)
    # Every round saves a version: across all runs, show the newest ones and ask for a run.
    shown = versions if run_id else sorted(versions, key=lambda v: v.created_at, reverse=True)
    return render(
        request,
        "versions.html",
        user,
        nav="versions",
        runs=runs,
        run_id=run_id,
        versions=shown[:VERSIONS_PER_PAGE],
        hidden_versions=max(0, len(shown) - VERSIONS_PER_PAGE),
        releases={v.released_from: v for v in versions if v.released_from is not None},
    )


@router.get("/audit", response_class=HTMLResponse)
def audit_page(
    request: Request,
    registry: RegistryDep,
    user: PageUser,
    run: Annotated[str | None, Query(max_length=128)] = None,
    site: Annotated[str | None, Query(max_length=128)] = None,
    kind: Annotated[str | None, Query(max_length=64)] = None,
    offset: Offset = 0,
) -> HTMLResponse:
    run_id = run if run and re.fullmatch(RUN_ID_PATTERN, run) else None
    site_id = site if site and re.fullmatch(TEXT_PATTERN, site) else None
    kind = kind if kind and re.fullmatch(TEXT_PATTERN, kind) else None
    if site_id is not None and not user.may_see_site(site_id):
        return error_page(
            request,
            user,
            status.HTTP_403_FORBIDDEN,
            f"your token is scoped to site {user.site_id!r}; site {site_id!r} is not yours",
        )
    events = service.audit_list(
        registry,
        user,
        run_id=run_id,
        site_id=site_id,
        kind=kind,
        limit=AUDIT_PER_PAGE + 1,
        offset=offset,
    )
    page = {
        "offset": offset,
        "limit": AUDIT_PER_PAGE,
        "shown": min(len(events), AUDIT_PER_PAGE),
        "more": len(events) > AUDIT_PER_PAGE,
        "total": None,
    }
    params = {k: v for k, v in (("run", run_id), ("site", site_id), ("kind", kind)) if v}
    return render(
        request,
        "audit.html",
        user,
        nav="audit",
        events=events[:AUDIT_PER_PAGE],
        page=page,
        params=params,
        run_id=run_id,
        site_id=site_id,
        kind=kind,
    )
