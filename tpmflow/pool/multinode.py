"""Replicas that span several nodes, through vLLM's own multi-node ``mp`` executor.

vLLM 0.32 runs one engine over ``--nnodes`` nodes: the head (node rank 0) runs the API server, the
engine core and its node's workers; every other node runs only its workers (``--headless``, here
``tpmflow.engine.headless``), and all ranks meet at ``--master-addr:--master-port``. Ranks are
ordered ``pp_rank * TP + tp_rank``, so with TP ranks per node each node holds whole pipeline
stages: tensor parallel inside a node, pipeline parallel across nodes, the layout vLLM recommends
without a fast interconnect. Ray is not needed (and vLLM's CPU build refuses it).

This module plans a replica's nodes (:func:`node_plan`: each node's command and the variables
that differ between nodes); :mod:`tpmflow.pool.node_agent` runs one node of the plan. Launchers
start one agent per node: the local launcher through each host's command prefix (``ssh node7``,
``ip netns exec n1``), the Parsl launcher through the block's MPI launcher (``srun``, ``mpiexec``).
The replica is one unit: any node's agent that exits ends the replica, and the launcher stops the
others and starts it again (see docs/dev/multinode-research.md for vLLM's failure behaviour).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from pydantic import BaseModel, Field

from tpmflow.config import HostConfig, PoolConfig
from tpmflow.pool.replica import ReplicaProcess, parse_cores, rank_binds, replica_command

PLAN_ENV = "TPMFLOW_NODE_PLAN"  # the replica's NodePlan as JSON, in every agent's environment
HEADLESS_MODULE = "tpmflow.engine.headless"


class NodeLaunch(BaseModel):
    """One node of a replica: the command its agent runs and the variables only this node gets."""

    rank: int
    address: str
    cmd: list[str]
    env: dict[str, str] = Field(default_factory=dict)
    cores: str | None = None


class NodePlan(BaseModel):
    """Every node of one replica, and where its head listens for the ranks' rendezvous."""

    replica_id: str
    master_addr: str
    master_port: int
    nodes: list[NodeLaunch]
    launcher: str | None = Field(None, description="the MPI launcher that starts the agents (srun, mpiexec), if any")
    head_grace_s: float = Field(15.0, description="a node stops its workers when the head is gone this long")
    start_timeout_s: float = Field(600.0, description="a node gives up when the head never appeared in this long")

    def to_env(self) -> dict[str, str]:
        return {PLAN_ENV: self.model_dump_json()}

    @classmethod
    def from_env(cls, environ: dict[str, str]) -> NodePlan:
        return cls.model_validate_json(environ[PLAN_ENV])


def multinode_flags(cfg: PoolConfig, master_addr: str, master_port: int, rank: int) -> list[str]:
    """vLLM's flags for node ``rank`` of a replica over ``engine.nodes`` nodes."""
    return [
        "--distributed-executor-backend",
        "mp",
        "--nnodes",
        str(cfg.engine.nodes),
        "--node-rank",
        str(rank),
        "--master-addr",
        master_addr,
        "--master-port",
        str(master_port),
    ]


def headless_command(head_cmd: list[str]) -> list[str]:
    """A worker node's command from the head's: the same vLLM flags, without the API server's
    ``--host``/``--port``, run by ``tpmflow.engine.headless``."""
    assert head_cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"], head_cmd[:3]
    flags: list[str] = []
    rest = iter(head_cmd[3:])
    for arg in rest:
        if arg in ("--host", "--port"):
            next(rest)  # and its value
            continue
        flags.append(arg)
    return [head_cmd[0], "-m", HEADLESS_MODULE, *flags]


def node_plan(
    cfg: PoolConfig,
    index: int,
    replica_id: str,
    addresses: list[str],
    port: int,
    hosts: list[HostConfig] | None = None,
    bind_host: str | None = None,
    model_dir: str | None = None,
) -> NodePlan:
    """The plan of replica slot ``index`` over the nodes at ``addresses`` (the head first): its API
    server on ``bind_host`` (default: the head's address) and ``port``. ``hosts`` (the local
    launcher's) add each node's interface and cores."""
    e = cfg.engine
    if len(addresses) != e.nodes:
        raise ValueError(f"a replica over {e.nodes} nodes was given {len(addresses)} node addresses: {addresses}")
    master_addr, master_port = addresses[0], e.master_port + index
    head = replica_command(cfg, port, bind_host or master_addr, index, model_dir)
    nodes: list[NodeLaunch] = []
    for rank, address in enumerate(addresses):
        host = hosts[rank] if hosts else None
        flags = multinode_flags(cfg, master_addr, master_port, rank) if e.nodes > 1 else []
        cmd = head + flags if rank == 0 else headless_command(head) + flags
        env = {"VLLM_HOST_IP": address}  # without it vLLM takes the address of its default route
        interface = (host.interface if host else None) or e.node_interface
        if interface:
            env["GLOO_SOCKET_IFNAME"] = env["NCCL_SOCKET_IFNAME"] = interface
        cores = host.cores if host else None
        if cores:  # vLLM's CPU build: one core list per rank of this node
            env["VLLM_CPU_OMP_THREADS_BIND"] = rank_binds(parse_cores(cores), e.ranks_per_node)
        nodes.append(NodeLaunch(rank=rank, address=address, cmd=cmd, env=env, cores=cores))
    return NodePlan(replica_id=replica_id, master_addr=master_addr, master_port=master_port, nodes=nodes)


