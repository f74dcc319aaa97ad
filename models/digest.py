"""One SHA-256 for a set of weights, computed the same way at every site and the coordinator.

Sites report it after applying an aggregate (docs/DESIGN.md §4): if the coordinator cannot decrypt,
agreeing digests are its only evidence that every site holds the same global model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch


def state_sha256(state: Mapping[str, torch.Tensor]) -> str:
    """Hash names, shapes and float32 bytes in sorted-name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu", torch.float32).contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()
