"""Fisher information diagonals for EWC: exact per-sample, and differentially private.

The *empirical* Fisher diagonal is ``F = (1/n)·Σᵢ (∇θ log p(yᵢ|xᵢ))²`` — the mean of squared
**per-sample** gradients at the observed labels. It is not the square of the mean gradient
``((1/n)·Σᵢ ∇θ log p(yᵢ|xᵢ))²``: at the end of a task that mean is close to zero (the model sits
near a minimum) while the per-sample gradients are not, so the squared mean would say "nothing
matters" exactly when EWC needs to know what does. Per-sample gradients come from
``torch.func`` (``vmap`` over ``grad``), one batch at a time.

The DP version (:func:`dp_fisher_diagonal`) is a single Gaussian mechanism on the *sum* of the
per-sample squared gradients:

1. clip every per-sample gradient ``gᵢ`` (all parameters together) to L2 norm ``≤ C``
   (``clip_norm``), as DP-SGD does: ``g̃ᵢ = gᵢ·min(1, C/‖gᵢ‖)``;
2. square elementwise: ``sᵢ = g̃ᵢ²``. Its entries are ``≥ 0``, so
   ``‖sᵢ‖₂ ≤ ‖sᵢ‖₁ = ‖g̃ᵢ‖₂² ≤ C²``;
3. optionally (``squared_clip_norm = S``) also clip ``sᵢ`` to L2 norm ``≤ S``: squared
   gradients spread over many parameters have ``‖sᵢ‖₂`` far below ``C²``, so a tighter ``S``
   buys the same privacy with much less noise;
4. release ``Σᵢ sᵢ + N(0, (σ·Δ)²·I)`` with ``Δ = min(C², S)``: the L2 sensitivity of the sum
   under add/remove-one adjacency (the adjacency Opacus' RDP accountant uses);
5. divide by ``n`` and clamp at ``0`` (post-processing, free).

So the release is exactly a Gaussian mechanism with noise multiplier ``σ`` relative to L2
sensitivity ``Δ``, applied once to the whole task dataset: an RDP accountant charges it as one
step at sample rate 1.0 with that noise multiplier (``FisherRelease``), composed with the site's
DP-SGD steps in its ledger. ``σ = 0`` gives no privacy at all (ε = ∞); a DP run must use
``σ > 0``.

Federated weighting: the site sends ``F_site·n_site`` (:func:`fisher_share`, which is the noisy
sum itself, so nothing beyond the mechanism's output leaves the site, and ``n_site`` is shared as
for any weighted update), the server adds the shares (plaintext or CKKS, like an update), and
every site divides by the total count (:func:`fisher_from_sum`). Clamp after the sum, not
before: per-site noise then cancels instead of being rectified into a positive bias.
"""

from __future__ import annotations

import math
import secrets
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from fedcl.config import ConfigError, FedclError

from .ewc import plain_name


@dataclass(frozen=True)
class FisherRelease:
    """What a DP Fisher release costs, in the terms the site's privacy ledger composes.

    One Gaussian mechanism (``noise_multiplier`` relative to L2 ``sensitivity``) over the whole
    task dataset: ``sample_rate = 1.0``, ``steps = 1``.
    """

    mechanism: str = "fisher"
    sample_rate: float = 1.0
    noise_multiplier: float = 0.0
    steps: int = 1
    sensitivity: float = 0.0
    clip_norm: float = 0.0
    squared_clip_norm: float | None = None
    num_examples: int = 0

    def to_dict(self) -> dict:
        """Plain values for a Flower ``ConfigRecord`` or the ledger's JSON."""
        return asdict(self)


