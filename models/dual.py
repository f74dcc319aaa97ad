"""A CLIP-style dual encoder whose output is a classifier's: one logit per class prompt.

``forward(images)`` gives ``(B, C)`` logits, ``exp(t) · cos(image_i, prompt_c)``, so the
objective is each image's softmax cross-entropy over the class prompts (CLIP's image→text half
with the classes' captions as the texts), and the trainer, DP-SGD, the continual methods and the
evaluation treat it like any classifier. Why this objective and not CLIP's in-batch loss: the
in-batch loss couples the examples of a batch (each image's loss has the other examples' texts in
its denominator), so clipping per-sample gradients would not bound one example's influence; here
example ``i``'s loss depends on ``(x_i, y_i)`` and the public prompts only, so DP-SGD's
per-sample clipping bounds it exactly as for a classifier (docs/DESIGN.md §11).

Per-sample gradients of the *text* side need care: the prompts are the same for every example,
so a text tower run once on ``(C, L)`` ids has activations without a batch dimension, and
Opacus' hooks would attribute its gradient wrongly. While Opacus' per-sample hooks are attached
(``hooks`` and ``functorch`` grad-sample modes, the ones the site uses) each example gets its own
copy of the prompts, ``(B, K, L)``, and :mod:`.text` keeps that batch dimension in every layer:
exact per-sample gradients at ``B``× the text compute. Without DP the prompts run once per batch
(the same function and the same summed gradient). ExpandedWeights ("ew") and ghost clipping
attach no such hooks, so the model declares the mode it needs (:attr:`DualEncoder.
fedcl_grad_sample_mode`, read by ``privacy/dp/grad_sample.py``).

**What trains and travels** is ``train``, a subset of ``image`` (the image tower), ``text`` (the
text tower) and ``projections`` (both projection heads and the temperature). A frozen part is not
a parameter of this module at all: a frozen text tower is run once at build time and only its
prompt features are kept (a non-persistent buffer), a frozen image tower is held outside the
module's registry. So ``state_dict()`` — what the sites encrypt, send and the coordinator sums —
and ``parameters()`` — what DP-SGD clips and noises — hold exactly the trained parts: a frozen
tower costs no bytes and no ε. Frozen weights come from ``frozen_seed`` (or a pretrained tower),
so every site builds the same ones.

While training, the held-out classes' prompts are not computed (their logits are −∞): no site's
update ever depends on a prompt reserved for zero-shot evaluation, whatever mask the trainer uses.
(EWC's Fisher is computed in evaluation mode, where every prompt competes: the prompts are public
text, so its curvature sees them but no held-out example.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

PARTS: tuple[str, ...] = ("image", "text", "projections")
_INIT_TEMPERATURE = math.log(1 / 0.07)  # CLIP's initial logit scale
_MAX_TEMPERATURE = math.log(100.0)  # and its cap


class LogitScale(nn.Module):
    """CLIP's learnable temperature ``t`` (logits are ``exp(t)·cos``), capped at ``log 100``.

    An ``nn.Embedding`` of one value looked up with a batch-shaped index, so Opacus has a grad
    sampler for it in every mode (a bare ``nn.Parameter`` has none in hooks mode).
    """

    def __init__(self) -> None:
        super().__init__()
        self.value = nn.Embedding(1, 1)
        nn.init.constant_(self.value.weight, _INIT_TEMPERATURE)

    def forward(self, batch: int, device: torch.device) -> torch.Tensor:
        """``(batch, 1)`` scales, one per example."""
        index = torch.zeros(batch, 1, dtype=torch.long, device=device)
        return self.value(index).squeeze(-1).clamp(max=_MAX_TEMPERATURE).exp()


class DualEncoder(nn.Module):
    """Image tower + text tower (or its frozen prompt features) + projections + temperature."""

    #: DP-SGD must use Opacus' hooks: the per-example prompt copies are made when the hooks
    #: are attached, and ExpandedWeights or ghost clipping would not see them
    #: (``fedcl.privacy.dp.grad_sample.choose_grad_sample_mode`` reads this).
    fedcl_grad_sample_mode = "hooks"

    def __init__(
        self,
        *,
        image_tower: nn.Module,
        image_features: int,
        prompt_ids: torch.Tensor,
        embed_dim: int,
        train: Sequence[str],
        text_tower: nn.Module | None = None,
        text_features: torch.Tensor | None = None,
        frozen_text: Callable[[Sequence[str]], torch.Tensor] | None = None,
        tokenize: Callable[[Sequence[str]], torch.Tensor] | None = None,
        held_out: Sequence[int] = (),
    ) -> None:
        super().__init__()
        self.train_parts = tuple(p for p in PARTS if p in train)
        if "image" in self.train_parts:
            self.image_tower = image_tower
        else:  # frozen: outside the module registry, so no parameter, no state, no gradient
            image_tower.requires_grad_(False).eval()
            object.__setattr__(self, "frozen_image_tower", image_tower)
        if text_tower is not None:
            self.text_tower = text_tower
            width = text_tower.dim
            self.register_buffer("prompt_ids", prompt_ids, persistent=False)
        else:
            assert text_features is not None
            width = text_features.shape[-1]
            self.register_buffer("text_features", text_features, persistent=False)
        # Outside the registry (no state, no parameters): turn any caption into text features,
        # for retrieval over captions that are not class prompts.
        object.__setattr__(self, "frozen_text", frozen_text)
        object.__setattr__(self, "tokenize", tokenize)
        self.num_classes = int(prompt_ids.shape[0])
        self.image_projection = nn.Linear(image_features, embed_dim)
        self.text_projection = nn.Linear(width, embed_dim)
        self.logit_scale = LogitScale()
        if "projections" not in self.train_parts:
            for module in (self.image_projection, self.text_projection, self.logit_scale):
                module.requires_grad_(False)
        seen = [c for c in range(self.num_classes) if c not in set(held_out)]
        self.register_buffer("seen", torch.tensor(seen, dtype=torch.long), persistent=False)

    def _apply(self, fn, recurse=True):  # .to(device) moves the frozen tower too
        super()._apply(fn, recurse)
        frozen = self.__dict__.get("frozen_image_tower")
        if frozen is not None:
            frozen._apply(fn, recurse)
        return self

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, E)`` unit image embeddings."""
        if "image" in self.train_parts:
            features = self.image_tower(images)
        else:
            with torch.no_grad():
                features = self.frozen_image_tower(images)
        return F.normalize(self.image_projection(features), dim=-1)

    def text_embeddings(self, classes: torch.Tensor, batch: int | None = None) -> torch.Tensor:
        """Unit embeddings of the prompts of ``classes``: ``(K, E)``, or ``(batch, K, E)`` with
        one copy per example (what exact per-sample gradients of the text side need)."""
        if hasattr(self, "text_tower"):
            ids = self.prompt_ids[classes]
            if batch is not None:
                ids = ids.unsqueeze(0).expand(batch, *ids.shape).contiguous()
            features = self.text_tower(ids)
        else:
            features = self.text_features[classes]
            if batch is not None:
                features = features.unsqueeze(0).expand(batch, *features.shape).contiguous()
        return F.normalize(self.text_projection(features), dim=-1)

    @torch.no_grad()
    def caption_embeddings(self, captions: Sequence[str]) -> torch.Tensor:
        """``(N, E)`` unit embeddings of any captions (image→text retrieval's gallery)."""
        device = self.image_projection.weight.device
        if hasattr(self, "text_tower"):
            assert self.tokenize is not None
            features = self.text_tower(self.tokenize(captions).to(device))
        else:
            assert self.frozen_text is not None
            features = self.frozen_text(captions).to(device)
        return F.normalize(self.text_projection(features), dim=-1)

    def _per_example_text(self) -> bool:
        """Whether the text side needs one copy of the prompts per example: it trains, and
        Opacus' hooks are computing per-sample gradients (they list themselves here)."""
        trainable = "projections" in self.train_parts or (
            "text" in self.train_parts and hasattr(self, "text_tower")
        )
        hooked = bool(self.__dict__.get("autograd_grad_sample_hooks"))
        return trainable and hooked and torch.is_grad_enabled()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C)`` logits ``exp(t)·cos(image, prompt)``; −∞ for held-out prompts in training."""
        image = self.image_embeddings(images)
        batch = image.shape[0]
        scale = self.logit_scale(batch, image.device)  # (B, 1)
        if not self.training:
            classes = torch.arange(self.num_classes, device=image.device)
            return scale * image @ self.text_embeddings(classes).T
        classes = self.seen
        if self._per_example_text():
            text = self.text_embeddings(classes, batch)  # (B, K, E): per-example copies
            sims = torch.einsum("be,bke->bk", image, text)
        else:
            sims = image @ self.text_embeddings(classes).T
        out = sims.new_full((batch, self.num_classes), float("-inf"))
        return out.index_copy(1, classes, scale * sims)


def strip_head(model: nn.Module) -> tuple[nn.Module, int]:
    """A zoo classifier without its last linear layer, and that layer's input width.

    Every zoo model ends in one ``nn.Linear`` (``head``, or ``net[-1]`` for the MLP): what comes
    before it is the image tower, and the dual encoder's projection takes the head's place.
    """
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear):
        model.head = nn.Identity()
        return model, head.in_features
    net = getattr(model, "net", None)
    if isinstance(net, nn.Sequential) and isinstance(net[-1], nn.Linear):
        width = net[-1].in_features
        net[-1] = nn.Identity()
        return model, width
    raise ValueError(f"{type(model).__name__} has no final nn.Linear head to replace")
