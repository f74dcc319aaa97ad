"""Book-keeping DP-SGD clipping (grad-sample mode ``bk``): one backward pass, exact clipping.

Why: Opacus 1.6 has no conv norm sampler, so on the conv models every mode materialises each
conv layer's per-sample gradients *and* the backward still computes the ordinary weight
gradients, and ghost clipping adds a second backward pass on top. Book-keeping (Bu et al.,
"Differentially private optimization on large model at small cost", 2023) needs neither:

1. the forward pass keeps each trainable layer's input ``a`` and output;
2. one ``torch.autograd.grad`` of Σᵢ lossᵢ *with respect to the layer outputs only* gives every
   layer's output gradient ``g``; autograd then skips the weight gradients entirely (no
   parameter is asked for) and the first layer's backward;
3. from (``a``, ``g``) each layer gives its per-example squared gradient norm, either from the
   per-example gradient itself (a batched matmul) or, where cheaper, without it ("ghost norm":
   ‖Gᵢ‖² = Σₜₛ (aₜ·aₛ)(gₜ·gₛ) over the T output positions, Li et al. 2021; choosing per layer
   is "mixed ghost clipping", Bu et al. 2022);
4. cᵢ = min(1, C / (‖gradᵢ‖ + 1e-6)), Opacus' clip factor, and each weight's gradient is the
   clipped sum Σᵢ cᵢ·gradᵢ, built from (``a``, cᵢ·``g``) or from the kept per-example gradient.

``p.grad`` then holds exactly what ghost clipping's second pass leaves there (Σᵢ cᵢ ∇lossᵢ), so
Opacus' ``DPOptimizerFastGradientClipping`` adds the same noise (σ·C) and divides by the same
expected batch, and the accountant is the same: only the route to the clipped sum differs
(tests/test_dp_modes.py checks the weights after a private fit agree with hooks to 1e-6).

Supported trainable layers: ``nn.Linear``, ``nn.Conv2d`` (``groups=1``, numeric padding),
``nn.GroupNorm``; every layer used once per forward, no in-place op on a layer's output (the
same rule Opacus' hooks impose; a changed output is detected and refused).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .planning import DPConfigError

#: Opacus' clip factor: ``(C / (norm + 1e-6)).clamp(max=1)`` (DPOptimizer, ghost clipping).
CLIP_EPS = 1e-6


def bk_supported(module: nn.Module) -> bool:
    """Whether book-keeping has exact per-example rules for this (trainable) layer."""
    if type(module) is nn.Linear or type(module) is nn.GroupNorm:
        return True
    if type(module) is nn.Conv2d:
        return module.groups == 1 and not isinstance(module.padding, str)
    return False


def bk_applies(model: nn.Module) -> bool:
    """Whether every layer that holds a trainable parameter is one :func:`bk_supported` covers.

    Parameters directly on a container (not in a leaf layer) rule it out: nothing would
    compute their per-example gradients.
    """
    layers = _trainable_layers(model)
    return bool(layers) and all(bk_supported(m) for m in layers)


def _trainable_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]


@dataclass
class _Record:
    module: nn.Module
    activation: torch.Tensor
    output: torch.Tensor
    version: int


class BookKeeper:
    """Per-example clipping for one model in one backward pass (see the module docstring).

    ``attach`` registers forward hooks; each training forward records (input, output) per
    layer; :meth:`backward` turns the per-example losses into clipped-sum gradients in
    ``p.grad``; ``detach`` removes the hooks.
    """

    def __init__(self, model: nn.Module, max_grad_norm: float):
        layers = _trainable_layers(model)
        unsupported = sorted({type(m).__name__ for m in layers if not bk_supported(m)})
        if not layers or unsupported:
            raise DPConfigError(
                "grad_sample_mode 'bk' supports only Linear, Conv2d (groups=1) and GroupNorm "
                f"layers; this model has {', '.join(unsupported) or 'no trainable layer'}"
            )
        self.model = model
        self.max_grad_norm = float(max_grad_norm)
        self._layers = layers
        self._records: list[_Record] = []
        self._handles: list[Any] = []
        #: Per-example gradient norms of the last batch (debugging; not private).
        self.last_norms: torch.Tensor | None = None

    def attach(self) -> None:
        """Register the forward hooks that record each layer's input and output."""
        if self._handles:
            return
        # A new forward of the model starts a new record (a forward that was never backed
        # through, e.g. one whose loss was discarded, leaves nothing behind).
        self._handles.append(self.model.register_forward_pre_hook(self._new_forward))
        for layer in self._layers:
            self._handles.append(layer.register_forward_hook(self._record))

    def _new_forward(self, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        if module.training and torch.is_grad_enabled():
            self._records = []

    def detach(self) -> None:
        """Remove the hooks and drop any recorded batch."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._records.clear()

    def _record(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        if any(r.module is module for r in self._records):
            self._records.clear()
            raise DPConfigError(
                f"grad_sample_mode 'bk': {type(module).__name__} ran twice in one forward "
                "(tied or reused layer); use 'hooks'"
            )
        self._records.append(_Record(module, inputs[0].detach(), output, output._version))

    @torch.no_grad()
    def _clip_coefficients(self, squared: torch.Tensor) -> torch.Tensor:
        norms = squared.clamp(min=0).sqrt()
        self.last_norms = norms
        return (self.max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)

    def backward(self, losses: torch.Tensor) -> None:
        """Write Σᵢ cᵢ ∇lossᵢ into every trainable ``p.grad`` from the per-example ``losses``."""
        records, self._records = self._records, []
        if losses.dim() != 1:
            raise DPConfigError(
                f"bk backward needs one loss per example, got {tuple(losses.shape)}"
            )
        if losses.shape[0] == 0:
            # An empty Poisson draw: the clipped sum of no example is zero, and Opacus'
            # optimizer still adds the noise (the accounted step). The per-layer rules are not
            # run on zero examples (conv's reads the first example's output: an IndexError).
            for layer in self._layers:
                for param in layer.parameters(recurse=False):
                    if param.requires_grad and param.grad is None:
                        param.grad = torch.zeros_like(param)
            return
        if not records:
            raise DPConfigError("bk backward without a recorded training forward")
        for r in records:
            if r.output._version != r.version:
                raise DPConfigError(
                    f"grad_sample_mode 'bk': the output of {type(r.module).__name__} was "
                    "modified in place after the layer ran; use out-of-place ops"
                )
        outputs = [r.output for r in records]
        grads = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)
        n = losses.shape[0]
        with torch.no_grad():
            squared = torch.zeros(n, dtype=losses.dtype, device=losses.device)
            pending = []
            for r, g in zip(records, grads, strict=True):
                if g is None:
                    g = torch.zeros_like(r.output)
                rule = _RULES[type(r.module)]
                norm2, finish = rule(r.module, r.activation.to(g.dtype), g)
                squared += norm2
                pending.append(finish)
            coef = self._clip_coefficients(squared)
            for finish in pending:
                for param, grad in finish(coef).items():
                    if param.grad is None:
                        param.grad = grad.view_as(param).to(param.dtype)
                    else:
                        param.grad.add_(grad.view_as(param))


# -- per-layer rules: (squared per-example norm [n], coef -> {param: clipped-sum grad})

_Finish = Any


def _linear(layer: nn.Linear, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, _Finish]:
    n = g.shape[0]
    w, b = layer.weight, layer.bias
    train_w, train_b = w.requires_grad, b is not None and b.requires_grad
    if g.dim() == 2:
        sq = torch.zeros(n, dtype=g.dtype, device=g.device)
        gg = (g * g).sum(1)
        if train_w:
            sq = sq + gg * (a * a).sum(1)
        if train_b:
            sq = sq + gg

        def finish(coef: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
            cg = g * coef[:, None]
            out = {}
            if train_w:
                out[w] = cg.t() @ a
            if train_b:
                out[b] = cg.sum(0)
            return out

        return sq, finish
    a3 = a.reshape(n, -1, a.shape[-1])  # [n, T, in]
    g3 = g.reshape(n, -1, g.shape[-1])  # [n, T, out]
    return _matrix_rule(w if train_w else None, b if train_b else None, a3, g3)


def _matrix_rule(
    w: nn.Parameter | None,
    b: nn.Parameter | None,
    a: torch.Tensor,
    g: torch.Tensor,
) -> tuple[torch.Tensor, _Finish]:
    """A layer whose per-example gradient is Σₜ gₜ aₜᵀ (a ``[n, T, p]``, g ``[n, T, d]``).

    Materialise the ``[n, d, p]`` per-example gradients when that costs less than the T×T
    Gram matrices (n·T·p·d against n·T²·(p+d) multiply-adds), else the ghost norm.
    """
    n, t, p = a.shape
    d = g.shape[-1]
    sq = torch.zeros(n, dtype=g.dtype, device=g.device)
    per_example: torch.Tensor | None = None
    if w is not None:
        if t * (p + d) < p * d:  # ghost norm: Gram matrices over positions
            aa = torch.bmm(a, a.transpose(1, 2))
            gg = torch.bmm(g, g.transpose(1, 2))
            sq = sq + (aa * gg).sum((1, 2))
        else:
            per_example = torch.bmm(g.transpose(1, 2), a)  # [n, d, p]
            sq = sq + per_example.pow(2).sum((1, 2))
    bias_sample = g.sum(1) if b is not None else None
    if bias_sample is not None:
        sq = sq + bias_sample.pow(2).sum(1)

    def finish(coef: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        out = {}
        if w is not None:
            if per_example is not None:
                out[w] = (coef @ per_example.reshape(n, -1)).reshape(d, p)
            else:
                cg = g * coef[:, None, None]
                out[w] = cg.reshape(-1, d).t() @ a.reshape(-1, p)
        if b is not None and bias_sample is not None:
            out[b] = coef @ bias_sample
        return out

    return sq, finish


def _conv2d(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, _Finish]:
    """Conv2d: the per-example weight gradients (grouped kernel or patches, kept for the
    clipped sum), or the ghost norm over patches where the T×T Gram matrices cost less; then
    the clipped sum by the native weight-gradient kernel on cᵢ-scaled output gradients.
    :func:`_conv_route` picks the route.
    """
    n = a.shape[0]
    w, b = layer.weight, layer.bias
    train_w = w.requires_grad
    train_b = b is not None and b.requires_grad
    d = g.shape[1]
    p = w[0].numel()
    t = g[0, 0].numel()
    sq = torch.zeros(n, dtype=g.dtype, device=g.device)
    per_example: torch.Tensor | None = None
    route = _conv_route(n, t, p, d, a.shape[1])
    ghost = train_w and route == "ghost"
    if train_w and ghost:
        patches = _unfold(layer, a)  # [n, p, T]
        gram_a = torch.bmm(patches.transpose(1, 2), patches)  # [n, T, T]
        g_flat = g.reshape(n, d, t)
        gram_g = torch.bmm(g_flat.transpose(1, 2), g_flat)
        sq = sq + (gram_a * gram_g).sum((1, 2))
        del gram_a, gram_g, patches
    elif train_w and route == "unfold":
        patches = _unfold(layer, a)  # [n, p, T]
        per_example = torch.bmm(g.reshape(n, d, t), patches.transpose(1, 2)).reshape(n, -1)
        del patches
    elif train_w:
        per_example = _conv2d_per_example(layer, a, g).reshape(n, -1)  # [n, d·p]
    if per_example is not None:
        sq = sq + per_example.pow(2).sum(1)
    bias_sample = g.reshape(n, d, t).sum(2) if train_b else None
    if bias_sample is not None:
        sq = sq + bias_sample.pow(2).sum(1)

    def finish(coef: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        out = {}
        if train_w and per_example is not None:
            out[w] = coef @ per_example
        elif train_w:
            scaled = g * coef.view(n, 1, 1, 1)
            out[w] = _weight_gradient(layer, scaled, a, w, groups=1)
        if bias_sample is not None:
            out[b] = coef @ bias_sample
        return out

    return sq, finish


def _conv_route(n: int, t: int, p: int, d: int, c_in: int) -> str:
    """How a conv layer gets its per-example norms: ``ghost``, ``grouped`` or ``unfold``.

    T output positions, p = Cin·kh·kw, d = Cout. Exact either way; only the cost differs, and
    the rule is a fixed one (a timing-based choice would make runs differ in the last bit):

    * ``ghost`` where the two T×T Gram matrices need fewer multiply-adds than the per-example
      gradient (T·(p+d) < p·d: the deep, low-resolution layers; measured 3-14x faster there);
    * else ``unfold`` (patches + one batched matmul) for a thin input (p ≤ 32, the stem) or
      wide layers (Cin, Cout ≥ 128), where PyTorch's grouped weight-gradient kernel is slow;
    * else ``grouped``: the batch folded into conv groups (2-3x faster than unfolding at
      32-64 channels on 32x32 maps, one CPU thread).
    """
    if t * (p + d) < p * d:
        return "ghost"
    if p <= 32 or (c_in >= 128 and d >= 128):
        return "unfold"
    return "grouped"


def _conv2d_per_example(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Every example's weight gradient ``[n·Cout, Cin, kh, kw]``: the batch as conv groups."""
    n, c_in = a.shape[:2]
    d = g.shape[1]
    shape = (n * d, c_in, *layer.kernel_size)
    placeholder = torch.empty(shape, dtype=a.dtype, device=a.device)  # only its shape is read
    return _weight_gradient(
        layer,
        g.reshape(1, n * d, *g.shape[2:]),
        a.reshape(1, n * c_in, *a.shape[2:]),
        placeholder,
        groups=n,
    )


def _weight_gradient(
    layer: nn.Conv2d, g: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, *, groups: int
) -> torch.Tensor:
    """PyTorch's conv weight-gradient kernel alone (``weight`` gives only the shape)."""
    return torch.ops.aten.convolution_backward(
        g,
        a,
        weight,
        None,
        list(layer.stride),
        list(layer.padding),
        list(layer.dilation),
        False,
        [0, 0],
        groups,
        [False, True, False],
    )[1]


def _unfold(layer: nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
    """Patches ``[n, Cin·kh·kw, T]`` (as F.unfold), by pad + strided view + one copy."""
    (kh, kw), (ph, pw), (sh, sw), (dh, dw) = (
        layer.kernel_size,
        layer.padding,
        layer.stride,
        layer.dilation,
    )
    n, c = a.shape[:2]
    padded = F.pad(a, (pw, pw, ph, ph))
    hp, wp = padded.shape[2:]
    ho = (hp - (dh * (kh - 1) + 1)) // sh + 1
    wo = (wp - (dw * (kw - 1) + 1)) // sw + 1
    s = padded.stride()
    view = padded.as_strided(
        (n, c, kh, kw, ho, wo), (s[0], s[1], s[2] * dh, s[3] * dw, s[2] * sh, s[3] * sw)
    )
    return view.reshape(n, c * kh * kw, ho * wo)


def _group_norm(
    layer: nn.GroupNorm, a: torch.Tensor, g: torch.Tensor
) -> tuple[torch.Tensor, _Finish]:
    n = a.shape[0]
    w, b = layer.weight, layer.bias
    train_w = w is not None and w.requires_grad
    train_b = b is not None and b.requires_grad
    sq = torch.zeros(n, dtype=g.dtype, device=g.device)
    gw = gb = None
    if train_w:
        normalised = F.group_norm(a, layer.num_groups, eps=layer.eps)
        gw = (normalised * g).reshape(n, g.shape[1], -1).sum(2)  # [n, C]
        sq = sq + gw.pow(2).sum(1)
    if train_b:
        gb = g.reshape(n, g.shape[1], -1).sum(2)
        sq = sq + gb.pow(2).sum(1)

    def finish(coef: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        out = {}
        if gw is not None:
            out[w] = coef @ gw
        if gb is not None:
            out[b] = coef @ gb
        return out

    return sq, finish


_RULES = {nn.Linear: _linear, nn.Conv2d: _conv2d, nn.GroupNorm: _group_norm}
