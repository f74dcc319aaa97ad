"""What a site's evaluation tells the coordinator, and what that costs (docs/DESIGN.md §9).

Without DP a site sends every task's exact (correct, count, summed loss), as it always has. With
DP on, ``dp.evaluation`` decides:

* ``"noised"`` (the default): the per-task (correct, count) with Gaussian noise
  (:mod:`fedcl.privacy.dp.counts`), charged to the site's ledger *before* the site evaluates,
  and only at the evaluations the accuracy matrix reads (the untrained baseline and the last
  round of each task); every other round's evaluation is withheld, so a run pays for
  ``1 + tasks`` releases, which the site's σ plan for ``dp.epsilon`` already counts
  (:func:`planned_releases`). No loss leaves the site.
* ``"withheld"``: nothing about the data leaves (the reply says only that the site is there).
* ``"clear"``: the exact counts and losses, unaccounted; a site whose policy requires DP
  refuses to send them (``fedcl.client.privacy_site.admit``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from fedcl.config import ExperimentConfig
from fedcl.config import protocol as P
from fedcl.continual.plan import RunPlan
from fedcl.privacy.dp.counts import evaluation_release, noised_counts
from fedcl.privacy.ledger import DPRelease

from .job import SiteJob

Mode = Literal["clear", "noised", "withheld"]


def evaluation_mode(experiment: ExperimentConfig) -> Mode:
    """The run's evaluation setting: ``clear`` without DP, else ``dp.evaluation``."""
    return experiment.dp.evaluation_mode  # type: ignore[return-value]


def feeds_matrix(plan: RunPlan, server_round: int, round_in_task: int) -> bool:
    """Whether the evaluation after this round is one the accuracy matrix reads.

    The baseline (server round 0: the untrained model, for forward transfer) and each task's
    last training round (R[i][j] is the accuracy after task i).
    """
    return server_round == 0 or round_in_task == plan.rounds_per_task - 1


def mode_at(job: SiteJob, evaluated_round: int | None = None) -> Mode:
    """What an evaluation sends: a noised evaluation off the matrix is withheld.

    ``evaluated_round`` is the server round whose output model is evaluated: this message's
    round for an evaluate message, the previous round's when a train message evaluates the
    model it carries before training on it (``evaluation.mode = "with_train"``).
    """
    mode = evaluation_mode(job.experiment)
    if evaluated_round is None:
        server_round, round_in_task = job.server_round, job.round_in_task
    else:
        server_round, round_in_task = evaluated_round, _round_in_task(job.plan, evaluated_round)
    if mode == "noised" and not feeds_matrix(job.plan, server_round, round_in_task):
        return "withheld"
    return mode


def _round_in_task(plan: RunPlan, server_round: int) -> int:
    if server_round == 0:
        return 0  # the untrained model: the baseline
    for step in plan.schedule:
        if step.server_round == server_round:
            return step.round_in_task
    raise ValueError(f"server round {server_round} is not in this run's schedule")


def release(job: SiteJob, delta: float) -> DPRelease:
    """What this message's noised evaluation spends (charged before the site evaluates)."""
    return evaluation_release(job.plan.evaluation_noise_multiplier, delta)


def planned_releases(experiment: ExperimentConfig, plan: RunPlan) -> list[tuple[float, float, int]]:
    """``(σ, 1, 1)`` for each noised evaluation the run will ask of a site (none otherwise)."""
    if evaluation_mode(experiment) != "noised":
        return []
    return [(plan.evaluation_noise_multiplier, 1.0, 1)] * plan.matrix_evaluations


def released_metrics(
    mode: Mode,
    results: Sequence[tuple[int, int, float]],
    charged: DPRelease | None = None,
    *,
    seed: int | None = None,
) -> dict[str, float | int]:
    """The evaluation metrics a reply carries for ``results`` = per task (correct, count, loss).

    ``clear``: all three per task and the total count; ``noised``: (correct, count) plus the
    noise of ``charged``, the release the ledger paid for, drawn from ``seed`` (None: the OS;
    :meth:`SiteJob.noise_seed`); ``withheld``: nothing.
    """
    metrics: dict[str, float | int] = {}
    if mode == "withheld":
        return metrics
    if mode == "noised":
        if charged is None:
            raise ValueError("a noised evaluation needs the release the site charged")
        noised = noised_counts([(c, n) for c, n, _loss in results], charged, seed=seed)
        for j, (correct, count) in enumerate(noised):
            metrics[P.eval_key("correct", j)] = correct
            metrics[P.eval_key("count", j)] = count
        return metrics
    for j, (correct, count, loss) in enumerate(results):
        metrics[P.eval_key("correct", j)] = correct
        metrics[P.eval_key("count", j)] = count
        metrics[P.eval_key("loss", j)] = loss
    metrics[P.NUM_EXAMPLES] = sum(count for _c, count, _l in results)
    return metrics
