"""``fedcl``: one command for coordinators, site administrators and researchers.

Each side owns a sub-command group (``simulate``, ``site``, ``coordinator``, …). A user mistake
raises a :class:`~fedcl.config.FedclError` somewhere below; it is printed here as one red
message naming the file, field or site, without a traceback.
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version

import typer
from rich.console import Console

from fedcl.config import FedclError

from . import (
    audit_cmd,
    coordinator_cmd,
    dashboard_cmd,
    keys_cmd,
    privacy_cmd,
    simulate_cmd,
    site_cmd,
)

console = Console(stderr=True, soft_wrap=True)  # paths in errors stay copyable

app = typer.Typer(
    name="fedcl",
    help="Federated and continual learning for sites that cannot share data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("simulate")(simulate_cmd.simulate)
app.add_typer(site_cmd.app, name="site")
app.add_typer(coordinator_cmd.app, name="coordinator")
app.add_typer(keys_cmd.app, name="keys")
app.add_typer(dashboard_cmd.app, name="dashboard")
app.add_typer(audit_cmd.app, name="audit")
site_cmd.app.command("privacy")(privacy_cmd.privacy)


DISTRIBUTION = "fedcl-framework"  # on PyPI; `fedcl` there is an unrelated package


def _version() -> str:
    for name in (DISTRIBUTION, "fedcl"):  # "fedcl": an install made before the rename
        try:
            return version(name)
        except PackageNotFoundError:
            continue
    return "0+unknown"  # running from a source tree without an install


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"fedcl {_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    version_: bool = typer.Option(
        False, "--version", callback=_version_callback, is_eager=True, help="Show the version."
    ),
) -> None:
    """Federated and continual learning for sites that cannot share data."""


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: user errors become one clear message and exit code 2."""
    try:
        code = app(args=argv, standalone_mode=False)  # click returns Exit codes in this mode
        if isinstance(code, int):
            return code
    except FedclError as err:
        console.print(f"[bold red]error:[/] {err}", highlight=False)
        return 2
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        console.print("aborted")
        return 130
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            return exc.exit_code
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
