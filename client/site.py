"""A site's view of an experiment: its config, its examples, cut into the experiment's tasks.

Everything here is derived from two inputs, the experiment (sent by the coordinator with every
message) and the site config (the site administrator's file), and cached by their content so a
Ray actor that plays several virtual sites never mixes them up (module globals leak between
simulated sites; cache keys do not).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedcl.config import ConfigError, ExperimentConfig, SiteConfig, load_toml, to_json
from fedcl.continual.streams import Stream
from fedcl.continual.tasks import experiment_stream
from fedcl.datasets import (
    DataError,
    LabeledImages,
    load_builtin,
    load_folder,
    partition_indices,
    train_test_split_indices,
)
from fedcl.datasets.info import DatasetInfo, dataset_info, freeze_options

SITE_CONFIG_KEY = "site-config"


def resolve_site_config(node_config: dict, sites_dir: str | None) -> SiteConfig:
    """Find this SuperNode's site config.

    A deployed SuperNode names its file with ``--node-config 'site-config="/etc/fedcl/site.toml"'``;
    a virtual site in a simulation finds ``site-<partition-id>.toml`` in the folder the
    simulation runner wrote.
    """
    path = node_config.get(SITE_CONFIG_KEY)
    if path:
        return load_toml(SiteConfig, str(path))
    if sites_dir is not None and "partition-id" in node_config:
        return load_toml(SiteConfig, Path(sites_dir) / f"site-{node_config['partition-id']}.toml")
    raise ConfigError(
        "this SuperNode has no site config: start it with "
        "--node-config 'site-config=\"/etc/fedcl/site.toml\"' (see `fedcl site init`)"
    )


@dataclass(frozen=True)
class SiteData:
    """A site's train and test examples, and the stream that cuts them into tasks."""

    site_id: str
    stream: Stream
    train: LabeledImages
    test: LabeledImages

    def train_set(self, task_index: int) -> TensorDataset:
        """Training examples of one task, labels mapped to model outputs."""
        return self._tensors(self.train, self.stream.tasks[task_index])

    def test_set(self, eval_index: int) -> TensorDataset:
        """Test examples of one evaluation task."""
        return self._tensors(self.test, self.stream.evaluation_tasks[eval_index])

    def _tensors(self, data: LabeledImages, task) -> TensorDataset:
        idx = self.stream.select(task, data.y, data.domain, data.task)
        x = torch.from_numpy(np.ascontiguousarray(data.x[idx]))
        y = torch.from_numpy(self.stream.targets(data.y[idx]))
        return TensorDataset(x, y)


def load_site_data(experiment: ExperimentConfig, site: SiteConfig) -> SiteData:
    """The site's examples for this experiment (cached by the two configs' content)."""
    return _load_site_data(to_json(experiment), to_json(site))


@lru_cache(maxsize=8)
def _load_site_data(experiment_json: str, site_json: str) -> SiteData:
    experiment = ExperimentConfig.model_validate(json.loads(experiment_json))
    site = SiteConfig.model_validate(json.loads(site_json))
    info = dataset_info(experiment.data, experiment.seed)
    examples = _site_examples(experiment, site, info)
    stream = experiment_stream(experiment, info)
    train_idx, test_idx = train_test_split_indices(
        len(examples),
        test_fraction=experiment.data.test_fraction,
        seed=experiment.seed,
        stratify=examples.y,
    )
    return SiteData(site.site_id, stream, examples.subset(train_idx), examples.subset(test_idx))


def _site_examples(experiment: ExperimentConfig, site: SiteConfig, info: DatasetInfo):
    spec = site.data
    if spec.source == "folder":
        if experiment.data.dataset != "folder":
            raise ConfigError(
                f"site {site.site_id}: data.source = 'folder' but the experiment trains on the "
                f"built-in dataset {experiment.data.dataset!r}; point the site at that dataset "
                "(source = 'builtin') or run a folder experiment"
            )
        data = load_folder(
            spec.path,
            image_size=info.image_size,
            channels=info.channels,
            class_names=info.class_names,
            domain_names=experiment.data.domain_names,
        )
        return data
    name = spec.name or experiment.data.dataset
    if name != experiment.data.dataset:
        raise ConfigError(
            f"site {site.site_id}: data.name = {name!r} but the experiment trains on "
            f"{experiment.data.dataset!r}"
        )
    data = _builtin(name, experiment.seed, freeze_options(experiment.data.options))
    if spec.partition is None:
        return data
    part = spec.partition
    shards = partition_indices(
        data.y,
        part.num_sites,
        scheme=part.scheme,
        alpha=part.alpha,
        domain=data.domain,
        seed=part.seed,
    )
    return data.subset(shards[part.index])


@lru_cache(maxsize=4)
def _builtin(name: str, seed: int, options: tuple) -> LabeledImages:
    return load_builtin(
        name, seed=seed, **{k: list(v) if isinstance(v, tuple) else v for k, v in options}
    )


__all__ = ["SiteData", "load_site_data", "resolve_site_config", "DataError"]
