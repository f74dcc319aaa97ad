"""What the coordinator may know about a dataset without seeing a single example."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from fedcl.config.experiment import DataSpec


@dataclass(frozen=True)
class DatasetInfo:
    """Label space, domains and image shape: enough to build a model and cut a stream."""

    class_names: tuple[str, ...]
    domain_names: tuple[str, ...]
    channels: int
    image_size: int
    #: Classes no site trains on: a stream evaluates them zero-shot (docs/DESIGN.md §11).
    held_out: tuple[int, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def dataset_info(spec: DataSpec, seed: int = 0) -> DatasetInfo:
    """Describe the experiment's dataset (declared for folders, derived for built-ins)."""
    if spec.dataset == "folder":
        assert spec.class_names and spec.image_size and spec.channels  # checked by DataSpec
        return DatasetInfo(
            tuple(spec.class_names),
            tuple(spec.domain_names or ("default",)),
            spec.channels,
            spec.image_size,
        )
    return _builtin_info(spec.dataset, seed, freeze_options(spec.options))


@lru_cache(maxsize=8)
def _builtin_info(name: str, seed: int, options: tuple) -> DatasetInfo:
    from .builtin import load_builtin

    data = load_builtin(name, seed=seed, **_thaw(options))
    return DatasetInfo(
        data.class_names, data.domain_names, data.in_channels, data.image_size, data.held_out
    )


def freeze_options(options: dict) -> tuple:
    """Hashable form of a dataset's options (lists become tuples), for caching loads."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items()))


def _thaw(options: tuple) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options}
