"""A site's SuperNode, supervised: TLS, its own key, its own port, restarts with a reason.

``flower-supernode`` retries a SuperLink it cannot reach forever and says only "Connection
attempt failed". The supervisor starts it with ``--max-wait-time`` so it gives up after a while
and prints Flower's reason, turns that reason into one line a site administrator can act on
(wrong CA, key not enrolled, nothing listening), and starts it again with exponential backoff.
A SuperNode that ran for a while (then lost a restarted SuperLink) starts again at once.

The SuperNode runs as ``python -m fedcl.cli.supernode`` (:func:`run_flower_supernode`): Flower
1.41's own ``flower-supernode`` never exits once it gives up on a SuperLink it was connected to.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

from fedcl.config import ConfigError

from .federation import SiteDir
from .superlink import flower_env, listening, log_tail, pid_alive, read_pid

BACKOFF_START, BACKOFF_MAX = 2.0, 60.0
# How long a SuperNode retries a SuperLink it lost before it gives up (and is restarted). Long
# enough that a link that comes back within it resumes the same session: a new session could
# not activate sooner anyway, since the SuperLink counts the old one online for up to 2 x 30 s.
MAX_WAIT_S = 120.0
ANSI = re.compile(r"\x1b\[[0-9;]*m")
HEALTHY_AFTER = 60.0  # a SuperNode that ran this long was fine: restart without waiting

REASONS = (  # (what Flower logs, what it means for this site)
    (
        "CERTIFICATE_VERIFY_FAILED",
        "TLS: the SuperLink's certificate is not signed by the CA in {ca} (a bundle of another "
        "federation, or the coordinator re-created its certificates): ask the coordinator for "
        "this site's current bundle and install it with `fedcl site bundle --force`",
    ),
    (
        "Failed to activate SuperNode",
        "the SuperLink refused this site's key {pub}: either it is not enrolled (send that file "
        "to the coordinator: it goes into federation.toml's [[sites]], then `fedcl coordinator "
        "init` and `up`), or the SuperLink still counts this site's previous connection as "
        "online (after a lost link Flower takes up to a minute, 2 missed heartbeats, to notice)",
    ),
    (
        "Connection refused",
        "nothing listens at {superlink}: is the coordinator's `fedcl coordinator up` running, "
        "and is this the address and port it printed?",
    ),
    (
        "No route to host",
        "the network path to {superlink} is down (no route to host): the link, a VPN or a "
        "firewall between this site and the coordinator",
    ),
    (
        "Name or service not known",
        "the SuperLink's host name in {superlink} does not resolve from this site",
    ),
    ("timed out", "no answer from {superlink} (a firewall, or the wrong address)"),
    ("hostname", "TLS: the SuperLink's certificate is not issued for {superlink}"),
)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def supernode_argv(site: SiteDir, superlink: str, port: int, max_wait: float) -> list[str]:
    return [
        sys.executable, "-m", "fedcl.cli.supernode",  # flower-supernode, see run_flower_supernode
        "--superlink", superlink,
        "--root-certificates", str(site.ca_cert),
        "--auth-supernode-private-key", str(site.node_key),
        "--host", "127.0.0.1",
        "--port", str(port),
        "--max-wait-time", str(max_wait),
        "--node-config", f'site-config="{site.site_toml}"',
    ]  # fmt: skip


def explain(log_text: str, site: SiteDir, superlink: str) -> str:
    """One actionable line for why a SuperNode stopped (from the end of its log)."""
    for needle, meaning in REASONS:
        if needle in log_text:
            return meaning.format(ca=site.ca_cert, pub=site.node_pub, superlink=superlink)
    lines = [ln.strip() for ln in log_text.splitlines() if "ERROR" in ln or "Error" in ln]
    return lines[-1] if lines else "no reason in its log"


class Supervisor:
    """Runs one SuperNode until SIGTERM/SIGINT; every start and exit goes to supervisor.log."""

    def __init__(self, site: SiteDir, *, port: int | None, max_wait: float = MAX_WAIT_S):
        self.site = site
        self.spec = site.bundle_spec()
        self.fixed_port = port
        self.max_wait = max_wait
        self.folder = site.supervisor
        self.folder.mkdir(mode=0o700, exist_ok=True)
        self.log = self.folder / "supervisor.log"
        self.node_log = self.folder / "supernode.log"
        self.proc: subprocess.Popen | None = None
        self.stopping = False

    def say(self, message: str) -> None:
        line = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}"
        with open(self.log, "a") as fh:
            fh.write(line + "\n")
        print(line, flush=True)

    def _status(self, **fields) -> None:
        path = self.folder / "status.json"
        path.write_text(json.dumps({"supervisor_pid": os.getpid(), **fields}, indent=2))

    def _stop(self, signum, _frame) -> None:
        self.stopping = True
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        (self.folder / "supervisor.pid").write_text(f"{os.getpid()}\n")
        backoff = BACKOFF_START
        try:
            while not self.stopping:
                ran, code, reason = self._once()
                if self.stopping:
                    break
                wait = 0.0 if ran >= HEALTHY_AFTER else backoff
                backoff = BACKOFF_START if ran >= HEALTHY_AFTER else min(backoff * 2, BACKOFF_MAX)
                self.say(
                    f"SuperNode exited with code {code} after {ran:.0f} s: {reason}; "
                    f"starting it again in {wait:.0f} s"
                )
                self._status(state="waiting", last_exit=code, reason=reason, since=time.time())
                deadline = time.monotonic() + wait
                while not self.stopping and time.monotonic() < deadline:
                    time.sleep(0.2)
        finally:
            self._status(state="stopped", since=time.time())
            (self.folder / "supervisor.pid").unlink(missing_ok=True)
        self.say("supervisor stopped")
        return 0

    def _once(self) -> tuple[float, int | None, str]:
        superlink = self.spec.superlink
        if not listening(superlink, timeout=3):
            self.say(f"the SuperLink at {superlink} does not answer yet (connection failed)")
        port = self.fixed_port or free_port()
        argv = supernode_argv(self.site, superlink, port, self.max_wait)
        offset = self.node_log.stat().st_size if self.node_log.exists() else 0
        with open(self.node_log, "ab") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=flower_env(), cwd=self.site.root, start_new_session=True,
            )  # fmt: skip
        started = time.monotonic()
        (self.folder / "supernode.pid").write_text(f"{self.proc.pid}\n")
        self._status(
            state="running", supernode_pid=self.proc.pid, port=port, superlink=superlink,
            since=time.time(), log_offset=offset,
        )  # fmt: skip
        self.say(
            f"SuperNode started (pid {self.proc.pid}, port {port}) for site {self.spec.site_id} "
            f"-> {superlink}"
        )
        code = self.proc.wait()
        ran = time.monotonic() - started
        with open(self.node_log, "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
        return ran, code, explain(text, self.site, superlink)


def detach(site: SiteDir, port: int | None, max_wait: float) -> int:
    """Start ``fedcl site up`` (without --detach) in the background; returns its pid."""
    site.bundle_spec()  # refuse early, in the foreground
    folder = site.supervisor
    folder.mkdir(mode=0o700, exist_ok=True)
    pid = read_pid(folder / "supervisor.pid")
    if pid_alive(pid):
        raise ConfigError(f"site {site.root} is already up (supervisor pid {pid})")
    argv = [sys.executable, "-m", "fedcl.cli.main", "site", "up", str(site.root)]
    argv += ["--max-wait", str(max_wait)] + (["--port", str(port)] if port else [])
    with open(folder / "supervisor.out", "ab") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env=flower_env(),
        )  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and read_pid(folder / "supervisor.pid") != proc.pid:
        if proc.poll() is not None:
            raise ConfigError(
                f"the supervisor exited at once:\n{log_tail(folder / 'supervisor.out')}"
            )
        time.sleep(0.1)
    return proc.pid


def stop(site: SiteDir, timeout: float = 20) -> int | None:
    """Stop the supervisor (it stops its SuperNode first); returns its pid if it ran."""
    pid = read_pid(site.supervisor / "supervisor.pid")
    if not pid_alive(pid):
        return None
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if pid_alive(pid):
        os.killpg(pid, signal.SIGKILL)
    node = read_pid(site.supervisor / "supernode.pid")
    if pid_alive(node):
        os.killpg(node, signal.SIGKILL)
    return pid


def connection_state(site: SiteDir) -> dict:
    """Supervisor and SuperNode alive?, connected?, the last log lines of the current SuperNode."""
    folder = site.supervisor
    status_file = folder / "status.json"
    status = json.loads(status_file.read_text()) if status_file.is_file() else {}
    supervisor = read_pid(folder / "supervisor.pid")
    node = status.get("supernode_pid") if status.get("state") == "running" else None
    text = ""
    log = folder / "supernode.log"
    if log.is_file():
        with open(log, "rb") as fh:
            fh.seek(int(status.get("log_offset", 0)))
            text = fh.read().decode(errors="replace")
    text = ANSI.sub("", text)
    alive = pid_alive(node)
    connected = alive and "SuperNode ID:" in text
    return {
        "supervisor_pid": supervisor if pid_alive(supervisor) else None,
        "supernode_pid": node if alive else None,
        "port": status.get("port"),
        "superlink": status.get("superlink"),
        "connected": connected,
        "state": status.get("state", "never started"),
        "reason": status.get("reason"),
        "last_lines": [ln for ln in text.splitlines() if ln.strip(" \t:INFO")][-5:],
        "supervisor_log": log_tail(folder / "supervisor.log", 5).splitlines(),
    }


# --- the SuperNode process itself --------------------------------------------------------------
GAVE_UP = "the SuperNode gave up reaching the SuperLink (--max-wait-time) and exits"


def run_flower_supernode() -> None:
    """``flower-supernode``, but a process that ends when the SuperNode stops trying.

    When Flower 1.41's SuperNode loses a SuperLink it was connected to (a cut link, a SuperLink
    down for longer than ``--max-wait-time``), its retries give up, the error is logged and its
    main function *returns*; its Runtime API server thread is no daemon, so the process lives on,
    connected to nothing, and a supervisor waiting for it to exit waits forever. Here it exits as
    on SIGTERM (Flower's exit handlers stop that thread), with an error code and a line saying
    why, so the :class:`Supervisor` starts a new one.
    """
    from flwr.supercore.exit import ExitCode, flwr_exit
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv[0] = "flower-supernode"  # what Flower's messages and exit handling expect
    flower_supernode()
    flwr_exit(ExitCode.SUPERNODE_CONNECTION_ERROR, GAVE_UP)


if __name__ == "__main__":
    run_flower_supernode()
