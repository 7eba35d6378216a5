"""The replica's shared state: one ``ReplicaContext`` per server, built by the plugin at start.

It holds the engine client, the model's facts, the settings the launcher gave this replica
(``ReplicaSettings``, read once from the environment), the payload store and the signer, and the
request's LoRA adapter (a context variable). Route modules and engine operations import it; it
imports neither.
"""

from __future__ import annotations

import json
import time
from argparse import Namespace
from collections import OrderedDict
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import numpy as np

from tpmflow.errors import InvalidRequest
from tpmflow.payload import PayloadStore, Reference, Signer, StoreConfig
from tpmflow.protocol import ReplicaSettings
from tpmflow.schema import InlineArray, Provenance, ReplicaInfo

# The vLLM ``LoRARequest`` of the request being served (None: the replica's own weights). Each
# request runs in its own context, so the adapter reaches every engine call of the request without
# being threaded through each handler.
CURRENT_LORA: ContextVar[Any] = ContextVar("tpmflow_lora", default=None)
ADAPTER_CACHE_SIZE = 16  # loaded adapters (with their trained parts) kept per replica


class ReplicaContext:
    """Per-server state the routes share: the engine client, model facts, settings, store and signer."""

    def __init__(self, engine: Any, args: Namespace, install_info: dict[str, Any], settings: ReplicaSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.model_dir = str(args.model)
        self.model_name = served_model_name(args)
        self.hidden_size = int(install_info["hidden_size"])
        self.num_layers = int(install_info["num_layers"])
        # The replica's shape: every route works on a split replica; the hooks record each value once.
        self.tensor_parallel = int(getattr(args, "tensor_parallel_size", 1) or 1)
        self.pipeline_parallel = int(getattr(args, "pipeline_parallel_size", 1) or 1)
        self.num_heads = int(install_info["num_heads"])
        self.head_dim = int(install_info["head_dim"])
        # Probes: None when this model's layout passed the start self-check, else why they are off.
        self.probe_error: str | None = install_info.get("probe_error")
        self.probes = (
            f"disabled: {self.probe_error}"
            if self.probe_error
            else f"{install_info.get('layout')} layout ({install_info.get('model_class')}): {install_info.get('self_check')}"
        )
        # Embeddings read the final norm through the same hooks: none without a layout for the model.
        self.embed_error: str | None = (
            None
            if install_info.get("layout")
            else f"embeddings need tpmflow's hooks, which have no decoder layout for {install_info.get('model_class')}; "
            "generation and chat work"
        )
        self.max_model_len = int(engine.model_config.max_model_len)
        self.vocab_size = int(engine.model_config.get_vocab_size())
        self.replica_id = settings.replica_id
        self.url = replica_url(settings, args)
        self.content_hash = served_version(Path(self.model_dir))
        # Versions served as vLLM LoRA adapters: `--lora-modules <version id>=<folder>`.
        self.lora_versions = [m.name for m in getattr(args, "lora_modules", None) or []]
        # Provenance names the shape too: a split replica's numbers may differ in the last bits.
        self.engine_build = f"vllm {vllm_version()} TP={self.tensor_parallel} PP={self.pipeline_parallel}"
        self.store = PayloadStore(StoreConfig.model_validate(settings.store))
        self.signer = Signer(settings.pool_secret)
        self._adapters: OrderedDict[tuple[str, str], Any] = OrderedDict()

    def adapter(self, name: str, config: dict[str, Any] | None) -> Any:
        """An installed adapter, loaded once per (name, config) and kept (the most recent few).

        A trained part carries the settings it was trained with, so a config naming one holds
        nothing else; ``name`` alone is resolved to the exact ``name@version`` first, so the cache,
        the served weights and the provenance all name the same version.
        """
        from tpmflow.adapters import load_adapter
        from tpmflow.adapters.parts import resolved_spec

        if config and config.get("part"):
            if set(config) != {"part"}:
                raise InvalidRequest(
                    f"a trained part carries its own settings: pass only {{'part': ...}}, not {sorted(config)}"
                )
            config = {"part": resolved_spec(name, str(config["part"]))}
        key = (name, json.dumps(config, sort_keys=True) if config else "")
        if key in self._adapters:
            self._adapters.move_to_end(key)
            return self._adapters[key]
        try:
            adapter = load_adapter(name, config)
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"bad config for adapter {name!r}: {exc}") from exc
        self._adapters[key] = adapter
        while len(self._adapters) > ADAPTER_CACHE_SIZE:
            self._adapters.popitem(last=False)
        return adapter

    def check_model(self, model: str | None) -> None:
        """A request naming a model must name the one this replica serves."""
        if model is not None and model != self.model_name:
            raise InvalidRequest(f"unknown model {model!r}; this pool serves {self.model_name!r}")

    def info(self) -> ReplicaInfo:
        running, waiting = engine_load()
        return ReplicaInfo(
            running=running,
            waiting=waiting,
            replica_id=self.replica_id,
            url=self.url,
            model=self.model_name,
            content_hash=self.content_hash,
            engine=self.engine_build,
            hidden_size=self.hidden_size,
            max_model_len=self.max_model_len,
            lora_versions=self.lora_versions,
            group=self.settings.replica_group,
            probes=self.probes,
            tensor_parallel=self.tensor_parallel,
            pipeline_parallel=self.pipeline_parallel,
        )

    def serving(self) -> str:
        """The version this request runs on: its LoRA adapter's, else the replica's weights'."""
        lora = CURRENT_LORA.get()
        return lora.lora_name if lora is not None else self.content_hash

    def provenance(self, request_id: str, sampling: dict[str, Any], started: float) -> Provenance:
        return Provenance(
            request_id=request_id,
            model=self.model_name,
            content_hash=self.serving(),
            replica_id=self.replica_id,
            engine=self.engine_build,
            sampling=sampling,
            started=started,
            finished=time.time(),
        )

    def resolve_array(self, payload: InlineArray | Reference, principal: str) -> tuple[np.ndarray, int]:
        """Inline or referenced array, with the bytes it brought in. References are verified first."""
        if isinstance(payload, InlineArray):
            array = payload.to_numpy()
            return array, array.nbytes
        self.signer.verify(payload, principal)
        value = self.store.get(payload)
        if not isinstance(value, np.ndarray):
            raise InvalidRequest("the reference points to bytes, not an array")
        return value, payload.nbytes

    def output_array(self, array: np.ndarray, principal: str) -> tuple[InlineArray | Reference, int]:
        """Small arrays inline; big ones into the store under the principal, as a signed reference."""
        if array.nbytes <= self.store.config.inline_limit_bytes:
            return InlineArray.from_numpy(array), 0
        ref = self.signer.sign(self.store.put(principal, array))
        return ref, ref.nbytes


def served_model_name(args: Namespace) -> str:
    """The name requests give the served model: vLLM's ``--served-model-name``, else its path."""
    return str((args.served_model_name or [args.model])[0])


def replica_url(settings: ReplicaSettings, args: Namespace) -> str:
    """Where gateways reach this replica: the launcher's URL, else vLLM's own host and port."""
    return settings.replica_url or f"http://{args.host or '127.0.0.1'}:{args.port}"


def served_version(model_dir: Path) -> str:
    """The served weights' version id (the card's, else hashed), as the pool and the model store name it."""
    from tpmflow.models.card import version_of

    try:
        return version_of(model_dir)
    except FileNotFoundError:
        return "unknown"


def engine_load() -> tuple[int, int]:
    """Requests running and waiting in this engine, from vLLM's own Prometheus gauges."""
    from prometheus_client import REGISTRY

    totals = {"vllm:num_requests_running": 0.0, "vllm:num_requests_waiting": 0.0}
    for metric in REGISTRY.collect():
        for sample in metric.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return int(totals["vllm:num_requests_running"]), int(totals["vllm:num_requests_waiting"])


def vllm_version() -> str:
    import vllm

    return str(vllm.__version__)