def fisher_release(
    *,
    clip_norm: float,
    noise_multiplier: float,
    num_examples: int,
    squared_clip_norm: float | None = None,
) -> FisherRelease:
    """The release :func:`dp_fisher_diagonal` makes with these settings, known beforehand.

    The mechanism builds its own report with this function, so a site that charges its ledger
    with it *before* computing the Fisher charges exactly what the mechanism then reports.
    """
    check_fisher_dp_settings(clip_norm, noise_multiplier)
    sensitivity = clip_norm**2
    if squared_clip_norm is not None:
        sensitivity = min(sensitivity, squared_clip_norm)
    return FisherRelease(
        mechanism="fisher",
        sample_rate=1.0,
        noise_multiplier=float(noise_multiplier),
        steps=1,
        sensitivity=float(sensitivity),
        clip_norm=float(clip_norm),
        squared_clip_norm=None if squared_clip_norm is None else float(squared_clip_norm),
        num_examples=int(num_examples),
    )


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain module under an Opacus ``GradSampleModule`` (or DDP) wrapper."""
    while isinstance(getattr(model, "_module", None), nn.Module):
        model = model._module  # type: ignore[assignment]
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def _mask_logits(logits: torch.Tensor, mask: Sequence[int] | None) -> torch.Tensor:
    """Task-IL: restrict the softmax to the task's outputs (same as the trainer's mask)."""
    if mask is None:
        return logits
    keep = torch.full((logits.shape[-1],), float("-inf"), device=logits.device)
    keep[list(mask)] = 0.0
    return logits + keep


def _per_sample_grads(
    model: nn.Module,
    dataset: Dataset,
    *,
    output_mask: Sequence[int] | None,
    batch_size: int,
) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
    """Yield ``(batch size, {plain name: per-sample grads [B, *shape]})`` batch by batch."""
    if batch_size < 1:
        raise ConfigError(f"Fisher batch_size must be >= 1, got {batch_size}")
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    device = next(iter(params.values())).device if params else torch.device("cpu")

    def log_loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, (p, frozen, buffers), (x.unsqueeze(0),))
        # −log p(y|x): its gradient squared is that of the log-likelihood.
        return F.cross_entropy(_mask_logits(logits, output_mask), y.unsqueeze(0))

    per_sample = vmap(grad(log_loss), in_dims=(None, 0, 0))
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        x, y = x.to(device), torch.as_tensor(y).to(device, torch.long)
        grads = per_sample(params, x, y)
        yield len(y), {plain_name(n): g.detach() for n, g in grads.items()}


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


@contextmanager
def _plain_evaluation(model: nn.Module) -> Iterator[None]:
    """Eval mode, module hooks suspended; both restored on exit.

    Eval mode: the Fisher describes the trained function, not a stochastic forward pass
    (dropout off, norm layers use their running statistics). Hooks: Opacus' per-sample-gradient
    hooks (left on the model by ``make_private``, with or without its ``_module`` wrapper) use
    full backward hooks, which ``torch.func`` transforms cannot run through, and would record
    batched activations for nothing.
    """
    was_training = model.training
    saved = []
    for module in model.modules():
        for attr in _HOOK_DICTS:
            hooks = getattr(module, attr, None)
            if hooks:
                saved.append((module, attr, hooks))
                setattr(module, attr, OrderedDict())
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
        for module, attr, hooks in saved:
            setattr(module, attr, hooks)


def fisher_diagonal(
    model: nn.Module,
    dataset: Dataset,
    *,
    output_mask: Sequence[int] | None = None,
    batch_size: int = 64,
    max_examples: int | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Empirical Fisher diagonal: the mean over examples of squared per-sample gradients.

    Not private: use it for centralised runs and non-DP federations; with DP on, use
    :func:`dp_fisher_diagonal`. ``max_examples`` bounds the cost with a random subset (chosen
    by ``seed``). Memory is ``batch_size ×`` the number of parameters: lower ``batch_size`` for
    large models. Returns float32 CPU tensors keyed by plain parameter names.
    """
    model = _unwrap(model)
    n_all = len(dataset)  # type: ignore[arg-type]
    if n_all == 0:
        raise FedclError("cannot compute a Fisher diagonal on an empty dataset")
    if max_examples is not None and max_examples < n_all:
        if max_examples < 1:
            raise ConfigError(f"Fisher max_examples must be >= 1, got {max_examples}")
        g = torch.Generator().manual_seed(seed)
        dataset = Subset(dataset, torch.randperm(n_all, generator=g)[:max_examples].tolist())
    total: dict[str, torch.Tensor] = {}
    n = 0
    with _plain_evaluation(model):
        for b, grads in _per_sample_grads(
            model, dataset, output_mask=output_mask, batch_size=batch_size
        ):
            n += b
            for name, g in grads.items():
                sq = g.pow(2).sum(0)
                total[name] = total[name] + sq if name in total else sq
    return {name: (t / n).to("cpu", torch.float32) for name, t in total.items()}


def check_fisher_dp_settings(clip_norm: float, noise_multiplier: float) -> None:
    """Validate the DP Fisher's clipping norm and noise multiplier (errors name the field)."""
    if not (math.isfinite(clip_norm) and clip_norm > 0):
        raise ConfigError(
            f"field 'continual.fisher_clip_norm': {clip_norm!r} is not valid; use a value > 0 "
            "(the per-sample gradient L2 bound; the squared-gradient sum then has sensitivity "
            "clip_norm**2)"
        )
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ConfigError(
            f"field 'continual.fisher_noise_multiplier': {noise_multiplier!r} is not valid; "
            "use a value >= 0 (> 0 for any privacy; 0 means epsilon = infinity)"
        )


