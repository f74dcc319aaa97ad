"""Random augmentation of a training batch at the site, and augmentation multiplicity.

Plain torch on batched tensors (no torchvision: it cannot be imported beside this torch), one
draw per copy from the trainer's seeded generator, so a run reruns identically. The copies of
an example are adjacent (example-major, ``repeat_interleave``): DP-SGD averages each
example's K per-sample gradients by reshaping ``[B·K, …]`` to ``[B, K, …]``
(:class:`fedcl.privacy.dp.DPHook` with ``augmult``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedcl.config import FedclError
from fedcl.config.experiment import AugmentSpec


def augment_batch(
    x: torch.Tensor, y: torch.Tensor, spec: AugmentSpec, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``spec.multiplicity`` randomly shifted / flipped copies of every image in ``x``.

    Returns ``([B·K, C, H, W], [B·K])`` with example ``i``'s copies at rows ``i·K … i·K+K−1``;
    ``x`` unchanged (and ``y`` as is) when the spec has no transform.
    """
    if not spec.active:
        return x, y
    if x.dim() != 4:
        raise FedclError(
            f"train.augment needs image batches [batch, channels, height, width]; this model's "
            f"inputs have shape {tuple(x.shape)}: set train.augment.shift = 0 and flip = false"
        )
    k, (n, _, h, w) = spec.multiplicity, x.shape
    if spec.shift >= min(h, w):
        raise FedclError(
            f"train.augment.shift = {spec.shift} is not smaller than the images ({h}x{w} "
            "pixels): a shift that large moves the whole image out of view"
        )
    out = x.repeat_interleave(k, dim=0)
    rows = n * k
    if spec.shift > 0:
        s = spec.shift
        dy = torch.randint(0, 2 * s + 1, (rows,), generator=generator).to(x.device)
        dx = torch.randint(0, 2 * s + 1, (rows,), generator=generator).to(x.device)
        padded = F.pad(out, (s, s, s, s))  # zeros: the background of every built-in image
        ys = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # [rows, H, 1]
        xs = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]  # [rows, 1, W]
        index = torch.arange(rows, device=x.device)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[index, ys, xs].permute(0, 3, 1, 2)  # [rows, C, H, W]
    if spec.flip:
        flip = torch.rand(rows, generator=generator).to(x.device) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    return out.contiguous(), y.repeat_interleave(k, dim=0)
