"""Who wants to hear about a run's progress (progress bars, dashboards, tests)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RoundSummary:
    """One finished round, as the coordinator saw it."""

    task_index: int
    round_in_task: int
    server_round: int
    seconds: float
    participants: int
    failures: int
    refusals: int
    accuracy: dict[int, float]


class RunObserver:
    """Subclass and override what you need; every method is a no-op here."""

    def run_started(self, run_id: str, total_rounds: int, done_rounds: int) -> None:
        """Called once, after resuming (``done_rounds`` > 0 on a restarted coordinator)."""

    def round_finished(self, summary: RoundSummary) -> None:
        """Called after a round's training, evaluation and recording."""

    def run_finished(self, run_id: str, status: str, reason: str | None) -> None:
        """Called once at the end, whatever the outcome."""
