"""Running a whole federation on one box: virtual sites on Flower's Ray simulation engine.

The runner only *arranges* a federation: it writes one site config per virtual site (the same
``site.toml`` a real site administrator writes), points the registry at ``OUT/registry.db`` and
hands Flower the same ServerApp and ClientApp that deployments run. Results are read back from
the registry, never from memory, so a simulation reports exactly what a deployment would.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedcl.config import (
    ConfigError,
    DataSource,
    ExperimentConfig,
    PrivacyPolicy,
    SiteConfig,
    SitePartition,
    write_toml,
)
from fedcl.config.experiment import SimulationSpec
from fedcl.privacy.dp.seeding import release_seed
from fedcl.server.coordinator import Coordinator, CoordinatorOptions
from fedcl.server.observers import RunObserver
from fedcl.server.registry import Registry
from fedcl.server.results import build_results

from .report import plot_accuracy_matrix

logger = logging.getLogger("fedcl.simulations")

ENGINES = ("ray", "inprocess")


@dataclass
class SimulationPlan:
    """Where a simulation writes and how it runs."""

    experiment: ExperimentConfig
    scenario: str
    out_dir: Path
    run_id: str
    engine: str = "ray"
    observers: list[RunObserver] = field(default_factory=list)

    @property
    def registry_url(self) -> str:
        return f"sqlite:///{(self.out_dir / 'registry.db').resolve()}"

    @property
    def sites_dir(self) -> Path:
        return self.out_dir / "sites"


def default_run_id(experiment: ExperimentConfig) -> str:
    return f"{experiment.name}-{datetime.now(UTC):%Y%m%d-%H%M%S}"


def prepare_keys(experiment: ExperimentConfig, out_dir: Path) -> ExperimentConfig:
    """With HE on, make a key set for this simulation (unless the experiment names one).

    The coordinator gets ``public.ctx`` through the experiment; every virtual site gets the
    path of ``secret.ctx`` in its own site config, as a real site would from its admin.
    """
    if not experiment.he.enabled or experiment.he.public_context:
        return experiment
    from fedcl.privacy.ckks.keys import init_keys

    keys_dir = out_dir / "keys"
    if (keys_dir / "public.ctx").exists():
        from fedcl.privacy.ckks.keys import describe_key_file

        _, fp = describe_key_file(keys_dir / "public.ctx")
    else:
        fp = init_keys(keys_dir).fingerprint
    he = experiment.he.model_copy(
        update={"public_context": str((keys_dir / "public.ctx").resolve()), "fingerprint": fp}
    )
    return experiment.model_copy(update={"he": he})


def write_site_configs(experiment: ExperimentConfig, sites_dir: Path) -> list[Path]:
    """One ``site-<i>.toml`` per virtual site, each with its shard of the built-in dataset."""
    key_path = None
    if experiment.he.enabled and experiment.he.public_context:
        key_path = Path(experiment.he.public_context).with_name("secret.ctx")
    part = experiment.data.partition
    paths = []
    for i in range(experiment.simulation.num_sites):
        site = SiteConfig(
            site_id=f"site-{i}",
            state_dir=(sites_dir / f"site-{i}").resolve(),
            data=DataSource(
                source="builtin",
                name=experiment.data.dataset,
                partition=SitePartition(
                    index=i,
                    num_sites=experiment.simulation.num_sites,
                    scheme=part.scheme,
                    alpha=part.alpha,
                    seed=part.seed,
                    min_per_site=part.min_per_site,
                ),
            ),
            key_path=key_path,
            # A site given a GPU share trains on the GPU Ray assigns it (client/device.py).
            device="auto" if experiment.simulation.num_gpus > 0 else "cpu",
            torch_threads=max(1, int(experiment.simulation.num_cpus)),
            max_physical_batch=experiment.simulation.max_physical_batch,
            privacy=PrivacyPolicy(
                epsilon_budget=experiment.simulation.site_epsilon_budget,
                delta=experiment.dp.delta,
                research_seed=release_seed(experiment.seed, "site", i)
                if experiment.simulation.research_seeds
                else None,
            ),
        )
        paths.append(write_toml(site, sites_dir / f"site-{i}.toml"))
    return paths


def fit_weight_unit(experiment: ExperimentConfig, site_configs: list[Path]) -> ExperimentConfig:
    """With HE on and ``he.max_examples`` left unset: the most examples any virtual site weights
    one update by (:func:`largest_update_count`).

    Why: a site's CKKS weight is n / ``max_examples``, quantised at a fixed step, so the error
    of the encrypted average grows with the unit (``Packing.error_bound``: contributors · step ·
    max_examples / Σ n). The default 10,000 left sites of a few hundred examples a few percent
    of the 15 bits; under DP-SGD, where two runs can be paired on the same noise, that moved
    digits-domain-il's ACC by −0.44 ± 0.99 points (10 seeds) against HE off
    (docs/notes/measurements.md). A simulation may count its virtual sites; a deployment cannot
    (under HE the count travels encrypted), so there the unit stays a setting.
    """
    he = experiment.he
    if not he.enabled or "max_examples" in he.model_fields_set or not site_configs:
        return experiment
    from fedcl.client.site import load_site_data
    from fedcl.config import SiteConfig, load_toml

    largest = max(
        largest_update_count(experiment, load_site_data(experiment, load_toml(SiteConfig, path)))
        for path in site_configs
    )
    logger.info("he.max_examples = %d: the largest count a virtual site weights by", largest)
    unit = he.model_copy(update={"max_examples": max(1, largest)})
    return experiment.model_copy(update={"he": unit})


def largest_update_count(experiment: ExperimentConfig, data) -> int:
    """The most examples this site's update (or Fisher share) is weighted by in any round.

    A round trains on one task's examples, plus the replay buffer when the method replays
    (``replay_size`` at most, and never more than the earlier tasks hold); joint training on all
    of them. Exactly the largest count the site sends, so a unit this large caps no weight.
    """
    from fedcl.continual.methods import get_method

    if experiment.is_joint:
        return len(data.train.y)
    replays = get_method(experiment.continual.method).replays
    largest, earlier = 0, 0
    for k in range(data.stream.num_tasks):
        n = len(data.train_set(k))
        buffer = min(experiment.continual.replay_size, earlier) if replays else 0
        largest, earlier = max(largest, n + buffer), earlier + n
    return largest


def preflight(experiment: ExperimentConfig) -> None:
    """Fail fast, before Ray starts, on anything the coordinator would reject later."""
    if experiment.he.enabled:
        from fedcl.privacy.ckks import check_packing

        check_packing(experiment.he)  # a packing that cannot sum he.max_sites sites exactly
    from fedcl.continual.methods import get_method
    from fedcl.continual.plan import RunPlan
    from fedcl.strategies.table import strategy_entry

    strategy_entry(experiment.strategy.name)
    get_method(experiment.continual.method).check(experiment)  # the method and its options
    RunPlan.of(experiment).initial_model()  # the model, its options and the stream build


class RunSimulationNotice(logging.Filter):
    """Drops Flower's notice that ``run_simulation`` is deprecated, and nothing else.

    Flower 1.41 points to ``flwr run``, which starts an *installed* app through a SuperLink.
    ``fedcl simulate`` drives the Simulation Runtime in this process with the ServerApp object
    it built (its observers, the progress bar, the registry it reads results from), and
    ``run_simulation`` is Flower's API for exactly that; deployments go through ``flwr run``
    (docs/DESIGN.md §2). Every Ray run printed the notice, which users cannot act on.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "`run_simulation` function is deprecated" not in record.getMessage()


