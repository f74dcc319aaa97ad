"""A small text transformer whose per-sample gradients Opacus computes exactly.

It reads token ids of any leading shape ``(B, ..., L)`` and keeps every leading dimension
through every layer: a dual encoder trained under DP-SGD feeds it each example's own copy of the
class prompts, ``(B, K, L)``, and Opacus' hooks read the batch from the first dimension of each
layer's input. Folding ``(B, K)`` into one dimension before a ``Linear`` would make Opacus take
``B·K`` for the batch and mix the examples' gradients (``tests/test_vl.py`` checks exactness).

The blocks are ``vit.py``'s, for the same reasons (``nn.Linear`` attention, no
``nn.MultiheadAttention``; pre-norm), with the padding keys masked; positions are an
``nn.Embedding`` looked up with batch-shaped indices. Padding is also left out of the mean
pooling.
"""

from __future__ import annotations

import torch
from torch import nn

from .tokenizer import PAD
from .vit import Block


class TextTransformer(nn.Module):
    """Token + position embeddings -> pre-norm blocks -> masked mean pool -> LayerNorm."""

    def __init__(
        self,
        *,
        vocab_size: int,
        max_len: int,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.tokens = nn.Embedding(vocab_size, dim)
        self.positions = nn.Embedding(max_len, dim)
        nn.init.normal_(self.tokens.weight, std=0.1)
        nn.init.normal_(self.positions.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.register_buffer("index", torch.arange(max_len), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``(..., L)`` token ids -> ``(..., dim)`` text features."""
        keep = ids != PAD
        positions = self.index[: ids.shape[-1]].expand(ids.shape).contiguous()
        x = self.tokens(ids) + self.positions(positions)
        for block in self.blocks:
            x = block(x, keep)
        weights = keep.to(x.dtype).unsqueeze(-1)
        pooled = (x * weights).sum(-2) / weights.sum(-2).clamp(min=1.0)
        return self.norm(pooled)


class BagOfWords(nn.Module):
    """Token embeddings -> masked mean: a text tower that composes by construction.

    A caption's features are the mean of its words' vectors, so (after the linear projection)
    the prompt of an unseen composition is the average of the same attribute vectors the seen
    compositions are built from: what zero-shot on held-out defect x material x lighting
    combinations needs when a random-initialised transformer (no pretraining here) mixes the
    words non-linearly. Like :class:`TextTransformer` it keeps every leading dimension of the
    ``(..., L)`` ids (per-sample gradients under Opacus' hooks).
    """

    def __init__(self, *, vocab_size: int, dim: int = 64) -> None:
        super().__init__()
        self.dim = dim
        self.tokens = nn.Embedding(vocab_size, dim)
        nn.init.normal_(self.tokens.weight, std=1.0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``(..., L)`` token ids -> ``(..., dim)`` mean of the real tokens' embeddings."""
        weights = (ids != PAD).to(self.tokens.weight.dtype).unsqueeze(-1)
        return (self.tokens(ids) * weights).sum(-2) / weights.sum(-2).clamp(min=1.0)
