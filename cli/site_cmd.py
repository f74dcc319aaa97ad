"""``fedcl site``: what a site administrator runs."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from fedcl.config import ConfigError, ExperimentConfig, SiteConfig, load_toml

from .checks import check_experiment

app = typer.Typer(help="Site agent: check a site's config and data, start its SuperNode.")
console = Console()


@app.command("check")
def check(
    site_config: Path = typer.Argument(..., help="The site's site.toml."),
    experiment: Path = typer.Option(
        ..., "--experiment", "-e", help="The coordinator's experiment TOML (for its tasks)."
    ),
) -> None:
    """Validate SITE_CONFIG and load its data the way a round would; print examples per task."""
    from fedcl.client.site import load_site_data

    site = load_toml(SiteConfig, site_config)
    exp = check_experiment(load_toml(ExperimentConfig, experiment), str(experiment))
    data = load_site_data(exp, site)
    table = Table(title=f"site {site.site_id}: {len(data.train)} train / {len(data.test)} test")
    table.add_column("task")
    table.add_column("name")
    table.add_column("train", justify="right")
    table.add_column("test", justify="right")
    for task in data.stream.tasks:
        table.add_row(
            str(task.index),
            task.name,
            str(len(data.train_set(task.index))),
            str(len(data.test_set(task.index))) if not data.stream.eval_tasks else "–",
        )
    console.print(table)
    console.print(f"[green]ok[/]: {site_config} is valid and its data loads")


@app.command("start")
def start(
    site_config: Path = typer.Argument(..., help="The site's site.toml."),
    superlink: str = typer.Option("127.0.0.1:9092", help="The coordinator's SuperLink address."),
    insecure: bool = typer.Option(False, help="No TLS (local testing only)."),
    root_certificates: Path | None = typer.Option(None, help="CA certificate for TLS."),
    port: int = typer.Option(9094, help="Port this SuperNode listens on for its ClientApp."),
) -> None:
    """Start a Flower SuperNode that runs fedcl's ClientApp with this site's config."""
    site = load_toml(SiteConfig, site_config)
    exe = shutil.which("flower-supernode")
    if exe is None:
        raise ConfigError("flower-supernode is not on PATH: install fedcl (it depends on flwr)")
    if not insecure and root_certificates is None:
        raise ConfigError("give --root-certificates CA.crt for TLS, or --insecure for local tests")
    args = [
        exe,
        "--superlink",
        superlink,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--node-config",
        f'site-config="{site_config.resolve()}"',
    ]
    args += ["--insecure"] if insecure else ["--root-certificates", str(root_certificates)]
    console.print(f"starting SuperNode for site {site.site_id}: {' '.join(args)}")
    sys.stdout.flush()
    os.execv(exe, args)
