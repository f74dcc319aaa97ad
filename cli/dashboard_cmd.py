"""``fedcl dashboard``: serve the coordinator dashboard, and manage its API tokens.

``fedcl dashboard --db URL`` serves the pages, the JSON API and ``/metrics`` with uvicorn;
``fedcl dashboard token create --db URL --role admin --name alice`` prints a new token once;
``token list`` shows every token (never the token itself), ``token revoke --id N`` or
``--name NAME`` revokes one and ends its dashboard sessions.
Registered in ``cli/main.py`` as ``app.add_typer(dashboard_cmd.app, name="dashboard")``; the
callback runs the server when no sub-command is given.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import typer
from rich.console import Console

from fedcl.config import FedclError

app = typer.Typer(
    help="Dashboard: runs, rounds, sites, privacy and model versions over the registry.",
    no_args_is_help=False,
)
token_app = typer.Typer(help="Create, list or revoke dashboard/API tokens (stored hashed).")
app.add_typer(token_app, name="token")
err = Console(stderr=True)


class DashboardCliError(FedclError, ValueError):
    """A dashboard command-line mistake (missing --db, port in use, ...)."""


def _require_db(db: str | None) -> str:
    if not db:
        raise DashboardCliError(
            "--db is required: the registry's SQLAlchemy URL, e.g. "
            "sqlite:///path/to/registry.db or postgresql+psycopg://user@host/db"
        )
    return db


def _check_port_free(host: str, port: int) -> None:
    """Fail with a clear message instead of uvicorn's log line and exit when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise DashboardCliError(
                f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port "
                "or --host"
            ) from None


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@app.callback(invoke_without_command=True)
def serve(
    ctx: typer.Context,
    db: str | None = typer.Option(
        None, "--db", help="SQLAlchemy URL of the coordinator's registry."
    ),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8765, min=1, max=65535, help="Port to listen on."),
    artifacts_dir: Path | None = typer.Option(
        None, help="Model artifacts folder (default: beside a SQLite registry)."
    ),
    public_metrics: bool = typer.Option(
        False, help="Serve /metrics without a token (default: admin or viewer bearer token)."
    ),
    poll_seconds: float = typer.Option(
        5.0, min=1.0, help="How often a running run's page refreshes its charts."
    ),
    ssl_certfile: Path | None = typer.Option(None, help="TLS certificate (PEM) to serve HTTPS."),
    ssl_keyfile: Path | None = typer.Option(None, help="TLS private key (PEM)."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
) -> None:
    """Serve the dashboard (pages, JSON API under /api, /metrics) over the registry at --db."""
    if ctx.invoked_subcommand is not None:
        return
    import uvicorn

    from fedcl.server.dashboard import create_app

    url = _require_db(db)
    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise DashboardCliError("--ssl-certfile and --ssl-keyfile must be given together")
    for path in (ssl_certfile, ssl_keyfile):
        if path is not None and not path.is_file():
            raise DashboardCliError(f"{path}: no such file")
    _check_port_free(host, port)
    dashboard = create_app(
        url,
        artifacts_dir=artifacts_dir,
        public_metrics=public_metrics,
        poll_seconds=poll_seconds,
    )
    scheme = "https" if ssl_certfile else "http"
    if scheme == "http" and not _is_loopback(host):
        err.print(
            f"[yellow]warning:[/] serving plain HTTP on {host}: tokens cross the network "
            "unencrypted; use --ssl-certfile/--ssl-keyfile or a TLS reverse proxy"
        )
    err.print(f"dashboard for {dashboard.state.registry.url} at {scheme}://{host}:{port}/")
    try:
        uvicorn.run(
            dashboard,
            host=host,
            port=port,
            log_level=log_level,
            ssl_certfile=str(ssl_certfile) if ssl_certfile else None,
            ssl_keyfile=str(ssl_keyfile) if ssl_keyfile else None,
        )
    finally:
        dashboard.state.registry.close()


@token_app.command("create")
def token_create(
    db: str | None = typer.Option(None, "--db", help="SQLAlchemy URL of the registry."),
    role: str = typer.Option(..., help="admin, viewer or site:<site id>."),
    name: str = typer.Option(..., help="Who holds it; recorded as the actor of their changes."),
) -> None:
    """Create a token and print it once (only its SHA-256 is stored)."""
    from fedcl.server.dashboard.auth import parse_role
    from fedcl.server.registry import Registry

    url = _require_db(db)
    role = parse_role(role)
    if not name.strip() or len(name) > 128:
        raise DashboardCliError("--name must be 1-128 characters")
    with Registry.open(url) as registry:
        token = registry.create_token(name.strip(), role, actor="cli")
        info = registry.verify_token(token)
    typer.echo(token)
    token_id = info.id if info is not None else "?"
    err.print(
        f"token id {token_id} for {name!r} with role {role!r}; it is shown only now: store it "
        f"(revoke with: fedcl dashboard token revoke --db URL --id {token_id})",
        highlight=False,
    )


@token_app.command("list")
def token_list(
    db: str | None = typer.Option(None, "--db", help="SQLAlchemy URL of the registry."),
) -> None:
    """List every token: id, name, role, when created and revoked, live dashboard sessions."""
    from rich.table import Table

    from fedcl.server.registry import Registry

    url = _require_db(db)
    with Registry.open(url) as registry:
        tokens = registry.list_tokens()
    table = Table(title=f"API tokens in {registry.url}")
    for column in ("id", "name", "role", "created", "revoked", "sessions"):
        table.add_column(column)
    for t in tokens:
        revoked = f"{t.revoked_at:%Y-%m-%d %H:%M:%S}" if t.revoked_at else ""
        table.add_row(
            str(t.id), t.name, t.role, f"{t.created_at:%Y-%m-%d %H:%M:%S}", revoked, str(t.sessions)
        )
    Console(width=160).print(table)


@token_app.command("revoke")
def token_revoke(
    db: str | None = typer.Option(None, "--db", help="SQLAlchemy URL of the registry."),
    token_id: int | None = typer.Option(
        None, "--id", min=1, help="The token id (fedcl dashboard token list)."
    ),
    name: str | None = typer.Option(None, "--name", help="The token's name (names are unique)."),
    actor: str = typer.Option("cli", help="Who revokes it (for the audit log)."),
) -> None:
    """Revoke a token by id or name; requests and sessions with it get 401 from then on."""
    from fedcl.server.registry import Registry

    url = _require_db(db)
    if (token_id is None) == (name is None):
        raise DashboardCliError("give exactly one of --id or --name")
    with Registry.open(url) as registry:
        info = registry.revoke_token(token_id, name=name, actor=actor)
    err.print(f"revoked token {info.id} ({info.name!r}, role {info.role!r})", highlight=False)
