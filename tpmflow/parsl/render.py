"""What a site config makes the scheduler, Parsl and vLLM run, shown without a cluster.

``render_site`` builds the site's real Parsl executors and providers and asks each provider to
write the batch script it would submit (its submit command is recorded, never run), then plans
each replica as its Parsl app would on a block's nodes: the MPI launcher's command for a replica
over several nodes (Parsl's own ``compose_all``), each node's vLLM command line and the variables
that differ per node, or the device list Parsl pins a one-node replica to. ``tpmflow site render``
prints it; the tests check the templates against it, since no cluster is reachable from CI.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tpmflow.parsl.sites import SiteConfig, accelerator_groups, build_parsl_config
from tpmflow.pool.multinode import app_resources, mpi_launch
from tpmflow.pool.replica import replica_command, replica_env

GATEWAY_URL = "http://CAMPAIGN-HOST:8321"  # stands for the gateway's URL in rendered commands


@dataclass
class RenderedExecutor:
    label: str
    kind: str  # HighThroughputExecutor or MPIExecutor
    submit_command: str  # qsub/sbatch, as the provider would run it
    job_script: str


@dataclass
class RenderedNode:
    rank: int
    address: str
    command: list[str]
    env: dict[str, str]  # what this node's vLLM gets from tpmflow (beyond the worker's own environment)


@dataclass
class RenderedReplica:
    replica_id: str
    url: str
    launch: list[str] | None  # the MPI launcher's command (replicas over several nodes)
    devices: str | None  # what Parsl pins a one-node replica's worker to (CUDA_VISIBLE_DEVICES ...)
    nodes: list[RenderedNode] = field(default_factory=list)


@dataclass
class RenderedSite:
    executors: list[RenderedExecutor]
    replicas: list[RenderedReplica]


def render_site(site: SiteConfig, nodelist: list[str], script_dir: str | None = None) -> RenderedSite:
    """The site's job scripts and its replicas' commands on a block of ``nodelist`` (the scheduler's
    host names, which must resolve here; tests pass addresses)."""
    script_dir = script_dir or tempfile.mkdtemp(prefix="tpmflow-render-")
    config = build_parsl_config(site, run_dir=script_dir)
    executors = [_render_executor(ex, script_dir) for ex in config.executors]
    return RenderedSite(executors=executors, replicas=_render_replicas(site, nodelist))


def _render_executor(executor: Any, script_dir: str) -> RenderedExecutor:
    """The batch script ``executor``'s provider would submit for one block."""
    executor.all_addresses = {"CAMPAIGN-HOST"}
    executor.worker_port = 54000
    executor.run_dir = script_dir  # worker logs go under it
    executor.cert_dir = None
    executor.logconf_path = None
    executor.initialize_scaling()  # composes the worker pool's launch command; starts nothing
    provider = executor.provider
    provider.script_dir = script_dir
    submitted: list[str] = []

    def record(cmd: str, timeout: int | None = None) -> tuple[int, str, str]:
        submitted.append(cmd)
        return 0, "Submitted batch job 1", ""  # what sbatch prints; qsub's job id is any line

    provider.execute_wait = record
    provider.submit(executor.launch_cmd, 1, f"tpmflow-{executor.label}")
    scripts = sorted(Path(script_dir).glob(f"tpmflow-{executor.label}.*"), key=os.path.getmtime)
    script = next(p for p in reversed(scripts) if p.suffix not in (".stdout", ".stderr"))
    return RenderedExecutor(
        label=executor.label, kind=type(executor).__name__, submit_command=submitted[-1], job_script=script.read_text()
    )


def _render_replicas(site: SiteConfig, nodelist: list[str]) -> list[RenderedReplica]:
    from parsl.executors.high_throughput.mpi_prefix_composer import compose_all

    cfg = site.pool
    spec = site.replica_executor()
    host = cfg.launcher.replica_host
    out = []
    for slot in cfg.initial_slots():
        env_base = replica_env(cfg, slot.replica_id, "URL", GATEWAY_URL, "POOL-SECRET", None, slot.group)
        tpmflow_env = {k: v for k, v in env_base.items() if os.environ.get(k) != v}
        if cfg.engine.nodes > 1:
            assert spec.mpi_launcher is not None
            prefixes = compose_all(spec.mpi_launcher, app_resources(cfg.engine.nodes), nodelist[: cfg.engine.nodes])
            port = cfg.launcher.replica_port + slot.index
            launch, plan = mpi_launch(
                cfg, slot.index, slot.replica_id, nodelist, prefixes["PARSL_MPI_PREFIX"], port, host, cfg.model
            )
            url = f"http://{plan.master_addr}:{port}"
            nodes = [
                RenderedNode(n.rank, n.address, n.cmd, {**tpmflow_env, "TPMFLOW_REPLICA_URL": url, **n.env})
                for n in plan.nodes
            ]
            out.append(RenderedReplica(slot.replica_id, url, launch, None, nodes))
            continue
        groups = accelerator_groups(spec.available_accelerators, cfg.engine.ranks)
        devices = groups[slot.index % len(groups)] if groups else None
        url = f"http://{nodelist[0]}:PORT"
        cmd = replica_command(cfg, 0, host, slot.index, cfg.model)
        node = RenderedNode(0, nodelist[0], cmd, {**tpmflow_env, "TPMFLOW_REPLICA_URL": url})
        out.append(RenderedReplica(slot.replica_id, url, None, devices, [node]))
    return out


def describe(rendered: RenderedSite) -> str:
    """The rendering as text: each job script, then each replica's commands."""
    lines: list[str] = []
    for ex in rendered.executors:
        lines += [f"# executor {ex.label} ({ex.kind}): {ex.submit_command}", ex.job_script.rstrip(), ""]
    for rep in rendered.replicas:
        where = f"devices {rep.devices}" if rep.devices else f"{len(rep.nodes)} nodes"
        lines.append(f"# {rep.replica_id} at {rep.url} ({where})")
        if rep.launch:
            lines.append("launch: " + " ".join(rep.launch))
        for node in rep.nodes:
            varying = {k: v for k, v in node.env.items() if k.startswith(("VLLM_HOST", "GLOO", "NCCL", "CCL", "ZE_"))}
            lines.append(f"node {node.rank} ({node.address}) {' '.join(f'{k}={v}' for k, v in varying.items())}")
            lines.append("  " + " ".join(node.command))
        lines.append("")
    return "\n".join(lines)
