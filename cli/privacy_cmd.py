"""``fedcl site privacy --state DIR``: what a site has spent of its privacy budget.

Reads the site's own ledger (never the coordinator's registry): the site administrator is the
one who must be able to answer "how much ε have we released, and how much is left?", with the
accountant's composition of every release rather than a sum of per-round numbers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from fedcl.privacy.ledger import ACCOUNTANTS, LedgerError, LedgerSummary, PrivacyLedger

console = Console()


def _eps(value: float) -> str:
    return "∞" if math.isinf(value) else f"{value:.3f}"


def render_summary(summary: LedgerSummary) -> Table:
    """One row per (run, task) with the run's own ε on its first row, then the lifetime."""
    table = Table(
        title=f"privacy ledger {summary.path}",
        caption=(
            f"ε at δ = {summary.delta:g}, {summary.accountant.upper()} accountant; "
            "ε of a task or run is its releases alone; every ε is the max over data cells "
            "(cell: where the run's is reached; * = every release composed in sequence)"
        ),
    )
    for name in ("run", "task", "releases", "steps", "ε task", "ε run", "cell"):
        table.add_column(name, justify="left" if name in ("run", "task", "cell") else "right")
    for run in summary.runs:
        for i, task in enumerate(run.tasks):
            table.add_row(
                run.run_id if i == 0 else "",
                str(task.task_index),
                str(task.releases),
                str(task.steps),
                _eps(task.epsilon),
                _eps(run.epsilon) if i == 0 else "",
                run.cell if i == 0 else "",
            )
        table.add_section()
    table.add_row(
        "[bold]lifetime[/]",
        "",
        str(summary.releases),
        str(summary.steps),
        "",
        f"[bold]{_eps(summary.epsilon_lifetime)}[/]",
        summary.cell,
    )
    if summary.budget is not None:
        remaining = summary.remaining or 0.0
        style = "red" if remaining <= 0 else "green"
        table.add_row("budget", "", "", "", "", _eps(summary.budget))
        table.add_row(f"[{style}]remaining[/]", "", "", "", "", f"[{style}]{_eps(remaining)}[/]")
    return table


def privacy(
    state: Path = typer.Option(
        ..., "--state", help="The site's state directory (state_dir in site.toml)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    budget: float | None = typer.Option(
        None, "--budget", min=0.0, help="The site's ε budget, to show what remains."
    ),
    delta: float = typer.Option(1e-5, "--delta", help="δ at which ε is reported (site's δ)."),
    accountant: str = typer.Option(
        "rdp", "--accountant", help=f"Composition: {' or '.join(ACCOUNTANTS)} (tighter)."
    ),
) -> None:
    """Show the ε this site has spent per run and task, over its lifetime, and what remains."""
    if not state.is_dir():
        raise LedgerError(f"site state dir {state} does not exist (give state_dir of site.toml)")
    if not 0.0 < delta < 1.0:
        raise LedgerError(f"--delta must be in (0, 1), got {delta}")
    summary = PrivacyLedger(state).summary(delta, budget=budget, accountant=accountant)
    if as_json:
        typer.echo(json.dumps(summary.to_dict(), indent=2))
        return
    if not summary.runs:
        console.print(f"no privacy spent yet: {summary.path} has no releases")
        if budget is not None:
            console.print(f"budget ε = {budget:g} (all of it remains)")
        return
    console.print(render_summary(summary))
