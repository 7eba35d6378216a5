"""Hosts on one machine: Linux network namespaces joined by a bridge, one address each.

Each host is a namespace with a veth pair into a bridge in the root namespace, so the hosts reach
each other (and the test process, "the thinker", at the bridge's address) over real TCP, and a
server bound to one host's address is unreachable at any other. A command runs "on" a host through
``exec_prefix(name)``: ``ip netns exec`` plus a private ``/dev/shm``, since vLLM tells nodes apart
by their shared memory as well as by address. Needs root and iproute2 (CI runs as root).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def why_not_available() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "simulated hosts need root (ip netns add)"
    if shutil.which("ip") is None:
        return "simulated hosts need iproute2's `ip`"
    return None


@dataclass
class SimulatedHosts:
    names: list[str]
    tag: str = field(default_factory=lambda: str(os.getpid() % 10000))
    subnet: int = field(default_factory=lambda: 200 + os.getpid() % 50)

    def __post_init__(self) -> None:
        self.bridge = f"tpmbr{self.tag}"
        self.made: list[str] = []

    @property
    def thinker_address(self) -> str:
        return f"10.{self.subnet}.0.254"

    def address(self, name: str) -> str:
        return f"10.{self.subnet}.0.{self.names.index(name) + 1}"

    def namespace(self, name: str) -> str:
        return f"tpm{self.tag}-{name}"

    def interface(self, name: str) -> str:
        return f"eth{self.names.index(name)}"

    def exec_prefix(self, name: str) -> list[str]:
        """A command prefix that runs the rest of the command on host ``name``."""
        shm = 'mount -t tmpfs tmpfs /dev/shm && exec "$@"'
        return ["ip", "netns", "exec", self.namespace(name), "unshare", "-m", "sh", "-c", shm, "sh"]

    def pids(self, name: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.namespace(name)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def __enter__(self) -> SimulatedHosts:
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.thinker_address}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            for i, name in enumerate(self.names):
                ns, outer = self.namespace(name), f"tpm{self.tag}v{i}"
                _ip("netns", "add", ns)
                self.made.append(ns)
                _ip("link", "add", outer, "type", "veth", "peer", "name", self.interface(name), "netns", ns)
                _ip("link", "set", outer, "master", self.bridge)
                _ip("link", "set", outer, "up")
                _ip("-n", ns, "addr", "add", f"{self.address(name)}/24", "dev", self.interface(name))
                _ip("-n", ns, "link", "set", self.interface(name), "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for name in self.names:
            for pid in self.pids(name):  # nothing may outlive its host
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    pass
        for ns in self.made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
