"""A site's view of an experiment: its config, its examples, cut into the experiment's tasks.

Everything here is derived from two inputs, the experiment (sent by the coordinator with every
message) and the site config (the site administrator's file), and cached by their content so a
Ray actor that plays several virtual sites never mixes them up (module globals leak between
simulated sites; cache keys do not).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
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

logger = logging.getLogger(__name__)

SITE_CONFIG_KEY = "site-config"


def resolve_site_config(node_config: dict, sites_dir: str | None) -> SiteConfig:
    """Find this SuperNode's site config.

    A deployed SuperNode names its file with ``--node-config 'site-config="/etc/fedcl/site.toml"'``;
    a virtual site in a simulation finds ``site-<partition-id>.toml`` in the folder the
    simulation runner wrote.
    """
    path = node_config.get(SITE_CONFIG_KEY)
    if path:
        return _site_config(Path(str(path)))
    if sites_dir is not None and "partition-id" in node_config:
        return _site_config(Path(sites_dir) / f"site-{node_config['partition-id']}.toml")
    raise ConfigError(
        "this SuperNode has no site config: start it with "
        "--node-config 'site-config=\"/etc/fedcl/site.toml\"' (see `fedcl site init`)"
    )


def _site_config(path: Path) -> SiteConfig:
    """The file's config, parsed again only when it changed (every message reads it)."""
    try:
        stamp = path.stat().st_mtime_ns
    except OSError:
        stamp = -1  # load_toml names the missing file
    return _parsed_site_config(str(path), stamp)


@lru_cache(maxsize=4096)
def _parsed_site_config(path: str, stamp: int) -> SiteConfig:
    site = load_toml(SiteConfig, path)
    if site.privacy.research_seed is not None:
        _warn_seeded_noise(site.site_id, path)
    return site


_SEEDED_NOISE_SAID: list[str] = []  # once per process: a simulation's actor plays many sites


def _warn_seeded_noise(site_id: str, path: str) -> None:
    if _SEEDED_NOISE_SAID:
        return
    _SEEDED_NOISE_SAID.append(site_id)
    logger.warning(
        "site %s: privacy.research_seed is set (%s): every DP draw at this site is reproducible, "
        "and anyone who knows the seed can remove the noise; for simulations and tests only",
        site_id,
        path,
    )


@dataclass(frozen=True)
class SiteData:
    """A site's train and test examples, and the stream that cuts them into tasks."""

    site_id: str
    stream: Stream
    train: LabeledImages
    test: LabeledImages
    #: The task views cut so far: every round evaluates every task, so each is cut once.
    _views: dict = field(default_factory=dict, compare=False, repr=False)

    def train_set(self, task_index: int) -> TensorDataset:
        """Training examples of one task, labels mapped to model outputs (read-only)."""
        key = ("train", task_index)
        if key not in self._views:
            self._views[key] = self._tensors(self.train, self.stream.tasks[task_index])
        return self._views[key]

    def test_set(self, eval_index: int) -> TensorDataset:
        """Test examples of one evaluation task (read-only)."""
        key = ("test", eval_index)
        if key not in self._views:
            self._views[key] = self._tensors(self.test, self.stream.evaluation_tasks[eval_index])
        return self._views[key]

    def _tensors(self, data: LabeledImages, task) -> TensorDataset:
        idx = self.stream.select(task, data.y, data.domain, data.task)
        x = torch.from_numpy(np.ascontiguousarray(data.x[idx]))
        y = torch.from_numpy(self.stream.targets(data.y[idx]))
        return TensorDataset(x, y)


class _SiteDataCache:
    """Site data by the two configs' content, holding as many sites as this process plays.

    A Ray actor (or the in-process engine) plays up to ``simulation.num_sites`` virtual sites
    in turn; a cache smaller than that (it held 8) is never hit once a process plays more, and
    every message would cut its site's shard again. Entries are small (a shard of a built-in
    dataset, a deployed site's own folder), and a site is loaded only when a message for it
    arrives, so an idle site costs nothing until then.
    """

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple[str, str], SiteData] = OrderedDict()
        self._same: dict[tuple[int, int], tuple[ExperimentConfig, SiteConfig, tuple]] = {}

    def get(self, experiment: ExperimentConfig, site: SiteConfig) -> SiteData:
        self.capacity = max(self.capacity, experiment.simulation.num_sites)
        same = self._same.get((id(experiment), id(site)))  # the configs a message reused
        if same is not None and same[0] is experiment and same[1] is site:
            key = same[2]
        else:
            key = (to_json(experiment), to_json(site))
        found = self._entries.get(key)
        if found is None:
            found = self._entries[key] = _read_site_data(*key)
        self._entries.move_to_end(key)
        # Holding the two objects keeps their ids from being reused while the entry lives.
        self._same[(id(experiment), id(site))] = (experiment, site, key)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        while len(self._same) > self.capacity:
            self._same.pop(next(iter(self._same)))
        return found

    def clear(self) -> None:
        self._entries.clear()
        self._same.clear()

    def __len__(self) -> int:
        return len(self._entries)


_SITE_DATA = _SiteDataCache()


def load_site_data(experiment: ExperimentConfig, site: SiteConfig) -> SiteData:
    """The site's examples for this experiment (cached by the two configs' content)."""
    return _SITE_DATA.get(experiment, site)


def forget_site_data() -> None:
    """Drop every site's examples this process holds (the shards, the built-in datasets).

    For a process that read site data once and will not train: ``fedcl simulate``'s driver
    counts every virtual site's examples to fit the CKKS weight unit, and under Ray the sites
    train in actors, so the driver's copy (~300 MB for defects-domain-il-large) would otherwise
    stay for the whole run.
    """
    _SITE_DATA.clear()
    _shards.cache_clear()
    _builtin.cache_clear()


def _read_site_data(experiment_json: str, site_json: str) -> SiteData:
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
    shards = _shards(
        name, experiment.seed, freeze_options(experiment.data.options),
        part.num_sites, part.scheme, part.alpha, part.seed, part.min_per_site,
    )  # fmt: skip
    return data.subset(shards[part.index])


@lru_cache(maxsize=4)
def _shards(
    name: str,
    seed: int,
    options: tuple,
    num_sites: int,
    scheme: str,
    alpha: float,
    pseed: int,
    min_per_site: int,
) -> list:
    """Every site's shard of a built-in dataset, cut once per process (not once per site)."""
    data = _builtin(name, seed, options)
    return partition_indices(
        data.y,
        num_sites,
        scheme=scheme,
        alpha=alpha,
        domain=data.domain,
        seed=pseed,
        min_per_site=min_per_site,
    )


@lru_cache(maxsize=4)
def _builtin(name: str, seed: int, options: tuple) -> LabeledImages:
    return load_builtin(
        name, seed=seed, **{k: list(v) if isinstance(v, tuple) else v for k, v in options}
    )


__all__ = ["SiteData", "load_site_data", "forget_site_data", "resolve_site_config", "DataError"]
