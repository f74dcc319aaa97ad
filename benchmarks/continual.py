"""Learning quality of every continual method on the built-in scenarios, with and without DP.

    python benchmarks/continual.py [--quick] [--scenarios a,b] [--methods a,b] [--no-dp | --dp-only]
        [--no-he] [--epsilon 8] [--seeds 0,1,2] [--engine inprocess|ray] [--set KEY=VALUE ...]
        [--out FILE] [--resume] [--keep] [--verbose]
    python benchmarks/continual.py --table REPORT.json [REPORT.json ...]   # one markdown table

For each built-in scenario (``digits-class-il``, ``digits-domain-il``, ``digits-task-il``,
``defects-domain-il``; 5 non-IID sites, their default) every ``continual.method`` runs (naive,
ewc, replay, ewc+replay, lwf, si, and joint, all tasks at once, the upper reference; each
method with its default ``continual.options``) once without DP and once with DP-SGD at a
target ``dp.epsilon`` (8 unless ``--epsilon``), each with CKKS-encrypted
aggregation on (``--no-he`` turns it off). Every configuration is a whole federation run through
:func:`fedcl.simulations.runner.run_plan` (the same ServerApp and ClientApp as deployments; the
in-process engine by default: no Ray, deterministic), in a fresh output folder.

One rich table: scenario, method, DP target, ACC, BWT, FWT (mean ± std over seeds when several),
max ε over sites (what the sites' ledgers report), federation wall seconds, and the status: runs
that did not complete are shown with their reason, site rounds that failed or were refused are
counted. Written next to each other: JSON (``benchmarks/results/continual.json``: one row per
configuration with its per-seed runs, the overrides used, machine info, timestamp) and a grid of
accuracy-matrix heatmaps (``continual.png``: one row per scenario and DP setting, one column per
method). The JSON is rewritten after every run, so a benchmark that is stopped keeps what it
measured; ``--resume`` then reuses those runs (same configuration and overrides) and runs the rest.

``--quick`` trains 2 rounds per task (``defects-domain-il``: 2 rounds of 1 local epoch, not 4 of
3). Seeds (``--seeds``) set both ``seed`` and ``data.partition.seed``, and every run sets
``simulation.research_seeds``: the sites' DP noise, sampling and replay keys follow the seed, so
each configuration reruns bit-identically (a benchmark, not a deployment).
Heavy imports live inside functions: the CKKS worker processes re-import this script.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "continual.json"
SCENARIOS = ("digits-class-il", "digits-domain-il", "digits-task-il", "defects-domain-il")
METHODS = ("naive", "ewc", "replay", "ewc+replay", "lwf", "si", "joint")
DEFAULT_EPSILON = 8.0
REASON_CHARS = 70


@dataclass(frozen=True)
class Config:
    """One federation to run: a scenario, a continual method, DP on or off, a seed."""

    scenario: str
    method: str
    dp: bool
    seed: int

    @property
    def slug(self) -> str:
        method = self.method.replace("+", "-")
        return f"{Path(self.scenario).stem}-{method}-{'dp' if self.dp else 'nodp'}-s{self.seed}"

    @property
    def key(self) -> tuple[str, str, bool]:
        return (self.scenario, self.method, self.dp)


def quick_overrides(scenario: str) -> list[str]:
    """``--quick``: 2 rounds per task (the defects CNN also trains one local epoch, not 3)."""
    if Path(scenario).stem.startswith("defects"):
        return ["train.rounds_per_task=2", "train.local_epochs=1"]
    return ["train.rounds_per_task=2"]


def overrides_for(config: Config, args: argparse.Namespace) -> list[str]:
    """The ``--set`` overrides that turn a scenario into ``config``."""
    out = [f'continual.method="{config.method}"']
    if config.dp:
        out += ["dp.enabled=true", f"dp.epsilon={args.epsilon:g}"]
    else:
        out += ["dp.enabled=false"]
    out += ["he.enabled=true" if args.he else "he.enabled=false"]
    out += [f"seed={config.seed}", f"data.partition.seed={config.seed}"]
    # Each virtual site seeds its DP noise, sampling and replay key from the experiment seed:
    # a configuration reruns bit-identically, DP rows included (privacy/dp/seeding.py).
    out += ["simulation.research_seeds=true"]
    if args.quick:
        out += quick_overrides(config.scenario)
    return out + list(args.set)


def _max_or_none(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def run_one(config: Config, overrides: list[str], out_dir: Path, engine: str) -> dict[str, Any]:
    """Run one federation; anything it raises becomes a row with status ``error``."""
    from fedcl.simulations.catalog import load_scenario
    from fedcl.simulations.runner import SimulationPlan, run_plan

    record: dict[str, Any] = {
        "scenario": config.scenario,
        "method": config.method,
        "dp": config.dp,
        "seed": config.seed,
        "overrides": overrides,
    }
    start = time.perf_counter()
    try:
        label, experiment = load_scenario(config.scenario, overrides)
        results = run_plan(SimulationPlan(experiment, label, out_dir, config.slug, engine=engine))
    except Exception as exc:  # a broken configuration is a row, not the end of the benchmark
        record.update(
            status="error",
            reason=f"{type(exc).__name__}: {exc}",
            traceback=traceback.format_exc(),
            total_seconds=time.perf_counter() - start,
        )
        return record
    sites = results.get("sites", {})
    record.update(
        status=results["status"],
        reason=results.get("reason"),
        avg_accuracy=results.get("avg_accuracy"),
        bwt=results.get("bwt"),
        fwt=results.get("fwt"),
        accuracy_matrix=results.get("accuracy_matrix"),
        baseline_accuracy=results.get("baseline_accuracy"),
        tasks=results.get("tasks"),
        eval_tasks=results.get("eval_tasks"),
        epsilon_max=_max_or_none([s.get("epsilon") for s in sites.values()]),
        epsilon_by_site={k: s.get("epsilon") for k, s in sites.items()},
        failed_site_rounds=sum(len(s["failed_rounds"]) for s in sites.values()),
        refused_site_rounds=sum(len(s["refused_rounds"]) for s in sites.values()),
        site_errors=sorted(
            {f"site {k}: {_strip_site(e)}" for k, s in sites.items() for e in s.get("errors", [])}
        ),
        rounds=sum(r["status"] == "completed" for r in results.get("rounds", [])),
        wall_seconds=results.get("wall_seconds"),
        total_seconds=time.perf_counter() - start,
    )
    return record


def _stats(values: list[float | None]) -> dict[str, Any]:
    import numpy as np

    present = [float(v) for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None, "n": 0}
    return {
        "mean": float(np.mean(present)),
        "std": float(np.std(present)) if len(present) > 1 else None,
        "n": len(present),
    }


def _mean_matrix(matrices: list[list[list[float | None]]]) -> list[list[float | None]]:
    """Element-wise mean over seeds (``None`` where no seed has a value)."""
    import numpy as np

    matrices = [m for m in matrices if m]
    if not matrices:
        return []
    rows = max(len(m) for m in matrices)
    cols = max((len(r) for m in matrices for r in m), default=0)
    stack = np.full((len(matrices), rows, cols), np.nan)
    for k, m in enumerate(matrices):
        for i, row in enumerate(m):
            for j, v in enumerate(row):
                if v is not None:
                    stack[k, i, j] = v
    out = []
    for i in range(rows):
        row = []
        for j in range(cols):
            col = stack[:, i, j]
            row.append(None if np.isnan(col).all() else float(np.nanmean(col)))
        out.append(row)
    return out


def aggregate(runs: list[dict[str, Any]], epsilon: float) -> dict[str, Any]:
    """One table row from the runs of one configuration over seeds."""
    ok = [r for r in runs if r["status"] == "completed"]
    use = ok or runs
    first = runs[0]
    not_ok = [r for r in runs if r["status"] != "completed"]
    return {
        "scenario": first["scenario"],
        "method": first["method"],
        "dp": first["dp"],
        "epsilon_target": epsilon if first["dp"] else None,
        "seeds": [r["seed"] for r in runs],
        "completed": len(ok),
        "status": "completed" if not not_ok else not_ok[0]["status"],
        "reason": not_ok[0].get("reason") if not_ok else None,
        "avg_accuracy": _stats([r.get("avg_accuracy") for r in use]),
        "bwt": _stats([r.get("bwt") for r in use]),
        "fwt": _stats([r.get("fwt") for r in use]),
        "epsilon_max": _max_or_none([r.get("epsilon_max") for r in runs]),
        "wall_seconds": _stats([r.get("wall_seconds") for r in runs]),
        "failed_site_rounds": sum(r.get("failed_site_rounds", 0) for r in runs),
        "refused_site_rounds": sum(r.get("refused_site_rounds", 0) for r in runs),
        "site_errors": sorted({e for r in runs for e in r.get("site_errors", [])}),
        "accuracy_matrix": _mean_matrix([r.get("accuracy_matrix") or [] for r in use]),
        "eval_tasks": next((r.get("eval_tasks") for r in use if r.get("eval_tasks")), None),
        "runs": runs,
    }


def _fmt_stat(s: dict[str, Any], spec: str = "+.3f") -> str:
    """``mean`` or ``mean ± std`` (std only over several seeds)."""
    if s["mean"] is None:
        return "–"
    text = format(s["mean"], spec)
    if s.get("std") is not None:
        text += f" ± {s['std']:{spec.lstrip('+')}}"
    return text


def _status_cell(row: dict[str, Any]) -> str:
    from rich.markup import escape

    notes = []
    if row["failed_site_rounds"]:
        notes.append(f"{row['failed_site_rounds']} site-rounds failed")
    if row["refused_site_rounds"]:
        notes.append(f"{row['refused_site_rounds']} refused")
    if row["status"] == "completed":
        return "ok" + (f" [yellow]({', '.join(notes)})[/]" if notes else "")
    reason = row.get("reason") or ""
    if len(reason) > REASON_CHARS:
        reason = reason[: REASON_CHARS - 1] + "…"
    runs = len(row["runs"])
    done = f"{row['completed']}/{runs} ok, " if runs > 1 else ""
    return f"[red]{done}{row['status']}: {escape(reason)}[/]"


def render(rows: list[dict[str, Any]], title: str) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=title)
    for col in ("scenario", "method", "DP ε", "ACC", "BWT", "FWT", "max ε", "wall s", "status"):
        table.add_column(
            col, justify="left" if col in ("scenario", "method", "status") else "right"
        )
    previous = None
    for row in rows:
        if previous is not None and row["scenario"] != previous:
            table.add_section()
        previous = row["scenario"]
        eps = row["epsilon_max"]
        table.add_row(
            row["scenario"],
            row["method"],
            f"{row['epsilon_target']:g}" if row["dp"] else "–",
            _fmt_stat(row["avg_accuracy"], ".3f"),
            _fmt_stat(row["bwt"]),
            _fmt_stat(row["fwt"]),
            "–" if eps is None else f"{eps:.2f}",
            _fmt_stat(row["wall_seconds"], ".1f"),
            _status_cell(row),
            # A run that stopped early: its metrics are of the partial accuracy matrix.
            style=None if row["status"] == "completed" else "dim",
        )
    console = Console(width=max(Console().width, 150))
    console.print(table)
    # One line per distinct error, then where it happened (a failed site round is skipped: the
    # run goes on with the other sites).
    where: dict[str, list[str]] = {}
    for row in rows:
        dp = f"DP ε={row['epsilon_target']:g}" if row["dp"] else "no DP"
        for err, sites in _site_errors(row["site_errors"]).items():
            where.setdefault(err, []).append(
                f"{row['scenario']} · {row['method']} · {dp} ({', '.join(sites)})"
            )
    if where:
        console.print("[bold]Site errors[/] (those site rounds were left out of the aggregate):")
    for err, places in where.items():
        console.print(f"  [red]•[/] {escape(err)}", highlight=False)
        console.print(f"    [dim]{escape('; '.join(places))}[/]", highlight=False)


def _strip_site(err: str) -> str:
    return re.sub(r"^site \S+: ", "", err)


def _site_errors(errors: list[str]) -> dict[str, list[str]]:
    """``site <id>: <message>`` strings folded: message -> the sites that hit it."""
    out: dict[str, list[str]] = {}
    for err in errors:
        match = re.match(r"site (\S+): (.*)", err, re.S)
        site, text = (match.group(1), match.group(2)) if match else ("site ?", err)
        out.setdefault(text, [])
        if site not in out[text]:
            out[text].append(site)
    return out


def plot(rows: list[dict[str, Any]], methods: list[str], path: Path, title: str) -> Path:
    """A grid of accuracy-matrix heatmaps: one row per (scenario, DP), one column per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    groups: dict[tuple[str, bool], dict[str, dict]] = {}
    for row in rows:
        groups.setdefault((row["scenario"], row["dp"]), {})[row["method"]] = row
    n_rows, n_cols = max(len(groups), 1), max(len(methods), 1)
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(2.9 * n_cols + 1.2, 2.8 * n_rows + 0.8), squeeze=False
    )
    im = None
    for r, ((scenario, dp), by_method) in enumerate(groups.items()):
        for c, method in enumerate(methods):
            ax = axes[r][c]
            row = by_method.get(method)
            if row is None or not row["accuracy_matrix"]:
                ax.set_axis_off()
                if row is not None:
                    ax.text(0.5, 0.5, f"{method}\n{row['status']}", ha="center", va="center")
                continue
            m = np.array(
                [[np.nan if v is None else v for v in line] for line in row["accuracy_matrix"]],
                dtype=float,
            )
            im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            size = 7 if m.shape[1] <= 5 else 5
            for (i, j), v in np.ndenumerate(m):
                if not np.isnan(v):
                    color = "white" if v < 0.6 else "black"
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=size, color=color)
            ax.set_xticks(range(m.shape[1]), [f"T{j}" for j in range(m.shape[1])], fontsize=7)
            ylabels = ["all" if method == "joint" else f"T{i}" for i in range(m.shape[0])]
            ax.set_yticks(range(m.shape[0]), ylabels, fontsize=7)
            # Joint trains once: its single row sits on top, at the height of the others' rows.
            ax.set_ylim(max(m.shape[0], m.shape[1]) - 0.5, -0.5)
            acc = row["avg_accuracy"]["mean"]
            head = f"{method}  ACC {acc:.2f}" if acc is not None else method
            if row["status"] != "completed":
                head += f"  [{row['status']}]"
            ax.set_title(head, fontsize=9, color="black" if row["status"] == "completed" else "red")
            if c == 0:
                dp_text = f"DP ε={row['epsilon_target']:g}" if dp else "no DP"
                ax.set_ylabel(f"{scenario}\n{dp_text}\ntrained up to", fontsize=8)
    fig.suptitle(
        f"{title}\nR[i][j]: accuracy on task j (columns) after training task i (rows)",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0, 0.9, 1 - 0.5 / fig.get_figheight()))
    if im is not None:
        cax = fig.add_axes((0.915, 0.15, 0.015, 0.7))
        fig.colorbar(im, cax=cax)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# The four settings of the grid, in the order of a table's columns: (DP, HE).
