"""The fedcl ServerApp (component string ``fedcl.server.app:app``).

In a deployment, ``flwr run`` starts it with a run config written by ``fedcl coordinator``:

* ``experiment``: path to the experiment TOML, or the experiment as inline JSON;
* ``registry-url``: SQLAlchemy URL of the registry (default: ``sqlite:///fedcl-registry.db``);
* ``run-id``: the run to start or resume (default: derived from the experiment's name);
* ``scenario``: a label recorded with the run.

Simulations build the same app with :func:`make_server_app` and pass the options directly.
"""

from __future__ import annotations

import json
import logging
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
    )


def make_server_app(options: CoordinatorOptions | None = None) -> ServerApp:
    """A ServerApp that runs ``options`` (or reads them from the run config when None)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        opts = options or options_from_run_config(dict(context.run_config))
        Coordinator(grid, opts).run()

    return server_app


app = make_server_app()
