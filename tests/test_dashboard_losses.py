"""A completed run that lost site-rounds is not shown as a plain success (issue 12).

The API's runs carry ``lost_site_rounds`` (counted by ``fedcl.server.losses``, the count
``results.json`` reports) and the pages give such a run its own badge.
"""

from __future__ import annotations

from fastapi.testclient import TestClient

from fedcl.server.dashboard import create_app
from fedcl.server.results import build_results

REFUSAL = "privacy budget (privacy.epsilon_budget): ε would reach 8.3 > budget 8.0"


def test_a_completed_run_that_lost_site_rounds_has_its_own_badge(tmp_path) -> None:
    app = create_app(f"sqlite:///{tmp_path / 'r.db'}", artifacts_dir=tmp_path / "a")
    registry = app.state.registry
    try:
        for run_id, lost in (("clean", False), ("lossy", True)):
            registry.create_run(run_id, name=run_id, scenario="s", config={}, tasks=["t"])
            for server_round in (1, 2):
                rid = registry.begin_round(
                    run_id, task_index=0, round_in_task=server_round - 1, server_round=server_round
                )
                registry.record_participation(rid, "site-0", phase="train", status="ok")
                refused = lost and server_round == 2
                registry.record_participation(
                    rid,
                    "site-1",
                    phase="train",
                    status="refused" if refused else "ok",
                    detail=REFUSAL if refused else None,
                )
                registry.record_participation(rid, "site-1", phase="evaluate", status="ok")
                registry.complete_round(rid, seconds=1.0, bytes_up=0, bytes_down=0)
            reason = "1 of 4 site-rounds lost: 1 refused (privacy.epsilon_budget ×1)"
            registry.set_run_status(run_id, "completed", reason if lost else None)
        results = build_results(registry, "lossy")
        assert results["lost_site_rounds"]["reasons"] == {"refused: privacy.epsilon_budget": 1}
        assert results["lost_site_rounds_summary"] == reason  # what the coordinator wrote
        headers = {"Authorization": f"Bearer {registry.create_token('a', 'admin')}"}
        client = TestClient(app)
        runs = {r["id"]: r for r in client.get("/api/runs", headers=headers).json()["items"]}
        assert (runs["lossy"]["lost_site_rounds"], runs["clean"]["lost_site_rounds"]) == (1, 0)
        assert client.get("/api/runs/lossy", headers=headers).json()["lost_site_rounds"] == 1
        charts = client.get("/api/runs/lossy/charts", headers=headers)
        assert charts.status_code == 200 and charts.json()["run"]["lost_site_rounds"] == 1
        client.cookies.set("fedcl_token", headers["Authorization"].split()[1])
        page = client.get("/runs", headers=headers).text
        assert page.count("badge-completed-lost") == 1 and "degraded · 1 site-rounds lost" in page
        assert 'class="badge badge-completed"' in page  # the clean run: a plain success
        run_page = client.get("/runs/lossy", headers=headers).text
        assert "degraded · 1 site-rounds lost" in run_page
    finally:
        registry.close()
