"""Dashboard API, auth, versions/canary, Prometheus, pages and CLI, on SQLite and PostgreSQL.

Fixtures: one small real simulation (in-process engine) runs once per session and is captured
as plain snapshots; every test replays it through the registry API into a fresh database from
conftest's ``registry_url`` (SQLite always, PostgreSQL with FEDCL_TEST_DATABASE_URL), then adds
a synthetic running run with the rows a tiny simulation does not produce: privacy spend,
refusals, failures, CKKS-encrypted versions and a model-hash check.
"""

from __future__ import annotations

import hashlib
import math
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, get_args

import pytest
import typer
from conftest import REGISTRY_PG_ENV, REGISTRY_PG_SKIP, _registry_postgres_schema_url
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from fedcl.cli import dashboard_cmd
from fedcl.config import FedclError
from fedcl.server.dashboard import create_app, evaluate_canary
from fedcl.server.dashboard.auth import CSRF_HEADER, SESSION_COOKIE, DashboardError, parse_role
from fedcl.server.registry import (
    RUN_STATUSES,
    VERSION_STATUSES,
    MetricInfo,
    MetricRow,
    ModelVersionInfo,
    ParticipationInfo,
    Registry,
    RegistryError,
    RoundInfo,
    RunInfo,
)
from fedcl.server.results import build_results

DEMO_RUN = "demo-run"
DP_RUN = "dp-he-run"
SITES = ("site-0", "site-1", "site-2")


# ==============================================================================================
# Fixtures
# ==============================================================================================


@dataclass(frozen=True)
class DemoSnapshot:
    """A finished simulation's registry rows, as plain values that can be replayed anywhere."""

    run: RunInfo
    rounds: list[RoundInfo]
    participations: list[ParticipationInfo]
    metrics: list[MetricInfo]
    versions: list[tuple[ModelVersionInfo, bytes]]


_DEMO_CACHE: dict[str, DemoSnapshot] = {}


def build_demo_snapshot(base: Path) -> DemoSnapshot:
    """Run a tiny real simulation once per process (the browser tests share it) and snapshot it.

    Torch gets one thread while it runs: on a 2-core runner its default thread pool makes this
    tiny CNN several times slower.
    """
    if "demo" in _DEMO_CACHE:
        return _DEMO_CACHE["demo"]
    import torch

    from fedcl.simulations.catalog import load_scenario
    from fedcl.simulations.runner import SimulationPlan, run_plan

    overrides = [
        "data.num_tasks=2",
        "train.rounds_per_task=2",
        "train.local_epochs=1",
        f"simulation.num_sites={len(SITES)}",
    ]
    label, experiment = load_scenario("digits-domain-il", overrides)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plan = SimulationPlan(experiment, label, base / "sim", DEMO_RUN, engine="inprocess")
        run_plan(plan)
    finally:
        torch.set_num_threads(threads)
    with Registry.open(plan.registry_url) as source:
        run = source.get_run(DEMO_RUN)
        assert run is not None and run.status == "completed"
        snapshot = DemoSnapshot(
            run=run,
            rounds=source.list_rounds(DEMO_RUN),
            participations=source.list_participations(DEMO_RUN),
            metrics=source.list_metrics(DEMO_RUN),
            versions=[(v, source.load_artifact(v)) for v in source.list_model_versions(DEMO_RUN)],
        )
    _DEMO_CACHE["demo"] = snapshot
    return snapshot


def replay(snapshot: DemoSnapshot, registry: Registry) -> None:
    """Write a snapshot into ``registry`` through its public API, as the coordinator did."""
    run = snapshot.run
    registry.create_run(
        run.id, name=run.name, scenario=run.scenario, config=run.config, tasks=run.tasks
    )

    def rows(round_id: int | None) -> list[MetricRow]:
        return [
            MetricRow(m.name, m.value, m.site_id, m.task_index)
            for m in snapshot.metrics
            if m.round_id == round_id
        ]

    registry.record_metrics(run.id, None, rows(None))
    for r in snapshot.rounds:
        rid = registry.begin_round(
            run.id,
            task_index=r.task_index,
            round_in_task=r.round_in_task,
            server_round=r.server_round,
            kind=r.kind,
        )
        for p in snapshot.participations:
            if p.round_id == r.id:
                registry.record_participation(
                    rid,
                    p.site_id,
                    phase=p.phase,
                    status=p.status,
                    num_examples=p.num_examples,
                    detail=p.detail,
                )
        registry.record_metrics(run.id, rid, rows(r.id))
        for v, payload in snapshot.versions:
            if v.round_id == r.id:
                registry.save_model_version(
                    run.id,
                    rid,
                    task_index=v.task_index,
                    server_round=v.server_round,
                    payload=payload,
                    encrypted=v.encrypted,
                    format=v.format,
                )
        registry.complete_round(
            rid, seconds=r.seconds, bytes_up=r.bytes_up, bytes_down=r.bytes_down
        )
    registry.set_run_status(run.id, run.status, run.reason)


# Federation accuracy of the synthetic run per server round and task (canary tests rely on it).
DP_ACCURACY = {1: {0: 0.80}, 2: {0: 0.70}, 3: {0: 0.78, 1: 0.40}}


