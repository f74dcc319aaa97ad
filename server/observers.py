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
    #: Federation accuracy per task of the model of server round ``evaluated_round``.
    accuracy: dict[int, float]
    #: Whose model ``accuracy`` is: this round's (``evaluation.mode = "separate"``), or the
    #: model this round started from, evaluated in its train message (``"with_train"``; 0:
    #: the untrained model); None when nothing was evaluated.
    evaluated_round: int | None = None


class RunObserver:
    """Subclass and override what you need; every method is a no-op here."""

    def run_started(self, run_id: str, total_rounds: int, done_rounds: int) -> None:
        """Called once, after resuming (``done_rounds`` > 0 on a restarted coordinator)."""

    def round_finished(self, summary: RoundSummary) -> None:
        """Called after a round's training, evaluation and recording (docs/DESIGN.md §3)."""

    def run_finished(self, run_id: str, status: str, reason: str | None) -> None:
        """Called once at the end, whatever the outcome."""
