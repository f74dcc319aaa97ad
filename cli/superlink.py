"""The coordinator's SuperLink: start it with TLS and SuperNode authentication, enrol the sites.

Flower 1.41's ``flower-superlink`` serves the Fleet API (SuperNodes), the Control API (``flwr``)
and the Runtime API (its SuperExec, which starts our ServerApp) over HTTPS on one ``--port``;
SuperNode authentication needs TLS and registered public keys (``flwr supernode register``
through the Control API). Runtime dependency installation is always off: the Flower app we
submit declares no dependency and runs what is installed here (no `uv sync` at run time).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fedcl.config import ConfigError

from .federation import CoordinatorDir, FederationSpec, write_json

NO_RUNTIME_INSTALL = "--disable-runtime-dependency-installation"


def tool(name: str) -> str:
    """A Flower executable next to this interpreter (the venv), else from PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file():
        return str(here)
    import shutil

    found = shutil.which(name)
    if found is None:
        raise ConfigError(f"{name} is not installed (it comes with flwr, a fedcl dependency)")
    return found


def flower_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every Flower process we start.

    The interpreter's folder goes first on PATH, since the SuperLink and SuperNode start
    ``flower-superexec`` and ``flwr-serverapp``/``flwr-clientapp`` by name. Telemetry and the
    update check are off unless the operator turned them on.
    """
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env.update(extra or {})
    return env


def superlink_argv(folder: CoordinatorDir, spec: FederationSpec) -> list[str]:
    link = spec.superlink
    return [
        tool("flower-superlink"),
        "--ssl-ca-certfile", str(folder.ca_cert),
        "--ssl-certfile", str(folder.server_cert),
        "--ssl-keyfile", str(folder.server_key),
        "--enable-supernode-auth",
        "--host", link.host,
        "--port", str(link.port),
        "--database", str(folder.superlink / "state.db"),
        "--isolation", "subprocess",
        NO_RUNTIME_INSTALL,
    ]  # fmt: skip


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (our own child that exited) is not alive
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return True


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def listening(address: str, timeout: float = 1.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except OSError:
        return False


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def start_superlink(
    folder: CoordinatorDir, spec: FederationSpec, *, foreground: bool = False, timeout: float = 60
) -> subprocess.Popen | int:
    """Start the SuperLink in its own session; returns when it listens.

    In the background (the default) its output goes to ``superlink/superlink.log`` and its pid
    is returned (an already running one's too: ``up`` is idempotent). In the ``foreground`` (a
    container's main process) it writes to our stdout and the process is returned.
    """
    pid_file, log = folder.superlink / "superlink.pid", folder.superlink / "superlink.log"
    pid = read_pid(pid_file)
    if pid_alive(pid):
        if foreground:
            raise ConfigError(f"the SuperLink of {folder.root} already runs (pid {pid})")
        return pid
    address = spec.superlink.local_address
    if listening(address):
        raise ConfigError(
            f"something else listens on {address}: stop it or choose another superlink.port in "
            f"the federation file (then `fedcl coordinator init` again: bundles carry the port)"
        )
    argv = superlink_argv(folder, spec)
    stamp = time.strftime("%F %T")
    header = f"\n=== fedcl coordinator up {stamp}: {' '.join(argv)}\n"
    out = sys.stdout if foreground else open(log, "ab")  # noqa: SIM115 - closed below
    try:
        out.write(header if foreground else header.encode())
        out.flush()
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=flower_env(), cwd=folder.superlink, start_new_session=True,
        )  # fmt: skip
    finally:
        if not foreground:
            out.close()
    pid_file.write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pid_file.unlink(missing_ok=True)
            where = "" if foreground else f"; {log}:\n{log_tail(log)}"
            raise ConfigError(f"flower-superlink exited with code {proc.returncode}{where}")
        if listening(address):
            return proc if foreground else proc.pid
        time.sleep(0.3)
    _terminate(proc)
    raise ConfigError(f"flower-superlink did not listen on {address} in {timeout:.0f} s; see {log}")


def _terminate(proc: subprocess.Popen, timeout: float = 15) -> int:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


def supervise_foreground(folder: CoordinatorDir, proc: subprocess.Popen) -> int:
    """Wait for the SuperLink; SIGTERM/SIGINT stop it (and its ServerApp); returns its code."""

    def forward(signum, _frame) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        code = proc.wait()
    finally:
        (folder.superlink / "superlink.pid").unlink(missing_ok=True)
    return code


def stop_superlink(folder: CoordinatorDir, timeout: float = 15) -> int | None:
    """Stop the SuperLink (and its SuperExec/ServerApp: its process group); returns its pid."""
    pid_file = folder.superlink / "superlink.pid"
    pid = read_pid(pid_file)
    if not pid_alive(pid):
        pid_file.unlink(missing_ok=True)
        return None
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not pid_alive(pid):
            break
    pid_file.unlink(missing_ok=True)
    return pid


# --- flwr's view: the named connection, node registration ----------------------------------------
def flwr_home() -> Path:
    """``$FLWR_HOME`` as flwr reads it (default ``~/.flwr``)."""
    return Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")


def write_connection(
    folder: CoordinatorDir, spec: FederationSpec, address: str | None = None
) -> Path:
    """Add (or update) ``[superlink.<name>]`` in ``$FLWR_HOME/config.toml``, keeping the rest.

    ``address`` is where this machine reaches the SuperLink (default: its local address).
    """
    import tomllib

    import tomli_w

    path = flwr_home() / "config.toml"
    data: dict = {}
    if path.is_file():
        data = tomllib.loads(path.read_text())
    else:
        try:  # start from Flower's own default so `flwr` keeps its usual connections
            from flwr.cli.constant import DEFAULT_FLOWER_CONFIG_TOML

            data = tomllib.loads(DEFAULT_FLOWER_CONFIG_TOML)
        except (ImportError, tomllib.TOMLDecodeError):
            data = {}
    data.setdefault("superlink", {})[spec.name] = {
        "address": address or spec.superlink.local_address,
        "root-certificates": str(folder.ca_cert),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(data))
    return path


def flwr(args: list[str], *, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [tool("flwr"), *args], capture_output=True, text=True, timeout=timeout, env=flower_env()
    )


def flwr_json(args: list[str], *, timeout: float = 120) -> dict:
    """Run ``flwr ARGS --format json`` and parse its JSON (a clear error when there is none)."""
    done = flwr([*args, "--format", "json"], timeout=timeout)
    text = done.stdout
    start = text.find("{")
    try:
        return json.loads(text[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        return {"success": False, "error-message": (text + done.stderr).strip()[-2000:]}


def register_sites(folder: CoordinatorDir, spec: FederationSpec) -> dict[str, str]:
    """Register every enrolled site's key; returns site id -> node id or 'already registered'."""

    def one(site_id: str) -> tuple[str, str]:
        got = flwr_json(
            ["supernode", "register", str(folder.node_key(site_id)), spec.name, "--name", site_id]
        )
        if got.get("success"):
            return site_id, str(got.get("node-id"))
        message = str(got.get("error-message", got))
        if "already in use" in message:
            return site_id, "already registered"
        raise ConfigError(f"could not register site {site_id!r} with the SuperLink: {message}")

    with ThreadPoolExecutor(max_workers=4) as pool:
        result = dict(pool.map(one, [s.id for s in spec.sites]))
    nodes_file = folder.superlink / "nodes.json"
    known = json.loads(nodes_file.read_text()) if nodes_file.is_file() else {}
    known.update({k: v for k, v in result.items() if v != "already registered"})
    write_json(nodes_file, known)
    return result
