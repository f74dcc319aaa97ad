"""The thin Flower app ``flwr run`` submits: component strings and the run config, nothing else.

It declares **no dependency** (``dependencies = []``): the ServerApp and ClientApp are the fedcl
already installed on the coordinator and at every site. A dependency named ``fedcl`` would make
any installer resolve an unrelated PyPI package of that name (our distribution is
``fedcl-framework``), and with it a CUDA torch; every SuperLink fedcl starts also passes
``--disable-runtime-dependency-installation``, so nothing is installed at run time anyway.
"""

from __future__ import annotations

import json
from pathlib import Path

from fedcl.config import ExperimentConfig, to_json

APP_DEPENDENCIES: list[str] = []


def write_flower_app(
    experiment: ExperimentConfig,
    out: Path,
    *,
    registry_url: str,
    run_id: str,
    scenario: str = "custom",
    artifacts_dir: str | None = None,
    site_nodes: dict[str, str] | None = None,
) -> Path:
    """A thin Flower app: components point at the installed fedcl, config carries the run."""
    import tomli_w

    out.mkdir(parents=True, exist_ok=True)
    config = {
        "experiment": to_json(experiment),
        "registry-url": registry_url,
        "run-id": run_id,
        "scenario": scenario,
    }
    if artifacts_dir:  # model versions (default: next to a SQLite registry)
        config["artifacts-dir"] = artifacts_dir
    if site_nodes:  # the node each enrolled site's key was registered as (SuperNode auth)
        config["site-nodes"] = json.dumps({site: int(node) for site, node in site_nodes.items()})
    pyproject = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": "fedcl-app",
            "version": "1.0.0",
            "description": f"fedcl run {run_id}",
            "dependencies": list(APP_DEPENDENCIES),
        },
        "tool": {
            "hatch": {"build": {"targets": {"wheel": {"packages": ["."]}}}},
            "flwr": {
                "app": {
                    "publisher": "fedcl",
                    "components": {
                        "serverapp": "fedcl.server.app:app",
                        "clientapp": "fedcl.client.app:app",
                    },
                    "config": config,
                }
            },
        },
    }
    path = out / "pyproject.toml"
    path.write_text(tomli_w.dumps(pyproject))
    return path
