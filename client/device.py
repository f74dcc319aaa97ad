"""Where a site's tensors live: the ``device`` of ``site.toml``, resolved against this machine.

A site names ``cpu``, ``cuda`` / ``cuda:N`` or ``auto`` (CUDA when this process sees a GPU, else
the CPU). A virtual site in a simulation gets ``auto`` when ``simulation.num_gpus > 0``: Ray then
gives each actor its share of a GPU by setting ``CUDA_VISIBLE_DEVICES``, so ``cuda`` inside the
actor *is* the GPU Ray assigned (several sites share one with fractional ``num_gpus``).

Asking for CUDA where there is none is not fatal: the site trains on the CPU and says so once,
naming the site and why (torch built without CUDA, or no device visible), rather than failing
each round with a driver traceback.
"""

from __future__ import annotations

import itertools
import logging
import os
from contextlib import nullcontext
from typing import Any

import torch

from fedcl.config import FedclError

logger = logging.getLogger("fedcl.client")

_WARNED: set[tuple[str, str]] = set()


def cuda_unavailable_reason() -> str | None:
    """Why this process cannot use CUDA, or None when it can."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is built without CUDA"
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
        return f"no CUDA device is visible to this process{where}"
    return None


def place(module: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """``module.to(device)``, skipped when every parameter and buffer is already there.

    ``Module.to`` walks every submodule and re-wraps each tensor even when nothing moves; a
    round asks three times per site (scoring, training, the reply), which on a tiny model cost
    as much as a training step.
    """
    device = torch.device(device)
    tensors = itertools.chain(module.parameters(), module.buffers())
    if all(t.device == device for t in tensors):
        return module
    return module.to(device)


def resolve_device(requested: str, *, site_id: str | None = None) -> torch.device:
    """The device to train on for ``requested`` (``cpu``, ``auto``, ``cuda``, ``cuda:N``).

    ``cuda`` without a usable GPU falls back to the CPU with one warning per site; an index past
    the visible devices does too. Anything else is a :class:`FedclError` naming the setting.
    """
    name = str(requested).strip().lower()
    who = f"site {site_id}: " if site_id else ""
    if name == "cpu":
        return torch.device("cpu")
    if name == "auto":
        return torch.device("cuda") if cuda_unavailable_reason() is None else torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        try:
            device = torch.device(name)
        except RuntimeError as err:
            raise FedclError(f"{who}device = {requested!r} is not a device") from err
        why = cuda_unavailable_reason()
        if why is None and device.index is not None and device.index >= torch.cuda.device_count():
            why = f"only {torch.cuda.device_count()} CUDA device(s) are visible"
        if why is None:
            return device
        if (who, name) not in _WARNED:
            _WARNED.add((who, name))
            logger.warning("%sdevice = %r asked for, but %s; training on the CPU", who, name, why)
        return torch.device("cpu")
    raise FedclError(
        f"{who}device = {requested!r} is not supported (site.toml `device`); "
        "use cpu, cuda, cuda:N or auto"
    )


def autocast_for(device: torch.device, *, enabled: bool) -> Any:
    """bfloat16 autocast on a CUDA device that supports it, else no autocast.

    bfloat16 keeps float32's exponent range, so no loss scaling is needed and gradients added
    by hooks after backward (EWC, FedProx) need no unscaling. Not for DP-SGD: Opacus' per-sample
    gradients and clipping run in the parameters' dtype (the trainer leaves DP steps in fp32).
    """
    if enabled and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()
