"""Which per-sample-gradient mode DP-SGD uses (Opacus' ``grad_sample_mode``), chosen per model.

Every mode computes the same thing: each example's gradient clipped to ``max_grad_norm``, summed,
plus Gaussian noise of sd ``σ·max_grad_norm``, divided by the expected batch. The clipping bound,
the noise and the sampling (hence the accountant's ε) do not depend on the mode
(tests/test_dp_modes.py checks that the privatised updates agree across modes); only the cost
does:

* ``hooks``: Opacus' module hooks materialise every per-sample gradient, the optimizer clips.
* ``ew``: PyTorch's ExpandedWeights (``torch.func``-style per-sample rules inside autograd); it
  supports only layers PyTorch knows.
* ``functorch``: Opacus' hooks with ``vmap`` rules per layer.
* ``ghost``: Opacus' fast gradient clipping. Layers with a norm sampler (``nn.Linear``,
  ``nn.Embedding`` in Opacus 1.6) give per-sample gradient *norms* without materialising the
  gradients; a second backward pass of the clip-weighted per-example losses then yields the
  clipped sum directly. Other layers (conv, norms) still materialise their per-sample gradient,
  one layer at a time, so ghost pays off only where linear layers hold the parameters. It needs
  the per-example losses (``DPHook.backward``); regularisers enter through
  ``add_gradients`` after the noise (``fedcl.client.trainer``), never the loss, so ghost's
  rescaling of the loss touches only data terms.
* ``bk``: book-keeping (:mod:`fedcl.privacy.dp.bookkeeping`): one backward pass to the layer
  outputs only (no weight gradients), per-example norms from each layer's activations and
  output gradients (conv: ghost norm over patches where cheaper, else the per-example
  gradient), then the clipped sum straight into ``p.grad`` for Opacus' ghost-clipping optimizer
  (same noise, same accountant). Linear, Conv2d and GroupNorm layers only, each used once per
  forward; like ghost it takes the per-example losses.

Measured through the site's training path (benchmarks/dp_throughput.py: every mode paired with
non-private training in one run; docs/notes/measurements.md, "DP-SGD modes per model"): the
choice below is the fastest mode per architecture there, or tied with it. On the CPU no Opacus
1.6 mode reaches 0.6x of non-private throughput on the conv models (conv layers have no norm
sampler, so every mode materialises their per-sample gradients and still runs the full
backward); ``bk`` does on the CIFAR-sized CNN and ResNet-18-GN, not on the 8x8 CNN, on one
thread (docs/notes/measurements.md, "Book-keeping DP-SGD").
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .bookkeeping import bk_applies
from .planning import DPConfigError

if TYPE_CHECKING:
    from torch import nn

#: Grad-sample modes :class:`fedcl.client.trainer.LocalTrainer` can run.
GRAD_SAMPLE_MODES: tuple[str, ...] = ("hooks", "ew", "functorch", "ghost", "bk")
DEFAULT_GRAD_SAMPLE_MODE = "hooks"
#: Modes that clip from per-sample gradient *norms* and never hold the gradients themselves.
NORM_ONLY_MODES: tuple[str, ...] = ("ghost", "bk")


def choose_grad_sample_mode(
    model: nn.Module, override: str | None = None, *, per_sample: bool = False
) -> str:
    """The per-sample-gradient mode for ``model``: ``override`` if given, else by architecture.

    ``per_sample``: the caller needs the per-sample gradients themselves (augmentation
    multiplicity averages them), so :data:`NORM_ONLY_MODES` are skipped in the choice below.

    * every parameterised layer a Linear, Conv2d (groups=1) or GroupNorm (MLP, CNN,
      ResNet-18-GN): ``bk``, book-keeping, one backward pass and no per-example gradients
      where a ghost norm is cheaper; measured fastest on all three (docs/notes/measurements.md,
      "Book-keeping DP-SGD": cnn, resnet18-gn and mlp ahead of ew, hooks and ghost);
    * every parameterised layer one ExpandedWeights supports (ViT: LayerNorm, attention
      Linears on sequences): ``ew``, PyTorch's per-sample rules, which beat Opacus' hooks
      there (vit-tiny 0.81x vs 0.69x; ghost 0.37x: sequence Linears need T×T Gram matrices);
    * anything else: ``hooks``, which supports every layer Opacus validates.
    """
    if override is not None:
        return _valid_mode(override)
    declared = getattr(model, "fedcl_grad_sample_mode", None)  # a model that needs one mode
    if isinstance(declared, str):  # (the dual encoder: hooks, docs/DESIGN.md §11)
        return _valid_mode(declared)
    layers = [
        module
        for module in model.modules()
        if any(p.requires_grad for p in module.parameters(recurse=False))
    ]
    if not layers:
        return DEFAULT_GRAD_SAMPLE_MODE
    if bk_applies(model) and not per_sample:
        return "bk"
    # Exact types: a subclass with its own forward (``WSConv2d``) has no ExpandedWeights rule.
    if all(type(m) in _ew_layers() for m in layers):
        return "ew"
    return DEFAULT_GRAD_SAMPLE_MODE


def _ew_layers() -> tuple[type, ...]:
    """Layers with a per-sample rule in PyTorch's ExpandedWeights (torch 2.x)."""
    from torch import nn

    return (
        nn.Linear,
        nn.Conv1d,
        nn.Conv2d,
        nn.Conv3d,
        nn.Embedding,
        nn.GroupNorm,
        nn.LayerNorm,
        nn.InstanceNorm1d,
        nn.InstanceNorm2d,
        nn.InstanceNorm3d,
    )


def _valid_mode(mode: str) -> str:
    if mode not in GRAD_SAMPLE_MODES:
        raise DPConfigError(
            f"grad_sample_mode {mode!r} is not supported; valid: {', '.join(GRAD_SAMPLE_MODES)}"
        )
    return mode