def dp_fisher_diagonal(
    model: nn.Module,
    dataset: Dataset,
    *,
    clip_norm: float,
    noise_multiplier: float,
    generator: torch.Generator | None = None,
    squared_clip_norm: float | None = None,
    output_mask: Sequence[int] | None = None,
    batch_size: int = 64,
    clamp: bool = True,
) -> tuple[dict[str, torch.Tensor], FisherRelease]:
    """A differentially private empirical Fisher diagonal and the release to account for it.

    See the module docstring for the mechanism: per-sample gradient clipping to ``clip_norm``
    (``C``), squaring, optional clipping of the squared vector to ``squared_clip_norm`` (``S``),
    Gaussian noise of standard deviation ``noise_multiplier·Δ`` with ``Δ = min(C², S)`` on the
    sum, division by ``n``. ``clamp=False`` skips the clamp at 0: use it for the federated share
    and clamp once after the server's sum (:func:`fisher_from_sum`).

    ``generator`` draws the noise; ``None`` seeds a fresh one from the OS's entropy. Pass a
    seeded generator only in tests: whoever knows the seed can subtract the noise. (Like Opacus
    without ``secure_mode``, the noise is not hardened against floating-point attacks.)

    Every example of ``dataset`` is used once (no subsampling: a data-dependent subset would
    break the add/remove-one sensitivity argument), so the accounting is sample rate 1.0, one
    step.
    """
    check_fisher_dp_settings(clip_norm, noise_multiplier)
    if squared_clip_norm is not None and not (
        math.isfinite(squared_clip_norm) and squared_clip_norm > 0
    ):
        raise ConfigError(
            f"field 'continual.fisher_squared_clip_norm': {squared_clip_norm!r} is not valid; "
            "use a value > 0 or leave it unset (then the bound is fisher_clip_norm**2)"
        )
    model = _unwrap(model)
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise FedclError("cannot compute a DP Fisher diagonal on an empty dataset")
    release = fisher_release(
        clip_norm=clip_norm,
        noise_multiplier=noise_multiplier,
        num_examples=n,
        squared_clip_norm=squared_clip_norm,
    )
    sensitivity = release.sensitivity

    total: dict[str, torch.Tensor] = {}
    with _plain_evaluation(model):
        for _, grads in _per_sample_grads(
            model, dataset, output_mask=output_mask, batch_size=batch_size
        ):
            names = list(grads)
            norms = torch.sqrt(sum(grads[k].flatten(1).pow(2).sum(1) for k in names))
            # Same guard as Opacus: the 1e-6 keeps the clipped norm strictly below C.
            factor = (clip_norm / (norms + 1e-6)).clamp(max=1.0)
            squared = {k: (grads[k] * _expand(factor, grads[k])).pow(2) for k in names}
            if squared_clip_norm is not None:
                sq_norms = torch.sqrt(sum(squared[k].flatten(1).pow(2).sum(1) for k in names))
                factor2 = (squared_clip_norm / (sq_norms + 1e-12)).clamp(max=1.0)
                squared = {k: v * _expand(factor2, v) for k, v in squared.items()}
            for k in names:
                s = squared[k].sum(0)
                total[k] = total[k] + s if k in total else s

    if generator is None:
        generator = torch.Generator().manual_seed(secrets.randbits(63))
    std = noise_multiplier * sensitivity
    fisher: dict[str, torch.Tensor] = {}
    for k in sorted(total):
        t = total[k].to("cpu", torch.float32)
        if std > 0:
            t = t + torch.normal(0.0, std, size=t.shape, generator=generator)
        t = t / n
        fisher[k] = t.clamp(min=0.0) if clamp else t
    return fisher, release


def _expand(factor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample factor ``[B]`` against per-sample tensors ``[B, *shape]``."""
    return factor.view(-1, *([1] * (like.dim() - 1)))


def fisher_share(fisher: Mapping[str, torch.Tensor], num_examples: int) -> dict[str, torch.Tensor]:
    """What a site sends for federated aggregation: ``F_site·n_site`` (the noisy sum).

    Plain float32 tensors: the transport (plaintext or CKKS) treats them like an update.
    """
    if num_examples < 0:
        raise FedclError(f"a site's example count cannot be negative, got {num_examples}")
    return {
        k: (v.detach().to("cpu", torch.float32) * float(num_examples)) for k, v in fisher.items()
    }


def fisher_from_sum(
    summed: Mapping[str, torch.Tensor], total_examples: int, *, clamp: bool = True
) -> dict[str, torch.Tensor]:
    """The federated Fisher from the server's sum of shares: ``Σ F_s·n_s / Σ n_s``, clamped ≥ 0.

    Every site runs this on the same aggregate, so all get bit-identical results (float32 on the
    CPU), which :meth:`EWCMemory.digest` then confirms.
    """
    if total_examples <= 0:
        raise FedclError(
            f"the Fisher aggregate covers {total_examples} examples; no site contributed"
        )
    out = {}
    for k, v in summed.items():
        t = v.detach().to("cpu", torch.float32) / float(total_examples)
        out[k] = t.clamp(min=0.0) if clamp else t
    return out
