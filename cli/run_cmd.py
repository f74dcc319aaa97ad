"""``fedcl coordinator run``: pre-flight, submit, follow, and make sure the registry has the end."""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime
from pathlib import Path

from rich.console import Console

from fedcl.config import ConfigError, ExperimentConfig, validate_mapping

from .federation import CoordinatorDir
from .progress import follow
from .runs import (
    FLOWER_POLL_S,
    TERMINAL,
    Submission,
    load_experiment,
    online_sites,
    preflight,
    record_orphan,
    require_superlink,
)


def _same(a: dict, b: dict) -> list[str]:
    norm = lambda d: json.loads(json.dumps(d, sort_keys=True, default=str))  # noqa: E731
    a, b = norm(a), norm(b)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _new_run_id(exp: ExperimentConfig) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "-", exp.name).strip("-.") or "run"
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def resolve(
    folder: CoordinatorDir, experiment: Path | None, run_id: str | None, resume: str | None
) -> tuple[ExperimentConfig, str]:
    """(the checked experiment, the run id), or a ConfigError naming what is wrong."""
    from fedcl.server.registry import Registry

    spec = folder.federation()
    url = folder.registry_url(spec)
    if resume and run_id and run_id != resume:
        raise ConfigError("give --resume RUN_ID or --run-id RUN_ID, not both")
    stored = None
    if resume or run_id:
        with Registry.open(url) as reg:
            stored = reg.get_run(resume or run_id)
    if experiment is None and stored is None:
        raise ConfigError("give the EXPERIMENT file (or --resume RUN_ID of a run in the registry)")
    if experiment is not None:
        exp = preflight(load_experiment(experiment), str(experiment), experiment.resolve().parent,
                        folder, spec)  # fmt: skip
    else:
        source = f"run {resume!r} in {url}"
        exp = preflight(validate_mapping(ExperimentConfig, stored.config, source), source,
                        folder.root, folder, spec)  # fmt: skip
    if resume:
        if stored is None:
            raise ConfigError(f"--resume {resume}: no such run in the registry {url}")
        if stored.status == "completed":
            raise ConfigError(f"--resume {resume}: the run already completed")
        from fedcl.continual.plan import resolve_evaluation_noise

        # The stored experiment is the coordinator's, with the defaults it states resolved.
        resolved = resolve_evaluation_noise(exp)
        differing = ", ".join(_same(stored.config, resolved.model_dump(mode="json")))
        if differing and experiment is None:
            raise ConfigError(
                f"--resume {resume}: the run's stored experiment reads back different in "
                f"{differing} (settings added since the run started?): resume it with the fedcl "
                "version that started it, or start a new run"
            )
        if differing:
            raise ConfigError(
                f"--resume {resume}: {experiment} differs from the run's experiment in "
                f"{differing}; resume with the original file, or start a new run"
            )
        return exp, resume
    run_id = run_id or _new_run_id(exp)
    if stored is not None:
        raise ConfigError(f"run {run_id!r} exists ({stored.status}): continue it with --resume")
    return exp, run_id


