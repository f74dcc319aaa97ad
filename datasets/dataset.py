"""The one in-memory form every site dataset takes, whatever its source.

Built-in datasets, class folders and CSV manifests all end up as :class:`LabeledImages`, so the
trainer, the continual stream and the partitioner never need to know where the pixels came from.
Arrays are plain numpy so the type is cheap to slice, pickle to Ray workers and test.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedcl.config.errors import FedclError

DEFAULT_DOMAIN = "default"


class DataError(FedclError, ValueError):
    """A site data problem the user can fix; the message names the file, folder or field."""


@dataclass(frozen=True, eq=False)
class LabeledImages:
    """Images with class labels, a domain index per example and, optionally, a task index.

    ``x`` is float32 ``(N, C, H, W)`` in ``[0, 1]`` with square images; ``y`` and ``domain`` are
    int64 ``(N,)`` indexing ``class_names`` and ``domain_names``. ``task`` is only set when the
    source names tasks explicitly (a manifest ``task`` column); otherwise the continual stream is
    free to cut tasks itself. Arrays are validated (and dtypes coerced) on construction so a bad
    loader fails here rather than deep inside training.
    """

    x: np.ndarray
    y: np.ndarray
    domain: np.ndarray
    class_names: tuple[str, ...]
    domain_names: tuple[str, ...]
    task: np.ndarray | None = None
    #: Classes no site trains on (zero-shot evaluation of a vision-language model, §11).
    held_out: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        x = np.asarray(self.x, dtype=np.float32)
        y = np.asarray(self.y, dtype=np.int64)
        domain = np.asarray(self.domain, dtype=np.int64)
        task = None if self.task is None else np.asarray(self.task, dtype=np.int64)
        class_names = tuple(str(c) for c in self.class_names)
        domain_names = tuple(str(d) for d in self.domain_names)
        if x.ndim != 4 or x.shape[2] != x.shape[3]:
            raise DataError(f"images must have shape (N, C, H, H) (square); got {x.shape}")
        n = x.shape[0]
        for field, arr in (("y", y), ("domain", domain), ("task", task)):
            if arr is not None and arr.shape != (n,):
                raise DataError(f"{field} must have shape ({n},) to match x; got {arr.shape}")
        if not class_names:
            raise DataError("class_names must name at least one class")
        if not domain_names:
            raise DataError("domain_names must name at least one domain")
        if n:
            if y.min() < 0 or y.max() >= len(class_names):
                raise DataError(
                    f"labels must lie in [0, {len(class_names)}); got {y.min()}..{y.max()}"
                )
            if domain.min() < 0 or domain.max() >= len(domain_names):
                raise DataError(
                    f"domain indices must lie in [0, {len(domain_names)}); "
                    f"got {domain.min()}..{domain.max()}"
                )
            if task is not None and task.min() < 0:
                raise DataError(f"task indices must be >= 0; got {task.min()}")
            if not (x.min() >= 0.0 and x.max() <= 1.0):
                raise DataError(f"pixel values must lie in [0, 1]; got {x.min()}..{x.max()}")
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)
        object.__setattr__(self, "domain", domain)
        object.__setattr__(self, "task", task)
        object.__setattr__(self, "class_names", class_names)
        object.__setattr__(self, "domain_names", domain_names)
        held_out = tuple(int(c) for c in self.held_out)
        if any(not 0 <= c < len(class_names) for c in held_out):
            raise DataError(f"held_out classes must lie in [0, {len(class_names)}); got {held_out}")
        object.__setattr__(self, "held_out", held_out)

    def subset(self, idx: np.ndarray) -> LabeledImages:
        """The examples at ``idx`` (integer indices or a boolean mask), keeping all names.

        Names are kept even for classes or domains absent from the subset, so every site shard
        agrees on label indices and the model's output size.
        """
        idx = np.asarray(idx)
        if idx.dtype != bool:
            idx = idx.astype(np.int64, copy=False)
        return LabeledImages(
            x=self.x[idx],
            y=self.y[idx],
            domain=self.domain[idx],
            class_names=self.class_names,
            domain_names=self.domain_names,
            task=None if self.task is None else self.task[idx],
            held_out=self.held_out,
        )

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __repr__(self) -> str:
        return (
            f"LabeledImages(n={len(self)}, shape={tuple(self.x.shape[1:])}, "
            f"classes={list(self.class_names)}, domains={list(self.domain_names)}, "
            f"tasks={'yes' if self.task is not None else 'no'})"
        )

    @property
    def num_classes(self) -> int:
        """Number of class names (the model's output size), present in the data or not."""
        return len(self.class_names)

    @property
    def in_channels(self) -> int:
        """Image channels (1 for grayscale, 3 for RGB): the model's input channels."""
        return int(self.x.shape[1])

    @property
    def image_size(self) -> int:
        """Height (= width) of every image in pixels."""
        return int(self.x.shape[2])


def to_tensor_dataset(data: LabeledImages) -> TensorDataset:
    """``(x, y)`` tensors for a torch ``DataLoader``; shares memory with the numpy arrays."""
    x = torch.from_numpy(np.ascontiguousarray(data.x))
    y = torch.from_numpy(np.ascontiguousarray(data.y))
    return TensorDataset(x, y)
