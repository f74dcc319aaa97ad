"""``fedcl coordinator run`` and ``stop``: check before submitting, submit, follow, stop.

Everything ``flwr run`` would only find out inside the ServerApp (where it dies with a traceback
while ``flwr run`` exits 0) is checked here first and refused as a user error naming the file
and field. The progress shown is fedcl's own, read from the registry (the record that outlives
the processes); Flower's view of the run (``flwr ls``) only tells whether the ServerApp still
lives, so a ServerApp that died without recording how leaves a *failed* run, never "running".
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from pathlib import Path

from fedcl.config import ConfigError, ExperimentConfig, load_toml

from .checks import check_experiment
from .federation import CoordinatorDir, FederationSpec, write_json
from .superlink import flower_env, flwr_json, listening, pid_alive, read_pid, tool

TERMINAL = ("completed", "failed", "stopped")
FLOWER_POLL_S = 10.0
STOP_GRACE_S = 10.0  # how long `coordinator stop` lets a ServerApp record its own end


def load_experiment(path: Path) -> ExperimentConfig:
    return check_experiment(load_toml(ExperimentConfig, path), str(path))


def preflight(
    exp: ExperimentConfig, source: str, base: Path, folder: CoordinatorDir, spec: FederationSpec
) -> ExperimentConfig:
    """The experiment as the ServerApp will get it, or every problem at once (ConfigError).

    ``source`` names the experiment in messages; relative paths in it are relative to ``base``.
    """
    problems: list[str] = []
    n, ids = len(spec.sites), ", ".join(s.id for s in spec.sites)
    if exp.expected_sites > n:
        field = "min_sites" if exp.min_sites is not None else "simulation.num_sites"
        why = "" if exp.min_sites is not None else " (min_sites is unset)"
        problems.append(
            f"{source}: field '{field}': the run waits for {exp.expected_sites} sites{why}, but "
            f"federation {spec.name!r} enrols {n} ({ids}); set min_sites = {n} or fewer"
        )
    he = exp.he
    if he.enabled and he.public_context is None:
        problems.append(
            f"{source}: field 'he.public_context': he.enabled = true needs the coordinator's "
            f'public CKKS context; set he.public_context = "{folder.public_ctx}"'
        )
    elif he.enabled:
        public = Path(he.public_context).expanduser()
        public = public if public.is_absolute() else (base / public)
        problem, fingerprint = _public_context_problem(source, public, he.fingerprint)
        if problem:
            problems.append(problem)
        else:
            he = he.model_copy(update={"public_context": str(public), "fingerprint": fingerprint})
        if "max_sites" not in exp.he.model_fields_set:  # sized to a round of the enrolled sites
            round_sites = max(1, math.ceil(n * exp.strategy.fraction_train))
            he = he.model_copy(update={"max_sites": round_sites})
        elif n > he.max_sites:
            problems.append(
                f"{source}: field 'he.max_sites': {he.max_sites} is below the {n} enrolled "
                "sites; an encrypted sum of more sites than that overflows its packing"
            )
    if problems:
        raise ConfigError("\n".join(problems))
    return exp.model_copy(update={"he": he})


def _public_context_problem(source: str, public: Path, pinned: str | None):
    from fedcl.privacy.ckks.errors import CKKSKeyError
    from fedcl.privacy.ckks.keys import key_file_info

    field = f"{source}: field 'he.public_context'"
    if not public.is_file():
        return f"{field}: {public} does not exist", None
    try:
        info = key_file_info(public)
    except CKKSKeyError as err:
        return f"{field}: {err}", None
    if info.kind != "public":
        return (
            f"{field}: {public} holds the SECRET key; the coordinator must use public.ctx",
            None,
        )
    if pinned and pinned.lower() != info.fingerprint:
        return f"{source}: field 'he.fingerprint': {public} is another key set", None
    return None, info.fingerprint


def require_superlink(folder: CoordinatorDir, spec: FederationSpec) -> None:
    pid = read_pid(folder.superlink / "superlink.pid")
    if not pid_alive(pid) or not listening(spec.superlink.local_address):
        raise ConfigError(
            f"the SuperLink of {folder.root} is not running: start it with "
            f"`fedcl coordinator up {folder.root}`"
        )


def online_sites(spec: FederationSpec) -> int | None:
    got = flwr_json(["supernode", "ls", spec.name], timeout=60)
    nodes = got.get("nodes")
    if not isinstance(nodes, list):
        return None
    return sum(1 for node in nodes if node.get("status") == "online")


class Submission:
    """One submitted run: its folder under ``runs/``, its Flower run id, its log follower."""

    def __init__(self, folder: CoordinatorDir, run_id: str):
        self.dir = folder.runs / run_id
        self.nodes_file = folder.superlink / "nodes.json"  # site id -> node id, from enrolment
        self.run_id = run_id
        self.info_file = self.dir / "flower.json"
        self.log_proc: subprocess.Popen | None = None

    @property
    def flower_run_id(self) -> str | None:
        if not self.info_file.is_file():
            return None
        return json.loads(self.info_file.read_text()).get("flower_run_id")

    def submit(
        self, spec: FederationSpec, exp: ExperimentConfig, registry_url: str, artifacts: Path
    ) -> str:
        from .flower_app import write_flower_app

        app = self.dir / "app"
        nodes = json.loads(self.nodes_file.read_text()) if self.nodes_file.is_file() else {}
        write_flower_app(
            exp, app, registry_url=registry_url, run_id=self.run_id, scenario="deployment",
            artifacts_dir=str(artifacts), site_nodes=nodes,
        )  # fmt: skip
        got = flwr_json(["run", str(app), spec.name], timeout=180)
        if not got.get("success") or not got.get("run-id"):
            raise RuntimeError(f"flwr run refused the run: {got.get('error-message', got)}")
        flower_id = str(got["run-id"])
        write_json(
            self.info_file,
            {"flower_run_id": flower_id, "federation": spec.name, "submitted": time.time()},
        )
        return flower_id

    def follow_log(self, spec: FederationSpec) -> None:
        """Keep the ServerApp's own log (``flwr log --stream``) next to the run."""
        out = open(self.dir / "serverapp.log", "ab")  # noqa: SIM115 - closed with the process
        self.log_proc = subprocess.Popen(
            [tool("flwr"), "log", str(self.flower_run_id), spec.name, "--stream"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=flower_env(),
            start_new_session=True,
        )  # fmt: skip
        out.close()

    def log_running(self) -> bool:
        """Whether ``flwr log --stream`` still follows the run (Flower ends it with the run)."""
        return self.log_proc is not None and self.log_proc.poll() is None

    def close(self) -> None:
        if self.log_running():
            self.log_proc.terminate()
            try:
                self.log_proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.log_proc.kill()

    def flower_status(self, spec: FederationSpec) -> str | None:
        """Flower's status of the run (e.g. ``running``, ``finished:failed``), None if unknown."""
        got = flwr_json(["ls", spec.name, "--run-id", str(self.flower_run_id)], timeout=60)
        runs = got.get("runs") or []
        return str(runs[0].get("status")) if runs else None


def record_orphan(
    registry_url: str, run_id: str, exp: ExperimentConfig, reason: str, since=None
) -> None:
    """The ServerApp ended without recording its end: leave a failed run, never nothing.

    An end recorded before ``since`` (a resumed run's previous attempt) does not count.
    """
    from fedcl.server.registry import Registry

    with Registry.open(registry_url) as reg:
        run = reg.get_run(run_id)
        fresh = run is not None and (since is None or run.updated_at >= since)
        if fresh and run.status in TERMINAL:
            return
        if run is None:
            reg.create_run(
                run_id, name=exp.name, scenario="deployment", config=exp.model_dump(mode="json"),
                tasks=[],
            )  # fmt: skip
        reg.set_run_status(run_id, "failed", reason)


def stop_run(folder: CoordinatorDir, spec: FederationSpec, run_id: str, reason: str) -> str:
    """``flwr stop`` the run, wait for the ServerApp to end, then record it stopped."""
    from fedcl.server.registry import Registry

    url = folder.registry_url(spec)
    with Registry.open(url) as reg:
        run = reg.get_run(run_id)
    if run is None:
        raise ConfigError(f"run {run_id!r} is not in the registry {url}")
    if run.status in TERMINAL:
        raise ConfigError(f"run {run_id!r} already ended: {run.status} ({run.reason or '-'})")
    sub = Submission(folder, run_id)
    note = "no Flower run is known for it (it was not started by `fedcl coordinator run`)"
    if sub.flower_run_id is not None:
        got = flwr_json(["stop", sub.flower_run_id, spec.name], timeout=60)
        note = f"Flower run {sub.flower_run_id}: " + (
            "stopped" if got.get("success") else str(got.get("error-message", got))
        )
        # A live ServerApp sees the stopped run at its next poll of the SuperLink (seconds) and
        # records its end; a dead one (the reason to stop it) never does: wait a little only.
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline:  # let the ServerApp record its end first ...
            with Registry.open(url) as reg:
                current = reg.get_run(run_id)
            if current is not None and current.status in TERMINAL:
                break
            time.sleep(0.5)
    with Registry.open(url) as reg:  # ... then ours is the reason that stays
        reg.set_run_status(run_id, "stopped", reason)
    return note
