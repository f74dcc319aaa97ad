"""Normalisation helper shared by the convolutional models.

DP-SGD needs every sample's gradient to depend on that sample alone. BatchNorm mixes samples
through its batch statistics (and Opacus rejects it), so the conv models use GroupNorm, whose
statistics are computed per sample.
"""

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
