"""Sites on hosts of their own: one network namespace per site, wired to a bridge of the test's.

The root namespace gets a bridge holding ``10.250.<N>.1/24`` (``N`` a /24 of 10.250/16 no
interface of the root namespace uses yet); each site gets a namespace with only ``lo`` and one
end of a veth pair (``10.250.<N>.<10 + k>/24``), the other end a port of the bridge. There is no
route anywhere else and IP forwarding is not touched: traffic of this /24 never leaves the
machine. Cutting a site's link is ``ip link set <its bridge port> down`` in the root namespace
(its end loses carrier: connections time out, as on a pulled cable); restoring it is ``up``.

:meth:`Netns.create` raises :class:`NetnsUnavailable` (the test skips with its reason) when the
process may not make namespaces; :meth:`Netns.close` removes every namespace, veth and bridge it
made and SIGKILLs whatever still runs inside its namespaces, and can be called any number of
times (also after a failed :meth:`create`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass, field

PREFIX = "10.250"


class NetnsUnavailable(Exception):
    """Network namespaces cannot be made here (not root, no `ip`, no CAP_NET_ADMIN, ...)."""


def ip(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done


def _used_subnets() -> set[int]:
    """Third octets of 10.250.x.y addresses and routes the root namespace already has."""
    text = ip("-4", "-o", "addr", "show").stdout + ip("-4", "route", "show", "table", "all").stdout
    return {int(m) for m in re.findall(rf"\b{re.escape(PREFIX)}\.(\d+)\.\d+", text)}


@dataclass
class Netns:
    tag: str
    octet: int
    sites: list[str]
    namespaces: dict[str, str] = field(default_factory=dict)  # site -> namespace
    ports: dict[str, str] = field(default_factory=dict)  # site -> bridge port (root side)
    bridge: str | None = None

    @property
    def coordinator_ip(self) -> str:
        return f"{PREFIX}.{self.octet}.1"

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        return ipaddress.ip_network(f"{PREFIX}.{self.octet}.0/24")

    def site_ip(self, site: str) -> str:
        return f"{PREFIX}.{self.octet}.{10 + self.sites.index(site)}"

    def exec_prefix(self, site: str) -> list[str]:
        """Prefix a command with this to run it on the site's host."""
        return ["ip", "netns", "exec", self.namespaces[site]]

    # --- life ---------------------------------------------------------------------------------
    @classmethod
    def create(cls, sites: list[str]) -> Netns:
        if os.geteuid() != 0:
            raise NetnsUnavailable("network namespaces need root (the test runs as uid "
                                   f"{os.geteuid()})")  # fmt: skip
        if shutil.which("ip") is None:
            raise NetnsUnavailable("no `ip` command (iproute2) on PATH")
        tag = f"{os.getpid() % 100000:05d}"
        used = _used_subnets()
        free = [n for n in range(100, 250) if n not in used]
        if not free:
            raise NetnsUnavailable(f"every {PREFIX}.100-249.0/24 is in use in the root namespace")
        net = cls(tag=tag, octet=free[os.getpid() % len(free)], sites=list(sites))
        probe = f"fedcl-{tag}-probe"
        done = ip("netns", "add", probe, check=False)
        if done.returncode != 0:
            raise NetnsUnavailable(f"`ip netns add` is not permitted here: {done.stderr.strip()}")
        ip("netns", "del", probe, check=False)
        try:
            net._wire()
        except BaseException:
            net.close()
            raise
        return net

    def _wire(self) -> None:
        self.bridge = f"fcl{self.tag}b"
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.coordinator_ip}/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for k, site in enumerate(self.sites):
            ns = f"fedcl-{self.tag}-{site}"
            outer, inner = f"fcl{self.tag}r{k}", f"fcl{self.tag}n{k}"  # bridge side, site side
            ip("netns", "add", ns)
            self.namespaces[site] = ns
            ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            self.ports[site] = outer
            ip("link", "set", inner, "netns", ns)
            ip("link", "set", outer, "master", self.bridge)
            ip("link", "set", outer, "up")
            ip("-n", ns, "link", "set", "lo", "up")  # the SuperNode's own API is on 127.0.0.1
            ip("-n", ns, "addr", "add", f"{self.site_ip(site)}/24", "dev", inner)
            ip("-n", ns, "link", "set", inner, "up")

    def cut(self, site: str) -> None:
        ip("link", "set", self.ports[site], "down")

    def restore(self, site: str) -> None:
        ip("link", "set", self.ports[site], "up")

    def pids(self, site: str) -> list[int]:
        done = ip("netns", "pids", self.namespaces[site], check=False)
        return [int(p) for p in done.stdout.split()]

    def close(self) -> None:
        for site, ns in list(self.namespaces.items()):
            for pid in self.pids(site):  # only what this test started runs in its namespaces
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            ip("netns", "del", ns, check=False)  # takes the site end of its veth pair along
            self.namespaces.pop(site)
        for site, port in list(self.ports.items()):
            ip("link", "del", port, check=False)  # gone with its peer already, normally
            self.ports.pop(site)
        if self.bridge is not None:
            ip("link", "del", self.bridge, check=False)
            self.bridge = None

    def leftovers(self) -> list[str]:
        """Namespaces and links of this tag that still exist (empty after :meth:`close`)."""
        names = ip("netns", "list", check=False).stdout + ip("-o", "link", check=False).stdout
        return sorted(set(re.findall(rf"\b(?:fedcl-{self.tag}-\S+|fcl{self.tag}\w+)", names)))
