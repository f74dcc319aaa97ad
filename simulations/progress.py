"""A rich progress bar fed by the coordinator's observer hooks."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedcl.server.observers import RoundSummary, RunObserver


class ProgressObserver(RunObserver):
    """Shows task / round while a federation runs."""

    def __init__(self, console: Console | None = None, num_tasks: int = 1):
        self.num_tasks = num_tasks
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            console=console,
            transient=False,
        )
        self._bar = None

    def run_started(self, run_id: str, total_rounds: int, done_rounds: int) -> None:
        self.progress.start()
        self._bar = self.progress.add_task(
            f"run {run_id}", total=total_rounds, completed=done_rounds, status="starting sites…"
        )

    def round_finished(self, s: RoundSummary) -> None:
        seen = [v for k, v in sorted(s.accuracy.items()) if k <= s.task_index]
        acc = sum(seen) / len(seen) if seen else float("nan")
        status = (
            f"task {s.task_index + 1}/{self.num_tasks} round {s.round_in_task + 1} · "
            f"{s.participants} sites · acc(seen) {acc:.3f}"
        )
        if s.failures or s.refusals:
            status += f" · [red]{s.failures} failed {s.refusals} refused[/]"
        self.progress.update(self._bar, advance=1, status=status)

    def run_finished(self, run_id: str, status: str, reason: str | None) -> None:
        if self._bar is not None:
            self.progress.update(self._bar, status=status if not reason else f"{status}: {reason}")
        self.progress.stop()
