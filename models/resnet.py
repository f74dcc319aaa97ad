"""CIFAR-style ResNet-18 with GroupNorm: the "real" model for 32x32 benchmarks.

Differences from the ImageNet ResNet-18, and why:

* 3x3 stride-1 stem and no max-pool, so 32x32 inputs are not downsampled to 8x8 before the
  first residual stage (the usual CIFAR adaptation, ~11.2M parameters at 10 classes).
* GroupNorm instead of BatchNorm: BatchNorm couples the samples of a batch, which breaks the
  per-sample gradients DP-SGD clips, and Opacus refuses it.
* No in-place ReLU: in-place ops on the outputs of hooked modules break Opacus' backward hooks.
* Adaptive average pooling before the head, so any ``image_size >= 8`` works.
* A ``width`` multiplier to shrink the network for CPU simulations or DP runs.
"""

import torch
from torch import nn
from torch.nn import functional as F

from .norm import conv2d, group_norm

MIN_IMAGE_SIZE = 8
STAGE_WIDTHS: tuple[int, int, int, int] = (64, 128, 256, 512)
STAGE_BLOCKS: tuple[int, int, int, int] = (2, 2, 2, 2)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection (1x1 conv projection when the shape changes)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, ws: bool = False) -> None:
        super().__init__()
        self.conv1 = conv2d(in_ch, out_ch, 3, ws=ws, stride=stride, padding=1, bias=False)
        self.norm1 = group_norm(out_ch)
        self.conv2 = conv2d(out_ch, out_ch, 3, ws=ws, stride=1, padding=1, bias=False)
        self.norm2 = group_norm(out_ch)
        self.shortcut: nn.Module
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(
                conv2d(in_ch, out_ch, 1, ws=ws, stride=stride, bias=False), group_norm(out_ch)
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block; every op is out-of-place so Opacus hooks see untouched tensors."""
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18GN(nn.Module):
    """ResNet-18 (BasicBlocks ``[2, 2, 2, 2]``) for small images, GroupNorm throughout."""

    def __init__(
        self, *, in_channels: int, num_classes: int, width: float = 1.0, ws: bool = False
    ) -> None:
        """``ws``: weight-standardised convolutions (``norm.WSConv2d``, De et al. 2022)."""
        super().__init__()
        widths = [max(1, round(w * width)) for w in STAGE_WIDTHS]
        self.stem = nn.Sequential(
            conv2d(in_channels, widths[0], 3, ws=ws, stride=1, padding=1, bias=False),
            group_norm(widths[0]),
            nn.ReLU(),
        )
        stages: list[nn.Module] = []
        in_ch = widths[0]
        for i, (out_ch, blocks) in enumerate(zip(widths, STAGE_BLOCKS, strict=True)):
            layers: list[nn.Module] = []
            for b in range(blocks):
                stride = 2 if (i > 0 and b == 0) else 1
                layers.append(BasicBlock(in_ch, out_ch, stride, ws))
                in_ch = out_ch
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images ``(B, C, H, W)`` to logits ``(B, num_classes)``."""
        return self.head(torch.flatten(self.pool(self.stages(self.stem(x))), 1))
