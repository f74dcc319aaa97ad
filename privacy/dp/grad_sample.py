"""Which per-sample-gradient mode DP-SGD uses (Opacus' ``grad_sample_mode``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .planning import DPConfigError

if TYPE_CHECKING:
    from torch import nn

#: Grad-sample modes that work with :class:`fedcl.client.trainer.LocalTrainer`. "ghost" is
#: excluded: it needs Opacus' own loss wrapper for its double backward pass (the trainer owns
#: its criterion), and it scales a penalty added to the loss by the mean clip factor, which
#: breaks the sensitivity argument (docs/notes/measurements.md, "Opacus 1.6").
GRAD_SAMPLE_MODES: tuple[str, ...] = ("hooks", "ew", "functorch")
DEFAULT_GRAD_SAMPLE_MODE = "hooks"


def choose_grad_sample_mode(model: nn.Module, override: str | None = None) -> str:
    """The per-sample-gradient mode for ``model``: ``override`` if given, else "hooks".

    Every built-in model gets per-sample gradients equal to a per-example loop in hooks, ew and
    functorch (tests/test_models.py), so this is a speed choice. Measured through the site's
    training path (benchmarks/dp_throughput.py --all-modes, 1 thread, batch 64, shared 2-core
    box; samples/s hooks / ew / functorch): mlp 1x8x8 3496 / 4345 / 2401, cnn 1x8x8
    739 / 845 / 449, mlp 3x32x32 227 / 265 / 254, cnn 3x32x32 144 / 134 / 152,
    resnet18-gn 6 / 6 / 4, vit-tiny 261 / 256 / 204. ExpandedWeights ("ew") wins only on the
    cheap MLP/digit-CNN cases (+15-25%, within the box's drift) and ties or loses on the conv
    and attention models where DP time matters; it also supports only layers PyTorch knows
    and fails at run time on any other. Hooks is the robust default; DPSpec may later carry
    an explicit mode (``override``).
    """
    del model  # the choice does not depend on the architecture today
    return DEFAULT_GRAD_SAMPLE_MODE if override is None else _valid_mode(override)


def _valid_mode(mode: str) -> str:
    if mode not in GRAD_SAMPLE_MODES:
        why = (
            " (ghost clipping needs Opacus' loss wrapper, which the trainer does not use, and "
            "rescales regulariser terms in the loss)"
            if mode.startswith("ghost")
            else ""
        )
        raise DPConfigError(
            f"grad_sample_mode {mode!r} is not supported{why}; valid: "
            f"{', '.join(GRAD_SAMPLE_MODES)}"
        )
    return mode
