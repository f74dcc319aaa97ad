"""``fedcl coordinator``: prepare a deployment's Flower app and read its registry."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from fedcl.config import ExperimentConfig, load_toml, to_json

from .checks import check_experiment

app = typer.Typer(help="Coordinator: write the Flower app for `flwr run`, inspect runs.")
console = Console()


def write_flower_app(
    experiment: ExperimentConfig,
    out: Path,
    *,
    registry_url: str,
    run_id: str,
    scenario: str = "custom",
) -> Path:
    """A thin Flower app: components point at the installed fedcl, config carries the run."""
    import tomli_w

    out.mkdir(parents=True, exist_ok=True)
    pyproject = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": "fedcl-app",
            "version": "1.0.0",
            "description": f"fedcl run {run_id}",
            "dependencies": ["fedcl"],
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
                    "config": {
                        "experiment": to_json(experiment),
                        "registry-url": registry_url,
                        "run-id": run_id,
                        "scenario": scenario,
                    },
                }
            },
        },
    }
    path = out / "pyproject.toml"
    path.write_text(tomli_w.dumps(pyproject))
    return path


@app.command("app")
def app_cmd(
    experiment: Path = typer.Argument(..., help="Experiment TOML."),
    out: Path = typer.Option(Path("fedcl-app"), help="Folder for the Flower app."),
    registry: str = typer.Option(
        "sqlite:///fedcl-registry.db", help="SQLAlchemy URL of the registry."
    ),
    run_id: str | None = typer.Option(None, help="Run id (default: the experiment's name)."),
) -> None:
    """Write the Flower app folder that `flwr run FOLDER FEDERATION` starts."""
    exp = check_experiment(load_toml(ExperimentConfig, experiment), str(experiment))
    if registry.startswith("sqlite:///") and not registry.startswith("sqlite:////"):
        # The ServerApp runs in another working directory: make relative SQLite paths absolute.
        registry = "sqlite:///" + str(Path(registry.removeprefix("sqlite:///")).resolve())
    path = write_flower_app(exp, out, registry_url=registry, run_id=run_id or exp.name)
    console.print(f"wrote {path}; start it with: flwr run {out} <federation> --stream")


@app.command("status")
def status(
    registry: str = typer.Option("sqlite:///fedcl-registry.db", help="Registry URL."),
    run_id: str | None = typer.Argument(None, help="Show one run's results."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List the runs in a registry, or one run's accuracy matrix and rounds."""
    from fedcl.server.registry import Registry
    from fedcl.server.results import build_results
    from fedcl.simulations.report import print_report

    with Registry.open(registry) as reg:
        if run_id is not None:
            results = build_results(reg, run_id)
            if as_json:
                typer.echo(json.dumps(results, indent=2, default=str))
            else:
                print_report(results, console)
            return
        runs = reg.list_runs()
    if as_json:
        typer.echo(json.dumps([{"id": r.id, "status": r.status} for r in runs]))
        return
    table = Table(title=f"runs in {registry}")
    for col in ("run", "scenario", "status", "tasks", "updated"):
        table.add_column(col)
    for r in runs:
        table.add_row(
            r.id, r.scenario, r.status, str(len(r.tasks)), f"{r.updated_at:%Y-%m-%d %H:%M}"
        )
    console.print(table)
