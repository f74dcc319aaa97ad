"""Online elastic weight consolidation (EWC) at the sites (docs/DESIGN.md §3 step 4, §7).

EWC (Kirkpatrick et al., 2017) keeps earlier tasks by pulling each parameter back towards the
value it had after those tasks, in proportion to how much the loss cared about it: the penalty
is ``(λ/2)·Σ F·(θ − θ*)²`` with ``F`` a Fisher information diagonal and ``θ*`` the anchor.
*Online* EWC (Schwarz et al., 2018) keeps a single running ``(F, θ*)`` instead of one per task,
so memory and cost stay constant however long the stream: ``F ← γ·F + F_t``, ``θ* ← θ_t``.

Why the penalty is a hook and not a loss term: Opacus computes per-sample gradients of the data
loss only; a penalty added to the loss is silently dropped in "hooks" and "functorch" modes and,
in "ghost" mode, kept but scaled by the mean clipping coefficient (opacus#249, measured in
``docs/notes/measurements.md``, "Opacus 1.6"). :class:`EWCHook` thus adds the penalty's gradient
``λ·F·(θ − θ*)`` to ``p.grad`` *after* clipping and noising, which the site trainer does through
``add_gradients``. This costs no privacy: ``F`` is the federated DP Fisher and ``θ*`` the global
model, both already released, so the penalty gradient is post-processing. (With DP on, never
feed a *non-private* Fisher of the site's data to the hook: that would bypass the noise.)

Every site must hold the same memory — the anchor is the *global* model at the task's end and
the Fisher is the federated sum — so :meth:`EWCMemory.digest` gives a SHA-256 that the sites
report and the coordinator compares, just as it compares model digests (docs/DESIGN.md §4).

This module must not import ``fedcl.client`` (layering: client → continual); the hook is
duck-typed to the trainer's ``TrainHook`` protocol.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedcl.config import ConfigError, FedclError

from .state_files import load_state, save_state

FORMAT = "fedcl-ewc-v1"
_WRAPPER_PREFIXES = ("_module.", "module.")


def plain_name(name: str) -> str:
    """A parameter name without wrapper prefixes (Opacus' ``_module.``, DDP's ``module.``).

    The memory is keyed by the names of the plain model so that a memory written after a DP run
    applies to a non-DP run and vice versa, and so that all sites agree on the keys.
    """
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                changed = True
    return name


def parameter_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached float32 CPU copies of the trainable parameters, keyed by plain names.

    This is the ``θ_t`` that :meth:`EWCMemory.consolidate` takes: call it on the *global* model
    at the end of a task (identical at every site), not on a site's local model.
    """
    return {
        plain_name(n): p.detach().to("cpu", torch.float32).clone()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def check_ewc_settings(lam: float, gamma: float) -> None:
    """Validate the EWC strength ``λ`` and the online decay ``γ`` (config errors name the field).

    ``λ = 0`` is allowed (the penalty is off, useful as an ablation); ``γ = 1`` sums the Fisher
    of all tasks (classic EWC with one anchor); ``γ < 1`` lets old tasks fade.
    """
    if not (isinstance(lam, int | float) and math.isfinite(lam) and lam >= 0):
        raise ConfigError(
            f"field 'continual.ewc_lambda': {lam!r} is not valid; use a finite value >= 0 "
            "(0 disables the penalty; typical values 1 to 10^4, depending on the Fisher's scale)"
        )
    if not (isinstance(gamma, int | float) and math.isfinite(gamma) and 0 < gamma <= 1):
        raise ConfigError(
            f"field 'continual.ewc_gamma': {gamma!r} is not valid; use a value in (0, 1] "
            "(1 keeps every task's Fisher at full weight, smaller values let old tasks fade)"
        )


def _as_float_cpu(name: str, value: torch.Tensor, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise FedclError(f"EWC {what} {name!r} is a {type(value).__name__}, not a tensor")
    t = value.detach().to("cpu", torch.float32).contiguous().clone()
    if not torch.isfinite(t).all():
        raise FedclError(f"EWC {what} {name!r} holds NaN or infinite values")
    return t


class EWCMemory:
    """The running ``(F, θ*)`` of online EWC, keyed by plain parameter names.

    An empty memory (before the first task has been consolidated) makes the penalty a no-op.
    """

    def __init__(
        self,
        fisher: Mapping[str, torch.Tensor] | None = None,
        anchor: Mapping[str, torch.Tensor] | None = None,
        consolidations: int = 0,
        tags: Sequence[str] = (),
    ) -> None:
        fisher = dict(fisher or {})
        anchor = dict(anchor or {})
        self._check_pair(fisher, anchor)
        self.fisher: dict[str, torch.Tensor] = {
            n: _as_float_cpu(n, t, "Fisher") for n, t in fisher.items()
        }
        self.anchor: dict[str, torch.Tensor] = {
            n: _as_float_cpu(n, t, "anchor") for n, t in anchor.items()
        }
        self.consolidations = int(consolidations)
        self.tags: list[str] = list(tags)  # which consolidations were applied (idempotency)

    @staticmethod
    def _check_pair(fisher: Mapping[str, torch.Tensor], anchor: Mapping[str, torch.Tensor]):
        if set(fisher) != set(anchor):
            missing = sorted(set(fisher) ^ set(anchor))
            raise FedclError(
                f"EWC Fisher and anchor must name the same parameters; these differ: {missing[:5]}"
            )
        for n in fisher:
            if tuple(fisher[n].shape) != tuple(anchor[n].shape):
                raise FedclError(
                    f"EWC parameter {n!r}: Fisher shape {tuple(fisher[n].shape)} differs from "
                    f"anchor shape {tuple(anchor[n].shape)}"
                )

    @property
    def is_empty(self) -> bool:
        """True before the first consolidation: the penalty is then zero."""
        return not self.fisher

    def names(self) -> list[str]:
        """Parameter names held, sorted (the order of :meth:`digest` and the saved file)."""
        return sorted(self.fisher)

    def consolidate(
        self,
        fisher_t: Mapping[str, torch.Tensor],
        theta_t: Mapping[str, torch.Tensor] | nn.Module,
        gamma: float = 1.0,
        *,
        tag: str | None = None,
    ) -> bool:
        """Fold task ``t`` in: ``F ← γ·F + F_t`` and ``θ* ← θ_t``; False if ``tag`` was applied.

        ``fisher_t`` is the task's (federated, DP) Fisher diagonal, ``theta_t`` the global model
        it was computed at (a module or a :func:`parameter_dict`). The arithmetic is float32 on
        the CPU, so sites that receive the same inputs get bit-identical memories.

        ``tag`` (e.g. ``"<run>/task-3"``) makes the call idempotent: a retried message or a site
        restarted between consolidating and acknowledging must not fold the same task in twice
        (that would double its Fisher and split the sites' digests).
        """
        check_ewc_settings(0.0, gamma)
        if tag is not None and tag in self.tags:
            return False
        theta = parameter_dict(theta_t) if isinstance(theta_t, nn.Module) else dict(theta_t)
        fisher_new = {n: _as_float_cpu(n, t, "Fisher") for n, t in fisher_t.items()}
        theta_new = {plain_name(n): _as_float_cpu(n, t, "anchor") for n, t in theta.items()}
        fisher_new = {plain_name(n): t for n, t in fisher_new.items()}
        self._check_pair(fisher_new, theta_new)
        for n, t in fisher_new.items():
            if (t < 0).any():
                raise FedclError(
                    f"EWC Fisher {n!r} has negative entries: clamp the (noisy) Fisher at 0 "
                    "before consolidating (fedcl.continual.fisher.fisher_from_sum does)"
                )
        if not self.is_empty:
            if set(fisher_new) != set(self.fisher):
                diff = sorted(set(fisher_new) ^ set(self.fisher))
                raise FedclError(
                    "the new task's Fisher names other parameters than the EWC memory "
                    f"(model changed?): {diff[:5]}"
                )
            for n, t in fisher_new.items():
                if t.shape != self.fisher[n].shape:
                    raise FedclError(
                        f"EWC parameter {n!r}: new shape {tuple(t.shape)} differs from the "
                        f"memory's {tuple(self.fisher[n].shape)} (model changed?)"
                    )
            fisher_new = {n: self.fisher[n] * gamma + t for n, t in fisher_new.items()}
        self.fisher = fisher_new
        self.anchor = theta_new
        self.consolidations += 1
        if tag is not None:
            self.tags.append(tag)
        return True

    def penalty(self, model: nn.Module, lam: float) -> torch.Tensor:
        """``(λ/2)·Σ F·(θ − θ*)²`` of ``model`` (for reporting; training uses the hook)."""
        total = torch.zeros((), dtype=torch.float64)
        if self.is_empty:
            return total
        for name, p in model.named_parameters():
            key = plain_name(name)
            if key in self.fisher:
                d = p.detach().to("cpu", torch.float32) - self.anchor[key]
                total += float((self.fisher[key] * d * d).sum())
        return total * (lam / 2)

    def digest(self) -> str:
        """SHA-256 over names, shapes and bytes of ``F`` and ``θ*``: equal at every site.

        The consolidation count and tags are deliberately left out: they are metadata, and two
        sites with the same tensors apply the same penalty.
        """
        h = hashlib.sha256(FORMAT.encode())
        for role, tensors in (("fisher", self.fisher), ("anchor", self.anchor)):
            for name in sorted(tensors):
                t = tensors[name]
                h.update(f"\0{role}\0{name}\0{str(t.dtype)}\0{tuple(t.shape)}\0".encode())
                h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the memory to ``path`` (safetensors: no pickle, so loading runs no code).

        The file is written beside the target and renamed over it, so a crash mid-write never
        leaves a half memory in the site state directory.
        """
        tensors = {f"fisher/{n}": t for n, t in self.fisher.items()}
        tensors.update({f"anchor/{n}": t for n, t in self.anchor.items()})
        metadata = {
            "consolidations": str(self.consolidations),
            "tags": json.dumps(self.tags),
            "digest": self.digest(),
        }
        return save_state(path, tensors, fmt=FORMAT, metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, missing_ok: bool = False) -> EWCMemory:
        """Read a memory written by :meth:`save` and check it against its stored digest.

        ``missing_ok=True`` returns an empty memory when the file does not exist (the first
        task at a new site).
        """
        path = Path(path)
        if not path.exists():
            if missing_ok:
                return cls()
            raise FedclError(f"EWC memory {path} does not exist")
        tensors, metadata = load_state(path, fmt=FORMAT, what="EWC memory")
        fisher = {k[len("fisher/") :]: t for k, t in tensors.items() if k.startswith("fisher/")}
        anchor = {k[len("anchor/") :]: t for k, t in tensors.items() if k.startswith("anchor/")}
        memory = cls(
            fisher,
            anchor,
            int(metadata.get("consolidations", "0")),
            json.loads(metadata.get("tags", "[]")),
        )
        if metadata.get("digest") and metadata["digest"] != memory.digest():
            raise FedclError(f"EWC memory {path} is corrupt: its digest does not match")
        return memory

    def __repr__(self) -> str:
        size = sum(t.numel() for t in self.fisher.values())
        return (
            f"EWCMemory(parameters={len(self.fisher)}, values={size}, "
            f"consolidations={self.consolidations})"
        )


class EWCHook:
    """Trainer hook adding the EWC penalty gradient ``λ·F·(θ − θ*)`` after privatisation.

    Duck-typed to ``fedcl.client.trainer.TrainHook``. The trainer calls :meth:`add_gradients`
    after Opacus' ``optimizer.pre_step()`` (clip + noise) and before the wrapped optimizer's
    step, or before the plain ``optimizer.step()`` without DP, so the same code path serves both
    and the penalty is neither clipped nor scaled. Put it after the DP hook in the hook list
    (its ``setup`` changes nothing, so the order only matters for readability).

    Stability: the penalty is a quadratic with curvature ``λ·F``; plain SGD on it diverges when
    ``lr·λ·max F > 2`` (``2·(1 + momentum)`` with heavy-ball momentum), and a diverging run
    shows up as NaN at the next consolidation. ``finish`` therefore reports
    ``ewc_max_curvature = λ·max F`` next to ``ewc_penalty``, to compare with ``2/lr``.
    """

    def __init__(self, memory: EWCMemory, lam: float, max_curvature: float | None = None) -> None:
        check_ewc_settings(lam, 1.0)
        self.memory = memory
        self.lam = float(lam)
        #: Cap on λ·F per coordinate. With plain SGD at learning rate ``lr``, ``1/lr`` makes the
        #: penalty step at most a full step back to θ* instead of overshooting it (measured:
        #: uncapped, EWC with replay diverged on Split-Digits at λ=100, lr=0.1).
        self.max_curvature = max_curvature
        self._bound: tuple[int, list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]]] | None = None

    def setup(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: Any
    ) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
        """Nothing to wrap: the penalty needs no per-sample gradients."""
        self._bound = None
        return model, optimizer, loader

    def _bind(self, model: nn.Module) -> list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]]:
        """Match the model's trainable parameters to the memory once per model object."""
        if self._bound is not None and self._bound[0] == id(model):
            return self._bound[1]
        trainable = {plain_name(n): p for n, p in model.named_parameters() if p.requires_grad}
        if set(trainable) != set(self.memory.fisher):
            diff = sorted(set(trainable) ^ set(self.memory.fisher))
            raise FedclError(
                "the EWC memory does not match the model's trainable parameters (was the model "
                f"changed between tasks?): {diff[:5]}"
            )
        pairs = []
        for name, p in trainable.items():
            f, a = self.memory.fisher[name], self.memory.anchor[name]
            if f.shape != p.shape:
                raise FedclError(
                    f"EWC parameter {name!r}: memory shape {tuple(f.shape)} differs from the "
                    f"model's {tuple(p.shape)}"
                )
            pairs.append((p, f.to(p.device, p.dtype), a.to(p.device, p.dtype)))
        self._bound = (id(model), pairs)
        return pairs

    @torch.no_grad()
    def add_gradients(self, model: nn.Module) -> None:
        """``p.grad += λ·F·(p − θ*)`` for every trainable parameter; no-op on an empty memory."""
        if self.memory.is_empty or self.lam == 0:
            return
        for p, f, a in self._bind(model):
            curvature = f * self.lam
            if self.max_curvature is not None:
                curvature = curvature.clamp(max=self.max_curvature)
            g = curvature * (p.detach() - a)
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)

    def finish(self, model: nn.Module, result: Any) -> None:
        """Report the penalty at the trained parameters and the largest curvature ``λ·F``."""
        self._bound = None
        if not self.memory.is_empty:
            result.metrics["ewc_penalty"] = float(self.memory.penalty(model, self.lam))
            result.metrics["ewc_max_curvature"] = self.lam * max(
                float(f.max()) for f in self.memory.fisher.values()
            )
