"""A run's progress as fedcl records it: one line per finished round, read from the registry.

Task, round, participants, failures and refusals (with each failing site's reason), federation
accuracy per task seen so far, and the largest ε a site has spent in this run. The registry is
polled, so the same view works for a run started elsewhere or by a coordinator that restarted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime

from rich.console import Console

TERMINAL = ("completed", "failed", "stopped")


def _eps(privacy) -> str:
    latest: dict[str, object] = {}
    for p in privacy:
        latest[p.site_id] = p
    if not latest:
        return ""
    worst = max(latest.values(), key=lambda p: p.epsilon_run)
    budget = f" of {worst.budget:g}" if worst.budget else ""
    return f", ε ≤ {worst.epsilon_run:.2f}{budget} ({worst.site_id}, this run)"


def round_line(reg, run, rnd, num_tasks: int, rounds_per_task: int | None) -> str:
    """``task 1/2 round 1/1 train: 3 sites, 0 failed, accuracy [0.81 0.12], ε ≤ 1.2 (4.1 s)``."""
    acc = {
        m.task_index: m.value
        for m in reg.list_metrics(run.id, name="accuracy", site_id=None)
        if m.server_round == rnd.server_round and m.task_index is not None
    }
    shown = " ".join(f"{acc[j]:.2f}" for j in sorted(acc)) if acc else "–"
    per_task = f"/{rounds_per_task}" if rounds_per_task else ""
    line = (
        f"task {rnd.task_index + 1}/{num_tasks} round {rnd.round_in_task + 1}{per_task} "
        f"{rnd.kind}: {rnd.num_participants} sites"
    )
    if rnd.num_failures:
        line += f", [red]{rnd.num_failures} failed[/]"
    if rnd.num_refusals:
        line += f", [yellow]{rnd.num_refusals} refused[/]"
    if rnd.kind == "train":
        line += f", accuracy [{shown}]"
    line += _eps([p for p in reg.list_privacy(run.id) if (p.server_round or 0) <= rnd.server_round])
    line += f" ({rnd.seconds:.1f} s)"
    if rnd.status == "failed":
        line = f"[red]{line} FAILED[/]"
    for p in reg.list_participations(run.id, round_id=rnd.id):
        if p.status in ("failed", "rejected", "refused") and p.detail:
            line += f"\n    {p.site_id} {p.status}: {p.detail}"
    return line


def follow(
    registry_url: str,
    run_id: str,
    console: Console,
    *,
    alive: Callable[[], bool] | None = None,
    since: datetime | None = None,
    poll_s: float = 1.0,
    timeout_s: float | None = None,
) -> tuple[str | None, str | None]:
    """Print rounds as they finish until the run ends; returns (status, reason).

    ``alive`` says whether the ServerApp still runs (Flower's view); when it says no and the
    registry still does not show an end, (None, None) is returned for the caller to record.
    ``since``: an end recorded before then is a previous attempt's (a resumed run), not this one.
    """

    def ended(run) -> bool:
        if run is None or run.status not in TERMINAL:
            return False
        return since is None or run.updated_at >= since

    from fedcl.server.registry import Registry

    printed: set[int] = set()

    def show():
        """Print every round finished since the last look; the run as the registry has it."""
        with Registry.open(registry_url) as reg:
            run = reg.get_run(run_id)
            if run is not None:
                config = run.config or {}
                num_tasks = len(run.tasks) or int(config.get("data", {}).get("num_tasks", 0))
                per_task = config.get("train", {}).get("rounds_per_task")
                for rnd in reg.list_rounds(run_id):
                    if rnd.status != "running" and rnd.id not in printed:
                        printed.add(rnd.id)
                        console.print(round_line(reg, run, rnd, num_tasks, per_task))
        return run

    started = time.monotonic()
    waiting_shown = False
    while True:
        run = show()
        if ended(run):
            return run.status, run.reason
        if run is not None and not printed and not waiting_shown:
            console.print("run started; round 1 waits for the sites ...")
            waiting_shown = True
        if alive is not None and not alive():
            run = show()  # one last look: it may just have ended, its last rounds unprinted
            if ended(run):
                return run.status, run.reason
            return None, None
        if timeout_s is not None and time.monotonic() - started > timeout_s:
            return "running", f"still running after {timeout_s:.0f} s"
        time.sleep(poll_s)
