"""Small CNN: the default model for image tasks that an MLP cannot solve well.

About 67k parameters, independent of the input size: adaptive average pooling before the head
means the same architecture (and the same federated parameter vector) serves 8x8 digits and
32x32 CIFAR images. GroupNorm instead of BatchNorm keeps it compatible with DP-SGD, and the
small size keeps per-sample gradients and encrypted aggregation cheap.
"""

import torch
from torch import nn

from .norm import conv2d, group_norm

MIN_IMAGE_SIZE = 8
DEFAULT_CHANNELS: tuple[int, int] = (32, 64)


def conv_block(in_ch: int, out_ch: int, ws: bool) -> list[nn.Module]:
    """3x3 conv (padded, so small inputs keep their size) -> GroupNorm -> ReLU."""
    return [conv2d(in_ch, out_ch, 3, ws=ws, padding=1), group_norm(out_ch, 8), nn.ReLU()]


class SmallCNN(nn.Module):
    """Two stages of (conv, conv, 2x2 max-pool), then global average pool and a linear head."""

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        channels: tuple[int, int] = DEFAULT_CHANNELS,
        ws: bool = False,
    ) -> None:
        """``ws``: weight-standardised convolutions (``norm.WSConv2d``)."""
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            *conv_block(in_channels, c1, ws),
            *conv_block(c1, c1, ws),
            nn.MaxPool2d(2),
            *conv_block(c1, c2, ws),
            *conv_block(c2, c2, ws),
            nn.MaxPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images ``(B, C, H, W)`` to logits ``(B, num_classes)``."""
        return self.head(torch.flatten(self.pool(self.features(x)), 1))
