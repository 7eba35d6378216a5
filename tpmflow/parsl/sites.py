"""Site configs: one YAML holds a pool (``PoolConfig``'s fields) and a ``parsl:`` section whose
executors run the replicas (``launcher.parsl_executor``, GPU nodes on clusters) and the
simulations. ``build_parsl_config`` turns it into a ``parsl.config.Config`` without submitting
anything; ``parsl.load`` of that config is what starts blocks.

    configs/local.yaml     the embedded default (no parsl section: local replicas)
    configs/polaris.yaml   ALCF Polaris: PBS Pro, 4 A100 per node, one replica per GPU
    configs/aurora.yaml    ALCF Aurora: PBS Pro, 6 Intel GPUs = 12 tiles per node (vLLM's XPU build)
    configs/slurm.yaml     a generic Slurm cluster with 4 GPUs per node
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from tpmflow.config import PoolConfig, read_config


class ExecutorSpec(BaseModel):
    """One HighThroughputExecutor and the batch provider behind it."""

    label: str
    provider: Literal["local", "pbspro", "slurm"] = "local"
    # Batch scheduler settings (ignored by the local provider).
    account: str | None = None
    queue: str | None = Field(None, description="PBS queue or Slurm partition")
    walltime: str = "01:00:00"
    nodes_per_block: int = Field(1, ge=1)
    init_blocks: int = Field(1, ge=0)
    min_blocks: int = Field(0, ge=0)
    max_blocks: int = Field(1, ge=1)
    scheduler_options: str = ""
    select_options: str = Field("", description="PBS: e.g. ngpus=4")
    worker_init: str = Field("", description="shell lines run before workers start (modules, venv)")
    cpus_per_node: int | None = None
    gpus_per_node: int | None = Field(None, description="Slurm --gpus-per-node")
    launcher: Literal["simple", "single_node", "mpiexec", "srun"] = "single_node"
    launcher_overrides: str = ""
    # Worker placement on a node.
    max_workers_per_node: int | None = None
    available_accelerators: int | list[str] = Field(
        default_factory=list, description="GPUs (or XPU tiles) to pin one per worker"
    )
    cpu_affinity: str = "none"
    mpi_launcher: Literal["mpiexec", "srun", "aprun"] | None = Field(
        None,
        description="Parsl's MPI mode: an app gets several nodes of the block and this launcher's prefix "
        "(replicas over engine.nodes nodes; the provider's launcher must then be `simple`)",
    )
    address: str | None = Field(None, description="interface workers connect back to (default: Parsl's guess)")


class ParslSection(BaseModel):
    executors: list[ExecutorSpec] = Field(min_length=1)
    run_dir: str = "runinfo"
    retries: int = Field(1, ge=0)

    @model_validator(mode="after")
    def _unique_labels(self) -> ParslSection:
        labels = [e.label for e in self.executors]
        if len(set(labels)) != len(labels):
            raise ValueError(f"executor labels repeat: {labels}")
        return self


class SiteConfig(BaseModel):
    """A pool and the Parsl executors it and the campaign run on."""

    pool: PoolConfig
    parsl: ParslSection | None = None

    @model_validator(mode="after")
    def _replica_executor_exists(self) -> SiteConfig:
        if self.pool.launcher.kind == "parsl":
            if self.parsl is None:
                raise ValueError("launcher.kind is parsl but the config has no parsl section")
            labels = {e.label for e in self.parsl.executors}
            if self.pool.launcher.parsl_executor not in labels:
                raise ValueError(
                    f"replicas run on executor {self.pool.launcher.parsl_executor!r}, not among {sorted(labels)}"
                )
        return self

    @model_validator(mode="after")
    def _multinode_replicas_fit_a_block(self) -> SiteConfig:
        nodes = self.pool.engine.nodes
        if self.pool.launcher.kind != "parsl" or self.parsl is None:
            return self
        spec = self.replica_executor()
        if nodes == 1:
            if spec.mpi_launcher is not None:
                raise ValueError(
                    f"executor {spec.label!r} runs in Parsl's MPI mode, for replicas over several nodes; these "
                    "replicas run on one node (engine.nodes: 1): drop its mpi_launcher"
                )
            return self
        if spec.mpi_launcher is None:
            raise ValueError(
                f"replicas over {nodes} nodes need Parsl's MPI mode on executor {spec.label!r}: set its mpi_launcher "
                "(mpiexec on PBS, srun on Slurm)"
            )
        if spec.launcher != "simple":
            raise ValueError(f"executor {spec.label!r} runs in MPI mode: its launcher must be `simple`")
        if spec.nodes_per_block < nodes:
            raise ValueError(
                f"a replica over {nodes} nodes cannot fit executor {spec.label!r}'s blocks of {spec.nodes_per_block}"
            )
        return self

    def replica_executor(self) -> ExecutorSpec:
        assert self.parsl is not None
        return next(e for e in self.parsl.executors if e.label == self.pool.launcher.parsl_executor)

    def executor_labels(self) -> list[str]:
        return [e.label for e in self.parsl.executors] if self.parsl else []


def load_site(path: str | Path, layout: str | None = None) -> SiteConfig:
    """A site config, in one of its ``layouts`` if named (``tpmflow.config.read_config``)."""
    data: dict[str, Any] = read_config(path, layout)
    parsl_section = data.pop("parsl", None)
    return SiteConfig(pool=PoolConfig.model_validate(data), parsl=parsl_section)


def _provider(spec: ExecutorSpec) -> Any:
    from parsl.launchers import MpiExecLauncher, SimpleLauncher, SingleNodeLauncher, SrunLauncher
    from parsl.providers import LocalProvider, PBSProProvider, SlurmProvider

    launcher = {
        "simple": lambda: SimpleLauncher(),
        "single_node": lambda: SingleNodeLauncher(),
        "mpiexec": lambda: MpiExecLauncher(bind_cmd="--cpu-bind", overrides=spec.launcher_overrides),
        "srun": lambda: SrunLauncher(overrides=spec.launcher_overrides),
    }[spec.launcher]()
    blocks = {"init_blocks": spec.init_blocks, "min_blocks": spec.min_blocks, "max_blocks": spec.max_blocks}
    if spec.provider == "local":
        return LocalProvider(worker_init=spec.worker_init, launcher=launcher, **blocks)
    if spec.provider == "pbspro":
        return PBSProProvider(
            account=spec.account,
            queue=spec.queue,
            walltime=spec.walltime,
            nodes_per_block=spec.nodes_per_block,
            scheduler_options=spec.scheduler_options,
            select_options=spec.select_options,
            worker_init=spec.worker_init,
            cpus_per_node=spec.cpus_per_node or 1,
            launcher=launcher,
            **blocks,
        )
    return SlurmProvider(
        partition=spec.queue,
        account=spec.account,
        walltime=spec.walltime,
        nodes_per_block=spec.nodes_per_block,
        cores_per_node=spec.cpus_per_node,
        gpus_per_node=spec.gpus_per_node,
        scheduler_options=spec.scheduler_options,
        worker_init=spec.worker_init,
        launcher=launcher,
        **blocks,
    )


def accelerator_groups(accelerators: int | list[str], ranks: int) -> list[str]:
    """Parsl's ``available_accelerators`` as one entry per worker of ``ranks`` devices: Parsl sets a
    worker's ``CUDA_VISIBLE_DEVICES`` (``ZE_AFFINITY_MASK`` ...) to its entry, so a replica of
    ``ranks`` ranks (tensor x pipeline parallel) gets ``ranks`` devices, ``"0,1,2,3"``."""
    devices = [str(i) for i in range(accelerators)] if isinstance(accelerators, int) else list(accelerators)
    if ranks == 1 or not devices:
        return devices
    if len(devices) % ranks:
        raise ValueError(
            f"{len(devices)} accelerators per node cannot be split into replicas of {ranks} ranks "
            "(tensor_parallel_size x pipeline_parallel_size)"
        )
    return [",".join(devices[i : i + ranks]) for i in range(0, len(devices), ranks)]


def _accelerators(spec: ExecutorSpec, site: SiteConfig) -> int | list[str]:
    """The replica executor's devices grouped per replica; other executors' as written."""
    if site.pool.launcher.kind != "parsl" or spec.label != site.pool.launcher.parsl_executor:
        return spec.available_accelerators
    return accelerator_groups(spec.available_accelerators, site.pool.engine.ranks)


def _nodes_per_app(spec: ExecutorSpec, site: SiteConfig) -> int:
    """Nodes one app of ``spec`` takes: a replica's ``engine.nodes`` on the replica executor."""
    return site.pool.engine.nodes if spec.label == site.pool.launcher.parsl_executor else 1


