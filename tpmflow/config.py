"""Where tpmflow keeps its files, and the pydantic pool configuration loaded from YAML."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, Field, model_validator

from tpmflow.access.costs import CostModel
from tpmflow.payload import StoreConfig


def tpmflow_home() -> Path:
    """The root of tpmflow's cache: ``$TPMFLOW_HOME`` or ``~/.cache/tpmflow``."""
    env = os.environ.get("TPMFLOW_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tpmflow"


def models_dir() -> Path:
    """Directory holding locally built models, one sub-directory each."""
    return tpmflow_home() / "models"


# -- pool configuration (YAML) ---------------------------------------------------------------------


class EngineConfig(BaseModel):
    """vLLM engine arguments passed through to every replica."""

    dtype: str = "float32"
    max_model_len: int = 1024
    enforce_eager: bool = Field(True, description="tpmflow's hooks need eager mode")
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    gpu_memory_utilization: float | None = None
    max_num_seqs: int | None = None
    kv_cache_space_gib: int = Field(1, description="VLLM_CPU_KVCACHE_SPACE on vLLM's CPU build")
    cpu_threads_bind: list[str] | Literal["auto"] = Field(
        "auto", description="VLLM_CPU_OMP_THREADS_BIND per replica ('auto' splits this node's cores)"
    )
    extra_args: list[str] = Field(default_factory=list, description="more `vllm serve` flags, verbatim")


class GatewayConfig(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(0, description="0 picks a free port")
    max_inflight: int = Field(64, description="requests forwarded to replicas at once")
    queue_limit: int = Field(512, description="requests waiting beyond max_inflight before 503")
    request_timeout_s: float = 120.0
    max_tokens_limit: int = 4096
    max_n: int = 16
    max_body_bytes: int = Field(8 << 20, description="largest inline request body; bigger data goes by reference")
    heartbeat_timeout_s: float = 5.0
    payload_sweep_s: float = Field(60.0, description="how often expired payloads are evicted from the store")
    # Rate limits every principal gets, enforced by each gateway in memory (tpmflow.pool.ratelimit).
    principal_requests_per_minute: float | None = Field(
        default=None, gt=0, description="requests one principal may send per minute (None: unlimited)"
    )
    principal_tokens_per_minute: float | None = Field(
        default=None, gt=0, description="prompt + output tokens one principal may use per minute (None: unlimited)"
    )


class LaunchConfig(BaseModel):
    """How replicas start: ``local`` subprocesses, or long-running apps on a Parsl executor."""

    kind: Literal["local", "parsl"] = "local"
    parsl_executor: str = Field("tpm", description="label of the Parsl executor that runs replicas")
    replica_host: str = Field("127.0.0.1", description="interface replicas listen on (cluster: the internal one)")
    orphan_grace_s: float = Field(30.0, description="a Parsl-run replica stops after its gateway is gone this long")
    restart: bool = True
    start_timeout_s: float = 300.0


class ServiceClass(BaseModel):
    """Scheduling priority (vLLM: lower runs earlier) and optional rate limits, shared by every
    principal of the class (per gateway, in memory: tpmflow.pool.ratelimit)."""

    priority: int = 0
    requests_per_minute: float | None = Field(default=None, gt=0, description="None: unlimited")
    tokens_per_minute: float | None = Field(default=None, gt=0, description="prompt + output tokens; None: unlimited")


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
    model_store: str | None = Field(
        None, description="the model store (default $TPMFLOW_MODEL_STORE, else $TPMFLOW_HOME/store/models)"
    )
    service_classes: dict[str, ServiceClass] = Field(
        default_factory=lambda: {"interactive": ServiceClass(priority=0), "batch": ServiceClass(priority=10)}
    )
    costs: CostModel = Field(
        default_factory=CostModel,
        description="service-unit prices: every ledger row's charge_su, drawn from project allocations",
    )

    @classmethod
    def from_yaml(cls, path: str | Path) -> PoolConfig:
        """The pool of a config file; a site config's ``parsl:`` section is read by ``tpmflow.parsl``."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        data.pop("parsl", None)
        return cls.model_validate(data)

    @model_validator(mode="after")
    def _one_version_per_replica(self) -> PoolConfig:
        if self.replica_versions is not None and len(self.replica_versions) != self.replicas:
            raise ValueError(
                f"replica_versions names {len(self.replica_versions)} versions for {self.replicas} replicas"
            )
        return self

    def model_dir(self, replica: int = 0) -> Path:
        """The folder replica ``replica`` loads: a model-store version's checkout, or ``model``."""
        version = self.replica_versions[replica] if self.replica_versions else self.version
        if version is not None:
            from tpmflow.versioning import materialise

            return materialise(version, self.model_store)
        path = Path(self.model).expanduser()
        if path.is_dir():
            return path
        from tpmflow.models.catalog import model_path

        return model_path(self.model)

    def model_name(self) -> str:
        return self.served_model_name or Path(self.model).name
