"""A tiny Vision Transformer that Opacus can train with per-sample gradients.

Why the unusual pieces:

* Attention is written with ``nn.Linear`` projections and a parameter-free
  ``scaled_dot_product_attention``. Opacus' validator rejects ``nn.MultiheadAttention`` (its
  fused projection weights have no grad sampler), and its fixer swaps in
  ``DPMultiheadAttention``, which renames the parameters, so sites that did and did not run
  the fixer would exchange mismatched state dicts. ``nn.Linear`` has a grad sampler in every
  Opacus mode and the model is valid as built.
* The cls token and the positional embedding are ``nn.Embedding`` tables looked up with index
  tensors that carry the batch dimension (``(B, 1)`` and ``(B, N + 1)``). A bare
  ``nn.Parameter`` added in ``forward`` has no grad sampler in Opacus' hook mode and breaks the
  ExpandedWeights ("ew") mode; an embedding lookup gives the same function (row ``i`` of the
  table is added at position ``i``) and is supported by the hooks, ew, functorch and ghost
  grad-sample modes.
* Patches are embedded by ``F.unfold`` + ``nn.Linear`` (the same function as a strided
  ``Conv2d``; the weight viewed as ``(dim, C, p, p)`` is the conv kernel). With a Conv2d, the
  gradient reaching it through ``flatten().transpose()`` is non-contiguous and PyTorch's
  ExpandedWeights conv backward fails on it (``view size is not compatible``), so ew mode
  would not work.
* LayerNorm and GELU MLPs in pre-norm blocks, the standard ViT recipe that trains without
  warm-up tricks at this depth.
"""

import torch
from torch import nn
from torch.nn import functional as F


def default_patch_size(image_size: int) -> int:
    """4x4 patches for images of 16 pixels and up, 2x2 below (an 8x8 digit gives 16 patches)."""
    return 4 if image_size >= 16 else 2


class TokenEmbedding(nn.Module):
    """Prepends a learned cls token and adds learned positional embeddings.

    Both are ``nn.Embedding`` lookups so that Opacus sees a layer it knows how to differentiate
    per sample; the index tensors are expanded to the batch size because Opacus reads the batch
    size from the first dimension of each layer's input.
    """

    def __init__(self, num_patches: int, dim: int) -> None:
        super().__init__()
        self.num_tokens = num_patches + 1
        self.cls_token = nn.Embedding(1, dim)
        self.pos_embedding = nn.Embedding(self.num_tokens, dim)
        nn.init.trunc_normal_(self.cls_token.weight, std=0.02)
        nn.init.trunc_normal_(self.pos_embedding.weight, std=0.02)
        self.register_buffer("positions", torch.arange(self.num_tokens), persistent=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """``(B, N, D)`` patch tokens -> ``(B, N + 1, D)`` tokens with cls first."""
        batch = patches.shape[0]
        # Contiguous copies: Opacus' ghost-clipping norm sampler calls ``.view`` on the indices.
        positions = self.positions.unsqueeze(0).expand(batch, -1).contiguous()
        cls = self.cls_token(torch.zeros_like(positions[:, :1]))
        return torch.cat([cls, patches], dim=1) + self.pos_embedding(positions)


class Attention(nn.Module):
    """Multi-head self-attention from plain ``nn.Linear`` layers (see module docstring), over
    the token axis of ``(..., T, D)``; ``keep`` (``(..., T)``, True for real tokens) masks the
    keys of padding (the text tower's prompts, ``text.py``)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """``(..., T, D)`` -> ``(..., T, D)``; every leading dimension is kept (Opacus reads
        the batch from the first)."""
        *lead, t, d = x.shape
        qkv = self.qkv(x).reshape(*lead, t, 3, self.heads, d // self.heads)
        q, k, v = qkv.movedim(-3, 0).transpose(-3, -2).unbind(0)  # each (..., H, T, d)
        mask = None if keep is None else keep[..., None, None, :]  # queries see real keys
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(-3, -2).reshape(*lead, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Residual attention (padding masked by ``keep``, see :class:`Attention`) then
        residual MLP."""
        x = x + self.attn(self.norm1(x), keep)
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patchify (unfold + Linear) -> cls + positions -> pre-norm blocks -> LayerNorm -> head."""

    def __init__(
        self,
        *,
        in_channels: int,
        image_size: int,
        num_classes: int,
        patch_size: int,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        grid = image_size // patch_size
        self.patch_size = patch_size
        self.patch_embed = nn.Linear(in_channels * patch_size * patch_size, dim)
        self.tokens = TokenEmbedding(grid * grid, dim)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map images ``(B, C, H, W)`` to logits ``(B, num_classes)`` via the cls token."""
        # (B, C*p*p, N) -> (B, N, C*p*p): one row per non-overlapping p x p patch.
        pixels = F.unfold(x, kernel_size=self.patch_size, stride=self.patch_size).transpose(1, 2)
        patches = self.patch_embed(pixels)
        tokens = self.blocks(self.tokens(patches))
        return self.head(self.norm(tokens[:, 0]))
