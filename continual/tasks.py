"""The stream an experiment defines, as both sides compute it."""

from __future__ import annotations

from fedcl.config import ExperimentConfig
from fedcl.datasets.info import DatasetInfo

from .streams import Stream, build_stream


def experiment_stream(experiment: ExperimentConfig, info: DatasetInfo) -> Stream:
    """The task sequence of ``experiment`` (its joint reference when ``stream = "joint"``).

    A dataset's held-out classes become the zero-shot column, and a model that compares images
    with class prompts trains each task on its own prompts (docs/DESIGN.md §11).
    """
    from fedcl.models.registry import model_objective

    stream = build_stream(
        experiment.data.scenario,
        num_classes=info.num_classes,
        num_tasks=experiment.data.num_tasks,
        class_names=info.class_names,
        domain_names=info.domain_names,
        held_out=info.held_out,
        task_prompts=model_objective(experiment.model.name).task_prompts,
    )
    return stream.joint() if experiment.is_joint else stream
