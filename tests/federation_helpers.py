"""Running small federations in-process for tests (LocalGrid: real apps, no network)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedcl.client.app import app as client_app
from fedcl.config import ExperimentConfig
from fedcl.server.coordinator import Coordinator, CoordinatorOptions
from fedcl.server.observers import RunObserver
from fedcl.simulations.catalog import load_scenario
from fedcl.simulations.local_grid import Interceptor, LocalGrid
from fedcl.simulations.runner import write_site_configs

SMALL = ("train.rounds_per_task=1", "simulation.num_sites=3")


def small_experiment(scenario: str = "digits-domain-il", *extra: str) -> ExperimentConfig:
    return load_scenario(scenario, [*SMALL, *extra])[1]


def run_inprocess(
    experiment: ExperimentConfig,
    tmp_path: Path,
    *,
    registry_url: str | None = None,
    run_id: str = "test-run",
    intercept: Interceptor | None = None,
    observers: Sequence[RunObserver] = (),
    node_configs: list[dict] | None = None,
    offline: set[int] | None = None,
) -> tuple[str, CoordinatorOptions, LocalGrid]:
    """Run ``experiment`` on a LocalGrid; returns (final status, options, grid)."""
    sites_dir = tmp_path / "sites"
    if not sites_dir.exists():
        write_site_configs(experiment, sites_dir)
    options = CoordinatorOptions(
        experiment=experiment,
        registry_url=registry_url or f"sqlite:///{tmp_path / 'registry.db'}",
        run_id=run_id,
        scenario="test",
        sites_dir=str(sites_dir),
        artifacts_dir=str(tmp_path / "artifacts"),
        observers=tuple(observers),
    )
    grid = LocalGrid(
        client_app,
        experiment.simulation.num_sites,
        node_configs=node_configs,
        intercept=intercept,
    )
    if offline:
        grid.offline |= {1000 + i for i in offline}
    status = Coordinator(grid, options).run()
    return status, options, grid


def results_and_models(options: CoordinatorOptions, tmp_path: Path) -> tuple[dict, list[bytes]]:
    """A finished in-process run's results and its stored model versions' bytes, by round."""
    from fedcl.server.registry import Registry
    from fedcl.server.results import build_results

    with Registry.open(options.registry_url) as reg:
        results = build_results(reg, options.run_id)
        versions = sorted(reg.list_model_versions(options.run_id), key=lambda v: v.server_round)
    blobs = []
    for v in versions:
        path = Path(v.path)
        blobs.append((path if path.is_absolute() else tmp_path / "artifacts" / path).read_bytes())
    return results, blobs