def quiet_flower() -> None:
    """Flower and Ray are chatty; the progress bar says what matters."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Ray 2.55's FutureWarning: it will stop blanking CUDA_VISIBLE_DEVICES for actors that
    # asked for no GPU. Opt in to that behaviour now (which silences it): a virtual site with
    # simulation.num_gpus = 0 trains on its configured device (cpu) either way.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.setLevel(logging.WARNING)
    flwr_logger.propagate = False
    if not any(isinstance(f, RunSimulationNotice) for f in flwr_logger.filters):
        flwr_logger.addFilter(RunSimulationNotice())


def run_plan(plan: SimulationPlan) -> dict[str, Any]:
    """Run the federation, then write ``results.json`` and ``accuracy_matrix.png`` to OUT."""
    plan.out_dir.mkdir(parents=True, exist_ok=True)
    preflight(plan.experiment)  # before anything is written: keys, site configs
    experiment = prepare_keys(plan.experiment, plan.out_dir)
    site_configs = write_site_configs(experiment, plan.sites_dir)
    experiment = plan.experiment = fit_weight_unit(experiment, site_configs)
    if plan.engine != "inprocess":  # the sites train in Ray actors, not in this process
        from fedcl.client.site import forget_site_data

        forget_site_data()
    (plan.out_dir / "experiment.json").write_text(
        json.dumps(experiment.model_dump(mode="json"), indent=2)
    )
    options = CoordinatorOptions(
        experiment=experiment,
        registry_url=plan.registry_url,
        run_id=plan.run_id,
        scenario=plan.scenario,
        sites_dir=str(plan.sites_dir.resolve()),
        observers=tuple(plan.observers),
    )
    quiet_flower()
    start = time.perf_counter()
    if plan.engine == "ray":
        cluster = _run_ray(options)
        if cluster is not None:  # what the run was given: the cluster as it started
            (plan.out_dir / "ray_cluster.json").write_text(json.dumps(asdict(cluster), indent=2))
    elif plan.engine == "inprocess":
        from .local_grid import LocalGrid

        site_gpus(experiment.simulation)  # says so when the sites cannot have their GPUs
        client_app, wrap_grid = _apps(experiment)
        grid = LocalGrid(client_app, experiment.simulation.num_sites)
        Coordinator(wrap_grid(grid) if wrap_grid else grid, options).run()
    else:
        raise ValueError(f"engine must be one of {ENGINES}, not {plan.engine!r}")
    wall = time.perf_counter() - start
    with Registry.open(plan.registry_url) as registry:
        results = build_results(registry, plan.run_id, wall_seconds=wall)
    (plan.out_dir / "results.json").write_text(json.dumps(results, indent=2))
    plot_accuracy_matrix(results, plan.out_dir / "accuracy_matrix.png")
    return results


def _apps(experiment: ExperimentConfig):
    """fedcl's ClientApp and no grid wrapper, or both with ``[[simulation.faults]]`` applied."""
    faults = experiment.simulation.faults
    if not faults:
        from fedcl.client.app import app as client_app

        return client_app, None
    from .faults import FaultyGrid, faulty_client_app

    return faulty_client_app(faults), lambda grid: FaultyGrid(grid, faults)


