"""The dual encoder federated (docs/DESIGN.md §11): in process on a tiny digits-vl, and once
through Ray with DP, CKKS and replay on a shrunk defects-vl (its scattering image tower inside
Ray's actors)."""

from __future__ import annotations

import json

import pytest
from federation_helpers import run_inprocess
from test_simulate_ray import fedcl

from fedcl.continual.plan import RunPlan
from fedcl.models.registry import count_parameters
from fedcl.server.registry import Registry
from fedcl.server.results import build_results
from fedcl.simulations.catalog import load_scenario

TINY = ["simulation.num_sites=2", "data.num_tasks=1", "train.rounds_per_task=2"]


def _results(tmp_path, *overrides: str) -> dict:
    exp = load_scenario("digits-vl", [*TINY, *overrides])[1]
    status, opts, _ = run_inprocess(exp, tmp_path)
    assert status == "completed"
    with Registry.open(opts.registry_url) as reg:
        return build_results(reg, opts.run_id)


def test_zero_shot_column_and_what_travels(tmp_path) -> None:
    """Held-out compositions are recognised zero-shot, and only the trained parts are sent."""
    full = _results(tmp_path / "a")
    assert full["eval_tasks"][-1] == "zero-shot (10 held-out classes)"
    zero = full["zero_shot"]
    assert zero["seen"] > 0.6 and zero["unseen"] > 0.25, full["accuracy_matrix"]  # chance 0.05
    assert zero["harmonic"] == pytest.approx(
        2 * zero["seen"] * zero["unseen"] / (zero["seen"] + zero["unseen"])
    )
    # What a site sends is the trained parameters in fp32: the frozen text tower is not in it.
    exp = load_scenario("digits-vl", TINY)[1]
    model = RunPlan.of(exp).build_model()
    trained = count_parameters(model, trainable_only=True)
    assert trained == count_parameters(model) and "text_tower" not in str(model)
    assert full["upload_bytes_per_site"]["mean"] == pytest.approx(4 * trained, rel=0.02)


@pytest.mark.slow
def test_defects_vl_on_ray_with_dp_he_and_replay(tmp_path) -> None:
    """defects-vl as shipped (scatter-cnn tower, max pool, bag text tower), shrunk to 8 images
    per composition and two class-incremental tasks: every site trains under DP in Ray's
    actors, and what is encrypted is the trained parameters only (the scattering filter bank
    is rebuilt in each actor, never sent)."""
    out = tmp_path / "out"
    proc = fedcl(
        "simulate",
        "defects-vl",
        "--set", "data.options.n_per_class_per_domain=8",
        "--set", "simulation.num_sites=2",
        "--set", "data.num_tasks=2",
        "--set", "train.rounds_per_task=1",
        "--set", "train.local_epochs=1",
        "--set", "dp.epsilon=8",
        "--set", "dp.evaluation=\"clear\"",
        "--set", "he.enabled=true",
        "--set", 'continual.method="replay"',
        "--set", "continual.replay_size=16",  # a site holds ~70 examples here
        "--out", str(out),
        "--run-id", "vl",
        "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed"
    assert len(results["eval_tasks"]) == 3 and len(results["accuracy_matrix"][-1]) == 3
    assert set(results["zero_shot"]) >= {"seen", "unseen", "harmonic"}
    for site in results["sites"].values():
        assert 0 < site["epsilon"] <= 8.0 + 1e-6
    assert 0 < results["upload_bytes_per_site"]["max"] <= 1_000_000  # encrypted, under 1 MB
    with Registry.open(f"sqlite:///{out / 'registry.db'}") as reg:
        versions = reg.list_model_versions("vl")
    assert versions and all(v.encrypted for v in versions)
    assert results["config"]["model"]["options"]["image"] == "scatter-cnn"
    assert results["lost_site_rounds"]["total"] == 0
    exp = load_scenario("defects-vl", ["data.options.n_per_class_per_domain=8"])[1]
    trained = count_parameters(RunPlan.of(exp).build_model(), trainable_only=True)
    assert results["he"]["model_parameters"] == trained == 21_905
