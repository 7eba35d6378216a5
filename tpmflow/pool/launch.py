"""Launchers start replicas and restart the ones that die.

``LocalLauncher`` (the embedded default) runs each replica as a subprocess in its own process
group and supervises it from a thread. A cluster launcher runs replicas as long-running Parsl apps
on a GPU executor; it implements the same small protocol.
"""

from __future__ import annotations

import logging
import re
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from tpmflow.config import TEXT_EMBEDDER_GROUP, PoolConfig, ReplicaSlot
from tpmflow.pool.multinode import MultiNodeReplica, hosts_of, node_plan
from tpmflow.pool.replica import (
    ReplicaProcess,
    cpu_binds,
    embedder_command,
    embedder_env,
    process_cores,
    replica_command,
    replica_env,
)
from tpmflow.pool.shape import check_pool_shape

log = logging.getLogger("tpmflow.launch")

# A replica that exits this soon after its start, this many times in a row, fails for a reason a
# restart will not fix (a model it cannot load, a bad flag): the launcher stops restarting it.
QUICK_EXIT_S = 300.0
MAX_QUICK_EXITS = 3
# "RuntimeError: ...", "torch.OutOfMemoryError: ...", "ValueError: ..." at the start of a log line.
_ERROR_LINE = re.compile(r"^(?:[\w.]+\.)?\w*(?:Error|Exception|Exit|Interrupt)\b.*?:\s*\S")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def advertised_host(bind_host: str) -> str:
    """The name other nodes reach a server bound to ``bind_host`` by: the host itself, or this
    node's hostname for a wildcard bind (``0.0.0.0`` means nothing on another node)."""
    return socket.gethostname() if bind_host in ("0.0.0.0", "::", "") else bind_host


def tail_log(log_dir: Path, replica_id: str, lines: int = 40) -> str:
    """The root cause line of a replica's log, then its last lines (every launcher writes
    ``<log_dir>/<replica_id>.log``): the cause first, not buried in a 40-line traceback."""
    path = log_dir / f"{replica_id}.log"
    if not path.is_file():
        return ""
    text = path.read_text(errors="replace").splitlines()
    cause = root_cause(text)
    tail = "\n".join(text[-lines:])
    return f"root cause: {cause}\n{tail}" if cause else tail


def root_cause(lines: list[str]) -> str | None:
    """The last exception line (``SomeError: message``) of a log, without its logger prefix."""
    for line in reversed(lines):
        # vLLM prefixes lines with "(EngineCore_DP0 pid=1) ERROR 01-02 ... " and similar; try every suffix.
        for start in [0, *(m.end() for m in re.finditer(r"[\s\]]\s*", line))]:
            rest = line[start:]
            if _ERROR_LINE.match(rest) and not rest.startswith(("Traceback", "raise ")):
                return rest.strip()
    return None