SETTINGS = ((False, False), (False, True), (True, False), (True, True))


def _setting_label(dp: bool, he: bool, epsilon: str) -> str:
    return f"{f'DP ε={epsilon}' if dp else 'no DP'}, HE {'on' if he else 'off'}"


def markdown_table(reports: list[dict[str, Any]]) -> str:
    """One markdown table from the JSON reports of several runs of this script (``--table``).

    Each report holds one HE setting (``--no-he`` or not) and one or both DP settings; the table
    puts the four (DP, HE) settings side by side per scenario and method, so a README's table
    is generated from the committed JSON rather than copied by hand. ``HE on − off`` is the
    difference of the mean ACC in points; lost site-rounds are failed plus refused, over seeds.
    """
    cells: dict[tuple[str, str], dict[tuple[bool, bool], dict[str, Any]]] = {}
    epsilon: set[float] = set()
    for report in reports:
        for row in report["rows"]:
            key = (row["scenario"], row["method"])
            cells.setdefault(key, {})[(row["dp"], bool(report["he"]))] = row
            if row["dp"] and row.get("epsilon_target") is not None:
                epsilon.add(row["epsilon_target"])
    present = [s for s in SETTINGS if any(s in by for by in cells.values())]
    eps = "/".join(f"{e:g}" for e in sorted(epsilon)) or "–"
    header = ["scenario", "method"]
    for dp, he in present:
        header += [f"{_setting_label(dp, he, eps)}: ACC", "BWT"]
    pairs = [dp for dp in (False, True) if (dp, False) in present and (dp, True) in present]
    header += [f"HE on − off, {'DP' if dp else 'no DP'} (pts)" for dp in pairs]
    dp_present = any(dp for dp, _ in present)
    if dp_present:
        header += ["max ε", "lost site-rounds (DP)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (scenario, method), by in cells.items():
        line = [scenario, method]
        for setting in present:
            row = by.get(setting)
            if row is None:
                line += ["–", "–"]
                continue
            acc = _fmt_stat(row["avg_accuracy"], ".3f")
            if row["status"] != "completed":
                acc += f" ({row['completed']}/{len(row['runs'])} ok)"
            line += [acc, _fmt_stat(row["bwt"])]
        for dp in pairs:
            on, off = by.get((dp, True)), by.get((dp, False))
            means = [r["avg_accuracy"]["mean"] if r else None for r in (on, off)]
            line.append("–" if None in means else f"{100 * (means[0] - means[1]):+.1f}")
        if dp_present:
            dp_rows = [by[s] for s in present if s[0] and s in by]
            eps_max = _max_or_none([r["epsilon_max"] for r in dp_rows])
            line.append("–" if eps_max is None else f"{eps_max:.2f}")
            lost = sum(r["failed_site_rounds"] + r["refused_site_rounds"] for r in dp_rows)
            line.append(str(lost))
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines) + "\n"


