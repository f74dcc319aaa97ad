"""Model zoo: plain-torch vision models that Opacus can train (no BatchNorm, no in-place tricks)."""

from .registry import ModelError, available_models, build_model, count_parameters

__all__ = ["ModelError", "available_models", "build_model", "count_parameters"]
