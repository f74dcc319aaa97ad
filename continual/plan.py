"""What a run *is*, computed in one place for the coordinator and every site.

The round schedule (which server round trains which task, and where a task is consolidated),
the model every run starts from and the number of training rounds a site will be asked for are
facts about the experiment, not about either side. Both sides build a :class:`RunPlan` from the
same validated experiment, so a site's DP noise plan counts exactly the rounds the coordinator
will run, and the model a site rebuilds is the one the coordinator initialised.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from fedcl.config import ExperimentConfig
from fedcl.config.vocabulary import RoundKind
from fedcl.datasets.info import DatasetInfo, dataset_info

from .streams import Stream
from .tasks import experiment_stream

if TYPE_CHECKING:
    from torch import nn


@dataclass(frozen=True)
class PlannedRound:
    """One server round of the schedule (server rounds count from 1)."""

    server_round: int
    task_index: int
    round_in_task: int
    kind: RoundKind


@dataclass(frozen=True)
class RunPlan:
    """The schedule and the model of one experiment, identical at the coordinator and the sites."""

    experiment: ExperimentConfig
    info: DatasetInfo
    stream: Stream

    @classmethod
    def of(cls, experiment: ExperimentConfig) -> RunPlan:
        info = dataset_info(experiment.data, experiment.seed)
        return cls(experiment, info, experiment_stream(experiment, info))

    @property
    def rounds_per_task(self) -> int:
        """Training rounds of each task (the joint reference gets the whole sequence's total)."""
        rounds = self.experiment.train.rounds_per_task
        if self.experiment.is_joint:
            rounds *= len(self.stream.evaluation_tasks)
        return rounds

    @property
    def consolidates(self) -> bool:
        """Whether every task but the last ends with a consolidation round (EWC's Fisher)."""
        from .methods import get_method

        method = get_method(self.experiment.continual.method)
        return method.consolidates and not self.experiment.is_joint

    @property
    def watch_rounds(self) -> int:
        """Monitoring rounds before each task after the first (0: tasks follow each other).

        With ``drift.action = "new-task"`` the next task opens on drift: the coordinator runs
        up to this many monitoring rounds after a task, and skips the rest once one triggers.
        """
        drift = self.experiment.drift
        if not drift.enabled or drift.action != "new-task" or self.experiment.is_joint:
            return 0
        return drift.trigger.watch_rounds

    @cached_property
    def schedule(self) -> list[PlannedRound]:
        """Every server round in order: a task's training rounds, its consolidation, watching."""
        plan: list[tuple[int, int, RoundKind]] = []
        last = self.stream.num_tasks - 1
        for t in range(self.stream.num_tasks):
            plan += [(t, r, RoundKind.TRAIN) for r in range(self.rounds_per_task)]
            after = self.rounds_per_task
            if self.consolidates and t < last:
                plan.append((t, after, RoundKind.CONSOLIDATE))
                after += 1
            if t < last:
                plan += [(t, after + w, RoundKind.MONITOR) for w in range(self.watch_rounds)]
        return [PlannedRound(i + 1, t, r, kind) for i, (t, r, kind) in enumerate(plan)]

    def count(self, kind: RoundKind) -> int:
        """How many rounds of ``kind`` the whole run has."""
        return sum(step.kind == kind for step in self.schedule)

    def build_model(self) -> nn.Module:
        """A fresh model of the experiment's architecture (weights: the caller's RNG)."""
        from fedcl.models import build_model

        return build_model(
            self.experiment.model.name,
            in_channels=self.info.channels,
            image_size=self.info.image_size,
            num_classes=self.stream.num_outputs,
            class_names=self.info.class_names,  # a dual encoder's prompts (§11)
            held_out=self.info.held_out,
            **self.experiment.model.options,
        )

    def initial_model(self) -> nn.Module:
        """The seeded starting model every run of this experiment begins from."""
        import torch

        torch.manual_seed(self.experiment.seed)
        return self.build_model()
