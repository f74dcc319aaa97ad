"""Learning without Forgetting (Li & Hoiem, 2016) at the sites: distil the previous task's model.

While a site trains on task ``t`` it also asks its model to answer like the *teacher*, the global
model at the end of task ``t − 1``, on the outputs earlier tasks used:
``α · T² · KL(softmax(z_teacher/T) ‖ softmax(z/T))`` per example, with temperature ``T`` and
weight ``α`` (``continual.options.temperature`` / ``continual.options.alpha``). In domain-IL
every output is an earlier task's; in class- and task-IL only the earlier tasks' classes are
distilled (the softmax restricted to them), so the new classes stay free to grow.

The teacher: the model a site receives in the first round of task ``t`` *is* the end-of-task
``t − 1`` global model, so the site keeps that copy in its private state folder
(``lwf/teacher-task-<t>.safetensors`` under the run's folder) for the task's later rounds; a
site that joins mid-task keeps the model it received then. The file is global state (a model
every site received), not data.

Privacy: the distillation term depends on the examples, so it must not be a post-noise penalty.
It enters through the trainer's ``extra_loss`` hook, inside each example's loss, which DP-SGD
clips and noises with the rest: the training release covers it and LwF costs no extra ε. The
teacher itself is a released global model: post-processing.

This module must not import ``fedcl.client``; :class:`LwFHook` is duck-typed to the trainer's
``TrainHook`` protocol. Its row is ``lwf`` in :mod:`fedcl.continual.methods`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.nn import functional as F

from fedcl.config import FedclError

from .methods import SiteContext
from .state_files import save_state
from .streams import Stream


class LwFOptions(BaseModel):
    """``continual.options`` of ``method = "lwf"``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Softmax temperature T of the distillation (Hinton et al.; Li & Hoiem use 2).
    temperature: float = Field(2.0, gt=0, allow_inf_nan=False)
    #: Weight α of the distillation term against the task loss (0 switches LwF off).
    alpha: float = Field(1.0, ge=0, allow_inf_nan=False)


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    outputs: Sequence[int] | None = None,
) -> torch.Tensor:
    """Per-example ``T² · KL(softmax(teacher/T) ‖ softmax(student/T))`` over ``outputs``.

    ``outputs`` restricts both softmaxes to those logits (all when None). The ``T²`` keeps the
    gradient's scale independent of ``T`` (Hinton et al., 2015). Shape ``[batch]``.
    """
    if outputs is not None:
        index = torch.as_tensor(list(outputs), dtype=torch.long, device=student.device)
        student, teacher = student.index_select(1, index), teacher.index_select(1, index)
    log_p = F.log_softmax(student / temperature, dim=1)
    log_q = F.log_softmax(teacher / temperature, dim=1)
    return (log_q.exp() * (log_q - log_p)).sum(dim=1) * temperature**2


def old_outputs(stream: Stream, task_index: int) -> tuple[int, ...] | None:
    """Model outputs the tasks before ``task_index`` trained; None when that is all of them."""
    seen = sorted({stream.label_map[c] for t in stream.tasks[:task_index] for c in t.classes})
    return None if len(seen) == stream.num_outputs else tuple(seen)


class LwFHook:
    """Trainer hook adding ``α · distillation_loss(z, teacher(x))`` to every example's loss."""

    def __init__(
        self,
        teacher: nn.Module,
        *,
        temperature: float,
        alpha: float,
        outputs: Sequence[int] | None = None,
    ) -> None:
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.outputs = None if outputs is None else tuple(outputs)
        self._total, self._count = 0.0, 0

    def setup(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: Any
    ) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
        """Put the teacher on the student's device; nothing of the student is wrapped."""
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self.teacher.to(device)
        self._total, self._count = 0.0, 0
        return model, optimizer, loader

    def extra_loss(
        self, inputs: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor | None:
        """``α · T² · KL`` per example, against the teacher's outputs on the same batch."""
        if self.alpha == 0:
            return None
        with torch.no_grad():
            teacher = self.teacher(inputs)
        term = distillation_loss(outputs, teacher, self.temperature, self.outputs) * self.alpha
        self._total += float(term.detach().sum())
        self._count += len(term)
        return term

    def add_gradients(self, model: nn.Module) -> None:
        """Nothing after the noise: the distillation term is already in the per-sample loss."""
        return None

    def finish(self, model: nn.Module, result: Any) -> None:
        """Report the mean distillation term over the examples trained on."""
        if self._count:
            result.metrics["lwf_distillation"] = self._total / self._count


def teacher_path(state_dir: str | os.PathLike[str], task_index: int) -> Path:
    """Where a site keeps task ``task_index``'s teacher (``state_dir`` is already per run)."""
    return Path(state_dir) / "lwf" / f"teacher-task-{task_index}.safetensors"


def previous_task_model(ctx: SiteContext) -> nn.Module | None:
    """The end-of-previous-task global model, kept at the site; None in the first task.

    The first time a site trains in a task it stores the model it received (the previous
    task's final global model, or the current one for a site that joins mid-task); later
    rounds of the task load that copy.
    """
    from safetensors.torch import load_file

    if ctx.task_index == 0:
        return None
    path = teacher_path(ctx.state_dir, ctx.task_index)
    if not path.exists():  # written atomically: a crash mid-write never leaves half a teacher
        state = {k: v.detach().to("cpu").clone() for k, v in ctx.model.state_dict().items()}
        save_state(path, state, fmt="fedcl-lwf-teacher-v1")
    teacher = copy.deepcopy(ctx.model)
    try:
        teacher.load_state_dict(load_file(str(path)))
    except Exception as exc:  # safetensors and load_state_dict raise their own error types
        raise FedclError(
            f"site {ctx.site_id}: LwF teacher {path} cannot be loaded ({exc}); delete it to "
            "keep the model received now as the teacher"
        ) from exc
    for p in teacher.parameters():
        p.requires_grad_(False)  # a fixed target: no gradient, no optimizer state
    return teacher.eval()


def site_hooks(ctx: SiteContext, options: LwFOptions) -> list[LwFHook]:
    """The ``lwf`` row's factory: a distillation hook from the second task on."""
    teacher = previous_task_model(ctx)
    if teacher is None:
        return []
    return [
        LwFHook(
            teacher,
            temperature=options.temperature,
            alpha=options.alpha,
            outputs=old_outputs(ctx.stream, ctx.task_index),
        )
    ]
