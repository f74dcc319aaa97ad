"""One real run that exercises the whole version lifecycle, for the API and browser tests.

An in-process federation (3 sites, Split-Digits domain-IL, 2 tasks of 2 rounds) with CKKS
encryption, EWC (so the registry holds summed Fishers, kind ``fisher``) and the unattended canary
judged at two canary sites. One training round is sabotaged at every site (its train message
asks for a learning rate of 40, so the aggregate diverges): the canary must roll that candidate
back by itself, and promote the healthy ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from federation_helpers import run_inprocess, small_experiment

from fedcl.client.app import app as client_app
from fedcl.config import protocol as P

RUN = "test-run"
SABOTAGED_ROUND = 4
CANARY_SITES = ("site-0", "site-1")


@dataclass(frozen=True)
class LifecycleRun:
    url: str
    artifacts: Path
    sites_dir: Path
    status: str


def sabotage(node_id, msg, context):
    """Round ``SABOTAGED_ROUND``'s training runs at a learning rate that wrecks the model."""
    cfg = msg.content[P.CONFIG]
    if msg.metadata.message_type != "train" or cfg[P.SERVER_ROUND] != SABOTAGED_ROUND:
        return None
    experiment = json.loads(str(cfg[P.EXPERIMENT]))
    experiment["train"]["lr"] = 40.0
    cfg[P.EXPERIMENT] = json.dumps(experiment)
    return client_app(msg, context)


def lifecycle_run(tmp_path: Path) -> LifecycleRun:
    from fedcl.simulations.runner import prepare_keys

    exp = small_experiment(
        "digits-domain-il",
        "he.enabled=true",
        "continual.method=ewc",
        "data.num_tasks=2",
        "train.rounds_per_task=2",
        "canary_max_drop=0.1",
        f"canary_sites={json.dumps(list(CANARY_SITES))}",
    )
    exp = prepare_keys(exp, tmp_path)
    status, opts, _ = run_inprocess(exp, tmp_path, intercept=sabotage)
    return LifecycleRun(opts.registry_url, Path(opts.artifacts_dir), tmp_path / "sites", status)
