"""Normalisation helpers shared by the convolutional models.

DP-SGD needs every sample's gradient to depend on that sample alone. BatchNorm mixes samples
through its batch statistics (and Opacus rejects it), so the conv models use GroupNorm, whose
statistics are computed per sample; optionally with weight-standardised convolutions
(:class:`WSConv2d`), which De et al. 2022 pair with GroupNorm for DP-SGD.
"""

import torch
from torch import nn

MAX_GROUPS = 32


def num_groups(channels: int, max_groups: int = MAX_GROUPS) -> int:
    """Largest group count <= ``max_groups`` that divides ``channels``.

    Narrow layers (a ResNet at ``width=0.25`` has 16-channel stages) cannot use 32 groups, and
    GroupNorm needs the channel count to be a multiple of the group count.
    """
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    for groups in range(min(max_groups, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1  # unreachable: 1 divides everything


def group_norm(channels: int, max_groups: int = MAX_GROUPS) -> nn.GroupNorm:
    """GroupNorm over ``channels`` with as many groups as divide it (at most ``max_groups``)."""
    return nn.GroupNorm(num_groups(channels, max_groups), channels)


class WSConv2d(nn.Conv2d):
    """A convolution whose filters are standardised when used (Qiao et al. 2019).

    Each output filter is applied as ``(w − mean(w)) / sqrt(var(w) + eps)`` over its inputs and
    kernel, so its scale cannot drift; with GroupNorm this is the normalisation De et al. 2022
    train with under DP-SGD. The statistics are of the *weights*, never of a batch, so each
    example's gradient still depends on that example alone. Opacus has no rule of its own for
    this layer: its hooks mode computes the per-sample gradients with functorch (exact, through
    the standardisation); book-keeping and ExpandedWeights do not apply to it
    (``fedcl.privacy.dp.choose_grad_sample_mode`` picks ``hooks``).
    """

    eps = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(self.weight, dim=(1, 2, 3), keepdim=True, unbiased=False)
        return self._conv_forward(x, (self.weight - mean) * torch.rsqrt(var + self.eps), self.bias)


def conv2d(in_ch: int, out_ch: int, kernel: int, *, ws: bool = False, **kwargs) -> nn.Conv2d:
    """``nn.Conv2d``, or :class:`WSConv2d` when ``ws`` (weight standardisation)."""
    return (WSConv2d if ws else nn.Conv2d)(in_ch, out_ch, kernel, **kwargs)
