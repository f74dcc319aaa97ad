"""The README's deployment, run verbatim: TLS, SuperNode authentication, three sites, DP + HE.

The blocks marked ``<!-- quickstart: NAME -->`` in README.md's "Deployment" section are run as
they are (bash -eu), with the variables they read set per site; the only edit is the SuperLink
port in federation.toml (a free one). What travels out of band (``node.pub`` to the coordinator,
the bundles to the sites) is copied here. Next to the enrolled sites run an intruder (its own
key, never enrolled) and a site holding another federation's CA: neither ever connects, each
one's supervisor says why, and both are stopped before the run (each retry is a SuperNode and
a SuperExec process: ~6 s of CPU). Then `coordinator run` refuses a bad experiment without
submitting it, and `coordinator stop` stops a run and records it. Every process is stopped,
also when the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedcl.server.registry import Registry

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SITES = {"hospital-a": 0, "hospital-b": 1, "hospital-c": 2}


def quickstart() -> dict[str, str]:
    text = ROOT.joinpath("README.md").read_text()
    section = text[text.index("## Deployment") : text.index("## Development")]
    pattern = r"<!-- quickstart: (\S+) -->\n```\w*\n(.*?)```"
    return {name: body for name, body in re.findall(pattern, section, re.S)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sh(script: str, *, cwd: Path, env: dict, timeout: float = 180) -> str:
    done = subprocess.run(
        ["bash", "-eu", "-o", "pipefail", "-c", script],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, f"{script}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    return done.stdout


def fedcl(*args, env: dict, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "fedcl"), *map(str, args)],
        env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def wait_for(predicate, timeout: float, what: str, every: float = 0.5):
    """Poll ``predicate``; one that starts a process (``fedcl site status``: ~1 s of CPU) polls
    every 2 s, so waiting does not take a core from the processes it waits for."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def kill_everything(tmp_path: Path, env: dict) -> None:
    """`fedcl site down` / `coordinator down`, then SIGKILL whatever a pid file still names."""
    for state in (tmp_path / "sites").glob("*"):
        with contextlib.suppress(Exception):
            fedcl("site", "down", state, env=env, cwd=tmp_path, timeout=40)
    for folder in (tmp_path / "coord" / "coordinator", tmp_path / "other"):
        if folder.is_dir():
            with contextlib.suppress(Exception):
                fedcl("coordinator", "down", "-d", folder, env=env, cwd=tmp_path, timeout=40)
    for pid_file in [*tmp_path.rglob("*.pid")]:
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            os.killpg(int(pid_file.read_text().strip()), signal.SIGKILL)


