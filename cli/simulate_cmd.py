"""``fedcl simulate``: a whole federation on this machine."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from fedcl.simulations.catalog import DEFAULT_SCENARIO, builtin_scenarios, load_scenario

from .checks import check_experiment

console = Console()


def simulate(
    scenario: str = typer.Argument(
        DEFAULT_SCENARIO, help="Built-in scenario name or path to an experiment TOML."
    ),
    set_: list[str] = typer.Option(
        [], "--set", help="Override a config key, e.g. --set train.rounds_per_task=2."
    ),
    out: Path | None = typer.Option(None, "--out", help="Output folder (default runs/RUN_ID)."),
    run_id: str | None = typer.Option(
        None, "--run-id", help="Run id; an existing id in OUT's registry resumes that run."
    ),
    engine: str = typer.Option("ray", help="ray (Flower's simulation engine) or inprocess."),
    ray_address: str | None = typer.Option(
        None,
        "--ray-address",
        help="Run the sites on an existing Ray cluster (the address `ray start --head` printed); "
        "same as --set simulation.ray_address=...",
    ),
    list_: bool = typer.Option(False, "--list", help="List the built-in scenarios and exit."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
    dashboard: bool = typer.Option(
        False, "--dashboard", help="Serve the dashboard during and after the run."
    ),
    dashboard_port: int = typer.Option(8765, help="Port of --dashboard (127.0.0.1 only)."),
) -> None:
    """Run SCENARIO on virtual sites and write results.json, accuracy_matrix.png, registry.db."""
    if list_:
        _list()
        return
    if ray_address is not None:
        set_ = [*set_, f"simulation.ray_address = {json.dumps(ray_address)}"]
    label, experiment = load_scenario(scenario, set_)
    check_experiment(experiment, label)  # before torch, keys, Ray or the dashboard start

    from fedcl.config import ConfigError
    from fedcl.simulations.progress import ProgressObserver
    from fedcl.simulations.report import print_report
    from fedcl.simulations.runner import ENGINES, SimulationPlan, default_run_id, run_plan

    if engine not in ENGINES:
        raise ConfigError(f"--engine {engine!r}: use one of {', '.join(ENGINES)}")
    if engine != "ray" and experiment.simulation.ray_address:
        raise ConfigError(
            f"simulation.ray_address = {experiment.simulation.ray_address!r} needs --engine ray "
            f"(the {engine} engine runs every site in this process)"
        )
    rid = run_id or default_run_id(experiment)
    out_dir = out or Path("runs") / rid
    observers = [] if no_progress else [ProgressObserver(console, experiment.data.num_tasks)]
    console.print(
        f"[bold]fedcl simulate[/] {label}: {experiment.simulation.num_sites} sites, "
        f"{experiment.data.num_tasks} tasks × {experiment.train.rounds_per_task} rounds, "
        f"engine {engine}"
        + (
            f" on the Ray cluster at {experiment.simulation.ray_address}"
            if experiment.simulation.ray_address
            else ""
        )
        + f" → {out_dir}"
    )
    plan = SimulationPlan(experiment, label, out_dir, rid, engine=engine, observers=observers)
    server = _start_dashboard(plan.registry_url, dashboard_port) if dashboard else None
    results = run_plan(plan)
    print_report(results, console)
    console.print(f"results: {out_dir / 'results.json'}  plot: {out_dir / 'accuracy_matrix.png'}")
    if server is not None:
        console.print("[bold]dashboard still serving[/]: Ctrl-C to stop")
        with contextlib.suppress(KeyboardInterrupt):
            server.join()
    if results["status"] != "completed":
        raise typer.Exit(1)


def _start_dashboard(registry_url: str, port: int):
    """Serve the dashboard over the simulation's registry in a background thread."""
    import secrets
    import threading

    import uvicorn

    from fedcl.server.dashboard import create_app
    from fedcl.server.registry import Registry

    with Registry.open(registry_url) as registry:  # create and migrate it before serving
        # Token names are unique (the audit actor): one per dashboard served.
        token = registry.create_token(f"simulate-{secrets.token_hex(4)}", "admin")
    app = create_app(registry_url)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True, name="fedcl-dashboard")
    thread.start()
    console.print(
        f"[bold]dashboard[/]: http://127.0.0.1:{port}/  (log in with the admin token {token})",
        soft_wrap=True,
    )
    return thread


def _list() -> None:
    from fedcl.config import ExperimentConfig, read_toml

    table = Table(title="Built-in scenarios")
    table.add_column("name")
    table.add_column("description")
    for name, path in builtin_scenarios().items():
        exp = ExperimentConfig.model_validate(read_toml(path))
        table.add_row(name, exp.description)
    console.print(table)