def machine_info() -> dict[str, Any]:
    from importlib import metadata

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = None
    git = {}
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if head.returncode == 0:
            git = {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpus_available": affinity,
        "load_average_start": load,
        "torch_threads": 1,
        "packages": {
            p: version(p) for p in ("torch", "flwr", "opacus", "tenseal", "numpy", "fedcl")
        },
        "git": git,
    }


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", type=_csv, default=list(SCENARIOS), help="comma list")
    parser.add_argument("--methods", type=_csv, default=list(METHODS), help="comma list")
    dp = parser.add_mutually_exclusive_group()
    dp.add_argument("--no-dp", action="store_true", help="only the runs without DP")
    dp.add_argument("--dp-only", action="store_true", help="only the runs with DP")
    parser.add_argument("--epsilon", type=float, default=DEFAULT_EPSILON, help="DP target ε")
    parser.add_argument("--no-he", dest="he", action="store_false", help="plaintext aggregation")
    parser.add_argument(
        "--seeds", type=lambda s: [int(x) for x in _csv(s)], default=[0], help="e.g. 0,1,2"
    )
    parser.add_argument(
        "--quick", action="store_true", help="2 rounds per task (defects: 1 round, 1 epoch)"
    )
    parser.add_argument("--engine", choices=("inprocess", "ray"), default="inprocess")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra override for every run (TOML value), repeatable",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON; the plot is .png next")
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep every run's folder under <out dir>/<out stem>-runs/ instead of a temp dir",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="reuse the runs already in --out whose configuration and overrides match",
    )
    parser.add_argument("--verbose", action="store_true", help="show fedcl's logs and warnings")
    parser.add_argument(
        "--table",
        nargs="+",
        type=Path,
        metavar="JSON",
        help="print one markdown table from earlier reports (one per HE setting) and exit",
    )
    args = parser.parse_args(argv)

    from fedcl.simulations.catalog import builtin_scenarios

    known = builtin_scenarios()
    for name in args.scenarios:
        if name not in known and not Path(name).is_file():
            parser.error(f"unknown scenario {name!r}: one of {', '.join(known)} or a TOML path")
    for name in args.methods:
        if name not in METHODS:
            parser.error(f"unknown method {name!r}: one of {', '.join(METHODS)}")
    if not args.seeds:
        parser.error("--seeds needs at least one seed")
    return args


