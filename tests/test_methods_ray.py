"""LwF and SI through ``fedcl simulate`` on Flower's Ray engine (the real runtime), with DP."""

from __future__ import annotations

import json

import pytest
from test_simulate_ray import fedcl

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("method", "state"),
    [("lwf", "lwf/teacher-task-1.safetensors"), ("si", "si.safetensors")],
)
def test_new_methods_run_on_ray_with_dp(tmp_path, method: str, state: str) -> None:
    out = tmp_path / "out"
    proc = fedcl(
        "simulate",
        "digits-domain-il",
        "--set", "train.rounds_per_task=1",
        "--set", "simulation.num_sites=2",
        "--set", "data.num_tasks=2",
        "--set", "dp.epsilon=8",
        "--set", f'continual.method="{method}"',
        "--out", str(out),
        "--run-id", method,
        "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed"
    assert [r["kind"] for r in results["rounds"]] == ["train", "train"]  # no consolidation
    assert all(r["participants"] == 2 for r in results["rounds"])
    for site in results["sites"].values():
        assert 0 < site["epsilon"] <= 8.0 + 1e-6 and not site["failed_rounds"]
    files = list((out / "sites").glob(f"site-*/runs/{method}/{state}"))
    assert len(files) == 2  # each site kept the method's state on its own disk
