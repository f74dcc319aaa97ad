"""Versions with kinds, the unattended canary, a release under HE, and the pages a coordinator
steers by — over one real run (tests/lifecycle_helpers.py: CKKS + EWC + canary, round 4
sabotaged), served by the dashboard through FastAPI's TestClient."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from lifecycle_helpers import CANARY_SITES, RUN, SABOTAGED_ROUND, LifecycleRun, lifecycle_run
from safetensors.torch import load as load_safetensors

from fedcl.cli.main import main as fedcl_main
from fedcl.server.dashboard import create_app
from fedcl.server.dashboard.service.cache import run_cache
from fedcl.server.registry import Registry, RegistryError


@dataclass
class Served:
    run: LifecycleRun
    registry: Registry
    client: TestClient
    tokens: dict[str, str]

    def get(self, url: str, role: str = "admin", **kw):
        return self.client.get(url, headers={"Authorization": f"Bearer {self.tokens[role]}"}, **kw)

    def post(self, url: str, role: str = "admin", **kw):
        return self.client.post(url, headers={"Authorization": f"Bearer {self.tokens[role]}"}, **kw)

    def versions(self) -> dict[tuple[str, int], object]:
        return {(v.kind, v.server_round): v for v in self.registry.list_model_versions(RUN)}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    run = lifecycle_run(tmp_path_factory.mktemp("lifecycle"))
    app = create_app(run.url, artifacts_dir=run.artifacts)
    registry: Registry = app.state.registry
    tokens = {
        "admin": registry.create_token("alice", "admin"),
        "viewer": registry.create_token("victor", "viewer"),
        "site-2": registry.create_token("site two", "site:site-2"),
    }
    try:
        yield Served(run, registry, TestClient(app), tokens)
    finally:
        registry.close()


def test_the_canary_promoted_and_rolled_back_by_itself(served: Served) -> None:
    assert served.run.status == "completed"
    v = served.versions()
    statuses = {r: v[("model", r)].status for r in (1, 2, 4, 5)}
    assert statuses == {1: "archived", 2: "archived", 4: "rolled_back", 5: "production"}
    canary = [a for a in served.registry.list_audit(run_id=RUN, limit=500) if a.actor == "canary"]
    kinds = [a.kind for a in reversed(canary) if not a.kind.startswith("model_version")]
    assert kinds == [
        "production.first",
        "canary.promoted",
        "canary.withheld",  # the sabotaged candidate stayed at the canary sites
        "canary.rolled_back",
        "canary.promoted",
    ]
    rolled = next(a for a in canary if a.kind == "canary.rolled_back")
    assert f"round {SABOTAGED_ROUND}" in rolled.message
    assert f"at canary sites {', '.join(CANARY_SITES)}" in rolled.message


def test_a_fisher_is_listed_as_such_and_promote_is_refused(served: Served) -> None:
    fisher = next(v for (kind, _), v in served.versions().items() if kind == "fisher")
    listed = {v["id"]: v for v in served.get(f"/api/versions?run={RUN}").json()}
    assert listed[fisher.id]["kind"] == "fisher"
    resp = served.post(f"/api/versions/{fisher.id}/promote")
    assert resp.status_code == 409
    assert "is a fisher" in resp.json()["detail"] and "only model versions" in resp.json()["detail"]
    with pytest.raises(RegistryError, match="not a model"):
        served.registry.set_version_status(fisher.id, "production", actor="alice")
    assert served.registry.get_model_version(fisher.id).status == "candidate"
    production = [v for v in served.registry.list_model_versions(RUN) if v.status == "production"]
    assert [(p.kind, p.server_round) for p in production] == [("model", 5)]  # untouched
    page = served.get(f"/versions?run={RUN}").text
    assert f'id="version-{fisher.id}" data-status="candidate" data-kind="fisher"' in page
    assert "data-locked disabled" in page


def test_a_site_releases_the_encrypted_production_model(served: Served) -> None:
    production = served.versions()[("model", 5)]
    assert production.encrypted
    # The coordinator's download is the ciphertext; nothing to take into use yet.
    blob = served.get(f"/api/versions/{production.id}/download")
    assert blob.headers["x-fedcl-encrypted"] == "true"
    site_toml = served.run.sites_dir / "site-0.toml"
    args = ["site", "release", str(site_toml), "--version", str(production.id)]
    args += ["--db", served.run.url, "--artifacts", str(served.run.artifacts)]
    assert fedcl_main(args) == 0
    release = served.versions()[("release", 5)]
    assert (release.released_from, release.encrypted, release.format) == (
        production.id,
        False,
        "safetensors",
    )
    event = next(
        a for a in served.registry.list_audit(run_id=RUN) if a.kind == "model_version.released"
    )
    assert event.site_id == "site-0" and event.actor == "site-admin:site-0"
    assert f"released model version {production.id}" in event.message

    for role in ("admin", "viewer", "site-2"):  # every authorised role downloads it
        resp = served.get(f"/api/versions/{release.id}/download", role=role)
        assert resp.status_code == 200, role
        assert resp.headers["x-fedcl-sha256"] == release.sha256
    assert served.client.get(f"/api/versions/{release.id}/download").status_code == 401
    weights = load_safetensors(resp.content)
    from fedcl.config import ExperimentConfig
    from fedcl.continual.plan import RunPlan

    run = served.registry.get_run(RUN)
    initial = RunPlan.of(ExperimentConfig.model_validate(run.config)).initial_model().state_dict()
    assert set(weights) == set(initial)
    assert all(weights[k].shape == initial[k].shape for k in initial)
    assert all(bool(w.isfinite().all()) for w in weights.values())
    moved = sum(float((weights[k] - initial[k]).abs().sum()) for k in initial)
    assert moved > 1.0  # the trained model, not the initial one
    # A release is not a model: it cannot be promoted; a plaintext version is not released.
    assert served.post(f"/api/versions/{release.id}/promote").status_code == 409
    assert fedcl_main([*args[:3], "--version", str(release.id), *args[5:]]) == 2
    page = served.get(f"/versions?run={RUN}").text
    assert f'href="/api/versions/{release.id}/download"' in page and "safetensors (v" in page


def test_the_run_page_answers_a_coordinators_questions(served: Served) -> None:
    charts = served.get(f"/api/runs/{RUN}/charts").json()
    assert charts["run"]["health"] == "degraded"  # completed, but site-1 failed round 4
    assert (charts["run"]["method"], charts["run"]["he"], charts["run"]["dp"]) == (
        "ewc",
        True,
        False,
    )
    assert charts["examples_hidden"] is True
    assert all(s["examples"] is None for s in charts["sites"])  # HE: hidden, not 0
    assert [s["site_id"] for s in charts["sites"]] == ["site-0", "site-1", "site-2"]
    drops = [a for a in charts["alerts"] if a["kind"] == "accuracy_drop"]
    assert [a["server_round"] for a in drops] == [SABOTAGED_ROUND]
    failed = [g for g in charts["failures"] if g["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["sites"] == ["site-1"]
    assert failed[0]["server_rounds"] == [SABOTAGED_ROUND]
    assert charts["model_hash"]["rounds_checked"] > 0
    assert all(p["status"] != "ok" for r in charts["rounds"] for p in r["participations"])

    page = served.get(f"/runs/{RUN}").text
    assert "degraded · 1 site-rounds lost" in page and "hidden (HE)" in page
    assert "mean accuracy fell from" in page
    assert "failed (train) ×1: site-1 in round 4: site site-1: local training" in page
    assert f"all sites agreed ({charts['model_hash']['rounds_checked']} rounds)" in page
    for name in ("results.json", "metrics.csv", "ledger.csv"):
        assert f'href="/api/runs/{RUN}/{name}"' in page

    # A site token's view: its own row only, in the page and in the JSON.
    mine = served.get(f"/api/runs/{RUN}/charts", role="site-2").json()
    assert [s["site_id"] for s in mine["sites"]] == ["site-2"]


def test_downloads_results_metrics_and_ledger(served: Served) -> None:
    results = served.get(f"/api/runs/{RUN}/results.json")
    assert results.headers["content-disposition"].endswith(f'filename="{RUN}-results.json"')
    doc = results.json()
    assert doc["run_id"] == RUN and set(doc["sites"]) == {"site-0", "site-1", "site-2"}
    assert set(served.get(f"/api/runs/{RUN}/results.json", role="site-2").json()["sites"]) == {
        "site-2"
    }
    rows = list(csv.DictReader(io.StringIO(served.get(f"/api/runs/{RUN}/metrics.csv").text)))
    acc = [r for r in rows if r["name"] == "accuracy" and r["site_id"] == "" and r["server_round"]]
    assert {int(r["server_round"]) for r in acc} == {1, 2, 4, 5}
    mine = csv.DictReader(
        io.StringIO(served.get(f"/api/runs/{RUN}/metrics.csv", role="site-2").text)
    )
    assert {r["site_id"] for r in mine} <= {"", "site-2"}
    ledger = list(csv.DictReader(io.StringIO(served.get(f"/api/runs/{RUN}/ledger.csv").text)))
    assert [r["site_id"] for r in ledger] == ["site-0", "site-1", "site-2"]
    assert int(ledger[0]["rounds_trained"]) >= 4 and ledger[1]["failed_rounds"] == "1"


def test_run_list_filters_and_comparison(served: Served) -> None:
    reg = served.registry
    reg.create_run(
        "plain-run", name="plain", scenario="digits-task-il", tasks=["a"],
        config={"continual": {"method": "replay"}, "dp": {"enabled": True}},
    )  # fmt: skip
    listed = served.get("/runs").text
    assert 'data-run="plain-run"' in listed and f'data-run="{RUN}"' in listed
    assert "<th>ACC</th><th>BWT</th>" in listed
    only_he = served.get("/runs?he=on").text
    assert f'data-run="{RUN}"' in only_he and 'data-run="plain-run"' not in only_he
    by_method = served.get("/runs?method=replay&dp=on").text
    assert 'data-run="plain-run"' in by_method and f'data-run="{RUN}"' not in by_method
    degraded = served.get("/runs?status=degraded").text
    assert f'data-run="{RUN}"' in degraded and 'data-run="plain-run"' not in degraded

    compare = served.get(f"/compare?run={RUN}&run=plain-run").text
    assert compare.count('class="grid matrix"') == 2
    acc = served.get(f"/api/runs/{RUN}").json()["avg_accuracy"]
    assert f"{100 * acc:.1f}%" in compare
    assert served.get("/compare?run=nope").status_code == 404


def test_a_run_whose_coordinator_went_silent_is_stale(served: Served) -> None:
    from fedcl.server.registry.models import Run

    reg = served.registry
    reg.create_run("silent-run", name="s", scenario="s", config={}, tasks=["a"])
    reg.set_run_status("silent-run", "running")
    assert served.get("/api/runs/silent-run/charts").json()["run"]["health"] == "running"
    with reg._tx() as s:  # the clock moves on: nothing recorded for two hours
        s.get(Run, "silent-run").updated_at = datetime.now(UTC) - timedelta(hours=2)
    charts = served.get("/api/runs/silent-run/charts").json()
    assert charts["run"]["health"] == "stale" and charts["run"]["idle_seconds"] > 7000
    assert "stale · silent 120 min" in served.get("/runs/silent-run").text
    assert 'data-run="silent-run" data-health="stale"' in served.get("/runs?status=stale").text


def test_the_run_page_is_built_once_per_change(served: Served) -> None:
    from fedcl.server.registry import MetricRow

    cache = run_cache(served.registry)
    # Both pages once first: which other tests of this module ran before on this worker (and
    # so built the run page's values already) depends on how xdist spread them.
    served.get(f"/api/runs/{RUN}/charts")
    served.get(f"/runs/{RUN}")
    before = cache.builds
    for _ in range(3):
        served.get(f"/api/runs/{RUN}/charts")
        served.get(f"/runs/{RUN}")
    assert cache.builds == before  # nothing changed: nothing rebuilt
    served.registry.record_metrics(RUN, None, [MetricRow("note", 1.0)])
    served.get(f"/api/runs/{RUN}/charts")
    assert cache.builds > before  # a new row: rebuilt once


def test_docs_need_no_cdn_and_head_is_answered(served: Served) -> None:
    docs = served.client.get("/docs")
    assert docs.status_code == 200
    assert "/docs-assets/swagger-ui-bundle.js" in docs.text and "cdn." not in docs.text
    asset = served.client.get("/docs-assets/swagger-ui-bundle.js")
    assert asset.status_code == 200 and len(asset.content) > 100_000
    assert served.client.head("/docs").status_code == 200
    head = served.client.head(f"/api/runs/{RUN}", headers=_bearer(served))
    assert head.status_code == 200 and head.content == b""
    assert served.client.head("/api/runs").status_code == 401  # not 405


def _bearer(served: Served) -> dict[str, str]:
    return {"Authorization": f"Bearer {served.tokens['admin']}"}


def test_prometheus_exports_the_run_alerts(served: Served) -> None:
    text = served.get("/metrics").text
    assert (
        f'fedcl_run_alert{{kind="accuracy_drop",run="{RUN}",severity="warning",site=""}} 1.0'
        in text
    )