def _quiet(verbose: bool) -> None:
    import logging
    import warnings

    if verbose:
        return
    # Failures land in results.json (status, reason, site errors) and so in the table; the
    # per-round log lines would only scroll the progress bar away.
    for name in ("fedcl", "opacus", "flwr"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table:
        print(markdown_table([json.loads(p.read_text()) for p in args.table]), end="")
        return 0

    import torch

    torch.set_num_threads(1)
    _quiet(args.verbose)

    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    dp_settings = [False] if args.no_dp else [True] if args.dp_only else [False, True]
    configs = [
        Config(s, m, dp, seed)
        for s in args.scenarios
        for m in args.methods
        for dp in dp_settings
        for seed in args.seeds
    ]
    machine = machine_info()
    console = Console()
    he = "HE on" if args.he else "HE off"
    seeds = f"seed {args.seeds[0]}" if len(args.seeds) == 1 else f"{len(args.seeds)} seeds"
    title = f"Continual methods · 5-site scenarios · {he} · {seeds}" + (
        " · quick" if args.quick else ""
    )
    previous = _previous_runs(args.out) if args.resume else {}
    runs_root = args.out.parent / f"{args.out.stem}-runs"
    tmp = None if args.keep else tempfile.TemporaryDirectory(prefix="fedcl-continual-")
    base = runs_root if args.keep else Path(tmp.name)
    start = time.perf_counter()
    runs: list[dict[str, Any]] = []
    try:
        with Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
        ) as progress:
            bar = progress.add_task("configurations", total=len(configs))
            for config in configs:
                progress.update(bar, description=config.slug)
                overrides = overrides_for(config, args)
                record = previous.get((config.slug, tuple(overrides)))
                if record is not None:
                    record = {**record, "resumed": True}
                else:
                    out_dir = base / config.slug
                    if args.keep and out_dir.exists():
                        shutil.rmtree(out_dir)  # a stale registry would hold an older run
                    record = run_one(config, overrides, out_dir, args.engine)
                    if args.keep:
                        record["out_dir"] = str(out_dir)
                runs.append(record)
                acc = record.get("avg_accuracy")
                eps = record.get("epsilon_max")
                progress.console.print(
                    f"{config.slug}: {record['status']}"
                    + (f" ACC {acc:.3f}" if acc is not None else "")
                    + (f" ε {eps:.2f}" if eps is not None else "")
                    + f" ({record['total_seconds']:.1f} s)"
                    + (" (from the previous JSON)" if record.get("resumed") else ""),
                    highlight=False,
                )
                # Saved after every run: a killed benchmark keeps what it measured (--resume).
                save(args, argv, machine, runs, time.perf_counter() - start, complete=False)
                progress.advance(bar)
    finally:
        if tmp is not None:
            tmp.cleanup()
        if "fedcl.privacy.ckks.parallel" in sys.modules:
            from fedcl.privacy.ckks import parallel

            parallel.shutdown()
    total = time.perf_counter() - start
    report = save(args, argv, machine, runs, total, complete=True)
    render(report["rows"], title)
    console.print(f"{len(runs)} runs in {total:.0f} s", highlight=False)
    png = plot(report["rows"], args.methods, args.out.with_suffix(".png"), title)
    console.print(f"wrote {args.out} and {png}", highlight=False)
    return 0


