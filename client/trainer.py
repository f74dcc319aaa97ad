"""The site's local training step: the one place where examples become an update.

DP-SGD, EWC and replay extend this loop through :class:`TrainHook` objects rather than by
rewriting it, so that every combination of them runs the same, tested code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedcl.config.experiment import TrainSpec


class TrainHook(Protocol):
    """Extension points of :class:`LocalTrainer` (subclass :class:`BaseHook`)."""

    def setup(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader
    ) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader]:
        """Wrap the training objects (DP-SGD swaps in Opacus' model, optimizer and loader)."""
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


class BaseHook:
    """No-op hook to subclass: override only what a feature needs."""

    def setup(self, model, optimizer, loader):
        return model, optimizer, loader

    def add_gradients(self, model):
        return None

    def finish(self, model, result):
        return None


class ProximalTerm(BaseHook):
    """FedProx: the gradient of (mu/2)·||w − w_global||², i.e. mu·(w − w_global)."""

    def __init__(self, mu: float, global_params: Sequence[torch.Tensor]):
        self.mu = mu
        self.global_params = [p.detach().clone() for p in global_params]

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


class LocalTrainer:
    """Runs ``local_epochs`` of minibatch training on one task's examples."""

    def __init__(self, spec: TrainSpec, device: str = "cpu", seed: int = 0):
        self.spec = spec
        self.device = torch.device(device)
        self.seed = seed

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
    ) -> TrainResult:
        """Train ``model`` in place and report the examples used and the mean loss."""
        n = len(dataset)  # type: ignore[arg-type]
        if n == 0:
            return TrainResult(0, 0, math.nan)
        generator = torch.Generator().manual_seed(self.seed)
        loader = DataLoader(
            dataset, batch_size=min(self.spec.batch_size, n), shuffle=True, generator=generator
        )
        model.to(self.device).train()
        optimizer = self.make_optimizer(model)
        for hook in hooks:
            model, optimizer, loader = hook.setup(model, optimizer, loader)
        criterion = nn.CrossEntropyLoss()
        total, batches = 0.0, 0
        for _ in range(self.spec.local_epochs):
            for x, y in loader:
                if len(y) == 0:  # Poisson sampling can draw an empty batch
                    continue
                x, y = x.to(self.device), y.to(self.device)
                optimizer.zero_grad(set_to_none=True)
                loss = criterion(masked_logits(model(x), output_mask), y)
                loss.backward()
                self._step(model, optimizer, hooks)
                total += float(loss.detach())
                batches += 1
        result = TrainResult(n, batches, total / max(batches, 1))
        model.zero_grad(set_to_none=True)
        for hook in hooks:
            hook.finish(model, result)
        return result

    @staticmethod
    def _step(model: nn.Module, optimizer: torch.optim.Optimizer, hooks: Sequence[TrainHook]):
        """One optimizer step, with regulariser gradients added after privatisation.

        Opacus' DPOptimizer exposes ``pre_step`` (clip per-sample gradients, add noise, write
        ``p.grad``) and ``original_optimizer``; splitting the two lets hooks add their
        gradients to the *privatised* gradient. A plain optimizer just steps.
        """
        pre_step = getattr(optimizer, "pre_step", None)
        if pre_step is not None:
            if not pre_step():
                return  # gradient accumulation: no step this batch
            for hook in hooks:
                hook.add_gradients(model)
            optimizer.original_optimizer.step()
            return
        for hook in hooks:
            hook.add_gradients(model)
        optimizer.step()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    *,
    output_mask: Sequence[int] | None = None,
    device: str = "cpu",
    batch_size: int = 512,
) -> tuple[int, int, float]:
    """(correct, count, summed loss) of ``model`` on ``dataset``."""
    model.to(device).eval()
    correct, count, loss = 0, 0, 0.0
    criterion = nn.CrossEntropyLoss(reduction="sum")
    for x, y in DataLoader(dataset, batch_size=batch_size):
        x, y = x.to(device), y.to(device)
        logits = masked_logits(model(x), output_mask)
        loss += float(criterion(logits, y))
        correct += int((logits.argmax(dim=1) == y).sum())
        count += len(y)
    return correct, count, loss