def build_parsl_config(site: SiteConfig, run_dir: str | None = None) -> Any:
    """The ``parsl.config.Config`` of a site: one HighThroughputExecutor per spec. Submits nothing."""
    from parsl.config import Config
    from parsl.executors import HighThroughputExecutor, MPIExecutor

    if site.parsl is None:
        raise ValueError("this site config has no parsl section (its replicas run as local processes)")
    executors = []
    for spec in site.parsl.executors:
        kwargs: dict[str, Any] = {
            "label": spec.label,
            "provider": _provider(spec),
            "prefetch_capacity": 0,  # long-running replica apps must not queue work behind them
        }
        if spec.address is not None:
            kwargs["address"] = spec.address
        if spec.mpi_launcher is not None:
            # Parsl's MPI mode: an app gets num_nodes nodes of the block (PARSL_MPI_NODELIST) and the
            # launcher prefix that reaches them (PARSL_MPI_PREFIX); a block runs this many at once.
            per_block = max(1, spec.nodes_per_block // _nodes_per_app(spec, site))
            executors.append(MPIExecutor(mpi_launcher=spec.mpi_launcher, max_workers_per_block=per_block, **kwargs))
            continue
        kwargs.update(cpu_affinity=spec.cpu_affinity, available_accelerators=_accelerators(spec, site))
        if spec.max_workers_per_node is not None:
            kwargs["max_workers_per_node"] = spec.max_workers_per_node
        executors.append(HighThroughputExecutor(**kwargs))
    return Config(executors=executors, run_dir=run_dir or site.parsl.run_dir, retries=site.parsl.retries)
