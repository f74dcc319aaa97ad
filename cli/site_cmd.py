"""``fedcl site``: what a site administrator runs.

``init`` makes the site's state folder (site.toml, the SuperNode key pair), ``bundle`` installs
what the coordinator sent, ``check`` validates config, policy and data against the experiment,
``up`` runs the supervised SuperNode, ``status`` tells whether it is connected and what the site
has spent, ``down`` stops it. ``privacy`` prints the ledger in full. ``release`` decrypts a chosen
encrypted model version with the site's key and stores the plaintext in the registry.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer
from rich.console import Console

from fedcl.config import ConfigError, SiteConfig, load_toml

from .federation import SiteDir
from .supernode import MAX_WAIT_S

app = typer.Typer(help="Site: enrol, check config and data, run and watch the SuperNode.")
console = Console(soft_wrap=True)


@app.command("init")
def init(
    state: Path = typer.Argument(..., help="The site's new state folder."),
    site_id: str = typer.Option(..., "--site-id", help="This site's id, e.g. hospital-a."),
    data: str | None = typer.Option(
        None, "--data", help="A class folder or CSV manifest; or builtin / builtin:INDEX/NUM."
    ),
    epsilon_budget: float = typer.Option(
        8.0, "--epsilon-budget", min=0.0, help="The ε this site will ever spend (0: no limit)."
    ),
    delta: float = typer.Option(1e-5, "--delta", help="δ at which the budget is counted."),
) -> None:
    """Create the state folder, site.toml and the SuperNode key pair; print the public key."""
    from .enrol import init_site

    site, public = init_site(
        state, site_id, data=data, epsilon_budget=epsilon_budget or None, delta=delta
    )
    console.print(f"[green]site {site_id}[/] state folder {site.root}", soft_wrap=True)
    console.print(f"  config       {site.site_toml}  (yours: data, privacy budget)")
    console.print(f"  private key  {site.node_key}  (mode 0600, never leaves this machine)")
    console.print(f"  public key   {site.node_pub}  -> send it to the coordinator:")
    console.print(public, soft_wrap=True, highlight=False)
    console.print(f"next, with the coordinator's bundle: fedcl site bundle {site.root} BUNDLE_DIR")


@app.command("bundle")
def bundle(
    state: Path = typer.Argument(..., help="The site's state folder."),
    folder: Path = typer.Argument(..., help="The bundle folder the coordinator sent."),
    force: bool = typer.Option(False, "--force", help="Replace an installed bundle."),
) -> None:
    """Install the coordinator's bundle (CA, SuperLink address, experiment, CKKS key)."""
    from .enrol import install_bundle

    site = SiteDir(state)
    spec = install_bundle(site, folder, force=force)
    has_key = site.secret_ctx.is_file()
    console.print(
        f"[green]bundle installed[/] in {site.bundle}: federation {spec.federation}, "
        f"SuperLink {spec.superlink}{', CKKS secret key (0600)' if has_key else ''}"
    )
    console.print(f"next: fedcl site check {site.root} && fedcl site up {site.root} --detach")


def _site_toml(path: Path) -> tuple[Path, SiteDir | None]:
    """A state folder or a site.toml path -> (site.toml, the state folder if it is one)."""
    if path.is_dir():
        site = SiteDir(path)
        site.require_site()
        return site.site_toml, site
    return path, None


@app.command("release")
def release(
    site_config: Path = typer.Argument(..., help="The state folder (or a site.toml)."),
    version: int = typer.Option(..., "--version", help="The encrypted model version's id."),
    db: str = typer.Option(..., "--db", help="The coordinator's registry database URL."),
    artifacts: Path | None = typer.Option(
        None, "--artifacts", help="Artifacts folder (default: beside a SQLite registry)."
    ),
) -> None:
    """Decrypt an encrypted model version with this site's secret key and release it.

    The plaintext goes to the registry as a version of kind ``release`` (audited with the site),
    downloadable as safetensors from the dashboard; the coordinator never sees the key.
    """
    from fedcl.client.release import decrypt_model_version, release_bytes
    from fedcl.config import ExperimentConfig
    from fedcl.server.registry import Registry

    toml_path, _ = _site_toml(site_config)
    site = load_toml(SiteConfig, toml_path)
    with Registry.open(db, artifacts_dir=artifacts) as reg:
        source = reg.get_model_version(version)
        if source is None:
            raise ConfigError(f"the registry at {db} has no model version {version}")
        run = reg.get_run(source.run_id)
        if run is None:  # a version's run is never deleted without it (cascade)
            raise ConfigError(f"model version {version} names run {source.run_id!r}, not found")
        experiment = ExperimentConfig.model_validate(run.config)
        state = decrypt_model_version(reg.load_artifact(source), experiment, site)
        released = reg.release_model_version(
            source.id,
            payload=release_bytes(state),
            site_id=site.site_id,
            actor=f"site-admin:{site.site_id}",
        )
    console.print(
        f"[green]released[/] version {source.id} (run {source.run_id!r}, round "
        f"{source.server_round}, {source.status}) as version {released.id}: "
        f"{len(state)} tensors, sha256 {released.sha256}"
    )


