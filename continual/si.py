"""Synaptic Intelligence (Zenke, Poole & Ganguli, 2017) at the sites.

While a site trains, every optimizer step contributes ``−g·Δθ`` per parameter to a *path
integral* ``ω`` (how much that parameter's movement lowered the loss), with ``g`` the gradient
the step used and ``Δθ`` the step's change. At a task's end the importance grows by
``ω / (Δ² + ξ)``, with ``Δ = θ_end − θ_start`` the parameter's change over the task, ``ξ`` a
damping term; later tasks then pay ``c·Σ Ω·(θ − θ*)²`` for moving important parameters away
from ``θ*``, the model at the last task's end (``c``, ``ξ``: ``continual.options.c`` /
``continual.options.xi``).

Federated and private:

* ``g`` is the gradient as DP-SGD released it: the hook reads ``p.grad`` in ``add_gradients``,
  after clipping and noise and before any penalty is added (Zenke et al. integrate the
  unregularised gradient). Post-processing of the DP-SGD release: SI costs no extra ε.
* The penalty's gradient ``2c·Ω·(θ − θ*)`` is added after the noise, like EWC's; with plain SGD
  it is capped at ``1/lr`` per coordinate (as EWC's curvature) so a large Ω cannot make the
  penalty step overshoot.
* A negative path integral (steps that raised the loss: DP noise, momentum) counts as 0.
* The task boundaries are the global model's: ``θ_start`` is the model a site receives when it
  first trains in a task, ``θ_end`` = ``θ*`` the model it receives when it first trains in a
  later task (the previous task's final global model, the same at every site). ``ω`` sums the
  site's own local steps over all its rounds of the task. All of it is private site state:
  ``si.safetensors`` in the run's folder at the site; a retried round is not counted twice.

This module must not import ``fedcl.client``; :class:`SIHook` is duck-typed to the trainer's
``TrainHook`` protocol. Its row is ``si`` in :mod:`fedcl.continual.methods`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedcl.config import FedclError

from .ewc import parameter_dict, plain_name
from .methods import SiteContext
from .state_files import load_state, save_state

FORMAT = "fedcl-si-v1"
_ROLES = ("omega", "start", "importance", "anchor")


class SIOptions(BaseModel):
    """``continual.options`` of ``method = "si"``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Strength c of the surrogate penalty ``c·Σ Ω·(θ − θ*)²`` (0 switches it off). With
    #: ``Δ² ≪ ξ`` only ``c/ξ`` matters; 30 / 0.1 was the best of 1-1000 on digits-domain-il.
    c: float = Field(30.0, ge=0, allow_inf_nan=False)
    #: Damping ξ of the importance ``ω / (Δ² + ξ)`` (keeps parameters that barely moved finite).
    xi: float = Field(0.1, gt=0, allow_inf_nan=False)


