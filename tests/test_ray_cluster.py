"""``fedcl simulate --ray-address``: the virtual sites run on an existing Ray cluster.

The test starts the cluster the way an operator would (``ray start --head``, then ``ray start
--address`` on a second node: both on this machine, 1 CPU each, their own temp dirs) and runs a
tiny federation on it. Each site actor asks for 1 CPU, so Flower's actor pool of two can only
exist with one actor on each node: a run that completes with two sites on a two-node cluster of
one CPU per node has used both nodes. Every process the test started is stopped by its id
(``ray stop`` would stop other Ray instances on the machine too).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_node(args: list[str], temp_dir: Path, log: Path) -> subprocess.Popen:
    """``ray start ... --block`` in its own session; returns once the node is up."""
    temp_dir.mkdir(parents=True)
    out = log.open("w")
    proc = subprocess.Popen(
        [
            RAY,
            "start",
            *args,
            "--num-cpus=1",
            "--num-gpus=0",
            "--object-store-memory=100000000",
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
            "--block",
        ],
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        text = log.read_text()
        if "Ray runtime started" in text:
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    raise AssertionError(f"ray start did not come up: {log.read_text()[-2000:]}")


def _pids_under(marker: str) -> list[int]:
    """Processes whose command line names ``marker`` (our temp dir): ours, and only ours."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                pids.append(int(entry.name))
    return pids


def _stop(nodes: list[subprocess.Popen], root: Path) -> None:
    for proc in reversed(nodes):  # --block: SIGTERM stops the node's processes with it
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
    for proc in nodes:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    for sig in (signal.SIGTERM, signal.SIGKILL):  # whatever a node left behind, by pid
        left = _pids_under(str(root))
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if left:
            time.sleep(2)
    assert _pids_under(str(root)) == [], "Ray processes of the test cluster are still running"


@pytest.fixture
def ray_cluster() -> Iterator[str]:
    """A head and a worker node on this machine; yields the head's address."""
    root = Path(tempfile.mkdtemp(prefix="fedcl-rc-", dir="/tmp"))  # short: Ray's socket paths
    address = f"127.0.0.1:{_free_port()}"
    nodes: list[subprocess.Popen] = []
    try:
        nodes.append(
            _start_node(
                ["--head", f"--port={address.rsplit(':', 1)[1]}", "--include-dashboard=false"],
                root / "head",
                root / "head.log",
            )
        )
        nodes.append(_start_node([f"--address={address}"], root / "worker", root / "worker.log"))
        yield address
    finally:
        _stop(nodes, root)
        shutil.rmtree(root, ignore_errors=True)


def test_simulate_joins_an_existing_two_node_ray_cluster(ray_cluster: str, tmp_path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedcl.cli.main",
            "simulate",
            "digits-domain-il",
            "--ray-address",
            ray_cluster,
            "--set",
            "simulation.num_sites=2",
            "--set",
            "data.num_tasks=2",
            "--set",
            "train.rounds_per_task=1",
            "--no-progress",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"on the Ray cluster at {ray_cluster}" in " ".join(proc.stdout.split())  # rich wraps
    cluster = json.loads((out / "ray_cluster.json").read_text())
    assert cluster == {"address": ray_cluster, "nodes": 2, "cpus": 2.0, "gpus": 0.0}
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed"
    assert len(results["rounds"]) == 2 and all(r["participants"] == 2 for r in results["rounds"])
    assert json.loads((out / "experiment.json").read_text())["simulation"]["ray_address"] == (
        ray_cluster
    )


def test_a_ray_address_with_no_cluster_is_a_clear_error(tmp_path) -> None:
    from fedcl.config import ConfigError
    from fedcl.simulations.runner import join_ray_cluster

    with pytest.raises(ConfigError, match=r"simulation.ray_address = '127.0.0.1:9': no Ray head"):
        join_ray_cluster("127.0.0.1:9")  # in seconds: ray.init itself retries for minutes
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedcl.cli.main",
            "simulate",
            "--ray-address",
            "127.0.0.1:9",
            "--engine",
            "inprocess",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    said = " ".join((proc.stdout + proc.stderr).split())
    assert "simulation.ray_address = '127.0.0.1:9' needs --engine ray" in said
    assert "Traceback" not in proc.stdout + proc.stderr