@app.command("check")
def check(
    site_config: Path = typer.Argument(..., help="The state folder (or a site.toml)."),
    experiment: Path | None = typer.Option(
        None, "--experiment", "-e", help="Experiment TOML (default: the bundle's)."
    ),
) -> None:
    """Validate config, privacy policy, keys and data against the experiment; print examples."""
    from .site_checks import check_site, data_table

    toml_path, site_dir = _site_toml(site_config)
    if experiment is None:
        if site_dir is None or not site_dir.experiment.is_file():
            raise ConfigError("give --experiment FILE (no installed bundle carries one)")
        experiment = site_dir.experiment
    site, exp, notes = check_site(toml_path, experiment, site_dir)
    console.print(data_table(site, exp))
    for note in notes:
        console.print(f"  [yellow]note:[/] {note}")
    console.print(f"[green]ok[/]: {toml_path} is valid and its data loads")


@app.command("up")
def up(
    state: Path = typer.Argument(..., help="The site's state folder."),
    port: int | None = typer.Option(None, "--port", help="SuperNode port (default: a free one)."),
    max_wait: float = typer.Option(
        MAX_WAIT_S, "--max-wait", help="Seconds to retry a lost SuperLink before a restart."
    ),
    detach: bool = typer.Option(False, "--detach", help="Supervise in the background."),
) -> None:
    """Start and supervise this site's SuperNode (TLS, its key); restart it with backoff."""
    from .supernode import Supervisor
    from .supernode import detach as start_detached

    site = SiteDir(state)
    site.require_site()
    load_toml(SiteConfig, site.site_toml)
    if detach:
        pid = start_detached(site, port, max_wait)
        console.print(f"[green]site up[/] (supervisor pid {pid}); log {site.supervisor}")
        console.print(f"watch it with: fedcl site status {site.root}")
        return
    raise typer.Exit(Supervisor(site, port=port, max_wait=max_wait).run())


@app.command("down")
def down(state: Path = typer.Argument(..., help="The site's state folder.")) -> None:
    """Stop the supervised SuperNode."""
    from .supernode import stop as stop_site

    pid = stop_site(SiteDir(state))
    console.print(f"site {'stopped (supervisor pid ' + str(pid) + ')' if pid else 'was not up'}")


@app.command("status")
def status(
    state: Path = typer.Argument(..., help="The site's state folder."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Connected or not (and why), ε spent of the budget, the last rounds this site trained."""
    from .site_checks import site_status

    site = SiteDir(state)
    site.require_site()
    info = site_status(site)
    if as_json:
        import json

        typer.echo(json.dumps(info, indent=2, default=str))
        return
    from .site_checks import print_status

    print_status(info, console)


@app.command("start")
def start(
    site_config: Path = typer.Argument(..., help="The site's site.toml."),
    superlink: str = typer.Option(..., help="The SuperLink address host:port (one port, 1.41)."),
    insecure: bool = typer.Option(False, help="No TLS (local testing only)."),
    root_certificates: Path | None = typer.Option(None, help="CA certificate for TLS."),
    private_key: Path | None = typer.Option(None, help="SuperNode auth key (OpenSSH EC)."),
    port: int = typer.Option(0, help="Port this SuperNode listens on (0: a free one)."),
) -> None:
    """Exec a bare Flower SuperNode for SITE_CONFIG (no supervision; prefer `fedcl site up`)."""
    from .superlink import flower_env, tool
    from .supernode import free_port

    site = load_toml(SiteConfig, site_config)
    if not insecure and root_certificates is None:
        raise ConfigError("give --root-certificates CA.crt for TLS, or --insecure for local tests")
    exe = tool("flower-supernode")
    args = [exe, "--superlink", superlink, "--host", "127.0.0.1"]
    args += ["--port", str(port or free_port())]
    args += ["--node-config", f'site-config="{site_config.resolve()}"']
    args += ["--insecure"] if insecure else ["--root-certificates", str(root_certificates)]
    args += ["--auth-supernode-private-key", str(private_key)] if private_key else []
    console.print(f"starting SuperNode for site {site.site_id}: {' '.join(args)}")
    sys.stdout.flush()
    os.execve(exe, args, flower_env())
