"""The deployment path: a real SuperLink, two SuperNodes and ``flwr run`` on 127.0.0.1.

Each SuperNode reads its site config from ``--node-config``; the coordinator's Flower app is
written by ``fedcl coordinator app`` and points at the installed package. Processes are always
cleaned up, also when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedcl.server.registry import Registry
from fedcl.server.results import build_results

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


# The dual encoder of digits-vl (docs/DESIGN.md §11): the vision-language path through a real
# SuperLink. Evaluation counts in clear (the sites' policy allows it: DP is the experiment's, not
# required by the site), so that the accuracy asserted is the model's and not the noise's.
EXPERIMENT = """
name = "deploy-test"
min_sites = 2
[model]
name = "dual-encoder"
options = { image = "mlp", image_options = { hidden = [128] }, train = ["image", "projections"] }
[data]
dataset = "captioned-digits"
scenario = "class-il"
num_tasks = 2
partition = { scheme = "iid" }
[train]
rounds_per_task = 1
local_epochs = 2
optimizer = "adam"
lr = 0.003
[dp]
epsilon = 8.0
evaluation = "clear"
[he]
enabled = true
public_context = "{public}"
[continual]
method = "replay"
[simulation]
num_sites = 2
"""


def test_two_tasks_on_superlink_and_two_supernodes(tmp_path) -> None:
    """Bring your own SuperLink: a dual encoder with DP-SGD, CKKS (keys from `fedcl keys init`)
    and replay over prompts.

    EWC's consolidation round through a real SuperLink is in tests/test_faults_processes.py.
    """
    env = {
        **os.environ,
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    port = free_port()
    (tmp_path / "flwr-home").mkdir()
    (tmp_path / "flwr-home" / "config.toml").write_text(
        f'[superlink.loopback]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    keys = tmp_path / "keys"
    subprocess.run([BIN / "fedcl", "keys", "init", "--out", keys], check=True, env=env)
    experiment = EXPERIMENT.replace("{public}", str(keys / "public.ctx"))
    (tmp_path / "experiment.toml").write_text(experiment)
    for i in range(2):
        (tmp_path / f"site-{i}.toml").write_text(
            f'site_id = "hospital-{i}"\nstate_dir = "{tmp_path / f"state-{i}"}"\n'
            f'key_path = "{keys / "secret.ctx"}"\n'
            f'[data]\nsource = "builtin"\npartition = {{ index = {i}, num_sites = 2, '
            'scheme = "iid" }\n[privacy]\nepsilon_budget = 8.0\nrequire_dp = false\n'
        )
    registry_url = f"sqlite:///{tmp_path / 'registry.db'}"
    subprocess.run(
        [
            BIN / "fedcl",
            "coordinator",
            "app",
            tmp_path / "experiment.toml",
            "--out",
            tmp_path / "app",
            "--registry",
            registry_url,
            "--run-id",
            "deploy-1",
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    procs: list[subprocess.Popen] = []
    logs = tmp_path / "logs"
    logs.mkdir()
    try:
        procs.append(
            subprocess.Popen(
                [
                    BIN / "flower-superlink",
                    "--insecure",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--database",
                    str(tmp_path / "superlink.db"),
                    "--disable-runtime-dependency-installation",
                ],
                env=env,
                stdout=open(logs / "superlink.log", "w"),  # noqa: SIM115 - lives as long as the process
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        wait_port(port)
        for i in range(2):
            procs.append(
                subprocess.Popen(
                    [
                        BIN / "flower-supernode",
                        "--insecure",
                        "--superlink",
                        f"127.0.0.1:{port}",
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(free_port()),
                        "--node-config",
                        f'site-config="{tmp_path / f"site-{i}.toml"}"',
                    ],
                    env=env,
                    stdout=open(logs / f"supernode-{i}.log", "w"),  # noqa: SIM115
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        run = subprocess.run(
            [BIN / "flwr", "run", str(tmp_path / "app"), "loopback", "--stream"],
            env=env,
            capture_output=True,
            text=True,
            timeout=480,
            cwd=tmp_path,
        )
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        deadline = time.time() + 120
        status = None
        while time.time() < deadline:
            with Registry.open(registry_url) as reg:
                r = reg.get_run("deploy-1")
                status = r.status if r else None
            if status in ("completed", "failed"):
                break
            time.sleep(1)
        assert status == "completed", (status, _logs(logs), run.stdout[-3000:])
        with Registry.open(registry_url) as reg:
            results = build_results(reg, "deploy-1")
            rounds = reg.list_rounds("deploy-1")
            versions = reg.list_model_versions("deploy-1")
        assert [(r.server_round, r.kind) for r in rounds] == [(1, "train"), (2, "train")]
        assert all(r.num_participants == 2 for r in rounds)
        assert set(results["sites"]) == {"hospital-0", "hospital-1"}  # from each --node-config
        assert len(results["accuracy_matrix"]) == 2  # two tasks, then the zero-shot column
        assert results["eval_tasks"][-1].startswith("zero-shot")
        assert set(results["zero_shot"]) >= {"seen", "unseen", "harmonic"}
        # Five new prompts per task (chance 0.2); in-process runs gave 0.62-0.70.
        print(f"accuracy matrix {results['accuracy_matrix']}")
        assert results["accuracy_matrix"][0][0] > 0.4, results["accuracy_matrix"]
        assert 0 < results["upload_bytes_per_site"]["max"] <= 1_000_000  # encrypted, under 1 MB
        assert all(0 < s["epsilon"] <= 8.0 for s in results["sites"].values())
        assert all(v.encrypted for v in versions)  # the coordinator only ever held ciphertexts
        for i in range(2):  # each site kept its replay buffer on its own disk
            assert (tmp_path / f"state-{i}" / "runs" / "deploy-1" / "replay.safetensors").is_file()
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def _logs(folder: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-1500:]}" for p in sorted(folder.iterdir()))
