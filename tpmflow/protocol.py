"""The wire contract between client, gateway and replica: header names, route paths and the
settings a replica is started with.

One place for every string two processes must agree on, so a rename is one edit. This module
imports nothing from tpmflow but pydantic models of its own, and nothing heavy: the client, the
gateway and the replica (inside vLLM) all import it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Headers:
    """HTTP header names. ``X-Tpmflow-*`` headers from clients are ignored unless listed as
    client headers; the gateway sets the replica-bound ones itself."""

    # Client → gateway.
    REQUEST_ID = "X-Request-Id"  # the client's correlation id; echoed on every answer
    VERSION = "X-Tpmflow-Version"  # pin a model version (content hash or a unique prefix)
    # Gateway → replica (replicas trust them only with the pool secret as bearer token).
    PRINCIPAL = "X-Tpmflow-Principal"
    ATTEMPT_ID = "X-Tpmflow-Request-Id"  # the id of this attempt, as the ledger records it
    PRIORITY = "X-Tpmflow-Priority"
    SALT = "X-Tpmflow-Cache-Salt"
    LORA = "X-Tpmflow-Lora"  # the gateway's choice of a LoRA version this replica serves as an adapter
    # Gateway → client: provenance of every answer.
    MODEL = "X-Tpmflow-Model"
    CONTENT_HASH = "X-Tpmflow-Content-Hash"
    REPLICA = "X-Tpmflow-Replica"
    ENGINE = "X-Tpmflow-Engine"
    RETRIEVED = "X-Tpmflow-Retrieved"  # what ``retrieve=`` put into the prompts (JSON)
    RETRY_AFTER = "Retry-After"
    AUTHORIZATION = "Authorization"


# Provenance headers as the client reads them into ``provenance`` dicts.
PROVENANCE_HEADERS: dict[str, str] = {
    "model": Headers.MODEL,
    "content_hash": Headers.CONTENT_HASH,
    "replica_id": Headers.REPLICA,
    "engine": Headers.ENGINE,
}


class Routes:
    """Route paths, as the client calls them on the gateway and the gateway on a replica."""

    HEALTH = "/health"
    METRICS = "/metrics"
    HEARTBEAT = "/internal/replicas/heartbeat"
    MODELS = "/v1/models"
    COMPLETIONS = "/v1/completions"
    CHAT = "/v1/chat/completions"
    TPMFLOW = "/v1/tpmflow"
    EMBED = "/v1/tpmflow/embed"
    OPENAI_EMBEDDINGS = "/v1/embeddings"  # vLLM's own, called on the text embedder's replica only
    GENERATE_EMBEDS = "/v1/tpmflow/generate_embeds"
    ADAPTER_EMBED = "/v1/tpmflow/adapters/embed"
    ADAPTER_PREDICT = "/v1/tpmflow/adapters/predict"
    ADAPTER_GENERATE = "/v1/tpmflow/adapters/generate"
    PROBE = "/v1/tpmflow/probe"
    DIGEST = "/v1/tpmflow/digest"
    STORE = "/v1/tpmflow/store"
    SIGN = "/v1/tpmflow/payloads/sign"
    USAGE = "/v1/tpmflow/usage"
    KNOWLEDGE = "/v1/tpmflow/knowledge"  # GET: the collections one may read; POST .../<operation>
    INFO = "/v1/tpmflow/info"  # replica only

    @staticmethod
    def endpoint(path: str) -> str:
        """The ledger's endpoint name of a tpmflow route (``/v1/tpmflow/adapters/embed`` →
        ``adapters/embed``)."""
        return path.removeprefix(Routes.TPMFLOW + "/")


_ENV_PREFIX = "TPMFLOW_"
# The pool secret: what replicas take from the gateway (bearer), and what every gateway of one pool shares.
SECRET_ENV = "TPMFLOW_POOL_SECRET"


class ReplicaSettings(BaseModel):
    """What a replica process needs to know besides vLLM's own arguments. Written once into the
    replica's environment by the launcher (``to_env``), read once inside it (``from_env``)."""

    model_config = ConfigDict(extra="forbid")

    replica_id: str = Field(default_factory=lambda: f"replica-{os.getpid()}")
    replica_group: str = "default"
    replica_url: str = ""  # how the gateway reaches this replica (empty: from vLLM's host and port)
    # Where heartbeats go: every gateway of the pool, comma-separated (empty: no gateway, e.g. a
    # replica under test). Each gateway learns the replica itself, so none depends on another.
    gateway_url: str = ""
    pool_secret: str = ""
    store: dict[str, Any] = Field(default_factory=dict)  # tpmflow.payload.StoreConfig as a dict
    parts: str = ""  # trained adapter parts (the pool's parts_path); empty: $TPMFLOW_HOME/parts
    max_activation_bytes: int = 256 * 1024 * 1024
    orphan_grace_s: float = 60.0  # stop after this long without the pool's own gateway (the first) answering
    heartbeat_s: float = 1.0

    @property
    def gateway_urls(self) -> list[str]:
        """The pool's gateways, in order (``gateway_url`` split at commas)."""
        return gateway_urls(self.gateway_url)

    def to_env(self) -> dict[str, str]:
        """``TPMFLOW_<FIELD>`` variables; dicts as JSON, empty strings left out."""
        env: dict[str, str] = {}
        for name, value in self.model_dump().items():
            if isinstance(value, dict):
                env[_ENV_PREFIX + name.upper()] = json.dumps(value)
            elif value != "":
                env[_ENV_PREFIX + name.upper()] = str(value)
        return env

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ReplicaSettings:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, field in cls.model_fields.items():
            raw = environ.get(_ENV_PREFIX + name.upper())
            if raw is None:
                continue
            values[name] = json.loads(raw) if field.annotation in (dict[str, Any], "dict[str, Any]") else raw
        return cls.model_validate(values)


def gateway_urls(joined: str) -> list[str]:
    """``"http://a:1,http://b:2"`` as ``["http://a:1", "http://b:2"]``: blanks, trailing slashes and
    repeats dropped (a pool's peers may list its own gateway)."""
    return list(dict.fromkeys(u.strip().rstrip("/") for u in joined.split(",") if u.strip()))