class SIState:
    """A site's SI state: ``ω`` of the current task, its ``θ_start``, and ``(Ω, θ*)``."""

    def __init__(
        self,
        tensors: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
        task: int = -1,
        tags: list[str] | None = None,
    ) -> None:
        tensors = tensors or {}
        self.omega = dict(tensors.get("omega", {}))
        self.start = dict(tensors.get("start", {}))
        self.importance = dict(tensors.get("importance", {}))
        self.anchor = dict(tensors.get("anchor", {}))
        self.task = int(task)  # the task ω and θ_start belong to (-1: none yet)
        self.tags = list(tags or [])  # rounds folded into ω (a retried round must not count twice)

    def begin_task(self, task: int, theta: Mapping[str, torch.Tensor], xi: float) -> bool:
        """Move to ``task`` (model ``theta`` received): close the previous task first.

        Returns False when ``task`` is the one in progress (nothing changes).
        """
        if task <= self.task:
            if task < self.task:
                raise FedclError(
                    f"SI state is at task {self.task} but the site was asked to train task {task}"
                )
            return False
        if self.task >= 0:
            self.consolidate(theta, xi)
        self.start = {n: t.detach().to("cpu", torch.float32).clone() for n, t in theta.items()}
        self.omega = {n: torch.zeros_like(t) for n, t in self.start.items()}
        self.task, self.tags = task, []
        return True

    def consolidate(self, theta_end: Mapping[str, torch.Tensor], xi: float) -> None:
        """``Ω += max(ω, 0) / ((θ_end − θ_start)² + ξ)``, ``θ* = θ_end``: the task's importance.

        A negative ``ω`` (the parameter's steps *raised* the task loss, which DP noise, momentum
        or another penalty can cause) gives no importance rather than a negative curvature that
        would push the parameter away from ``θ*``.
        """
        for n, w in self.omega.items():
            end = theta_end[n].detach().to("cpu", torch.float32)
            delta = end - self.start[n]
            gain = w.clamp(min=0.0) / (delta * delta + xi)
            self.importance[n] = self.importance[n] + gain if n in self.importance else gain
            self.anchor[n] = end.clone()

    def add_path(self, omega: Mapping[str, torch.Tensor], tag: str) -> bool:
        """Fold one round's ``ω`` into the task's; False (ignored) for a round already folded."""
        if tag in self.tags:
            return False
        for n, w in omega.items():
            self.omega[n] = self.omega[n] + w.to("cpu", torch.float32)
        self.tags.append(tag)
        return True

    def save(self, path: str | os.PathLike[str]) -> Path:
        tensors = {f"{role}/{n}": t for role in _ROLES for n, t in getattr(self, role).items()}
        meta = {"task": str(self.task), "tags": json.dumps(self.tags)}
        return save_state(path, tensors, fmt=FORMAT, metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SIState:
        """The saved state, or an empty one when ``path`` does not exist (a new site)."""
        path = Path(path)
        if not path.exists():
            return cls()
        flat, meta = load_state(path, fmt=FORMAT, what="SI state")
        tensors: dict[str, dict[str, torch.Tensor]] = {role: {} for role in _ROLES}
        for key, t in flat.items():
            role, _, name = key.partition("/")
            tensors[role][name] = t
        return cls(tensors, int(meta.get("task", "-1")), json.loads(meta.get("tags", "[]")))


class SIHook:
    """Trainer hook: accumulate ``ω`` from the privatised gradients, add the SI penalty's."""

    def __init__(
        self,
        state: SIState,
        *,
        c: float,
        tag: str,
        path: str | os.PathLike[str] | None = None,
        max_curvature: float | None = None,
    ) -> None:
        self.state = state
        self.c = float(c)
        self.tag = tag
        self.path = path
        self.max_curvature = max_curvature
        self.omega: dict[str, torch.Tensor] = {}
        self._params: dict[str, nn.Parameter] = {}
        self._last: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (g, θ) of a step

    def setup(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: Any
    ) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
        self._params = {plain_name(n): p for n, p in model.named_parameters() if p.requires_grad}
        missing = sorted(set(self.state.omega) ^ set(self._params))
        if missing:
            raise FedclError(
                f"the SI state does not match the model's trainable parameters: {missing[:5]}"
            )
        self.omega = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self._params.items()}
        self._last = {}
        return model, optimizer, loader

    def _close_step(self) -> None:
        """``ω −= g·(θ_now − θ_before)`` for the step taken since the last call."""
        for n, (g, before) in self._last.items():
            self.omega[n] -= g * (self._params[n].detach().float() - before)
        self._last = {}

    @torch.no_grad()
    def add_gradients(self, model: nn.Module) -> None:
        """Record this step's (privatised) gradient, then add ``2c·Ω·(θ − θ*)``."""
        self._close_step()
        for n, p in self._params.items():
            g = torch.zeros_like(p, dtype=torch.float32) if p.grad is None else p.grad.float()
            self._last[n] = (g.clone(), p.detach().float().clone())
        if self.c == 0 or not self.state.importance:
            return
        for n, p in self._params.items():
            curvature = self.state.importance[n].to(p.device, p.dtype) * (2 * self.c)
            if self.max_curvature is not None:
                curvature = curvature.clamp(max=self.max_curvature)
            g = curvature * (p.detach() - self.state.anchor[n].to(p.device, p.dtype))
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)

    def penalty(self) -> float:
        """``c·Σ Ω·(θ − θ*)²`` at the current parameters (0 before the first task's end)."""
        total = 0.0
        for n, p in self._params.items():
            if n in self.state.importance:
                d = p.detach().to("cpu", torch.float32) - self.state.anchor[n]
                total += float((self.state.importance[n] * d * d).sum())
        return self.c * total

    def finish(self, model: nn.Module, result: Any) -> None:
        """Close the last step, fold this round's ``ω`` into the state and save it."""
        self._close_step()
        folded = self.state.add_path(self.omega, self.tag)
        if folded and self.path is not None:
            self.state.save(self.path)
        result.metrics["si_path_integral"] = float(sum(float(w.sum()) for w in self.omega.values()))
        if self.state.importance:
            result.metrics["si_penalty"] = self.penalty()
        self._params = {}


def state_path(state_dir: str | os.PathLike[str]) -> Path:
    """Where a site keeps its SI state (``state_dir`` is already per run)."""
    return Path(state_dir) / "si.safetensors"


def site_hooks(ctx: SiteContext, options: SIOptions) -> list[SIHook]:
    """The ``si`` row's factory: move the state to this task, then one hook for the round."""
    path = state_path(ctx.state_dir)
    state = SIState.load(path)
    if state.begin_task(ctx.task_index, parameter_dict(ctx.model), options.xi):
        state.save(path)
    train = ctx.experiment.train
    cap = 1.0 / train.lr if train.optimizer == "sgd" else None
    tag = f"round-{ctx.server_round}"
    return [SIHook(state, c=options.c, tag=tag, path=path, max_curvature=cap)]
