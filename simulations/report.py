"""Turning ``results.json`` into what people look at: a table and an accuracy-matrix plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def print_report(results: dict[str, Any], console: Console | None = None) -> None:
    """Accuracy matrix, ACC/BWT/FWT and per-site participation."""
    console = console or Console()
    eval_tasks = results["eval_tasks"]
    table = Table(title=f"Accuracy matrix R[i][j] · {results['scenario']}")
    table.add_column("after task", justify="right")
    for j, name in enumerate(eval_tasks):
        table.add_column(f"T{j}\n{name}", justify="right")
    for i, row in enumerate(results["accuracy_matrix"]):
        table.add_row(
            str(results["tasks"][i]) if len(results["tasks"]) > i else str(i), *map(_fmt, row)
        )
    table.add_row("untrained", *map(_fmt, results.get("baseline_accuracy", [])), style="dim")
    console.print(table)

    summary = Table(title="Summary")
    for col in ("status", "ACC", "BWT", "FWT", "rounds", "s/round", "wall s"):
        summary.add_column(col, justify="right")
    rounds = [r for r in results["rounds"] if r["status"] == "completed"]
    per_round = sum(r["seconds"] for r in rounds) / len(rounds) if rounds else None
    lost = results.get("lost_site_rounds") or {}
    status = results["status"]
    if status == "completed" and lost.get("total"):
        status = f"completed, {lost['total']}/{lost['site_rounds']} site-rounds lost"
    summary.add_row(
        status,
        _fmt(results["avg_accuracy"]),
        _fmt(results["bwt"]),
        _fmt(results["fwt"]),
        str(len(rounds)),
        _fmt(per_round),
        _fmt(results.get("wall_seconds")),
    )
    console.print(summary)
    if results.get("reason") and results["status"] != "completed":
        console.print(f"[red]{results['reason']}[/]")

    sites = Table(title="Sites")
    for col in ("site", "rounds trained", "failed", "refused", "examples", "ACC", "BWT", "ε"):
        sites.add_column(col, justify="right")
    for site, s in results["sites"].items():
        sites.add_row(
            site,
            str(s["rounds_trained"]),
            str(len(s["failed_rounds"])),
            str(len(s["refused_rounds"])),
            str(s["examples"]),
            _fmt(s["avg_accuracy"]),
            _fmt(s["bwt"]),
            _fmt(s.get("epsilon")),
        )
    console.print(sites)
    for site, s in results["sites"].items():
        for err in s["errors"]:
            console.print(f"[red]{site}: {err}[/]")
    for line in closing_lines(results):
        console.print(line)


def closing_lines(results: dict[str, Any]) -> list[str]:
    """The report's last lines: how the accuracy was measured, and the site-rounds lost."""
    lines = []
    evaluation = results.get("evaluation") or {}
    if evaluation.get("mode") == "noised":
        sd = [v for row in evaluation.get("accuracy_noise_sd", []) for v in row if v is not None]
        spread = f", accuracy noise sd {min(sd):.3f}–{max(sd):.3f}" if sd else ""
        lines.append(
            f"evaluation: DP-noised counts (σ = {evaluation['noise_multiplier']:g}, "
            f"sd {evaluation['count_noise_sd']:.3g} per site and count{spread})"
        )
    elif evaluation.get("mode") == "withheld":
        lines.append("evaluation: withheld by the sites (dp.evaluation = 'withheld'): no accuracy")
    lost = results.get("lost_site_rounds") or {}
    if lost.get("total"):
        lines.append(f"[yellow]not a plain success: {results['lost_site_rounds_summary']}[/]")
    return lines


def plot_accuracy_matrix(results: dict[str, Any], path: str | Path) -> Path:
    """Heatmap of R[i][j] with the values written in (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    matrix = np.array(
        [[np.nan if v is None else v for v in row] for row in results["accuracy_matrix"]]
        or [[np.nan]],
        dtype=float,
    )
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * matrix.shape[1], 1.0 + 0.8 * matrix.shape[0]))
    im = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    for (i, j), v in np.ndenumerate(matrix):
        if not np.isnan(v):
            ax.text(
                j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black"
            )
    ax.set_xticks(range(matrix.shape[1]), [f"T{j}" for j in range(matrix.shape[1])])
    ax.set_yticks(range(matrix.shape[0]), [f"after T{i}" for i in range(matrix.shape[0])])
    ax.set_xlabel("evaluated on task")
    acc = results.get("avg_accuracy")
    ax.set_title(
        f"{results['scenario']}  ACC={acc:.3f}" if acc is not None else results["scenario"]
    )
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
