"""``python -m tpmflow.pool.node_agent [--rank R]``: one node of a replica that spans several nodes.

Run once per node by the launcher (through a host's command prefix, or as one task of the block's
``srun``/``mpiexec``), with the replica's :class:`~tpmflow.pool.multinode.NodePlan` in
``TPMFLOW_NODE_PLAN``. The rank comes from ``--rank`` or the MPI launcher's environment. The agent
runs its node's vLLM process in its own process group and ends when:

- its vLLM process exits (the agent exits with its code, so the launcher, or ``srun
  --kill-on-bad-exit``, ends every other node of the replica);
- it is a worker node and the head has been unreachable for ``head_grace_s`` (vLLM's headless
  workers would otherwise wait for a dead head forever);
- it is signalled (SIGTERM/SIGINT): its vLLM processes get SIGTERM, then SIGKILL.

No vLLM process outlives its agent: they share the agent's process group, which is signalled
last of all.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import time

from tpmflow.pool.multinode import NodePlan

log = logging.getLogger("tpmflow.node_agent")

# Where MPI launchers put a task's rank: Slurm, PALS (Aurora/Polaris mpiexec), MPICH/Hydra, Open MPI, PMIx.
RANK_VARIABLES = ("SLURM_PROCID", "PALS_RANKID", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
POLL_S = 1.0


def rank_from_env(environ: dict[str, str] | os._Environ[str], launcher: str | None = None) -> int:
    """This task's rank, from the variables of the MPI launcher that started it (``srun`` sets
    SLURM_PROCID; under Slurm, an ``mpiexec`` task inherits the batch step's SLURM_PROCID=0, so
    it is read only for srun)."""
    names = ("SLURM_PROCID",) if launcher == "srun" else tuple(v for v in RANK_VARIABLES if v != "SLURM_PROCID")
    for name in names:
        if environ.get(name, "").isdigit():
            return int(environ[name])
    raise SystemExit(f"node_agent: no --rank and none of {', '.join(names)} is set")


def reachable(address: str, port: int, timeout_s: float = 2.0) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout_s):
            return True
    except OSError:
        return False


class NodeAgent:
    def __init__(self, plan: NodePlan, rank: int) -> None:
        if not 0 <= rank < len(plan.nodes):
            raise SystemExit(f"node_agent: rank {rank} outside the replica's {len(plan.nodes)} nodes")
        self.plan = plan
        self.node = plan.nodes[rank]
        self.child: subprocess.Popen[bytes] | None = None
        self.stopping = False

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            os.setsid()  # a group of its own, which the vLLM processes join (an MPI proxy's is not ours)
        except PermissionError:
            pass  # already leads its own group (started with start_new_session)
        if self.node.cores and hasattr(os, "sched_setaffinity"):
            from tpmflow.pool.replica import parse_cores

            os.sched_setaffinity(0, parse_cores(self.node.cores))  # the vLLM processes inherit it
        log.info("%s node %d (%s): %s", self.plan.replica_id, self.node.rank, self.node.address, " ".join(self.node.cmd))
        self.child = subprocess.Popen(self.node.cmd, env={**os.environ, **self.node.env}, stdin=subprocess.DEVNULL)
        code = self._watch()
        self._stop_child()
        return code

    def _watch(self) -> int:
        assert self.child is not None
        started = time.monotonic()
        head_seen: float | None = None
        while not self.stopping:
            code = self.child.poll()
            if code is not None:
                log.error("node %d: vLLM exited with code %s", self.node.rank, code)
                return code or 1
            if self.node.rank > 0:  # the head hosts the rendezvous store on master_port
                now = time.monotonic()
                if reachable(self.plan.master_addr, self.plan.master_port):
                    head_seen = now
                elif head_seen is not None and now - head_seen > self.plan.head_grace_s:
                    log.error("node %d: the head %s:%d is gone; stopping", self.node.rank, self.plan.master_addr,
                              self.plan.master_port)  # fmt: skip
                    return 1
                elif head_seen is None and now - started > self.plan.start_timeout_s:
                    log.error("node %d: the head never appeared in %.0f s", self.node.rank, self.plan.start_timeout_s)
                    return 1
            time.sleep(POLL_S)
        return 0

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _stop_child(self) -> None:
        child = self.child
        if child is None:
            return
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        # vLLM's workers (its children) share this group: none outlives the agent. The agent
        # exits with vLLM's code unless something of its group is still alive at the end, which a
        # SIGKILL of the whole group (the agent too, as its last act) then ends.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        group = os.getpgid(0)
        try:
            if group_members(group):
                os.killpg(group, signal.SIGTERM)
                deadline = time.monotonic() + 5.0
                while group_members(group) and time.monotonic() < deadline:
                    time.sleep(0.2)
            if group_members(group):
                os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass


def group_members(group: int) -> list[int]:
    """Live processes of process group ``group`` other than this one (from /proc; zombies excluded)."""
    me, members = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()  # noqa: PTH123, SIM115 - one short read
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, pgrp, ...
        if int(fields[2]) == group and fields[0] != "Z":
            members.append(int(entry))
    return members


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s node_agent %(levelname)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=None, help="this node's rank (default: the MPI launcher's)")
    args = parser.parse_args(argv)
    plan = NodePlan.from_env(dict(os.environ))
    rank = args.rank if args.rank is not None else rank_from_env(os.environ, plan.launcher)
    sys.exit(NodeAgent(plan, rank).run())


if __name__ == "__main__":
    main()