def test_readme_deployment_tls_auth_three_sites(tmp_path: Path) -> None:
    blocks = quickstart()
    assert set(blocks) == {
        "site-init", "federation.toml", "experiment.toml", "coordinator-up", "site-up",
        "coordinator-run",
    }  # fmt: skip
    commands = {
        side: sum(ln.strip().startswith("fedcl ") for k in names for ln in blocks[k].splitlines())
        for side, names in (("site", ("site-init", "site-up")),
                            ("coordinator", ("coordinator-up", "coordinator-run")))
    }  # fmt: skip
    assert commands == {"site": 5, "coordinator": 4}
    port = free_port()
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(tmp_path / "flwr-home"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
    }
    coord, sites = tmp_path / "coord", tmp_path / "sites"
    (coord / "keys").mkdir(parents=True)
    sites.mkdir()
    site_env = {
        sid: {**env, "SITE_ID": sid, "STATE": str(sites / sid), "DATA": f"builtin:{i}/3",
              "BUNDLE": str(coord / "coordinator" / "bundles" / sid)}
        for sid, i in SITES.items()
    }  # fmt: skip
    timings: dict[str, float] = {}
    procs: list[subprocess.Popen] = []
    try:
        start = time.monotonic()
        for sid in SITES:  # 1. each site enrols; node.pub goes to the coordinator
            out = sh(blocks["site-init"], cwd=sites, env=site_env[sid])
            assert (sites / sid / "node.pub").read_text().split()[1] in out
            shutil.copy(sites / sid / "node.pub", coord / "keys" / f"{sid}.pub")
        federation = blocks["federation.toml"]
        assert "port = 9092" in federation
        (coord / "federation.toml").write_text(federation.replace("port = 9092", f"port = {port}"))
        (coord / "experiment.toml").write_text(blocks["experiment.toml"])
        out = sh(blocks["coordinator-up"], cwd=coord, env=env)  # 2. the coordinator
        assert out.count("node ") == 3 and "next: fedcl coordinator run" in out
        flwr_config = (tmp_path / "flwr-home" / "config.toml").read_text()
        assert f'address = "127.0.0.1:{port}"' in flwr_config and "root-certificates" in flwr_config
        superlink_argv = read(coord / "coordinator" / "superlink" / "superlink.log")
        assert "--disable-runtime-dependency-installation" in superlink_argv
        assert "--enable-supernode-auth" in superlink_argv
        for sid in SITES:  # 3. each site installs its bundle, checks, starts
            out = sh(blocks["site-up"], cwd=sites, env=site_env[sid])
            assert "is valid and its data loads" in out and "site up" in out
        timings["enrol and start"] = time.monotonic() - start

        _start_outsiders(tmp_path, coord, sites, env)
        for sid in SITES:
            wait_for(lambda s=sid: _status(s, sites, env)["connection"]["connected"], 60,
                     f"{sid} to connect", every=2)  # fmt: skip
        _check_outsiders(sites, env)  # refused, each saying why; then stopped

        start = time.monotonic()  # 4. the run
        out = sh(blocks["coordinator-run"], cwd=coord, env=env, timeout=480)
        timings["coordinator run"] = time.monotonic() - start
        assert "3 of 3 enrolled sites online" in out and "completed" in out
        assert out.count("train: 3 sites") == 2, out

        url = f"sqlite:///{coord / 'coordinator' / 'registry.db'}"
        with Registry.open(url) as reg:
            (run,) = reg.list_runs()
            rounds = reg.list_rounds(run.id)
            takers = {p.site_id for p in reg.list_participations(run.id)}
            versions = reg.list_model_versions(run.id)
            privacy = reg.list_privacy(run.id)
        assert run.status == "completed" and run.scenario == "deployment"
        assert [(r.server_round, r.kind, r.status) for r in rounds] == [
            (1, "train", "completed"), (2, "train", "completed")
        ]  # fmt: skip
        assert all(r.num_participants == 3 and r.num_failures == 0 for r in rounds)
        assert takers == set(SITES)  # only enrolled sites: the outsiders were refused
        assert versions and all(v.encrypted for v in versions)
        assert {p.site_id for p in privacy} == set(SITES)
        assert all(0 < p.epsilon_run <= 8.0 for p in privacy)

        status = _status("hospital-a", sites, env)
        assert status["connection"]["connected"] and status["privacy"]["epsilon_spent"] > 0
        trained = [r["task"] for r in status["last_rounds"] if r["release"] == "dp-sgd"]
        assert trained == [0, 1]  # beside them, the noised evaluations it paid for

        _check_refusal(coord, env)
        start = time.monotonic()
        foreground = _restart_in_foreground(coord, sites, env, procs)
        timings["SuperLink restart, sites back"] = time.monotonic() - start
        _check_stop(coord, sites, env, url, f"127.0.0.1:{port}")
        foreground.send_signal(signal.SIGTERM)  # a container runtime stopping the coordinator
        assert foreground.wait(timeout=30) is not None
        assert not (coord / "coordinator" / "superlink" / "superlink.pid").exists()
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        kill_everything(tmp_path, env)
    print(f"timings: {timings}")


def _start_outsiders(tmp_path: Path, coord: Path, sites: Path, env: dict) -> None:
    """An intruder with the right CA but its own, never enrolled key; a site with another CA."""
    assert fedcl("site", "init", sites / "intruder", "--site-id", "intruder", "--data",
                 "builtin:0/3", env=env, cwd=tmp_path).returncode == 0  # fmt: skip
    real = coord / "coordinator" / "bundles" / "hospital-a"
    fake = tmp_path / "intruder-bundle"
    fake.mkdir()
    shutil.copy(real / "ca.crt", fake / "ca.crt")  # the CA certificate is no secret
    text = (real / "superlink.toml").read_text().replace('"hospital-a"', '"intruder"')
    (fake / "superlink.toml").write_text(text)
    other = fedcl("coordinator", "init", coord / "federation.toml", "--out", tmp_path / "other",
                  env=env, cwd=tmp_path)  # fmt: skip
    assert other.returncode == 0, other.stderr
    assert fedcl("site", "init", sites / "wrong-ca", "--site-id", "hospital-a", "--data",
                 "builtin:0/3", env=env, cwd=tmp_path).returncode == 0  # fmt: skip
    for state, bundle in (
        (sites / "intruder", fake),
        (sites / "wrong-ca", tmp_path / "other" / "bundles" / "hospital-a"),
    ):
        assert fedcl("site", "bundle", state, bundle, env=env, cwd=tmp_path).returncode == 0
        up = fedcl("site", "up", state, "--detach", "--max-wait", "5", env=env, cwd=tmp_path)
        assert up.returncode == 0, up.stderr


