"""``fedcl audit verify``: check the registry's hash-chained audit log end to end.

Exit status 0 when every event's hash matches its fields and links to the one before it, 1 with
the first broken link (event id and what is wrong) otherwise, 2 for a user mistake (bad --db).
The head hash it prints is worth keeping outside the registry: ``--anchor HASH`` later proves
the log up to it was not rewritten with every later hash recomputed. Registered in
``cli/main.py`` as ``app.add_typer(audit_cmd.app, name="audit")``.
"""

from __future__ import annotations

import typer
from rich.console import Console

from fedcl.config import FedclError

app = typer.Typer(help="The coordinator's tamper-evident audit log.", no_args_is_help=True)
out = Console(soft_wrap=True, highlight=False)


class AuditCliError(FedclError, ValueError):
    """An audit command-line mistake (missing --db, malformed anchor)."""


@app.command("verify")
def verify(
    db: str | None = typer.Option(None, "--db", help="SQLAlchemy URL of the registry."),
    anchor: str | None = typer.Option(
        None, help="A head hash printed by an earlier verify: it must still be on the chain."
    ),
) -> None:
    """Recompute the audit log's hash chain; name the first broken link (exit 1) if any."""
    from fedcl.server.registry import Registry

    if not db:
        raise AuditCliError(
            "--db is required: the registry's SQLAlchemy URL, e.g. sqlite:///path/to/registry.db"
        )
    if anchor is not None and (
        len(anchor) != 64 or any(c not in "0123456789abcdef" for c in anchor)
    ):
        raise AuditCliError(f"--anchor {anchor!r} is not a SHA-256 hex digest (64 of 0-9a-f)")
    with Registry.open(db) as registry:
        report = registry.verify_audit(anchor=anchor)
        shown = registry.url
    if report.broken is not None:
        where = (
            f"event {report.broken.event_id}" if report.broken.event_id is not None else "the head"
        )
        out.print(
            f"audit log of {shown} is BROKEN at {where} (after {report.events} events checked): "
            f"{report.broken.reason}"
        )
        raise typer.Exit(1)
    out.print(f"audit log of {shown} verifies: {report.events} events, head {report.head_hash}")
