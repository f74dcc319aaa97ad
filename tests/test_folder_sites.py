"""Sites that bring their own image folders; a corrupt image names the file, loses nothing."""

from __future__ import annotations

import numpy as np
from PIL import Image

from fedcl.client.app import app as client_app
from fedcl.config import DataSource, ExperimentConfig, SiteConfig, validate_mapping, write_toml
from fedcl.datasets import load_builtin
from fedcl.server.coordinator import Coordinator, CoordinatorOptions
from fedcl.server.registry import Registry
from fedcl.server.results import build_results
from fedcl.simulations.local_grid import LocalGrid

CLASSES = ["zero", "one", "two", "three"]


def _write_site_folder(root, digits, indices) -> None:
    for i in indices:
        label = int(digits.y[i])
        folder = root / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.x[i, 0] * 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"img{i}.png")


def test_folder_sites_train_and_a_corrupt_image_fails_only_its_site(tmp_path) -> None:
    digits = load_builtin("digits")
    keep = np.flatnonzero(digits.y < 4)
    rng = np.random.default_rng(0)
    rng.shuffle(keep)
    shards = np.array_split(keep, 3)
    node_configs = []
    for s, shard in enumerate(shards):
        data_dir = tmp_path / f"data-{s}"
        _write_site_folder(data_dir, digits, shard)
        site = SiteConfig(
            site_id=f"plant-{s}",
            state_dir=tmp_path / f"state-{s}",
            data=DataSource(source="folder", path=data_dir),
        )
        node_configs.append({"site-config": str(write_toml(site, tmp_path / f"site-{s}.toml"))})
    corrupt = tmp_path / "data-2" / "three" / "broken.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really an image")

    experiment = validate_mapping(
        ExperimentConfig,
        {
            "name": "folders",
            "model": {"name": "mlp"},
            "data": {
                "dataset": "folder",
                "class_names": CLASSES,
                "image_size": 8,
                "channels": 1,
                "scenario": "class-il",
                "num_tasks": 2,
            },
            "train": {"rounds_per_task": 2, "local_epochs": 5, "lr": 0.1},
            "simulation": {"num_sites": 3},
        },
        "test",
    )
    grid = LocalGrid(client_app, 3, node_configs=node_configs)
    opts = CoordinatorOptions(
        experiment=experiment,
        registry_url=f"sqlite:///{tmp_path / 'registry.db'}",
        run_id="folders",
    )
    assert Coordinator(grid, opts).run() == "completed"
    with Registry.open(opts.registry_url) as reg:
        results = build_results(reg, "folders")
    broken = results["sites"]["plant-2"]
    assert broken["rounds_trained"] == 0
    assert any(str(corrupt) in e for e in broken["errors"])  # names the file
    assert results["sites"]["plant-0"]["rounds_trained"] == 4
    r = results["accuracy_matrix"]  # each pair of digits is learnt from the two good sites
    assert r[0][0] > 0.8 and r[1][1] > 0.8, r
