"""``fedcl simulate`` end to end through Flower's Ray simulation engine (the real runtime)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def fedcl(*args: str, cwd=None, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fedcl.cli.main", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def test_simulate_on_ray_writes_the_contract(tmp_path) -> None:
    out = tmp_path / "out"
    proc = fedcl(
        "simulate",
        "digits-domain-il",
        "--set",
        "train.rounds_per_task=1",
        "--set",
        "simulation.num_sites=3",
        "--out",
        str(out),
        "--run-id",
        "ray-run",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Accuracy matrix" in proc.stdout and "ACC" in proc.stdout
    # Neither Flower's run_simulation deprecation notice nor Ray's FutureWarning (issue 14).
    printed = proc.stdout + proc.stderr
    assert "DEPRECATED FEATURE" not in printed and "FutureWarning" not in printed, printed[-3000:]
    results = json.loads((out / "results.json").read_text())
    for key in (
        "scenario",
        "config",
        "tasks",
        "accuracy_matrix",
        "avg_accuracy",
        "bwt",
        "fwt",
        "sites",
        "rounds",
        "wall_seconds",
    ):
        assert key in results, key
    assert results["scenario"] == "digits-domain-il" and results["status"] == "completed"
    assert len(results["rounds"]) == 5
    assert all(r["participants"] == 3 and r["bytes_up"] > 0 for r in results["rounds"])
    assert results["avg_accuracy"] > 0.6  # two outputs: chance is 0.5
    assert set(results["sites"]) == {"site-0", "site-1", "site-2"}
    assert all(s["rounds_trained"] == 5 and s["examples"] > 0 for s in results["sites"].values())
    assert (out / "accuracy_matrix.png").stat().st_size > 1000
    assert (out / "registry.db").exists()


def test_simulate_list_and_user_errors(tmp_path) -> None:
    listing = fedcl("simulate", "--list")
    assert listing.returncode == 0
    for name in (
        "digits-domain-il",
        "digits-class-il",
        "digits-task-il",
        "defects-domain-il",
        "digits-drift",
    ):
        assert name in listing.stdout
    bad = fedcl("simulate", "digits-domain-il", "--set", "train.rounds=2", "--out", str(tmp_path))
    assert bad.returncode == 2
    assert "train.rounds" in bad.stderr and "unknown key" in bad.stderr
    assert "Traceback" not in bad.stderr
    missing = fedcl("simulate", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2 and "nope.toml" in missing.stderr


def test_version_and_help() -> None:
    assert fedcl("--version").stdout.startswith("fedcl ")
    helptext = fedcl("--help").stdout
    assert "simulate" in helptext and "site" in helptext and "coordinator" in helptext


def test_simulate_on_ray_with_dp_he_and_ewc(tmp_path) -> None:
    """Every capability at once through the Ray engine: DP-SGD (with augmentation
    multiplicity), CKKS, EWC and replay."""
    out = tmp_path / "out"
    proc = fedcl(
        "simulate",
        "digits-domain-il",
        "--set", "train.rounds_per_task=1",
        "--set", "data.num_tasks=2",
        "--set", "simulation.num_sites=3",
        "--set", "dp.epsilon=8",
        "--set", "he.enabled=true",
        "--set", 'continual.method="ewc+replay"',
        "--set", "train.augment.shift=1",
        "--set", "train.augment.multiplicity=2",
        "--out", str(out),
        "--run-id", "everything",
        "--no-progress",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed"
    # Under DP the augmentation is [train.dp]'s too: the sites trained with 2 copies each.
    assert results["config"]["train"]["augment"] == {"shift": 1, "flip": False, "multiplicity": 2}
    kinds = [r["kind"] for r in results["rounds"]]
    assert kinds.count("train") == 2 and kinds.count("consolidate") == 1
    assert all(r["participants"] == 3 for r in results["rounds"])
    for site in results["sites"].values():
        assert 0 < site["epsilon"] <= 8.0 + 1e-6
    # The CKKS weight unit is the largest count a virtual site weights an update by
    # (runner.fit_weight_unit; tests/test_he_weight_unit.py), not the 10,000 default.
    from fedcl.client.site import load_site_data
    from fedcl.config import SiteConfig, load_toml
    from fedcl.simulations.catalog import load_scenario
    from fedcl.simulations.runner import largest_update_count

    exp = load_scenario(
        "digits-domain-il",
        ["data.num_tasks=2", "simulation.num_sites=3", 'continual.method="ewc+replay"'],
    )[1]
    counts = [
        largest_update_count(exp, load_site_data(exp, load_toml(SiteConfig, p)))
        for p in sorted((out / "sites").glob("site-*.toml"))
    ]
    assert results["config"]["he"]["max_examples"] == max(counts) < 10_000
    from fedcl.server.registry import Registry

    with Registry.open(f"sqlite:///{out / 'registry.db'}") as reg:
        versions = reg.list_model_versions("everything")
        agreement = reg.list_metrics("everything", name="model-sha256-agreement")
    assert versions and all(v.encrypted for v in versions)  # the coordinator holds ciphertexts
    assert {v.format for v in versions} == {"ckks", "fisher-ckks"}
    assert agreement and all(m.value == 1.0 for m in agreement)  # every site decrypted alike
    assert (out / "keys" / "secret.ctx").stat().st_mode & 0o077 == 0
    buffers = list((out / "sites").glob("site-*/runs/everything/replay.safetensors"))
    assert len(buffers) == 3  # each site kept its own replay buffer on its own disk


def test_simulate_serves_the_dashboard_during_and_after_the_run(tmp_path) -> None:
    import re
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedcl.cli.main", "simulate", "digits-domain-il",
         "--engine", "inprocess", "--set", "train.rounds_per_task=1",
         "--set", "simulation.num_sites=2", "--out", str(tmp_path / "out"),
         "--run-id", "watched", "--no-progress", "--dashboard", "--dashboard-port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    try:
        token = None
        for line in proc.stdout:
            m = re.search(r"admin token (\S+)\)", line)
            if m:
                token = m.group(1)
                break
        assert token, "no dashboard token printed"
        seen: set[str] = set()
        deadline = time.time() + 300
        while time.time() < deadline:
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/api/runs/watched",
                headers={"Authorization": f"Bearer {token}"},
            )
            try:
                with urllib.request.urlopen(req, timeout=5) as resp:
                    seen.add(json.loads(resp.read())["status"])
            except OSError:
                pass  # not up yet, or the run is not registered yet
            if "completed" in seen:
                break
            time.sleep(0.5)
        assert "completed" in seen  # and the server is still up after the run
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=30)


FAULTS = """
[[simulation.faults]]
site = 1
round = 2
kind = "nan"