class Launcher(Protocol):
    """What a pool needs from a launcher."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def replica_ids(self) -> list[str]: ...

    def log_tail(self, replica_id: str, lines: int = 40) -> str: ...


class LocalLauncher:
    """Replica subprocesses on this node; a supervisor thread restarts any that exits."""

    def __init__(
        self,
        cfg: PoolConfig,
        gateway_url: str,
        secret: str,
        log_dir: Path,
        on_restart: Callable[[str], None] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.cfg = cfg
        self.gateway_url = gateway_url
        self.secret = secret
        self.log_dir = log_dir
        self.on_restart = on_restart
        self.host = host
        self.replicas: dict[str, ReplicaProcess | MultiNodeReplica] = {}
        self._slots = {s.replica_id: s for s in cfg.slots() + cfg.embedder_slots()}
        self._binds = cpu_binds(cfg)  # refuses a node without a core per rank
        if cfg.launcher.hosts:
            hosts_of(cfg, len(cfg.slots()) - 1)  # refuses too few hosts for every slot's nodes
        elif cfg.engine.nodes > 1:
            raise ValueError(
                f"a replica over {cfg.engine.nodes} nodes needs their hosts: list them in launcher.hosts, or "
                "run the pool with `launcher.kind: parsl` on a multi-node block"
            )
        check_pool_shape(cfg)  # a shape the model cannot take is refused before any start
        if cfg.text_embedder is not None:
            cfg.text_embedder.check()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._supervisor: threading.Thread | None = None
        self._started: dict[str, float] = {}  # replica id -> when its current process started
        self._quick_exits: dict[str, int] = {}  # replica id -> quick exits in a row
        self.gave_up: dict[str, str] = {}  # replica id -> why it is no longer restarted

    def _spawn(self, slot: ReplicaSlot) -> ReplicaProcess | MultiNodeReplica:
        if self.cfg.launcher.hosts:
            return self._spawn_on_hosts(slot)
        port = free_port(self.host)
        url = f"http://{advertised_host(self.host)}:{port}"
        if slot.group == TEXT_EMBEDDER_GROUP:
            cmd = embedder_command(self.cfg, port, self.host)
            env = embedder_env(self.cfg, slot.replica_id, url, self.gateway_url, self.secret)
            cores = None
        else:
            cmd = replica_command(self.cfg, port, self.host, slot.index)
            bind = self._binds[slot.index]
            env = replica_env(self.cfg, slot.replica_id, url, self.gateway_url, self.secret, bind, slot.group)
            cores = process_cores(self.cfg, slot.index)
        proc = ReplicaProcess(slot.replica_id, cmd, env, self.log_dir / f"{slot.replica_id}.log", cores)
        proc.start()
        self._started[slot.replica_id] = time.monotonic()
        log.info("started %s (group %s, pid %s) on %s", slot.replica_id, slot.group, proc.pid, url)
        return proc

    def _spawn_on_hosts(self, slot: ReplicaSlot) -> MultiNodeReplica:
        """A replica on ``launcher.hosts`` (over ``engine.nodes`` of them): one node agent per host,
        its API server on the first host's address."""
        hosts = hosts_of(self.cfg, slot.index)
        port = self.cfg.launcher.replica_port + slot.index
        url = f"http://{hosts[0].address}:{port}"
        plan = node_plan(self.cfg, slot.index, slot.replica_id, [h.address for h in hosts], port, hosts)
        env = replica_env(self.cfg, slot.replica_id, url, self.gateway_url, self.secret, None, slot.group)
        proc = MultiNodeReplica(slot.replica_id, plan, hosts, env, self.log_dir)
        proc.start()
        self._started[slot.replica_id] = time.monotonic()
        log.info("started %s (group %s) on %s: nodes %s", slot.replica_id, slot.group, url, proc.describe())
        return proc

    def start(self) -> None:
        with self._lock:
            for slot in self.cfg.initial_slots() + self.cfg.embedder_slots():
                self.replicas[slot.replica_id] = self._spawn(slot)
        self._supervisor = threading.Thread(target=self._supervise, name="tpmflow-launcher", daemon=True)
        self._supervisor.start()

    def _supervise(self) -> None:
        while not self._stopping.wait(0.5):
            if not self.cfg.launcher.restart:
                continue
            with self._lock:
                for replica_id, proc in list(self.replicas.items()):
                    if proc.alive() or self._stopping.is_set() or replica_id in self.gave_up:
                        continue
                    code = proc.proc and proc.proc.returncode
                    proc.stop(grace_s=0)  # reap the group: engine children may outlive the server
                    quick = time.monotonic() - self._started.get(replica_id, 0.0) < QUICK_EXIT_S
                    self._quick_exits[replica_id] = self._quick_exits.get(replica_id, 0) + 1 if quick else 0
                    if self._quick_exits[replica_id] >= MAX_QUICK_EXITS:
                        cause = root_cause(self.log_tail(replica_id, 400).splitlines()) or f"exit code {code}"
                        self.gave_up[replica_id] = cause
                        log.error(
                            "%s exited %d times within %.0f s of its start; not restarting it: %s",
                            replica_id, MAX_QUICK_EXITS, QUICK_EXIT_S, cause,
                        )  # fmt: skip
                        continue
                    log.warning("%s exited (code %s); restarting", replica_id, code)
                    fresh = self._spawn(self._slots[replica_id])
                    fresh.restarts = proc.restarts + 1
                    self.replicas[replica_id] = fresh
                    if self.on_restart:
                        self.on_restart(replica_id)

    def group_ids(self, group: str) -> list[str]:
        """The replicas of ``group`` this launcher runs (started, maybe not yet registered)."""
        with self._lock:
            return [r for r in self.replicas if self._slots[r].group == group]

    def add(self, group: str) -> str | None:
        """Start one more replica of ``group`` in its first free slot; None when the group is at its maximum."""
        with self._lock:
            if self._stopping.is_set():
                return None
            free = [s for s in self._slots.values() if s.group == group and s.replica_id not in self.replicas]
            if not free:
                return None
            self.replicas[free[0].replica_id] = self._spawn(free[0])
            return free[0].replica_id

    def remove(self, replica_id: str, grace_s: float = 10.0) -> None:
        """Stop a replica for good (no restart): the autoscaler drains it first."""
        with self._lock:
            proc = self.replicas.pop(replica_id, None)
        if proc is not None:
            proc.stop(grace_s=grace_s)
            log.info("stopped %s (scaled down)", replica_id)

    def kill(self, replica_id: str) -> None:
        """SIGKILL a replica's whole process group (what a node failure looks like); for tests."""
        self.replicas[replica_id].kill()

    def stop(self) -> None:
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=5)
        with self._lock:
            for proc in self.replicas.values():
                proc.kill(15)
            deadline = time.monotonic() + 10
            for proc in self.replicas.values():
                while proc.alive() and time.monotonic() < deadline:
                    time.sleep(0.1)
                proc.stop(grace_s=0)

    def replica_ids(self) -> list[str]:
        return list(self.replicas)

    def log_tail(self, replica_id: str, lines: int = 40) -> str:
        return tail_log(self.log_dir, replica_id, lines)
