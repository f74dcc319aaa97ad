"""The fixed order in which a state dict is flattened into the values a site encrypts.

:class:`Layout` records names, shapes and dtypes in order; its SHA-256 travels with every message
so a reply from a site with another model is rejected instead of being added into the wrong
coordinates. :meth:`Layout.flatten` refuses NaN/inf naming the tensor, before anything is
encrypted.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from .errors import UpdateError

LAYOUT_VERSION = "fedcl-layout-1"


@dataclass(frozen=True)
class LayoutEntry:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def _dtype_name(tensor: Any) -> str:
    dtype = str(tensor.dtype)
    return dtype.removeprefix("torch.")


def _as_float64(tensor: Any) -> np.ndarray:
    """A torch tensor or numpy array as a float64 numpy array (copying only when needed)."""
    if hasattr(tensor, "detach"):
        import torch

        return tensor.detach().to("cpu", torch.float64).numpy()
    return np.asarray(tensor, dtype=np.float64)


@dataclass(frozen=True)
class Layout:
    """The fixed order in which a state dict is flattened: names, shapes, dtypes."""

    entries: tuple[LayoutEntry, ...]

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> Layout:
        return cls(
            tuple(
                LayoutEntry(str(k), tuple(int(d) for d in v.shape), _dtype_name(v))
                for k, v in state.items()
            )
        )

    @cached_property
    def hash(self) -> str:
        """SHA-256 of names, shapes, dtypes and their order: what replies are checked against."""
        desc = [LAYOUT_VERSION] + [[e.name, list(e.shape), e.dtype] for e in self.entries]
        return hashlib.sha256(json.dumps(desc, separators=(",", ":")).encode()).hexdigest()

    @cached_property
    def num_values(self) -> int:
        return sum(e.size for e in self.entries)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def flatten(self, state: Mapping[str, Any]) -> np.ndarray:
        """All values in layout order as float64; refuses NaN/inf naming the tensor."""
        missing = [e.name for e in self.entries if e.name not in state]
        extra = [k for k in state if k not in {e.name for e in self.entries}]
        if missing or extra:
            raise UpdateError(
                f"update does not match the model layout: missing {missing[:5]}, "
                f"unexpected {extra[:5]}"
            )
        flat = np.empty(self.num_values, dtype=np.float64)
        pos = 0
        for e in self.entries:
            arr = _as_float64(state[e.name])
            if tuple(arr.shape) != e.shape:
                raise UpdateError(
                    f"tensor {e.name!r} has shape {tuple(arr.shape)}, the layout says {e.shape}"
                )
            if not np.isfinite(arr).all():
                bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
                raise UpdateError(
                    f"tensor {e.name!r} has {bad} NaN/inf value(s): refusing to encrypt this "
                    "update (training diverged? lower the learning rate or check the data)"
                )
            flat[pos : pos + e.size] = arr.reshape(-1)
            pos += e.size
        return flat

    def unflatten(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        pos = 0
        for e in self.entries:
            out[e.name] = flat[pos : pos + e.size].reshape(e.shape)
            pos += e.size
        return out