def _run_ray(options: CoordinatorOptions) -> RayCluster | None:
    """Run on Ray: a private one on this machine, or the cluster at ``simulation.ray_address``."""
    from flwr.simulation import run_simulation

    from fedcl.server.app import make_server_app

    client_app, wrap_grid = _apps(options.experiment)
    sim = options.experiment.simulation
    cluster = join_ray_cluster(sim.ray_address) if sim.ray_address else None
    run_simulation(
        server_app=make_server_app(options, wrap_grid=wrap_grid),
        client_app=client_app,
        num_supernodes=sim.num_sites,
        backend_config=ray_backend_config(sim, cluster),
    )
    return cluster


@dataclass(frozen=True)
class RayCluster:
    """The Ray cluster a simulation joined, as it was when the run started."""

    address: str
    nodes: int
    cpus: float
    gpus: float


def join_ray_cluster(address: str) -> RayCluster:
    """Connect this process to the Ray cluster at ``address`` (Flower then uses that Ray).

    Flower's Ray backend starts Ray only when it is not initialised, so initialising here makes
    it place the site actors on the cluster's nodes. Every node must run the same fedcl and
    torch (the actors import them there); ``PYTHONPATH`` travels as Flower sends it.
    """
    import sys

    import ray

    _check_reachable(address)
    if ray.is_initialized():
        ray.shutdown()
    try:
        ray.init(
            address=address,
            logging_level="ERROR",
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}},
        )
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise ConfigError(
            f"simulation.ray_address = {address!r}: cannot join a Ray cluster there ({err}); "
            "start one with `ray start --head` and pass the address it prints"
        ) from err
    alive = [n for n in ray.nodes() if n.get("Alive")]
    cluster = RayCluster(
        address=address,
        nodes=len(alive),
        cpus=sum(n["Resources"].get("CPU", 0.0) for n in alive),
        gpus=sum(n["Resources"].get("GPU", 0.0) for n in alive),
    )
    logger.info(
        "joined the Ray cluster at %s: %d node(s), %g CPUs, %g GPUs",
        address,
        cluster.nodes,
        cluster.cpus,
        cluster.gpus,
    )
    return cluster


def _check_reachable(address: str) -> None:
    """Fail in seconds, naming the setting, when nothing listens at a ``HOST:PORT`` address
    (``ray.init`` would retry for minutes); ``auto`` and ``ray://`` addresses go to Ray as is."""
    import socket

    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as err:
        raise ConfigError(
            f"simulation.ray_address = {address!r}: no Ray head answers there ({err}); start "
            "one with `ray start --head --port PORT` and pass the address it prints"
        ) from err


def ray_backend_config(sim: SimulationSpec, cluster: RayCluster | None = None) -> dict[str, Any]:
    """Flower's Ray backend settings: each site's resources, and how Ray starts."""
    return {
        "client_resources": {"num_cpus": sim.num_cpus, "num_gpus": site_gpus(sim, cluster)},
        "init_args": {"logging_level": "ERROR", "log_to_driver": False},
    }


def site_gpus(sim: SimulationSpec, cluster: RayCluster | None = None) -> float:
    """The GPU share each virtual site gets: ``simulation.num_gpus``, or 0 where none can serve.

    ``num_gpus > 0`` where no GPU exists (no CUDA in this process for a local run, no GPU in a
    joined cluster) would leave Flower's actor pool empty; the sites train on the CPU instead,
    and the run says so.
    """
    if sim.num_gpus <= 0:
        return 0.0
    if cluster is None:
        from fedcl.client.device import cuda_unavailable_reason

        why = cuda_unavailable_reason()
    else:
        why = None if cluster.gpus > 0 else f"the Ray cluster at {cluster.address} has no GPU"
    if why is None:
        return sim.num_gpus
    logger.warning(
        "simulation.num_gpus = %g asked for, but %s: the virtual sites train on the CPU",
        sim.num_gpus,
        why,
    )
    return 0.0
