"""The fedcl ServerApp (component string ``fedcl.server.app:app``).

In a deployment, ``flwr run`` starts it with a run config written by ``fedcl coordinator``:

* ``experiment``: path to the experiment TOML, or the experiment as inline JSON;
* ``registry-url``: SQLAlchemy URL of the registry (default: ``sqlite:///fedcl-registry.db``);
* ``run-id``: the run to start or resume (default: derived from the experiment's name);
* ``scenario``: a label recorded with the run;
* ``site-nodes``: JSON ``{site id: node id}`` of the enrolled sites, as the SuperLink registered
  their keys (``fedcl coordinator up``): a reply's site is then its authenticated node's.

Simulations build the same app with :func:`make_server_app` and pass the options directly.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedcl.config import ConfigError, ExperimentConfig, load_toml, validate_mapping

from .coordinator import Coordinator, CoordinatorOptions

logger = logging.getLogger("fedcl.server")

DEFAULT_REGISTRY_URL = "sqlite:///fedcl-registry.db"


def options_from_run_config(run_config: dict) -> CoordinatorOptions:
    """Read the coordinator's options from a Flower run config (see module docstring)."""
    raw = run_config.get("experiment")
    if not raw:
        raise ConfigError(
            "run config: 'experiment' is missing: set it to an experiment TOML path "
            "(e.g. flwr run . --run-config 'experiment=\"experiment.toml\"')"
        )
    raw = str(raw)
    if raw.lstrip().startswith("{"):
        experiment = validate_mapping(ExperimentConfig, json.loads(raw), "run config 'experiment'")
    else:
        experiment = load_toml(ExperimentConfig, Path(raw))
    return CoordinatorOptions(
        experiment=experiment,
        registry_url=str(run_config.get("registry-url") or DEFAULT_REGISTRY_URL),
        run_id=str(run_config.get("run-id") or experiment.name),
        scenario=str(run_config.get("scenario") or "custom"),
        artifacts_dir=str(run_config["artifacts-dir"]) if run_config.get("artifacts-dir") else None,
        site_nodes={
            str(site): int(node)
            for site, node in json.loads(str(run_config.get("site-nodes") or "{}")).items()
        },
    )


def make_server_app(
    options: CoordinatorOptions | None = None,
    *,
    wrap_grid: Callable[[Grid], Grid] | None = None,
) -> ServerApp:
    """A ServerApp that runs ``options`` (or reads them from the run config when None).

    ``wrap_grid`` lets a simulation put a double between the coordinator and the network
    (faults on demand: ``fedcl.simulations.faults``).
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_config = dict(context.run_config)
        opts = options
        try:
            opts = opts or options_from_run_config(run_config)
            Coordinator(wrap_grid(grid) if wrap_grid else grid, opts).run()
        except BaseException as exc:
            record_failure(opts, run_config, exc)
            raise

    return server_app


def record_failure(
    options: CoordinatorOptions | None, run_config: dict, exc: BaseException
) -> None:
    """A ServerApp that dies leaves a *failed* run with its reason in the registry, never nothing.

    Covers what fails before the coordinator's own bookkeeping starts (a bad run config, an
    experiment the strategy refuses); a run the coordinator already ended keeps its status.
    """
    from fedcl.config.vocabulary import RunStatus

    from .registry import Registry

    url = options.registry_url if options else run_config.get("registry-url")
    run_id = options.run_id if options else run_config.get("run-id")
    if not run_id:
        return  # without a run id there is no run to record
    reason = f"the ServerApp failed: {type(exc).__name__}: {exc}"
    try:
        with Registry.open(str(url or DEFAULT_REGISTRY_URL)) as reg:
            run = reg.get_run(str(run_id))
            if run is not None and run.status != RunStatus.RUNNING:
                return
            if run is None:
                scenario = options.scenario if options else run_config.get("scenario")
                reg.create_run(
                    str(run_id), name=str(run_id), scenario=str(scenario or "custom"),
                    config={}, tasks=[],
                )  # fmt: skip
            reg.set_run_status(str(run_id), RunStatus.FAILED, reason)
    except Exception:  # the original error matters more than this one
        logger.exception("could not record the failure of run %s", run_id)


app = make_server_app()