def agent_command(python: str = sys.executable) -> list[str]:
    return [python, "-m", "tpmflow.pool.node_agent"]


def app_resources(nodes: int) -> dict[str, int]:
    """The Parsl resource specification of a replica app over ``nodes`` nodes: one rank (its node
    agent) per node."""
    return {"num_nodes": nodes, "ranks_per_node": 1, "num_ranks": nodes}


def mpi_launch(
    cfg: PoolConfig,
    index: int,
    replica_id: str,
    nodelist: list[str],
    mpi_prefix: str,
    port: int,
    bind_host: str,
    model_dir: str | None = None,
) -> tuple[list[str], NodePlan]:
    """How a Parsl app on a multi-node block starts replica slot ``index``: one node agent per node
    through the block's MPI launcher (Parsl's ``PARSL_MPI_PREFIX`` for ``num_nodes`` nodes, one
    rank each), and the plan the agents read. With ``srun``, one task's exit ends the step, so a
    node lost ends the replica everywhere (``mpiexec`` of PALS and Hydra does so by default)."""
    import shlex

    nodes = cfg.engine.nodes
    if len(nodelist) < nodes:
        raise ValueError(
            f"a replica over {nodes} nodes was given {len(nodelist)} by the block ({','.join(nodelist) or 'none'}): "
            "set the replica executor's nodes_per_block and the app's num_nodes to engine.nodes"
        )
    addresses = [resolve(host) for host in nodelist[:nodes]]
    plan = node_plan(cfg, index, replica_id, addresses, port, bind_host=bind_host, model_dir=model_dir)
    prefix = shlex.split(mpi_prefix)
    plan.launcher = Path(prefix[0]).name if prefix else None
    if plan.launcher == "srun":
        prefix.insert(1, "--kill-on-bad-exit=1")
    return [*prefix, *agent_command()], plan


def resolve(host: str) -> str:
    """A node's address from its hostname (as the scheduler lists it); a name that does not resolve
    is an error naming it, not a replica that hangs at its rendezvous."""
    import socket

    try:
        return socket.gethostbyname(host)
    except OSError as exc:
        raise ValueError(f"node {host!r} of the block does not resolve to an address: {exc}") from None


class MultiNodeReplica:
    """One replica over several hosts, as the local launcher runs it: one node agent per host,
    each started through its host's command prefix in a process group of its own. It is alive
    while every agent is; stopping or killing it signals every agent's group."""

    def __init__(
        self, replica_id: str, plan: NodePlan, hosts: list[HostConfig], env: dict[str, str], log_dir: Path
    ) -> None:
        self.replica_id = replica_id
        self.plan = plan
        self.restarts = 0
        env = {**env, **plan.to_env()}
        self.nodes = [
            ReplicaProcess(
                f"{replica_id}.node{node.rank}",
                [*host.exec, *agent_command(), "--rank", str(node.rank)],
                env,
                log_dir / (f"{replica_id}.log" if node.rank == 0 else f"{replica_id}.node{node.rank}.log"),
            )
            for node, host in zip(plan.nodes, hosts, strict=True)
        ]

    def start(self) -> None:
        try:
            for node in self.nodes:
                node.start()
        except BaseException:
            self.stop(grace_s=0)  # the nodes already started
            raise

    def alive(self) -> bool:
        return all(node.alive() for node in self.nodes)

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        """The first node's process that exited (its return code is the replica's), else the head's."""
        dead = [n.proc for n in self.nodes if n.proc is not None and n.proc.poll() is not None]
        return dead[0] if dead else self.nodes[0].proc

    @property
    def pid(self) -> int | None:
        return self.nodes[0].pid

    def kill(self, sig: int = signal.SIGKILL) -> None:
        for node in self.nodes:
            node.kill(sig)

    def stop(self, grace_s: float = 10.0) -> None:
        self.kill(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for node in self.nodes:
            while node.alive() and time.monotonic() < deadline:
                time.sleep(0.1)
        for node in self.nodes:
            node.stop(grace_s=0)

    def describe(self) -> str:
        return json.dumps([{"rank": n.rank, "address": n.address} for n in self.plan.nodes])


def hosts_of(cfg: PoolConfig, index: int) -> list[HostConfig]:
    """The hosts of replica slot ``index``: ``engine.nodes`` consecutive entries of ``launcher.hosts``."""
    hosts, n = cfg.launcher.hosts, cfg.engine.nodes
    need = n * len(cfg.slots())
    if len(hosts) < need:
        raise ValueError(
            f"{len(cfg.slots())} replica slot(s) of {n} node(s) need {need} entries in launcher.hosts; "
            f"the config lists {len(hosts)}"
        )
    return hosts[index * n : (index + 1) * n]