def _previous_runs(path: Path) -> dict[tuple[str, tuple[str, ...]], dict[str, Any]]:
    """(slug, overrides) -> run record from an earlier JSON at ``path`` (``--resume``)."""
    if not path.exists():
        return {}
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    out = {}
    for row in report.get("rows", []):
        for run in row.get("runs", []):
            config = Config(run["scenario"], run["method"], run["dp"], run["seed"])
            out[(config.slug, tuple(run["overrides"]))] = run
    return out


def save(
    args: argparse.Namespace,
    argv: list[str] | None,
    machine: dict[str, Any],
    runs: list[dict[str, Any]],
    total: float,
    *,
    complete: bool,
) -> dict[str, Any]:
    """Write the JSON report (rows aggregated over seeds) and return it."""
    grouped: dict[tuple[str, str, bool], list[dict[str, Any]]] = {}
    for record in runs:
        key = (record["scenario"], record["method"], record["dp"])
        grouped.setdefault(key, []).append(record)
    rows = [aggregate(group, args.epsilon) for group in grouped.values()]
    machine = dict(machine)
    with contextlib.suppress(OSError):
        machine["load_average_end"] = list(os.getloadavg())
    report = {
        "benchmark": "continual",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "complete": complete,
        "command": [Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)],
        "quick": args.quick,
        "engine": args.engine,
        "he": args.he,
        "dp_epsilon": args.epsilon,
        "seeds": args.seeds,
        "scenarios": args.scenarios,
        "methods": args.methods,
        "overrides": {
            "method": 'continual.method="<method>"',
            "dp": ["dp.enabled=true", f"dp.epsilon={args.epsilon:g}"],
            "no_dp": ["dp.enabled=false"],
            "he": ["he.enabled=true" if args.he else "he.enabled=false"],
            "seed": ["seed=<seed>", "data.partition.seed=<seed>"],
            "quick": {s: quick_overrides(s) for s in args.scenarios} if args.quick else None,
            "extra": list(args.set),
        },
        "machine": machine,
        "total_seconds": total,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(args.out)
    return report


if __name__ == "__main__":
    raise SystemExit(main())