def add_dp_run(registry: Registry) -> None:
    """A running DP + HE run: privacy spend, a refusal, a failure, encrypted versions, a hash
    check — the rows the tiny plaintext simulation does not produce."""
    registry.create_run(
        DP_RUN,
        name="dp-he",
        scenario="synthetic",
        config={
            "stream": "sequential",
            "dp": {"enabled": True},
            "he": {"enabled": True, "max_sites": 20},
        },
        tasks=["task a", "task b"],
    )
    registry.record_metrics(
        DP_RUN,
        None,
        [
            MetricRow("baseline_accuracy", 0.1, None, 0),
            MetricRow("baseline_accuracy", 0.1, None, 1),
        ],
    )
    budgets = {"site-0": 4.0, "site-1": 4.0, "site-2": 1.0}
    for server_round, task in ((1, 0), (2, 0), (3, 1)):
        rid = registry.begin_round(
            DP_RUN,
            task_index=task,
            round_in_task=0 if server_round != 2 else 1,
            server_round=server_round,
        )
        for site in SITES:
            status, detail = "ok", None
            if server_round == 2 and site == "site-1":
                status, detail = "failed", "RuntimeError: CUDA out of memory"
            if server_round >= 2 and site == "site-2":
                status, detail = "refused", "privacy budget exhausted (epsilon 1.00 of 1.00)"
            registry.record_participation(
                rid, site, phase="train", status=status, num_examples=100, detail=detail
            )
            if status == "ok" or status == "refused":
                spent = min(0.5 * server_round, budgets[site])
                registry.record_privacy(
                    DP_RUN,
                    rid,
                    site,
                    epsilon_run=spent,
                    epsilon_lifetime=spent + 0.25,
                    delta=1e-5,
                    budget=budgets[site],
                )
        metrics = [
            MetricRow("accuracy", acc, None, j) for j, acc in DP_ACCURACY[server_round].items()
        ]
        metrics += [
            MetricRow("accuracy", 0.5, "site-0", 0),
            MetricRow("accuracy", 0.6, "site-1", 0),
        ]
        metrics.append(MetricRow("loss", math.nan, None, 0))  # a diverged loss: NaN
        if server_round == 1:
            metrics.append(MetricRow("model_hash_agreement", 1.0, "site-0"))
        registry.record_metrics(DP_RUN, rid, metrics)
        registry.save_model_version(
            DP_RUN,
            rid,
            task_index=task,
            server_round=server_round,
            payload=f"ckks blob {server_round}".encode() * 10,
            encrypted=True,
            format="ckks",
        )
        if server_round < 3:  # round 3 is still running
            registry.complete_round(
                rid, seconds=30.0 * server_round, bytes_up=5000, bytes_down=7000
            )
    registry.audit(
        "model_hash.mismatch",
        "site-1 reported model sha256 abc..., expected def...",
        run_id=DP_RUN,
        site_id="site-1",
    )


@pytest.fixture(scope="session")
def demo_snapshot(tmp_path_factory: pytest.TempPathFactory) -> DemoSnapshot:
    return build_demo_snapshot(tmp_path_factory.mktemp("dashboard-demo"))


