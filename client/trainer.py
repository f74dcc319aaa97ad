"""The site's local training step: the one place where examples become an update.

DP-SGD and the continual methods (EWC, SI, LwF, ...) extend this loop through
:class:`TrainHook` objects rather than by rewriting it, so that every combination of them runs
the same, tested code. A hook has two ways to change the objective, and which one a term takes
decides how DP treats it:

* :meth:`TrainHook.extra_loss` (before backward): a *per-example* term added to the data loss,
  so it is part of each example's loss that Opacus clips and noises. Use it for terms that
  depend on the examples (LwF's distillation): they are then covered by the DP-SGD release.
* :meth:`TrainHook.add_gradients` (after clipping and noise): a gradient added to the
  privatised one. Use it for penalties on the parameters alone (EWC, SI, FedProx), which touch
  no example and so are post-processing.

The loss itself and the evaluation metric are the model's registered objective
(:func:`fedcl.models.registry.objective_of`), not a hard-coded cross-entropy.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedcl.config import FedclError
from fedcl.config.experiment import TrainSpec
from fedcl.models.registry import Objective, objective_of

from .augment import augment_batch
from .device import autocast_for, place, resolve_device


class TrainHook(Protocol):
    """Extension points of :class:`LocalTrainer` (subclass :class:`BaseHook`)."""

    def setup(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader
    ) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]:
        """Wrap the training objects (DP-SGD swaps in Opacus' model, optimizer and loader)."""
        ...

    def extra_loss(
        self, inputs: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor | None:
        """A per-example loss term (shape ``[batch]``) added to the data loss, or None.

        Called before backward with the batch and the model's *raw* outputs (before any
        task-IL mask). The trainer adds the term's batch mean to the objective's mean loss, so
        it is inside every example's loss that DP-SGD clips and noises: a term that uses the
        examples costs no privacy beyond the training release. Optional: the trainer treats a
        hook without this method (the duck-typed DP and EWC hooks) as returning None.
        """
        ...

    def add_gradients(self, model: nn.Module) -> None:
        """Add a regulariser's gradient to ``p.grad`` (EWC, FedProx).

        Called *after* DP clipping and noising and before the optimizer step: Opacus computes
        per-sample gradients of the data loss only and silently drops any term added to the
        loss (opacus#249), so a penalty must enter here to be applied at all.
        """
        ...

    def finish(self, model: nn.Module, result: TrainResult) -> None:
        """Undo ``setup`` and add what the hook measured to ``result.metrics``."""
        ...

    # Optional: ``runs_backward() -> bool`` and ``backward(losses)``. A hook whose
    # ``runs_backward()`` is true gets each batch's per-example losses (``[batch]``, the
    # objective's plus every ``extra_loss`` term) instead of the trainer calling
    # ``loss.backward()``: DP-SGD with ghost clipping runs Opacus' two backward passes there.


class BaseHook:
    """No-op hook to subclass: override only what a feature needs."""

    def setup(self, model, optimizer, loader):
        return model, optimizer, loader

    def extra_loss(self, inputs, outputs, targets):
        return None

    def add_gradients(self, model):
        return None

    def finish(self, model, result):
        return None


class ProximalTerm(BaseHook):
    """FedProx: the gradient of (mu/2)·||w − w_global||², i.e. mu·(w − w_global)."""

    def __init__(self, mu: float, global_params: Sequence[torch.Tensor]):
        self.mu = mu
        self.global_params = [p.detach().clone() for p in global_params]

    def setup(self, model, optimizer, loader):
        """Put the global weights where the model trains (the trainer moved it already)."""
        params = [p for p in model.parameters() if p.requires_grad]
        self.global_params = [
            g.to(p.device, p.dtype) for p, g in zip(params, self.global_params, strict=True)
        ]
        return model, optimizer, loader

    def add_gradients(self, model: nn.Module) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        for p, g in zip(params, self.global_params, strict=True):
            if p.grad is not None:
                p.grad.add_(p.detach() - g, alpha=self.mu)


@dataclass
class TrainResult:
    """What a site reports about one local training run."""

    num_examples: int
    steps: int
    loss: float
    metrics: dict[str, float] = field(default_factory=dict)


def masked_logits(logits: torch.Tensor, mask: Sequence[int] | None) -> torch.Tensor:
    """Restrict predictions to ``mask`` (task-IL: the task identity is known)."""
    if mask is None:
        return logits
    keep = torch.full((logits.shape[-1],), float("-inf"), device=logits.device)
    keep[list(mask)] = 0.0
    return logits + keep


def batch_loss(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    objective: Objective,
    output_mask: Sequence[int] | None = None,
    hooks: Sequence[TrainHook] = (),
) -> torch.Tensor:
    """The loss one batch is trained on: the objective's mean loss plus the hooks' terms.

    Each hook's :meth:`~TrainHook.extra_loss` must give one value per example; its mean is
    added, so example ``i``'s share of the loss is ``(loss_i + Σ term_i) / batch`` and Opacus'
    per-sample gradients are those of ``loss_i + Σ term_i``.
    """
    outputs = model(inputs)
    loss = objective.loss(masked_logits(outputs, output_mask), targets)
    for term in _extra_terms(hooks, inputs, outputs, targets):
        loss = loss + term.mean()
    return loss


def example_losses(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    objective: Objective,
    output_mask: Sequence[int] | None = None,
    hooks: Sequence[TrainHook] = (),
) -> torch.Tensor:
    """Each example's loss (``[batch]``): the objective's plus the hooks' terms.

    What ghost clipping needs (its second backward pass weights each example's loss by its clip
    factor); its mean is :func:`batch_loss`.
    """
    outputs = model(inputs)
    losses = objective.loss(masked_logits(outputs, output_mask), targets, reduction="none")
    for term in _extra_terms(hooks, inputs, outputs, targets):
        losses = losses + term
    return losses


def _extra_terms(
    hooks: Sequence[TrainHook],
    inputs: torch.Tensor,
    outputs: torch.Tensor,
    targets: torch.Tensor,
) -> list[torch.Tensor]:
    """The hooks' per-example loss terms, each checked to be one value per example."""
    terms = []
    for hook in hooks:
        extra = getattr(hook, "extra_loss", None)
        term = None if extra is None else extra(inputs, outputs, targets)
        if term is None:
            continue
        if term.shape != (len(targets),):
            raise FedclError(
                f"{type(hook).__name__}.extra_loss returned shape {tuple(term.shape)}; it must "
                f"return one value per example ({len(targets)},) so that DP-SGD clips it per "
                "example (a batch-level term would mix examples)"
            )
        terms.append(term)
    return terms


class LocalTrainer:
    """Runs ``local_epochs`` of minibatch training on one task's examples."""

    def __init__(
        self,
        spec: TrainSpec,
        device: str | torch.device = "cpu",
        seed: int = 0,
        *,
        site_id: str | None = None,
        mixed_precision: bool = True,
    ):
        self.spec = spec
        self.device = resolve_device(str(device), site_id=site_id)
        self.seed = seed
        #: bfloat16 autocast on CUDA for non-private steps (``autocast_for``); never under DP.
        self.mixed_precision = mixed_precision

    def make_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        params = [p for p in model.parameters() if p.requires_grad]
        if self.spec.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.spec.lr)
        return torch.optim.SGD(params, lr=self.spec.lr, momentum=self.spec.momentum)

    def fit(
        self,
        model: nn.Module,
        dataset: Dataset,
        *,
        output_mask: Sequence[int] | None = None,
        hooks: Sequence[TrainHook] = (),
        objective: Objective | None = None,
    ) -> TrainResult:
        """Train ``model`` in place and report the examples used and the mean loss.

        ``objective`` defaults to the one the model registry recorded on ``model``.
        """
        n = len(dataset)  # type: ignore[arg-type]
        if n == 0:
            return TrainResult(0, 0, math.nan)
        objective = objective_of(model) if objective is None else objective
        generator = torch.Generator().manual_seed(self.seed)
        # Its own stream: turning augmentation on does not change the order examples come in.
        augment_rng = torch.Generator().manual_seed(self.seed * 2 + 1)
        loader = DataLoader(
            dataset, batch_size=min(self.spec.batch_size, n), shuffle=True, generator=generator
        )
        place(model, self.device).train()
        optimizer = self.make_optimizer(model)
        for hook in hooks:
            model, optimizer, loader = hook.setup(model, optimizer, loader)
        # One hook may run the backward pass itself, from per-example losses (ghost clipping).
        owner = next((h for h in hooks if getattr(h, "runs_backward", lambda: False)()), None)
        # Autocast only non-private steps: Opacus clips per-sample gradients in fp32.
        private = hasattr(optimizer, "pre_step")
        autocast = autocast_for(self.device, enabled=self.mixed_precision and not private)
        total, batches, with_examples = 0.0, 0, 0
        ema = WeightAverage(model, self.spec.ema) if self.spec.ema > 0 else None
        with warnings.catch_warnings():  # once a fit, not per batch: the loop is hot
            # Opacus' hooks on a first layer whose input needs no grad: PyTorch says so per
            # layer on every backward; expected, and not the site admin's concern
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for _ in range(self.spec.local_epochs):
                for batch in loader:
                    x, y = objective.split_batch(batch)
                    if len(y) == 0:  # Poisson sampling can draw an empty batch
                        if not private:
                            continue  # nothing to learn from and nothing released
                        # DP-SGD: the accounted mechanism still releases noise on this draw.
                        optimizer.zero_grad(set_to_none=True)
                        _empty_clipped_sum(optimizer)
                        if self._step(model, optimizer, hooks) and ema is not None:
                            ema.update()
                        batches += 1  # an empty draw is never split: it always steps
                        continue
                    x, y = x.to(self.device), y.to(self.device)
                    x, y = augment_batch(x, y, self.spec.augment, augment_rng)  # K copies each
                    optimizer.zero_grad(set_to_none=True)
                    kwargs = {"objective": objective, "output_mask": output_mask, "hooks": hooks}
                    if owner is None:
                        with autocast:
                            loss = batch_loss(model, x, y, **kwargs)
                        loss.backward()
                    else:
                        losses = example_losses(model, x, y, **kwargs)
                        owner.backward(losses)
                        loss = losses.detach().mean()
                    stepped = self._step(model, optimizer, hooks)
                    if stepped and ema is not None:
                        ema.update()
                    total += float(loss.detach())
                    batches += stepped  # a draw split into physical batches is one step
                    with_examples += 1
        # The loss is a mean over the batches that had examples (an empty one has no loss);
        # ``steps`` counts every optimizer step, noise-only ones included.
        result = TrainResult(n, batches, total / max(with_examples, 1))
        if ema is not None:
            ema.copy_to_model()  # what the site sends: the average, not the last iterate
        model.zero_grad(set_to_none=True)
        for hook in hooks:
            hook.finish(model, result)
        return result

    @staticmethod
    def _step(
        model: nn.Module, optimizer: torch.optim.Optimizer, hooks: Sequence[TrainHook]
    ) -> bool:
        """One optimizer step, with regulariser gradients added after privatisation.

        Opacus' DPOptimizer exposes ``pre_step`` (clip per-sample gradients, add noise, write
        ``p.grad``) and ``original_optimizer``; splitting the two lets hooks add their
        gradients to the *privatised* gradient. A plain optimizer just steps. Returns whether
        the weights moved (not on an accumulation-only batch).
        """
        pre_step = getattr(optimizer, "pre_step", None)
        if pre_step is not None:
            if not pre_step():
                return False  # gradient accumulation: no step this batch
            for hook in hooks:
                hook.add_gradients(model)
            optimizer.original_optimizer.step()
            return True
        for hook in hooks:
            hook.add_gradients(model)
        optimizer.step()
        return True


class WeightAverage:
    """An exponential moving average of the trainable weights over one local training run.

    Why: DP-SGD's iterates each carry fresh noise; averaging them cancels part of it, and the
    average of weights DP-SGD already released is post-processing, so it costs no ε and needs
    no change to the plan or the ledger (De et al. 2022, "parameter averaging"). It starts at
    the weights training starts from (the global model) and, after step t (1-based), is
    ``a ← d_t·a + (1 − d_t)·w_t`` with ``d_t = min(decay, t / (t + 9))``: De et al.'s warm-up
    (TensorFlow's ``num_updates``), so a round of a few steps averages its last iterates
    rather than staying near its start. Trainable parameters only (buffers are the model's).
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.average = [p.detach().clone() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """Fold the weights after one optimizer step into the average."""
        self.updates += 1
        d = min(self.decay, self.updates / (self.updates + 9))
        for a, p in zip(self.average, self.params, strict=True):
            a.mul_(d).add_(p.detach(), alpha=1.0 - d)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Write the average into the model's weights (what the site then releases)."""
        for a, p in zip(self.average, self.params, strict=True):
            p.copy_(a)


def _empty_clipped_sum(optimizer: torch.optim.Optimizer) -> None:
    """Give Opacus' DP optimizer the clipped sum of an empty Poisson draw: zero.

    Why: the accountant (RDP of the sampled Gaussian mechanism, charged for every draw) assumes
    each draw releases Σ clipped gradients + N(0, σ²C²), the empty one included, where the
    update is pure noise. Skipping the step instead would release "model unchanged" exactly
    when the draw was empty, an event whose probability a lone example shifts by 1/(1−q), with
    no noise to mask it. So an empty draw takes a noise-only step.

    Not by running the model on the empty batch: Opacus 1.6 handles that only in some modes
    (ExpandedWeights refuses batch size 0, functorch's conv rule fails on 0 groups). Instead
    this writes what Opacus' own backward leaves for an empty batch, in the field each
    optimizer reads: ``DPOptimizer`` (hooks, ew, functorch) clips and sums ``p.grad_sample``,
    here of shape ``[0, *p.shape]``, which its own empty-batch branch turns into zeros;
    ``DPOptimizerFastGradientClipping`` (ghost, bk) takes the clipped sum from ``p.grad``,
    here 0. ``pre_step`` then adds the noise from the optimizer's own generator and divides by
    the expected batch, exactly as on a drawn batch.
    """
    from opacus.optimizers import DPOptimizerFastGradientClipping

    clipped_sum_in_grad = isinstance(optimizer, DPOptimizerFastGradientClipping)
    for p in optimizer.params:  # type: ignore[attr-defined]  # the DP optimizer's trainables
        if clipped_sum_in_grad:
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = p.new_zeros((0, *p.shape))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    output_mask: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    batch_size: int = 512,
    objective: Objective | None = None,
) -> tuple[int, int, float]:
    """(summed metric, count, summed loss) of ``model`` on ``dataset``: one task's
    :func:`fedcl.client.scoring.score_tasks` (the one owner of the scoring loop).

    The metric and the loss are the model's registered objective (``objective`` overrides it):
    for a classifier, (correct predictions, count, summed cross-entropy).
    """
    from .scoring import score_tasks  # scoring imports this module (masked_logits)

    return score_tasks(
        model,
        [dataset],
        output_masks=[output_mask],
        device=device,
        batch_size=batch_size,
        objective=objective,
    )[0]
