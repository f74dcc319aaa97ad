"""Model zoo: plain-torch vision models that Opacus can train (no BatchNorm, no in-place tricks)."""

from .digest import state_sha256
from .registry import (
    ModelError,
    available_models,
    build_model,
    count_parameters,
    min_image_size,
)

__all__ = [
    "state_sha256",
    "ModelError",
    "available_models",
    "build_model",
    "count_parameters",
    "min_image_size",
]
