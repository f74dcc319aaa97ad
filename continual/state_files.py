"""Site-local continual state on disk: one safetensors file per piece, written atomically.

EWC memory, SI's path integral, LwF's teacher and the replay buffer all live in the site's state
folder and survive restarts. They share one format discipline: safetensors (no pickle, so reading
a file runs no code), a ``format`` tag in the metadata that is checked on load, and a write beside
the target renamed over it, so a crash mid-write never leaves half a file behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from fedcl.config import FedclError


def save_state(
    path: str | os.PathLike[str],
    tensors: dict[str, torch.Tensor],
    *,
    fmt: str,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``tensors`` (and ``metadata``, tagged ``format = fmt``) to ``path`` atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(
        {k: t.contiguous() for k, t in tensors.items()},
        str(tmp),
        metadata={**(metadata or {}), "format": fmt},
    )
    os.replace(tmp, path)
    return path


def load_state(
    path: str | os.PathLike[str], *, fmt: str, what: str
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a file written by :func:`save_state` with format ``fmt``.

    ``what`` names the file in errors ("EWC memory", "SI state", …); a file that cannot be read
    or has another format is a :class:`FedclError` naming it.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types
        raise FedclError(f"{what} {path} cannot be read: {exc}") from exc
    if metadata.get("format") != fmt:
        raise FedclError(f"{what} {path} has format {metadata.get('format')!r}, expected {fmt!r}")
    return tensors, metadata
