"""``fedcl coordinator``: enrol sites, run the SuperLink, submit and follow runs, read the registry.

``init`` turns ``federation.toml`` into a coordinator folder (TLS, node keys, site bundles),
``up`` starts the SuperLink and registers the sites, ``run`` checks and submits an experiment
and follows it, ``stop`` stops a run, ``status`` reads the registry, ``down`` stops the
SuperLink. ``app`` still writes a bare Flower app for those who drive ``flwr`` themselves.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from fedcl.config import ConfigError, ExperimentConfig, load_toml

from .checks import check_experiment
from .federation import CoordinatorDir
from .flower_app import write_flower_app

__all__ = ["app", "write_flower_app"]

app = typer.Typer(help="Coordinator: enrol sites, run the SuperLink, submit and follow runs.")
console = Console(soft_wrap=True)

DIR_HELP = "The coordinator folder written by `fedcl coordinator init`."
DIR_ENV = "FEDCL_COORDINATOR_DIR"


def _dir_option() -> Path:
    return typer.Option(Path("fedcl-coordinator"), "--dir", "-d", envvar=DIR_ENV, help=DIR_HELP)


@app.command("init")
def init(
    federation: Path = typer.Argument(..., help="federation.toml: SuperLink address, sites, keys."),
    out: Path = typer.Option(Path("fedcl-coordinator"), "--out", "-o", help="New folder."),
) -> None:
    """Make the CA, the server certificate and one bundle per site; never overwrites."""
    from .enrol import init_coordinator

    done = init_coordinator(federation, out)
    folder, spec = done.folder, done.spec
    console.print(f"[green]coordinator folder[/] {folder.root}", soft_wrap=True)
    console.print(f"  CA              {folder.ca_cert}  (its key stays in tls/, mode 0600)")
    console.print(f"  server cert     {folder.server_cert}  for {', '.join(done.sans)}")
    console.print(f"  SuperLink       {spec.superlink.site_address} (one port: sites, flwr, runs)")
    if done.fingerprint:
        console.print(f"  CKKS public     {folder.public_ctx}  fingerprint {done.fingerprint}")
        console.print(
            f'  [yellow]set he.public_context = "{folder.public_ctx}" in {spec.experiment}[/]'
            if done.experiment.he.public_context is None
            else f"  experiment he.public_context = {done.experiment.he.public_context}"
        )
    for site in spec.sites:
        console.print(f"  bundle          {folder.bundles / site.id}  -> site {site.id}")
    if done.fingerprint:
        console.print(
            "[bold yellow]the bundles hold the CKKS secret key[/]: deliver each out of band, then "
            f"delete {folder.bundles} (the coordinator must never keep a secret key)"
        )
    console.print(f"next: fedcl coordinator up -d {folder.root}", soft_wrap=True)


@app.command("up")
def up(
    folder_path: Path = _dir_option(),
    foreground: bool = typer.Option(
        False, "--foreground", help="Stay in the foreground (a container's main process)."
    ),
) -> None:
    """Start the SuperLink (TLS, SuperNode auth, no run-time installs) and register the sites."""
    from .superlink import start_superlink, supervise_foreground

    folder = CoordinatorDir(folder_path)
    spec = folder.federation()
    started = start_superlink(folder, spec, foreground=foreground)
    pid = started if isinstance(started, int) else started.pid
    try:
        _announce(folder, spec, pid)
    except BaseException:
        if not isinstance(started, int):
            started.terminate()
        raise
    if not isinstance(started, int):
        raise typer.Exit(supervise_foreground(folder, started))


def _announce(folder: CoordinatorDir, spec, pid: int) -> None:
    from .superlink import register_sites, write_connection

    config = write_connection(folder, spec)
    console.print(
        f"[green]SuperLink[/] pid {pid} on {spec.superlink.host}:{spec.superlink.port} "
        f"(sites dial {spec.superlink.site_address}); log {folder.superlink / 'superlink.log'}"
    )
    console.print(f"flwr connection [bold]{spec.name}[/] in {config}", soft_wrap=True)
    for site_id, node in register_sites(folder, spec).items():
        shown = node if node == "already registered" else f"node {node}"
        console.print(f"  site {site_id}: {shown}")
    console.print(f"next: fedcl coordinator run {spec.experiment} -d {folder.root}", soft_wrap=True)


@app.command("down")
def down(folder_path: Path = _dir_option()) -> None:
    """Stop the SuperLink (a run still going is recorded as stopped)."""
    from .run_cmd import stop_running_runs
    from .superlink import stop_superlink

    folder = CoordinatorDir(folder_path)
    stopped = stop_running_runs(folder, "the SuperLink was shut down (fedcl coordinator down)")
    pid = stop_superlink(folder)
    console.print(f"SuperLink {'pid ' + str(pid) + ' stopped' if pid else 'was not running'}")
    for run_id in stopped:
        console.print(f"  run {run_id} recorded as stopped")


@app.command("run")
def run(
    experiment: Path | None = typer.Argument(None, help="Experiment TOML (default: --resume's)."),
    folder_path: Path = _dir_option(),
    run_id: str | None = typer.Option(None, help="Run id (default: NAME-YYYYmmdd-HHMMSS)."),
    resume: str | None = typer.Option(None, "--resume", help="Continue this run."),
    detach: bool = typer.Option(False, "--detach", help="Submit and return without following."),
    superlink: str | None = typer.Option(
        None, "--superlink", help="HOST:PORT of a SuperLink on another host (default: this one)."
    ),
) -> None:
    """Check the experiment, submit it with `flwr run`, follow it until it ends."""
    from .run_cmd import start_run

    folder = CoordinatorDir(folder_path)
    code = start_run(
        folder, experiment, run_id=run_id, resume=resume, detach=detach, superlink=superlink,
        out=console,
    )  # fmt: skip
    raise typer.Exit(code)


@app.command("stop")
def stop(
    run_id: str = typer.Argument(..., help="The fedcl run id (as `coordinator status` lists)."),
    folder_path: Path = _dir_option(),
    reason: str = typer.Option("stopped by the coordinator (fedcl coordinator stop)", help="Why."),
) -> None:
    """Stop a run (`flwr stop`) and record it as stopped, with the reason, in the registry."""
    from .runs import stop_run

    folder = CoordinatorDir(folder_path)
    note = stop_run(folder, folder.federation(), run_id, reason)
    console.print(f"run {run_id} stopped: {reason} ({note})")


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
    run_id: str | None = typer.Argument(None, help="Show one run's results."),
    registry: str | None = typer.Option(None, help="Registry URL (default: --dir's registry)."),
    folder_path: Path | None = typer.Option(None, "--dir", "-d", envvar=DIR_ENV, help=DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    follow: bool = typer.Option(False, "--follow", help="Print RUN_ID's rounds until it ends."),
) -> None:
    """List the runs in a registry, or one run's accuracy matrix and rounds."""
    from fedcl.server.registry import Registry
    from fedcl.server.results import build_results
    from fedcl.simulations.report import print_report

    if registry is None:
        default_dir = CoordinatorDir(Path("fedcl-coordinator"))
        folder = CoordinatorDir(folder_path) if folder_path else default_dir
        if folder_path is None and not folder.spec_file.is_file():
            registry = "sqlite:///fedcl-registry.db"
        else:
            registry = folder.registry_url()
    if follow and run_id is not None:
        from .progress import follow as follow_run

        status, reason = follow_run(registry, run_id, console)
        console.print(f"run {run_id} {status}" + (f": {reason}" if reason else ""))
    with Registry.open(registry) as reg:
        if run_id is not None:
            if reg.get_run(run_id) is None:
                raise ConfigError(f"run {run_id!r} is not in the registry {registry}")
            results = build_results(reg, run_id)
            if as_json:
                typer.echo(json.dumps(results, indent=2, default=str))
            else:
                print_report(results, console)
            return
        runs = reg.list_runs()
    if as_json:
        typer.echo(json.dumps([{"id": r.id, "status": r.status, "reason": r.reason} for r in runs]))
        return
    table = Table(title=f"runs in {registry}")
    for col in ("run", "scenario", "status", "tasks", "updated", "reason"):
        table.add_column(col)
    for r in runs:
        table.add_row(
            r.id, r.scenario, r.status, str(len(r.tasks)), f"{r.updated_at:%Y-%m-%d %H:%M}",
            r.reason or "",
        )  # fmt: skip
    console.print(table)