[[simulation.faults]]
site = 0
round = 3
kind = "duplicate"

[[simulation.faults]]
site = 2
round = 4
kind = "stale"

[[simulation.faults]]
site = 2
round = 5
kind = "crash"
"""


@pytest.mark.parametrize(
    ("he", "engine"), [(False, "inprocess"), (True, "ray")], ids=["plaintext", "he"]
)
def test_faults_on_demand_on_ray_cost_only_their_site(tmp_path, he, engine) -> None:
    """[[simulation.faults]]: every round completes, each culprit is named. Under HE through
    Ray (the real runtime); in plaintext the same faults through the in-process engine (the
    fault wrapper is the engine's ClientApp either way, and a Ray start costs ~40 s here)."""
    from pathlib import Path

    from fedcl.server.registry import Registry

    scenario = Path(__file__).resolve().parents[1] / "simulations/scenarios/digits-domain-il.toml"
    faults = FAULTS
    if he:  # under HE a flipped bit only shows when the sites decrypt: the culprit search
        faults += '\n[[simulation.faults]]\nsite = 1\nround = 3\nkind = "bitflip"\n'
    experiment = tmp_path / "faults.toml"
    experiment.write_text(scenario.read_text() + faults)
    out = tmp_path / "out"
    args = ["--set", "train.rounds_per_task=1", "--set", "simulation.num_sites=3"]
    args += ["--engine", engine]
    if he:
        args += ["--set", "he.enabled=true"]
    proc = fedcl("simulate", str(experiment), *args, "--out", str(out), "--run-id", "faults")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert all(r["status"] == "completed" for r in results["rounds"])
    assert [r["participants"] for r in results["rounds"]] == [3, 2, 2 if he else 3, 2, 2]
    with Registry.open(f"sqlite:///{out / 'registry.db'}") as reg:
        parts = {
            (p.server_round, p.site_id): p
            for p in reg.list_participations("faults")
            if p.phase == "train"
        }
        audit = [(a.kind, a.site_id) for a in reg.list_audit(run_id="faults")]
    assert parts[(2, "site-1")].status == "rejected"
    assert parts[(3, "site-0")].status == "ok" and ("update.duplicate", "site-0") in audit
    assert parts[(4, "site-2")].status == "rejected" and "stale" in parts[(4, "site-2")].detail
    crashed = parts[(5, "site-2")]
    assert crashed.status == "failed" and "injected crash" in crashed.detail
    if he:
        assert parts[(3, "site-1")].status == "rejected"
        assert "corrupts the encrypted aggregate" in parts[(3, "site-1")].detail
    assert results["avg_accuracy"] > 0.6


def test_drift_scenario_on_ray_opens_a_task_and_shows_on_the_dashboard(tmp_path) -> None:
    """digits-drift through Ray (issue 16): site-1's contrast drops at round 2, its monitor
    alerts, the alert opens task 1 (round 3 is skipped), the accuracy matrix has its row, and
    the run page shows the alert and why the task began."""
    from fastapi.testclient import TestClient

    from fedcl.server.dashboard import create_app

    out = tmp_path / "out"
    proc = fedcl(
        "simulate",
        "digits-drift",
        "--set",
        "train.rounds_per_task=1",
        "--set",
        "train.local_epochs=1",
        "--set",
        "simulation.num_sites=2",
        "--set",
        "drift.trigger.watch_rounds=2",
        "--set",
        "simulation.drift=[{site = 1, round = 2, task = 1}]",
        "--out",
        str(out),
        "--run-id",
        "drift-run",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert len(results["accuracy_matrix"]) == 2  # the task drift opened was trained
    assert [(r["server_round"], r["kind"]) for r in results["rounds"]] == [
        (1, "train"),
        (2, "monitor"),
        (4, "train"),
    ]  # round 3 (a second monitoring round) was not needed
    app = create_app(f"sqlite:///{out / 'registry.db'}", artifacts_dir=out / "artifacts")
    registry = app.state.registry
    try:
        alerts = {(e.server_round, e.site_id) for e in registry.list_drift("drift-run") if e.alert}
        assert alerts == {(2, "site-1")}
        starts = registry.list_task_starts("drift-run")
        assert [(t.task_index, t.server_round, t.trigger) for t in starts] == [
            (0, 1, "scheduled"),
            (1, 4, "drift"),
        ]
        token = registry.create_token("ci", "viewer")
        client = TestClient(app)
        drift = client.get(
            "/api/runs/drift-run/drift", headers={"Authorization": f"Bearer {token}"}
        ).json()
        assert [(a["site_id"], a["server_round"]) for a in drift["alerts"]] == [("site-1", 2)]
    finally:
        registry.close()