def _status(site: str, sites: Path, env: dict) -> dict:
    done = fedcl("site", "status", sites / site, "--json", env=env, cwd=sites)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _check_outsiders(sites: Path, env: dict) -> None:
    log = sites / "intruder" / "supernode" / "supervisor.log"
    wait_for(lambda: "refused this site's key" in read(log), 60, "the intruder's reason")
    assert "SuperNode ID:" not in read(sites / "intruder" / "supernode" / "supernode.log")
    log = sites / "wrong-ca" / "supernode" / "supervisor.log"
    wait_for(lambda: "TLS: the SuperLink's certificate is not signed by the CA" in read(log), 60,
             "the wrong CA's reason")  # fmt: skip
    assert "SuperNode ID:" not in read(sites / "wrong-ca" / "supernode" / "supernode.log")
    for outsider in ("intruder", "wrong-ca"):  # said why: stop retrying (each try is a process)
        done = fedcl("site", "down", sites / outsider, env=env, cwd=sites, timeout=40)
        assert done.returncode == 0, done.stderr


def _check_refusal(coord: Path, env: dict) -> None:
    """HE without he.public_context: exit code 2, the file and field named, nothing submitted."""
    runs_before = sorted((coord / "coordinator" / "runs").iterdir())
    bad = coord / "no-public.toml"
    bad.write_text(re.sub(r"public_context = .*\n", "\n", (coord / "experiment.toml").read_text()))
    done = fedcl("coordinator", "run", bad, "-d", "coordinator", env=env, cwd=coord)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{bad}: field 'he.public_context'" in done.stderr
    assert sorted((coord / "coordinator" / "runs").iterdir()) == runs_before


def _restart_in_foreground(
    coord: Path, sites: Path, env: dict, procs: list[subprocess.Popen]
) -> subprocess.Popen:
    """`down`, then `up --foreground` (as in a container): the supervised sites come back."""
    done = fedcl("coordinator", "down", "-d", "coordinator", env=env, cwd=coord)
    assert done.returncode == 0 and "stopped" in done.stdout, done.stdout + done.stderr
    log = coord / "foreground.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "fedcl"), "coordinator", "up", "-d", "coordinator", "--foreground"],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=coord, start_new_session=True,
        )  # fmt: skip
    procs.append(proc)
    wait_for(lambda: read(log).count("already registered") == 3, 90, "up --foreground")
    for sid in SITES:
        wait_for(lambda s=sid: _status(s, sites, env)["connection"]["connected"], 150,
                 f"{sid} to reconnect", every=2)  # fmt: skip
    return proc


def _check_stop(coord: Path, sites: Path, env: dict, url: str, superlink: str) -> None:
    """`coordinator stop` ends a run and records it stopped with the reason."""
    # Budgets are spent (ε 8 of 8): the run to stop trains without DP, for many rounds, which
    # each site's policy refuses unless its administrator allows it (site.toml is read per round).
    for toml in sites.glob("hospital-*/site.toml"):
        toml.write_text(toml.read_text().replace("[privacy]\n", "[privacy]\nrequire_dp = false\n"))
    long = coord / "long.toml"
    long.write_text((coord / "experiment.toml").read_text().replace("[dp]\nepsilon = 8.0\n", "")
                    .replace("rounds_per_task = 1", "rounds_per_task = 20"))  # fmt: skip
    done = fedcl("coordinator", "run", long, "-d", "coordinator", "--run-id", "stop-me",
                 "--detach", "--superlink", superlink, env=env, cwd=coord)  # fmt: skip
    assert done.returncode == 0, done.stderr

    def started() -> bool:
        with Registry.open(url) as reg:
            run = reg.get_run("stop-me")
        return run is not None and run.status == "running"

    wait_for(started, 120, "the ServerApp to start run stop-me")
    done = fedcl("coordinator", "stop", "stop-me", "-d", "coordinator", env=env, cwd=coord)
    assert done.returncode == 0, done.stderr
    with Registry.open(url) as reg:
        run = reg.get_run("stop-me")
    assert run.status == "stopped" and "fedcl coordinator stop" in run.reason