def start_run(
    folder: CoordinatorDir,
    experiment: Path | None,
    *,
    run_id: str | None,
    resume: str | None,
    detach: bool,
    superlink: str | None = None,
    out: Console,
) -> int:
    """The whole `coordinator run`; returns the exit code (0 only for a completed run).

    ``superlink``: HOST:PORT of a SuperLink elsewhere (another container); by default the one
    `coordinator up` started on this machine. Either way the flwr connection is (re)written.
    """
    from .superlink import listening, write_connection

    spec = folder.federation()
    exp, run_id = resolve(folder, experiment, run_id, resume)
    if superlink is None:
        require_superlink(folder, spec)
    elif not listening(superlink, timeout=5):
        raise ConfigError(f"--superlink {superlink}: nothing answers there")
    write_connection(folder, spec, superlink)
    url = folder.registry_url(spec)
    if resume:
        _refuse_if_still_running(folder, spec, url, run_id)
    leftover = sorted(folder.bundles.glob("*/secret.ctx")) if folder.bundles.is_dir() else []
    if leftover:
        out.print(
            f"[yellow]warning:[/] {folder.bundles} still holds {len(leftover)} CKKS secret "
            "key(s): delete them once delivered (the coordinator must not keep a secret key)"
        )
    online = online_sites(spec)
    if online is not None:
        style = "green" if online >= exp.expected_sites else "yellow"
        out.print(
            f"[{style}]{online} of {len(spec.sites)} enrolled sites online[/]; "
            f"rounds wait for {exp.expected_sites}"
        )
    sub = Submission(folder, run_id)
    submitted = datetime.now(UTC)
    flower_id = sub.submit(spec, exp, url, folder.artifacts)
    verb = "resumed" if resume else "submitted"
    out.print(f"{verb} run [bold]{run_id}[/] (Flower run {flower_id}); registry {url}")
    if detach:
        out.print(f"follow it with: fedcl coordinator status {run_id} -d {folder.root}")
        return 0
    sub.follow_log(spec)
    last = {"t": time.monotonic(), "status": "starting"}

    def alive() -> bool:
        """Whether the ServerApp still runs. Flower ends ``flwr log --stream`` when the run
        finishes, so while the log follower runs nothing is asked; once it has ended, Flower's
        view (``flwr ls``: a process, ~1-2 s of CPU) is asked every FLOWER_POLL_S."""
        if sub.log_running():
            last["t"] = 0.0  # once it ends, ask Flower at once
            return True
        if time.monotonic() - last["t"] >= FLOWER_POLL_S:
            last["t"] = time.monotonic()
            last["status"] = sub.flower_status(spec) or last["status"]
        return not str(last["status"]).startswith("finished")

    try:
        status, reason = follow(url, run_id, out, alive=alive, since=submitted)
    except KeyboardInterrupt:
        out.print(
            f"the run goes on: follow it with `fedcl coordinator status {run_id} --follow`, "
            f"stop it with `fedcl coordinator stop {run_id}`"
        )
        return 130
    finally:
        sub.close()
    if status is None:
        reason = (
            f"the ServerApp ended (Flower: {last['status']}) without recording how; "
            f"{_last_error(sub.dir / 'serverapp.log')}"
        )
        record_orphan(url, run_id, exp, reason, since=submitted)
        status = "failed"
    _report(url, run_id, status, reason, out)
    return 0 if status == "completed" else 1


def _refuse_if_still_running(folder: CoordinatorDir, spec, url: str, run_id: str) -> None:
    """Two ServerApps on one run would interleave its rounds: resume only what has ended."""
    from fedcl.server.registry import Registry

    with Registry.open(url) as reg:
        run = reg.get_run(run_id)
    if run is None or run.status != "running":
        return
    previous = Submission(folder, run_id)
    status = previous.flower_status(spec) if previous.flower_run_id else None
    if status is not None and not status.startswith("finished"):
        raise ConfigError(
            f"--resume {run_id}: the run is still running (Flower run {previous.flower_run_id}, "
            f"{status}); follow it with `fedcl coordinator status {run_id} --follow` or stop it "
            f"with `fedcl coordinator stop {run_id}`"
        )


def _last_error(log: Path) -> str:
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no ServerApp log"
    errors = [ln for ln in lines if "Error" in ln or "ERROR" in ln or "Exception" in ln]
    return f"last error in {log}: {(errors or lines or ['(empty)'])[-1]}"


def _report(url: str, run_id: str, status: str, reason: str | None, out: Console) -> None:
    from fedcl.server.registry import Registry
    from fedcl.server.results import build_results
    from fedcl.simulations.report import print_report

    if status == "completed":
        with Registry.open(url) as reg:
            print_report(build_results(reg, run_id), out)
        out.print(f"[green]run {run_id} completed[/]")
    else:
        out.print(f"[red]run {run_id} {status}[/]: {reason or 'no reason recorded'}")


def stop_running_runs(folder: CoordinatorDir, reason: str) -> list[str]:
    """Record every run this folder submitted that is still running as stopped."""
    from fedcl.server.registry import Registry

    if not folder.runs.is_dir() or not folder.spec_file.is_file():
        return []
    stopped = []
    with Registry.open(folder.registry_url()) as reg:
        for info in sorted(folder.runs.glob("*/flower.json")):
            run = reg.get_run(info.parent.name)
            if run is not None and run.status not in TERMINAL:
                reg.set_run_status(run.id, "stopped", reason)
                stopped.append(run.id)
    return stopped