@dataclass
class Dash:
    """A dashboard app over a populated registry, with one token per role."""

    url: str
    app: FastAPI
    registry: Registry
    client: TestClient
    tokens: dict[str, str]

    def headers(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    def get(self, url: str, role: str = "admin", **kwargs: Any) -> Any:
        return self.client.get(url, headers=self.headers(role), **kwargs)

    def post(self, url: str, role: str = "admin", **kwargs: Any) -> Any:
        return self.client.post(url, headers=self.headers(role), **kwargs)

    def versions(self, run_id: str) -> dict[int, str]:
        return {v.id: v.status for v in self.registry.list_model_versions(run_id)}


@contextmanager
def populated_dashboard(
    url: str, artifacts: Path, snapshot: DemoSnapshot, *, extra_runs: int = 0
) -> Iterator[Dash]:
    """Create the app over ``url``, fill the registry, make one token per role."""
    app = create_app(url, artifacts_dir=artifacts, poll_seconds=2)
    registry: Registry = app.state.registry
    try:
        replay(snapshot, registry)
        add_dp_run(registry)
        for i in range(extra_runs):  # for paging: odd ones failed
            registry.create_run(f"extra-{i}", name="x", scenario="s", config={}, tasks=["t"])
            if i % 2:
                registry.set_run_status(f"extra-{i}", "failed", "boom")
        tokens = {
            "admin": registry.create_token("alice", "admin"),
            "viewer": registry.create_token("victor", "viewer"),
            "site-1": registry.create_token("site one admin", "site:site-1"),
        }
        yield Dash(url, app, registry, TestClient(app), tokens)
    finally:
        registry.close()


@pytest.fixture
def dash(registry_url: str, tmp_path: Path, demo_snapshot: DemoSnapshot) -> Iterator[Dash]:
    """A fresh dashboard per test, for tests that change versions (conftest's backends)."""
    with populated_dashboard(registry_url, tmp_path / "artifacts", demo_snapshot) as d:
        yield d


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def ro(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    demo_snapshot: DemoSnapshot,
) -> Iterator[Dash]:
    """One dashboard per backend shared by the read-only tests.

    Filling a registry costs ~75 transactions, about a second on PostgreSQL, so the tests that
    only read share one (same backends and PostgreSQL schema handling as conftest's
    ``registry_url``, at module scope). They must not change what another test reads.
    """
    base = tmp_path_factory.mktemp("dashboard-ro")
    if request.param == "sqlite":
        urls: Iterator[str] = iter([f"sqlite:///{base / 'registry.db'}"])
    else:
        pg = os.environ.get(REGISTRY_PG_ENV)
        if not pg:
            pytest.skip(REGISTRY_PG_SKIP)
        urls = _registry_postgres_schema_url(pg)
    url = next(urls)
    try:
        with populated_dashboard(url, base / "artifacts", demo_snapshot, extra_runs=5) as d:
            yield d
    finally:
        next(urls, None)  # drops the PostgreSQL schema


def _version_ids(dash: Dash, run_id: str) -> list[int]:
    return [v.id for v in dash.registry.list_model_versions(run_id)]


# ==============================================================================================
# Auth
# ==============================================================================================


API_GETS = [
    "/api/runs",
    f"/api/runs/{DEMO_RUN}",
    f"/api/runs/{DEMO_RUN}/tasks",
    f"/api/runs/{DEMO_RUN}/rounds",
    f"/api/runs/{DEMO_RUN}/metrics",
    f"/api/runs/{DEMO_RUN}/accuracy-matrix",
    f"/api/runs/{DEMO_RUN}/charts",
    f"/api/runs/{DEMO_RUN}/drift",
    f"/api/runs/{DEMO_RUN}/results.json",
    f"/api/runs/{DEMO_RUN}/metrics.csv",
    f"/api/runs/{DEMO_RUN}/ledger.csv",
    "/api/sites",
    "/api/sites/site-0",
    "/api/versions",
    "/api/versions/1",
    "/api/versions/1/download",
    "/api/audit",
    "/api/tokens",
    "/metrics",
]
API_POSTS = [
    "/api/versions/1/promote",
    "/api/versions/1/candidate",
    "/api/versions/1/rollback",
    f"/api/runs/{DEMO_RUN}/canary",
    "/api/tokens/1/revoke",
]


def test_every_api_route_needs_a_valid_token(ro: Dash) -> None:
    # The API routers and these lists must agree, so a new route cannot skip the auth test.
    from fedcl.server.dashboard.routers import audit, prometheus, runs, sites, tokens, versions

    api_routes = {
        (method, route.path)
        for module in (audit, prometheus, runs, sites, tokens, versions)
        for route in module.router.routes
        for method in route.methods  # type: ignore[attr-defined]
    }
    assert len(api_routes) == len(API_GETS) + len(API_POSTS)
    revoked = ro.registry.create_token("mallory", "admin")
    info = ro.registry.verify_token(revoked)
    assert info is not None
    ro.registry.revoke_token(info.id, actor="alice")
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Bearer {revoked}"}):
        for url in API_GETS:
            response = ro.client.get(url, headers=headers)
            assert response.status_code == 401, url
            assert response.headers["www-authenticate"] == "Bearer"
            assert "token" in response.json()["detail"]
        for url in API_POSTS:
            assert ro.client.post(url, headers=headers).status_code == 401, url
    assert ro.versions(DEMO_RUN) == {v: "candidate" for v in _version_ids(ro, DEMO_RUN)}


def test_openapi_and_docs_are_public(ro: Dash) -> None:
    schema = ro.client.get("/openapi.json").json()
    assert ro.client.get("/docs").status_code == 200
    assert "/api/runs/{run_id}/accuracy-matrix" in schema["paths"]
    assert {"HTTPBearer", "APIKeyCookie"} <= set(schema["components"]["securitySchemes"])
    download = schema["paths"]["/api/versions/{version_id}/download"]["get"]
    assert "raw encrypted blob" in download["description"]


def test_viewer_reads_everything_but_cannot_post(ro: Dash) -> None:
    for url in API_GETS:
        assert ro.get(url, "viewer").status_code == 200, url
    before = ro.versions(DEMO_RUN)
    for url in API_POSTS:
        response = ro.post(url, "viewer")
        assert response.status_code == 403, url
        assert "needs role 'admin'" in response.json()["detail"]
    assert ro.versions(DEMO_RUN) == before


def test_site_token_sees_only_its_own_site_rows(ro: Dash) -> None:
    sites = ro.get("/api/sites", "site-1").json()
    assert [s["id"] for s in sites] == ["site-1"]
    assert ro.get("/api/sites/site-1", "site-1").status_code == 200
    for url in (
        "/api/sites/site-0",
        f"/api/runs/{DP_RUN}/metrics?site=site-0",
        f"/api/runs/{DP_RUN}/accuracy-matrix?site=site-2",
        "/api/audit?site=site-0",
    ):
        response = ro.get(url, "site-1")
        assert response.status_code == 403, url
        assert "scoped to site 'site-1'" in response.json()["detail"]

    metrics = ro.get(f"/api/runs/{DP_RUN}/metrics", "site-1").json()
    assert {m["site_id"] for m in metrics} == {None, "site-1"}
    own = ro.get(f"/api/runs/{DP_RUN}/metrics?site=site-1", "site-1").json()
    assert own and {m["site_id"] for m in own} == {"site-1"}

    rounds = ro.get(f"/api/runs/{DP_RUN}/rounds", "site-1").json()
    assert {p["site_id"] for r in rounds for p in r["participations"]} == {"site-1"}
    assert rounds[1]["num_refusals"] == 1  # federation aggregates stay visible

    charts = ro.get(f"/api/runs/{DP_RUN}/charts", "site-1").json()
    assert [s["site_id"] for s in charts["privacy"]] == ["site-1"]
    assert ro.get(f"/api/runs/{DP_RUN}", "site-1").json()["sites"] == ["site-1"]
    events = ro.get("/api/audit", "site-1").json()
    assert all(e["site_id"] in (None, "site-1") for e in events)
    assert any(e["kind"] == "model_hash.mismatch" for e in events)

    for url in API_POSTS:
        assert ro.post(url, "site-1").status_code == 403
    assert ro.get("/metrics", "site-1").status_code == 403


def test_cookie_auth_and_csrf_header_on_writes(dash: Dash) -> None:
    client = TestClient(dash.app)
    started = dash.registry.start_session(dash.tokens["admin"], lifetime=timedelta(hours=1))
    assert started is not None
    client.cookies.set(SESSION_COOKIE, started[0])
    assert client.get("/api/runs").status_code == 200
    version = _version_ids(dash, DEMO_RUN)[0]
    response = client.post(f"/api/versions/{version}/promote")
    assert response.status_code == 403
    assert CSRF_HEADER in response.json()["detail"]
    assert dash.versions(DEMO_RUN)[version] == "candidate"
    response = client.post(f"/api/versions/{version}/promote", headers={CSRF_HEADER: "1"})
    assert response.status_code == 200
    assert dash.versions(DEMO_RUN)[version] == "production"


def test_roles_are_validated() -> None:
    assert parse_role("admin") == "admin"
    assert parse_role("site:site-1") == "site:site-1"
    for bad in ("root", "site:", "site: ", "site:" + "x" * 40, ""):
        with pytest.raises(DashboardError):
            parse_role(bad)


# ==============================================================================================
# Runs, rounds, metrics, matrix
# ==============================================================================================


def test_runs_pagination_and_status_filter(ro: Dash) -> None:
    page = ro.get("/api/runs?limit=3").json()
    assert page["total"] == 7 and page["limit"] == 3 and page["offset"] == 0
    assert [r["id"] for r in page["items"]] == ["extra-4", "extra-3", "extra-2"]
    rest = ro.get("/api/runs?limit=3&offset=3").json()
    tail = ro.get("/api/runs?limit=3&offset=6").json()
    ids = [r["id"] for r in page["items"] + rest["items"] + tail["items"]]
    assert len(ids) == len(set(ids)) == 7
    assert ro.get("/api/runs?offset=100").json()["items"] == []
    failed = ro.get("/api/runs?status=failed").json()
    assert failed["total"] == 2 and {r["id"] for r in failed["items"]} == {"extra-1", "extra-3"}
    running = ro.get("/api/runs?status=running").json()["items"]
    assert DP_RUN in {r["id"] for r in running}
    for bad in ("status=bogus", "limit=0", "limit=501", "offset=-1", "limit=x"):
        assert ro.get(f"/api/runs?{bad}").status_code == 422, bad


def test_run_detail_tasks_and_rounds(ro: Dash, demo_snapshot: DemoSnapshot) -> None:
    detail = ro.get(f"/api/runs/{DEMO_RUN}").json()
    assert detail["status"] == "completed"
    assert detail["rounds_completed"] == len(demo_snapshot.rounds) == 4
    assert detail["sites"] == list(SITES)
    assert detail["versions"] == {"candidate": 4}
    assert detail["avg_accuracy"] is not None and 0 <= detail["avg_accuracy"] <= 1

    tasks = ro.get(f"/api/runs/{DEMO_RUN}/tasks").json()
    assert [(t["index"], t["rounds"], t["first_server_round"]) for t in tasks] == [
        (0, 2, 1),
        (1, 2, 3),
    ]
    assert [t["name"] for t in tasks] == demo_snapshot.run.tasks

    rounds = ro.get(f"/api/runs/{DEMO_RUN}/rounds").json()
    assert [r["server_round"] for r in rounds] == [1, 2, 3, 4]
    first = rounds[0]
    assert first["num_participants"] == 3 and first["bytes_up"] > 0 and first["seconds"] > 0
    assert {(p["site_id"], p["phase"]) for p in first["participations"]} == {
        (s, phase) for s in SITES for phase in ("train", "evaluate")
    }

    dp_rounds = ro.get(f"/api/runs/{DP_RUN}/rounds").json()
    assert [(r["status"], r["num_failures"], r["num_refusals"]) for r in dp_rounds] == [
        ("completed", 0, 0),
        ("completed", 1, 1),
        ("running", 0, 0),
    ]
    second = {p["site_id"]: p for p in dp_rounds[1]["participations"]}
    assert second["site-2"]["status"] == "refused"
    assert "budget" in second["site-2"]["detail"]
    assert second["site-1"]["status"] == "failed"


def test_metrics_filters_and_nan(ro: Dash) -> None:
    url = f"/api/runs/{DEMO_RUN}/metrics"
    everything = ro.get(url).json()
    assert {"accuracy", "loss", "train_loss", "baseline_accuracy"} <= {
        m["name"] for m in everything
    }
    acc = ro.get(f"{url}?name=accuracy&round=2&task=0").json()
    assert {m["site_id"] for m in acc} == {None, *SITES}
    assert all(m["server_round"] == 2 and m["task_index"] == 0 for m in acc)
    federation = ro.get(f"{url}?name=accuracy&federation_only=true").json()
    assert federation and all(m["site_id"] is None for m in federation)
    site = ro.get(f"{url}?site=site-0&name=accuracy").json()
    assert site and {m["site_id"] for m in site} == {"site-0"}
    baseline = ro.get(f"{url}?name=baseline_accuracy&federation_only=true").json()
    assert [m["server_round"] for m in baseline] == [None, None]
    assert ro.get(f"{url}?name=nope").json() == []

    losses = ro.get(f"/api/runs/{DP_RUN}/metrics?name=loss").json()
    assert losses and all(m["value"] is None for m in losses)  # NaN is sent as null


def test_accuracy_matrix_matches_results_json(ro: Dash) -> None:
    results = build_results(ro.registry, DEMO_RUN)
    fed = ro.get(f"/api/runs/{DEMO_RUN}/accuracy-matrix").json()
    assert fed["matrix"] == results["accuracy_matrix"]
    assert fed["baseline"] == results["baseline_accuracy"]
    assert fed["avg_accuracy"] == pytest.approx(results["avg_accuracy"])
    assert fed["bwt"] == pytest.approx(results["bwt"])
    site = ro.get(f"/api/runs/{DEMO_RUN}/accuracy-matrix?site=site-2").json()
    assert site["site_id"] == "site-2"
    assert site["matrix"] == results["sites"]["site-2"]["accuracy_matrix"]
    absent = ro.get("/api/runs/extra-0/accuracy-matrix?site=site-2")
    assert absent.status_code == 404 and "took no part" in absent.json()["detail"]


def test_run_charts_for_a_running_run(ro: Dash) -> None:
    charts = ro.get(f"/api/runs/{DP_RUN}/charts").json()
    assert charts["poll"] is True and charts["run"]["status"] == "running"
    assert charts["task_boundaries"] == [3]
    task0 = charts["accuracy"][0]
    assert task0["server_rounds"] == [0, 1, 2, 3]
    assert task0["values"] == pytest.approx([0.1, 0.8, 0.7, 0.78])
    eps = {s["site_id"]: s for s in charts["privacy"]}
    assert eps["site-2"]["budget"] == 1.0 and eps["site-2"]["epsilon_run"] == [0.5, 1.0, 1.0]
    done = ro.get(f"/api/runs/{DEMO_RUN}/charts").json()
    assert done["poll"] is False and done["privacy"] == []


def test_unknown_ids_are_404_with_detail(ro: Dash) -> None:
    for url in (
        "/api/runs/no-such-run",
        "/api/runs/no-such-run/tasks",
        "/api/runs/no-such-run/rounds",
        "/api/runs/no-such-run/metrics",
        "/api/runs/no-such-run/accuracy-matrix",
        "/api/runs/no-such-run/charts",
        "/api/sites/no-such-site",
        "/api/versions/999999",
        "/api/versions/999999/download",
    ):
        response = ro.get(url)
        assert response.status_code == 404, url
        detail = response.json()["detail"]
        assert "not found" in detail and ("no-such" in detail or "999999" in detail), detail
    for url in ("/api/versions/999999/promote", "/api/runs/no-such-run/canary"):
        assert ro.post(url).status_code == 404


def test_bad_parameters_are_422(ro: Dash) -> None:
    for url in (
        "/api/runs/bad%20id",
        "/api/runs/.hidden",
        "/api/runs/" + "x" * 129,
        "/api/versions/abc",
        "/api/versions/0",
        "/api/versions/99999999999999999999",
        f"/api/runs/{DEMO_RUN}/metrics?round=-1",
        f"/api/runs/{DEMO_RUN}/metrics?task=99999999999",
        f"/api/runs/{DEMO_RUN}/metrics?site=%00",
        f"/api/runs/{DEMO_RUN}/metrics?name=" + "n" * 129,
        "/api/sites/a%01b",
        "/api/audit?run=../etc",
        "/api/versions?status=shiny",
    ):
        assert ro.get(url).status_code == 422, url
    for drop in ("2", "-0.1", "nan", "inf", "x"):
        assert ro.post(f"/api/runs/{DP_RUN}/canary?max_drop={drop}").status_code == 422, drop


# ==============================================================================================
# Sites, privacy, audit
# ==============================================================================================


def test_sites_summary_privacy_and_hash_agreement(ro: Dash) -> None:
    sites = {s["id"]: s for s in ro.get("/api/sites").json()}
    assert set(sites) == set(SITES)
    s0, s1, s2 = sites["site-0"], sites["site-1"], sites["site-2"]
    assert s0["runs"] == 2
    assert s0["rounds_ok"] == 4 + 3 and s0["rounds_failed"] == 0
    assert s1["rounds_failed"] == 1 and s2["rounds_refused"] == 2
    assert s2["epsilon_lifetime"] == pytest.approx(1.25) and s2["budget"] == 1.0
    assert s2["budget_used"] == pytest.approx(1.25)
    assert s0["hash_agreement"]["metric"] == "model_hash_agreement"
    assert s0["hash_agreement"]["value"] == 1.0
    assert s1["hash_agreement"]["audit_events"] == 1
    # Without a site-level row, the federation's check of the site's latest checked run: the
    # demo run's sites all agreed (it used to say "not recorded" while every site agreed).
    for s in (s1, s2):
        assert s["hash_agreement"]["metric"] == "model-sha256-agreement"
        assert s["hash_agreement"]["run_id"] == DEMO_RUN and s["hash_agreement"]["value"] == 1.0
    assert s0["last_seen"] >= s0["first_seen"]

    detail = ro.get("/api/sites/site-2").json()
    runs = {r["run_id"]: r for r in detail["per_run"]}
    assert runs[DP_RUN]["rounds_refused"] == 2
    assert any("budget" in e for e in runs[DP_RUN]["errors"])
    assert [p["server_round"] for p in detail["privacy"]] == [1, 2, 3]


def test_audit_filters_and_paging(ro: Dash) -> None:
    events = ro.get("/api/audit").json()
    assert events[0]["created_at"] >= events[-1]["created_at"]  # newest first
    run_events = ro.get(f"/api/audit?run={DEMO_RUN}").json()
    assert run_events and all(e["run_id"] == DEMO_RUN for e in run_events)
    site_events = ro.get("/api/audit?site=site-1").json()
    # site-1's own token's creation is an event of site-1 (issue 13), then its hash report
    assert [e["kind"] for e in site_events] == ["token.created", "model_hash.mismatch"]
    tokens = ro.get("/api/audit?kind=token").json()
    assert tokens and {e["kind"] for e in tokens} <= {"token.created", "token.revoked"}
    assert any("'victor'" in e["message"] for e in tokens)
    page1 = ro.get("/api/audit?limit=2").json()
    page2 = ro.get("/api/audit?limit=2&offset=2").json()
    assert [e["id"] for e in page1 + page2] == [e["id"] for e in events[:4]]


# ==============================================================================================
# Versions, download, canary
# ==============================================================================================


def _audit_by(dash: Dash, actor: str) -> list[dict[str, Any]]:
    return [e for e in dash.get("/api/audit").json() if e["actor"] == actor]


def test_promote_archives_previous_production_and_audits_actor(dash: Dash) -> None:
    v1, v2, *_ = _version_ids(dash, DEMO_RUN)
    response = dash.post(f"/api/versions/{v1}/promote")
    assert response.status_code == 200
    assert response.json()["version"]["status"] == "production"
    body = dash.post(f"/api/versions/{v2}/promote").json()
    assert body["version"]["status"] == "production"
    statuses = dash.versions(DEMO_RUN)
    assert statuses[v1] == "archived" and statuses[v2] == "production"
    again = dash.post(f"/api/versions/{v2}/promote").json()
    assert "already production" in again["message"]
    messages = [e["message"] for e in _audit_by(dash, "alice")]
    assert any(f"model version {v1}" in m and "production -> archived" in m for m in messages)
    assert any(f"model version {v2}" in m and "candidate -> production" in m for m in messages)
    listed = dash.get(f"/api/versions?run={DEMO_RUN}&status=production").json()
    assert [v["id"] for v in listed] == [v2]


def test_rollback_restores_previous_production(dash: Dash) -> None:
    v1, v2, v3, _ = _version_ids(dash, DEMO_RUN)
    conflict = dash.post(f"/api/versions/{v1}/rollback")
    assert conflict.status_code == 409 and "not production" in conflict.json()["detail"]
    dash.post(f"/api/versions/{v1}/promote")
    lonely = dash.post(f"/api/versions/{v1}/rollback")
    assert lonely.status_code == 409 and "no archived version" in lonely.json()["detail"]
    dash.post(f"/api/versions/{v2}/promote")
    dash.post(f"/api/versions/{v3}/promote")
    body = dash.post(f"/api/versions/{v3}/rollback").json()
    assert body["version"]["id"] == v3 and body["version"]["status"] == "rolled_back"
    assert body["restored"]["id"] == v2 and body["restored"]["status"] == "production"
    statuses = dash.versions(DEMO_RUN)
    assert (statuses[v1], statuses[v2], statuses[v3]) == ("archived", "production", "rolled_back")
    kinds = [e["kind"] for e in _audit_by(dash, "alice")]
    assert "model_version.rollback" in kinds
    # A rolled-back model is never resumed from; candidate puts it back into play.
    latest = dash.registry.latest_model_version(DEMO_RUN)
    assert latest is not None and latest.id != v3
    assert dash.post(f"/api/versions/{v3}/candidate").json()["version"]["status"] == "candidate"


def test_download_plaintext_and_encrypted(dash: Dash, demo_snapshot: DemoSnapshot) -> None:
    from safetensors.numpy import load

    plain = dash.registry.list_model_versions(DEMO_RUN)[0]
    response = dash.get(f"/api/versions/{plain.id}/download", "viewer")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/octet-stream"
    assert 'filename="demo-run-round-00001.safetensors"' in response.headers["content-disposition"]
    assert response.headers["x-fedcl-encrypted"] == "false"
    assert hashlib.sha256(response.content).hexdigest() == plain.sha256
    assert load(response.content)  # a real safetensors file with tensors in it

    encrypted = dash.registry.list_model_versions(DP_RUN)[0]
    response = dash.get(f"/api/versions/{encrypted.id}/download")
    assert response.headers["x-fedcl-encrypted"] == "true"
    assert response.content == b"ckks blob 1" * 10
    assert response.headers["content-disposition"].endswith('.ckks"')

    (dash.registry.artifacts_dir / encrypted.path).unlink()
    missing = dash.get(f"/api/versions/{encrypted.id}/download")
    assert missing.status_code == 409 and "missing" in missing.json()["detail"]


def test_canary_rolls_back_a_worse_candidate(dash: Dash) -> None:
    v1, v2, v3 = _version_ids(dash, DP_RUN)
    assert evaluate_canary(dash.registry, DP_RUN, max_drop=0.05) is None  # no production yet
    dash.registry.set_version_status(v1, "production", actor="alice")
    # Newest candidate is round 3 (mean on the shared task 0: 0.78 vs 0.80): within 0.05.
    assert evaluate_canary(dash.registry, DP_RUN, max_drop=0.05) is None
    message = evaluate_canary(dash.registry, DP_RUN, max_drop=0.01, actor="coordinator")
    assert message is not None and f"candidate version {v3}" in message
    assert dash.versions(DP_RUN)[v3] == "rolled_back"
    events = dash.registry.list_audit(run_id=DP_RUN)
    assert any(e.kind == "canary.rolled_back" and e.actor == "coordinator" for e in events)
    # Next candidate (round 2, 0.70) through the API: a 0.10 drop.
    kept = dash.post(f"/api/runs/{DP_RUN}/canary?max_drop=0.2").json()
    assert kept["action"] == "kept" and kept["candidate_id"] == v2
    rolled = dash.post(f"/api/runs/{DP_RUN}/canary").json()
    assert rolled["action"] == "rolled_back"
    assert rolled["candidate_accuracy"] == pytest.approx(0.70)
    assert rolled["production_accuracy"] == pytest.approx(0.80)
    assert dash.versions(DP_RUN) == {v1: "production", v2: "rolled_back", v3: "rolled_back"}
    assert any(e["kind"] == "canary.rolled_back" for e in _audit_by(dash, "alice"))
    skipped = dash.post(f"/api/runs/{DP_RUN}/canary").json()
    assert skipped["action"] == "skipped"
    with pytest.raises(RegistryError):
        evaluate_canary(dash.registry, DP_RUN, max_drop=math.nan)


def test_literal_statuses_match_the_registry() -> None:
    from fedcl.server.dashboard.routers.runs import RunStatus
    from fedcl.server.dashboard.routers.versions import VersionStatus

    assert get_args(RunStatus) == RUN_STATUSES
    assert get_args(VersionStatus) == VERSION_STATUSES


# ==============================================================================================
# Prometheus
# ==============================================================================================


def _sample(text: str, prefix: str) -> float:
    lines = [line for line in text.splitlines() if line.startswith(prefix + " ")]
    assert len(lines) == 1, (prefix, lines)
    return float(lines[0].rsplit(" ", 1)[1])


def test_prometheus_metrics(ro: Dash, tmp_path: Path) -> None:
    assert ro.client.get("/metrics").status_code == 401
    response = ro.get("/metrics", "viewer")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    families = {f.name for f in text_string_to_metric_families(text)}  # valid exposition format
    assert {"fedcl_rounds_completed", "fedcl_round_duration_seconds", "fedcl_runs"} <= families
    assert _sample(text, "fedcl_registry_up") == 1
    assert _sample(text, f'fedcl_rounds_completed_total{{run="{DEMO_RUN}"}}') == 4
    assert _sample(text, f'fedcl_rounds_completed_total{{run="{DP_RUN}"}}') == 2
    assert _sample(text, f'fedcl_site_refusals_total{{run="{DP_RUN}"}}') == 1
    assert _sample(text, f'fedcl_site_failures_total{{run="{DP_RUN}"}}') == 1
    assert _sample(text, f'fedcl_round_participants{{run="{DP_RUN}"}}') == 1
    assert _sample(text, f'fedcl_round_last_duration_seconds{{run="{DP_RUN}"}}') == 60
    assert _sample(text, f'fedcl_round_duration_seconds_count{{run="{DP_RUN}"}}') == 2
    assert _sample(text, f'fedcl_round_duration_seconds_bucket{{le="30.0",run="{DP_RUN}"}}') == 1
    assert _sample(text, f'fedcl_bytes_received_total{{run="{DP_RUN}"}}') == 10000
    assert _sample(text, f'fedcl_bytes_sent_total{{run="{DP_RUN}"}}') == 14000
    assert _sample(text, f'fedcl_site_epsilon{{run="{DP_RUN}",site="site-2"}}') == 1.0
    assert _sample(text, 'fedcl_site_epsilon_budget{site="site-2"}') == 1.0
    assert _sample(text, 'fedcl_site_epsilon_lifetime{site="site-0"}') == 1.75

    public = create_app(ro.url, artifacts_dir=tmp_path / "artifacts", public_metrics=True)
    try:
        response = TestClient(public).get("/metrics")
        assert response.status_code == 200 and "fedcl_rounds_completed_total" in response.text
        assert TestClient(public).get("/api/runs").status_code == 401
    finally:
        public.state.registry.close()


# ==============================================================================================
# Pages
# ==============================================================================================


def _page_client(dash: Dash, role: str) -> TestClient:
    client = TestClient(dash.app)
    response = client.post(
        "/login",
        content=f"token={dash.tokens[role]}&next=/versions",
        headers={"content-type": "application/x-www-form-urlencoded"},
        follow_redirects=False,
    )
    assert response.status_code == 303 and response.headers["location"] == "/versions"
    cookie = response.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie
    return client


def test_pages_need_login_and_render(ro: Dash) -> None:
    anonymous = TestClient(ro.app)
    response = anonymous.get(f"/runs/{DEMO_RUN}", follow_redirects=False)
    assert response.status_code == 303
    assert response.headers["location"] == f"/login?next=/runs/{DEMO_RUN}"
    assert anonymous.get("/login").status_code == 200
    bad = anonymous.post(
        "/login",
        content="token=wrong&next=https://evil.example",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert bad.status_code == 401 and "not valid" in bad.text
    assert 'value="/runs"' in bad.text  # the off-site "next" was dropped

    admin = _page_client(ro, "admin")
    for url, needle in (
        ("/runs", DP_RUN),
        ("/runs?status=completed", DEMO_RUN),
        (f"/runs/{DEMO_RUN}", "chart-matrix"),
        ("/sites", "site-2"),
        ("/sites/site-2", "privacy budget exhausted"),
        ("/versions", "Promote"),
        (f"/versions?run={DP_RUN}", "encrypted"),
        ("/audit?kind=token", "token.created"),
    ):
        response = admin.get(url)
        assert response.status_code == 200, url
        assert needle in response.text, url
        assert "Content-Security-Policy" in response.headers
    run_page = admin.get(f"/runs/{DEMO_RUN}").text
    assert 'src="http' not in run_page and "cdn" not in run_page.lower()  # air-gapped sites
    assert "/static/plotly.min.js" in run_page
    js = admin.get("/static/plotly.min.js")
    assert js.status_code == 200 and len(js.content) > 1_000_000
    assert admin.get("/static/run.js").status_code == 200
    assert admin.get("/runs/no-such-run").status_code == 404

    viewer = _page_client(ro, "viewer")
    assert 'data-action="promote"' not in viewer.get("/versions").text
    site = _page_client(ro, "site-1")
    assert site.get("/sites/site-0").status_code == 403
    assert "site-0" not in site.get("/sites").text
    logout = site.post("/logout", follow_redirects=False)
    assert logout.status_code == 303 and SESSION_COOKIE in logout.headers["set-cookie"]


def test_drift_map_alerts_and_task_starts(dash: Dash) -> None:
    """The run page's drift panel, its API and the Prometheus drift metrics (issue 16)."""
    reg = dash.registry
    reg.create_run("drift-run", name="d", scenario="digits-drift", config={}, tasks=["a", "b"])
    for server_round, kind in ((1, "train"), (2, "monitor")):
        rid = reg.begin_round(
            "drift-run", task_index=0, round_in_task=server_round - 1,
            server_round=server_round, kind=kind,
        )  # fmt: skip
        for site in SITES:
            moved = server_round == 2 and site == "site-1"
            reg.record_drift(
                "drift-run", rid, site, score=1.9 if moved else 0.4, alert=moved, rate_shift=0.02
            )
        reg.complete_round(rid, seconds=1.0, bytes_up=10, bytes_down=10)
    reg.record_task_start("drift-run", 0, server_round=1, trigger="scheduled", reason="schedule")
    reg.record_task_start(
        "drift-run", 1, server_round=4, trigger="drift", reason="drift at 1 site(s) in round 2"
    )

    drift = dash.get("/api/runs/drift-run/drift", "viewer").json()
    assert drift["sites"] == list(SITES) and drift["server_rounds"] == [1, 2]
    assert drift["scores"][1] == [0.4, 1.9]  # site-1 over rounds 1, 2
    assert [(a["site_id"], a["server_round"]) for a in drift["alerts"]] == [("site-1", 2)]
    assert [t["trigger"] for t in drift["task_starts"]] == ["scheduled", "drift"]
    mine = dash.get("/api/runs/drift-run/drift", "site-1").json()
    assert mine["sites"] == ["site-1"]  # a site token sees only its own reports
    charts = dash.get("/api/runs/drift-run/charts").json()
    assert charts["drift"] == drift
    assert dash.get("/api/runs/no-such-run/drift").status_code == 404

    page = _page_client(dash, "admin").get("/runs/drift-run").text
    assert 'id="panel-drift"' in page and 'id="panel-drift" hidden' not in page
    assert "round 2: site-1 drift (score 1.90)" in page
    assert "task 1 began at round 4: drift at 1 site(s) in round 2" in page

    text = dash.get("/metrics", "viewer").text
    assert _sample(text, 'fedcl_site_drift_alert{run="drift-run",site="site-1"}') == 1
    assert _sample(text, 'fedcl_site_drift_alert{run="drift-run",site="site-0"}') == 0
    assert _sample(text, 'fedcl_site_drift_score{run="drift-run",site="site-1"}') == 1.9
    assert _sample(text, 'fedcl_drift_alerts_total{run="drift-run"}') == 1


# ==============================================================================================
# CLI
# ==============================================================================================


def _cli() -> typer.Typer:
    """The CLI as the lead registers it in cli/main.py."""
    root = typer.Typer()

    @root.callback()
    def _root() -> None:
        """fedcl"""

    root.add_typer(dashboard_cmd.app, name="dashboard")
    return root


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_cli_token_create_and_serve(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'reg' / 'registry.db'}"
    runner = CliRunner()
    result = runner.invoke(
        _cli(), ["dashboard", "token", "create", "--db", url, "--role", "viewer", "--name", "bob"]
    )
    assert result.exit_code == 0, result.output
    token = result.stdout.strip().splitlines()[0]
    with Registry.open(url) as registry:
        info = registry.verify_token(token)
        assert info is not None and (info.name, info.role) == ("bob", "viewer")

    for args, error in (
        (["token", "create", "--db", url, "--role", "root", "--name", "x"], DashboardError),
        (["token", "create", "--role", "admin", "--name", "x"], FedclError),
        (["--db", "nosuchdriver://x"], RegistryError),
        ([], FedclError),
    ):
        result = runner.invoke(_cli(), ["dashboard", *args])
        assert isinstance(result.exception, error), (args, result.exception)

    served: dict[str, Any] = {}

    def fake_run(app: FastAPI, **kwargs: Any) -> None:
        served.update(kwargs, app=app)

    import uvicorn

    monkeypatch.setattr(uvicorn, "run", fake_run)
    port = _free_port()
    result = runner.invoke(_cli(), ["dashboard", "--db", url, "--port", str(port)])
    assert result.exit_code == 0, result.output
    assert served["host"] == "127.0.0.1" and served["port"] == port
    with pytest.raises(RegistryError):  # the CLI closed the registry after serving
        served["app"].state.registry.list_runs()


# ==============================================================================================
# Schemathesis: no input reachable through the OpenAPI schema makes a 5xx
# ==============================================================================================


def test_schemathesis_finds_no_server_errors(dash: Dash) -> None:
    """Generated valid and invalid requests to every operation: never a 5xx, and every answer
    matches the documented status codes, content types and response schemas."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.core.failures import FailureGroup
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    max_examples = int(os.environ.get("FEDCL_SCHEMATHESIS_EXAMPLES", "5"))
    schema = schemathesis.openapi.from_asgi("/openapi.json", dash.app)
    headers = dash.headers("admin")
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == len(API_GETS) + len(API_POSTS)
    settings_ = settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )

    def run(operation: Any, mode: GenerationMode) -> None:
        @settings_
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case: Any) -> None:
            try:
                case.call_and_validate(headers=headers, checks=checks)
            except (AssertionError, FailureGroup) as exc:  # collect, do not shrink
                failures.append(f"{case.method} {case.formatted_path} ({mode.name}): {exc}")

        check()

    for operation in operations:
        run(operation, GenerationMode.POSITIVE)
        run(operation, GenerationMode.NEGATIVE)
    assert not failures, "\n\n".join(failures[:5])
