"""Multi-layer perceptron: the cheapest baseline.

On 8x8 digits an MLP trains in seconds on a CPU, which makes it the model of choice for smoke
tests, simulations with many clients and DP experiments where per-sample gradients must stay
cheap. It ignores spatial structure, so it is a floor, not a contender, on CIFAR-sized images.
"""

from collections.abc import Sequence

import torch
from torch import nn

DEFAULT_HIDDEN: tuple[int, ...] = (128, 64)


class MLP(nn.Module):
    """Flatten -> (Linear -> ReLU) per hidden layer -> Linear logits."""

    def __init__(
        self,
        *,
        in_channels: int,
        image_size: int,
        num_classes: int,
        hidden: Sequence[int] = DEFAULT_HIDDEN,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_channels * image_size * image_size
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images ``(B, C, H, W)`` to logits ``(B, num_classes)``."""
        return self.net(x)
