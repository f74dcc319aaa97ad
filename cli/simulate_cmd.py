"""``fedcl simulate``: a whole federation on this machine."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from fedcl.simulations.catalog import DEFAULT_SCENARIO, builtin_scenarios, load_scenario

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
    list_: bool = typer.Option(False, "--list", help="List the built-in scenarios and exit."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar."),
) -> None:
    """Run SCENARIO on virtual sites and write results.json, accuracy_matrix.png, registry.db."""
    if list_:
        _list()
        return
    from fedcl.config import ConfigError
    from fedcl.simulations.progress import ProgressObserver
    from fedcl.simulations.report import print_report
    from fedcl.simulations.runner import ENGINES, SimulationPlan, default_run_id, run_plan

    if engine not in ENGINES:
        raise ConfigError(f"--engine {engine!r}: use one of {', '.join(ENGINES)}")
    label, experiment = load_scenario(scenario, set_)
    rid = run_id or default_run_id(experiment)
    out_dir = out or Path("runs") / rid
    observers = [] if no_progress else [ProgressObserver(console, experiment.data.num_tasks)]
    console.print(
        f"[bold]fedcl simulate[/] {label}: {experiment.simulation.num_sites} sites, "
        f"{experiment.data.num_tasks} tasks × {experiment.train.rounds_per_task} rounds, "
        f"engine {engine} → {out_dir}"
    )
    results = run_plan(
        SimulationPlan(experiment, label, out_dir, rid, engine=engine, observers=observers)
    )
    print_report(results, console)
    console.print(f"results: {out_dir / 'results.json'}  plot: {out_dir / 'accuracy_matrix.png'}")
    if results["status"] != "completed":
        raise typer.Exit(1)


def _list() -> None:
    from fedcl.config import ExperimentConfig, read_toml

    table = Table(title="Built-in scenarios")
    table.add_column("name")
    table.add_column("description")
    for name, path in builtin_scenarios().items():
        exp = ExperimentConfig.model_validate(read_toml(path))
        table.add_row(name, exp.description)
    console.print(table)
