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
    def matrix_evaluations(self) -> int:
        """Evaluations the accuracy matrix reads at a site: the untrained baseline and each
        task's last training round (the only ones a noised evaluation is released at)."""
        last = self.rounds_per_task - 1
        ends = sum(s.kind == RoundKind.TRAIN and s.round_in_task == last for s in self.schedule)
        return 1 + ends

    @cached_property
    def evaluation_noise_multiplier(self) -> float:
        """σ of each noised evaluation: ``dp.evaluation_noise_multiplier``, else chosen here.

        Unset, it depends on what else the test data's records are charged with, which the
        method table knows and ``config`` cannot: where the run can be accounted in data cells
        (``dp.composition = "parallel"``, a cell-disjoint method, not joint), the test data is a
        cell of its own and the evaluations may spend :data:`TEST_CELL_SHARE` of ``dp.epsilon``
        by themselves (σ ≈ 1.7 at ε = 8 for 6 evaluations); otherwise they compose with the
        training and get :func:`sequential_evaluation_noise`. A site whose own policy or data
        rules out cells still accounts them correctly, with the training's σ planned around
        them. The coordinator writes the value into the experiment it sends and records
        (:func:`resolve_evaluation_noise`), so both ends and results.json state the same σ.
        """
        from fedcl.privacy.dp.counts import (
            TEST_CELL_SHARE,
            evaluation_noise_for_budget,
            sequential_evaluation_noise,
        )

        dp = self.experiment.dp
        if dp.evaluation_noise_multiplier is not None:
            return float(dp.evaluation_noise_multiplier)
        if dp.epsilon is None or not self.cells_possible:
            return sequential_evaluation_noise(dp.epsilon)
        share = TEST_CELL_SHARE * float(dp.epsilon)
        return evaluation_noise_for_budget(share, dp.delta, self.matrix_evaluations)

    @property
    def cells_possible(self) -> bool:
        """Whether the experiment allows accounting a site's data in cells (each site still
        checks its own policy and data: ``fedcl.client.privacy_cells.composition``)."""
        return self.cells_ruled_out is None

    @property
    def cells_ruled_out(self) -> str | None:
        """Why the experiment itself rules out data cells (None: it does not): the experiment's
        part of the rule, which the site's own part (``privacy_cells.composition``) starts with."""
        from .methods import get_method

        exp = self.experiment
        if exp.dp.composition != "parallel":
            return 'dp.composition = "sequential"'
        method = get_method(exp.continual.method)
        if not method.cell_disjoint:
            return (
                f"continual.method = {method.name!r} trains later tasks on earlier tasks' records"
            )
        if exp.is_joint:
            return "joint training reads every task's records at once"
        return None

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


def resolve_evaluation_noise(experiment: ExperimentConfig) -> ExperimentConfig:
    """``experiment`` with ``dp.evaluation_noise_multiplier`` stated where DP is on and it was
    left unset (:attr:`RunPlan.evaluation_noise_multiplier`); otherwise unchanged."""
    dp = experiment.dp
    if not dp.enabled or dp.evaluation_noise_multiplier is not None:
        return experiment
    sigma = RunPlan.of(experiment).evaluation_noise_multiplier
    return experiment.model_copy(
        update={"dp": dp.model_copy(update={"evaluation_noise_multiplier": sigma})}
    )
