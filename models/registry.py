"""Name -> model constructor, so configs, clients and the server agree on architectures.

Every participant of a federation must build the *same* parameter vector from a config entry
such as ``model: cnn``. Keeping the mapping in one place (and validating parameters here, with
messages that say what would be valid) turns a silent shape mismatch at aggregation time into
an early, readable error.

Each model also records the :class:`Objective` it trains: the loss on ``(outputs, targets)``,
the evaluation metric and how a batch splits into inputs and targets. The site trainer reads it
from the model (:func:`objective_of`) instead of hard-coding a classifier's cross-entropy, so a
model with another objective needs a registry row, not a new trainer. Every built-in model is a
classifier (:data:`CLASSIFIER`: cross-entropy, accuracy, ``(x, y)`` batches); the dual encoder
(``dual-encoder``, docs/DESIGN.md §11) trains :data:`PROMPT_CONTRASTIVE`, the same per-example
cross-entropy over its logits, which are image-prompt similarities, and is built with the class
prompts (the dataset's class names, :func:`build_model` ``class_names``).
"""

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from fedcl.config.errors import FedclError

from . import cnn, dual, mlp, resnet, scatter, vit


class ModelError(FedclError, ValueError):
    """Unknown model name or parameters the chosen model cannot be built with."""


def _xy(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets = batch  # exactly two: a batch of another shape is an error, not a guess
    return inputs, targets


def _cross_entropy(
    outputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    return F.cross_entropy(outputs, targets, reduction=reduction)


def _correct(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (outputs.argmax(dim=1) == targets).sum()


@dataclass(frozen=True)
class Objective:
    """What a model is trained and evaluated on.

    ``loss(outputs, targets, reduction)`` takes ``reduction`` in ``"mean"`` (training),
    ``"sum"`` (evaluation totals) and ``"none"`` (one value per example);
    ``metric(outputs, targets)`` is the *summed* metric of a batch (correct predictions for
    accuracy), divided by the example count by whoever reports it;
    ``split_batch(batch)`` gives ``(inputs, targets)``.
    """

    name: str
    loss: Callable[..., torch.Tensor]
    metric: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    metric_name: str
    split_batch: Callable[[Any], tuple[torch.Tensor, torch.Tensor]] = _xy
    #: The outputs are similarities to class prompts: each task trains against its own
    #: classes' prompts and held-out classes are evaluated zero-shot (continual/streams.py).
    task_prompts: bool = False


#: The objective of every zoo classifier: softmax cross-entropy, accuracy, ``(x, y)``.
CLASSIFIER = Objective("classifier", _cross_entropy, _correct, "accuracy")
#: The dual encoder's: each image's cross-entropy over its similarities to the class prompts,
#: a per-example loss (no other example's text in it), so DP-SGD's clipping bounds it.
PROMPT_CONTRASTIVE = Objective(
    "prompt-contrastive", _cross_entropy, _correct, "accuracy", task_prompts=True
)
_OBJECTIVE_ATTR = "fedcl_objective"


@dataclass(frozen=True)
class _Spec:
    builder: Callable[..., nn.Module]
    min_image_size: int
    summary: str
    objective: Objective = CLASSIFIER
    #: Built with the class prompts (``class_names``, ``held_out``) as well.
    prompted: bool = False


def _flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ModelError(f"{name} must be true or false, got {value!r}")
    return value


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelError(f"{name} must be a positive int, got {value!r}")
    return value


def _two_stages(channels: Sequence[int]) -> tuple[int, int]:
    """A two-stage CNN's ``channels`` option, validated."""
    channels = tuple(channels)
    if len(channels) != 2:
        raise ModelError(f"channels must have 2 entries (one per stage), got {channels!r}")
    for i, c in enumerate(channels):
        _positive_int(f"channels[{i}]", c)
    return channels  # type: ignore[return-value]


def _build_mlp(
    *,
    in_channels: int,
    image_size: int,
    num_classes: int,
    hidden: Sequence[int] = mlp.DEFAULT_HIDDEN,
    dropout: float = 0.0,
) -> nn.Module:
    hidden = tuple(hidden)
    for i, h in enumerate(hidden):
        _positive_int(f"hidden[{i}]", h)
    if not 0.0 <= dropout < 1.0:
        raise ModelError(f"dropout must be in [0, 1), got {dropout!r}")
    return mlp.MLP(
        in_channels=in_channels,
        image_size=image_size,
        num_classes=num_classes,
        hidden=hidden,
        dropout=dropout,
    )


def _build_cnn(
    *,
    in_channels: int,
    image_size: int,
    num_classes: int,
    channels: Sequence[int] = cnn.DEFAULT_CHANNELS,
    ws: bool = False,
) -> nn.Module:
    del image_size  # adaptive pooling: the architecture does not depend on it
    _flag("ws", ws)
    channels = _two_stages(channels)
    return cnn.SmallCNN(in_channels=in_channels, num_classes=num_classes, channels=channels, ws=ws)


def _build_scatter_cnn(
    *,
    in_channels: int,
    image_size: int,
    num_classes: int,
    channels: Sequence[int] = scatter.DEFAULT_CHANNELS,
) -> nn.Module:
    del image_size  # adaptive pooling: the architecture does not depend on it
    return scatter.ScatterCNN(
        in_channels=in_channels, num_classes=num_classes, channels=_two_stages(channels)
    )


def _build_resnet18_gn(
    *, in_channels: int, image_size: int, num_classes: int, width: float = 1.0, ws: bool = False
) -> nn.Module:
    del image_size  # adaptive pooling: the architecture does not depend on it
    _flag("ws", ws)
    if not isinstance(width, int | float) or isinstance(width, bool) or width <= 0:
        raise ModelError(f"width must be a positive number, got {width!r}")
    if round(64 * width) < 1:
        raise ModelError(f"width={width} leaves the first stage with no channels; use >= 1/64")
    return resnet.ResNet18GN(in_channels=in_channels, num_classes=num_classes, width=width, ws=ws)


def _build_vit_tiny(
    *,
    in_channels: int,
    image_size: int,
    num_classes: int,
    patch_size: int | None = None,
    dim: int = 64,
    depth: int = 4,
    heads: int = 4,
    mlp_ratio: float = 2.0,
) -> nn.Module:
    if patch_size is None:
        patch_size = vit.default_patch_size(image_size)
    _positive_int("patch_size", patch_size)
    for key, value in (("dim", dim), ("depth", depth), ("heads", heads)):
        _positive_int(key, value)
    if image_size % patch_size != 0 or image_size // patch_size < 2:
        valid = [p for p in range(1, image_size // 2 + 1) if image_size % p == 0]
        lower = image_size - image_size % patch_size
        nearest = [s for s in (lower, lower + patch_size) if s // patch_size >= 2]
        raise ModelError(
            f"vit-tiny needs image_size divisible by patch_size with at least 2x2 patches; "
            f"image_size={image_size} and patch_size={patch_size} do not fit. Valid patch sizes "
            f"for image_size={image_size}: {valid}; valid image sizes for patch_size="
            f"{patch_size}: multiples of {patch_size} such as {nearest}"
        )
    if dim % heads != 0:
        valid_heads = [h for h in range(1, dim + 1) if dim % h == 0 and h <= 16]
        raise ModelError(
            f"dim={dim} must be divisible by heads={heads}; valid heads: {valid_heads}"
        )
    if mlp_ratio <= 0 or int(dim * mlp_ratio) < 1:
        raise ModelError(f"mlp_ratio must give an MLP width >= 1, got {mlp_ratio!r}")
    return vit.ViT(
        in_channels=in_channels,
        image_size=image_size,
        num_classes=num_classes,
        patch_size=patch_size,
        dim=dim,
        depth=depth,
        heads=heads,
        mlp_ratio=mlp_ratio,
    )


def _build_dual_encoder(
    *,
    in_channels: int,
    image_size: int,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    held_out: Sequence[int] = (),
    image: str = "cnn",
    image_options: dict[str, Any] | None = None,
    image_pool: str = "avg",
    text: str = "transformer",
    text_dim: int = 64,
    text_depth: int = 2,
    text_heads: int = 4,
    embed_dim: int = 64,
    train: Sequence[str] = dual.PARTS,
    frozen_seed: int = 0,
) -> nn.Module:
    from .vl_build import build_dual_encoder

    if class_names is None:
        raise ModelError(
            "dual-encoder needs the class prompts: build it through the run plan, which passes "
            "the dataset's class names (or call build_model(..., class_names=[...]))"
        )
    if image == "dual-encoder" or image not in _MODELS:
        valid = [m for m in available_models() if m != "dual-encoder"]
        raise ModelError(f"dual-encoder option image={image!r} is not a zoo model; valid: {valid}")

    def tower() -> nn.Module:
        return build_model(
            image, in_channels=in_channels, image_size=image_size, num_classes=1,
            **dict(image_options or {}),
        )  # fmt: skip

    tower()  # a bad image option fails here, with the zoo's message
    for key, value in (("text_dim", text_dim), ("text_depth", text_depth),
                       ("text_heads", text_heads), ("embed_dim", embed_dim)):  # fmt: skip
        _positive_int(key, value)
    return build_dual_encoder(
        tower,
        class_names=list(class_names),
        num_classes=num_classes,
        held_out=held_out,
        text=text,
        text_dim=text_dim,
        text_depth=text_depth,
        text_heads=text_heads,
        embed_dim=embed_dim,
        train=train,
        frozen_seed=frozen_seed,
        image_pool=image_pool,
    )


_MODELS: dict[str, _Spec] = {
    "mlp": _Spec(_build_mlp, 1, "flatten -> hidden layers -> logits; cheapest baseline"),
    "cnn": _Spec(_build_cnn, cnn.MIN_IMAGE_SIZE, "~67k-param GroupNorm CNN, any size >= 8"),
    "scatter-cnn": _Spec(
        _build_scatter_cnn,
        scatter.MIN_IMAGE_SIZE,
        "fixed wavelet scattering + small CNN (~10k trained); the DP choice, size >= 16",
    ),
    "resnet18-gn": _Spec(
        _build_resnet18_gn, resnet.MIN_IMAGE_SIZE, "CIFAR ResNet-18 with GroupNorm, ~11.2M"
    ),
    "vit-tiny": _Spec(_build_vit_tiny, 4, "tiny ViT with Opacus-friendly attention/embeddings"),
    "dual-encoder": _Spec(
        _build_dual_encoder,
        1,
        "image tower from the zoo + text transformer + projections + temperature (CLIP-style)",
        PROMPT_CONTRASTIVE,
        prompted=True,
    ),
}
_SHARED = ("in_channels", "image_size", "num_classes", "class_names", "held_out")


def _spec(name: str) -> _Spec:
    """The registry row of ``name``; an unknown name is a ModelError listing the valid ones."""
    spec = _MODELS.get(name)
    if spec is None:
        raise ModelError(f"unknown model {name!r}; valid names: {', '.join(available_models())}")
    return spec


def available_models() -> list[str]:
    """Names accepted by :func:`build_model`, sorted, for CLI choices and error messages."""
    return sorted(_MODELS)


def build_model(
    name: str,
    *,
    in_channels: int,
    image_size: int,
    num_classes: int,
    class_names: Sequence[str] | None = None,
    held_out: Sequence[int] = (),
    **kwargs: Any,
) -> nn.Module:
    """Build the model called ``name`` for ``(in_channels, image_size, image_size)`` inputs.

    ``kwargs`` are model-specific (``hidden`` for mlp, ``channels`` for cnn, ``width`` for
    resnet18-gn, ``patch_size``/``dim``/``depth``/``heads``/``mlp_ratio`` for vit-tiny, see
    ``_build_dual_encoder`` for dual-encoder). ``class_names`` and ``held_out`` reach only a
    model that reads prompts (the dual encoder); the others ignore them.
    Raises :class:`ModelError` for an unknown name, an unknown keyword or invalid values, so a
    bad config fails before any client trains.
    """
    spec = _spec(name)
    _positive_int("in_channels", in_channels)
    _positive_int("image_size", image_size)
    _positive_int("num_classes", num_classes)
    if image_size < spec.min_image_size:
        raise ModelError(f"{name} needs image_size >= {spec.min_image_size}, got {image_size}")
    accepted = [p for p in inspect.signature(spec.builder).parameters if p not in _SHARED]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ModelError(f"{name} does not accept {unknown}; its options are {accepted or 'none'}")
    if spec.prompted:
        kwargs = {**kwargs, "class_names": class_names, "held_out": tuple(held_out)}
    try:
        model = spec.builder(
            in_channels=in_channels, image_size=image_size, num_classes=num_classes, **kwargs
        )
    except ModelError:
        raise
    except (TypeError, ValueError) as exc:  # e.g. a string where a number was expected
        raise ModelError(f"cannot build {name} with {kwargs}: {exc}") from exc
    # A plain attribute, not a buffer: it stays out of the state dict (and so out of updates).
    setattr(model, _OBJECTIVE_ATTR, spec.objective)
    return model


def min_image_size(name: str) -> int:
    """The smallest square input the registered model ``name`` accepts (an unknown name is a
    ModelError), so callers can choose valid shapes instead of catching the build's error."""
    spec = _spec(name)
    return spec.min_image_size


def model_objective(name: str) -> Objective:
    """The objective the registered model ``name`` trains (unknown names are a ModelError)."""
    spec = _spec(name)
    return spec.objective


def objective_of(model: nn.Module) -> Objective:
    """The objective recorded on ``model`` by :func:`build_model`; a classifier's otherwise.

    Looks through wrappers (Opacus' ``_module``, DDP's ``module``), so the trainer finds it on
    the model it was handed whatever wraps it.
    """
    seen: Any = model
    while isinstance(seen, nn.Module):
        found = seen.__dict__.get(_OBJECTIVE_ATTR)
        if isinstance(found, Objective):
            return found
        seen = seen._modules.get("_module", seen._modules.get("module"))
    return CLASSIFIER


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of scalar parameters, for logs, budgets (CKKS ciphertext count) and tests."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
