"""tpmflow's endpoint plugin for an embedding model's replica (the pool's text embedder).

vLLM's pooling runner serves the model's own ``/v1/embeddings``; tpmflow adds only what makes it a
replica of the pool: the heartbeat that registers it with every gateway (``task="embed"``, in
the text embedder's group, so no generate request is routed to it) and ``GatewayOnly``, so only
the gateway (which meters and authorises) can call it. None of the hooks: nothing probes an
encoder, and the general plugin is not allow-listed on this replica (``VLLM_PLUGINS``).
"""

from __future__ import annotations

import asyncio
from argparse import Namespace
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.datastructures import State

from tpmflow.engine.context import engine_load, replica_url, served_model_name, served_version, vllm_version
from tpmflow.engine.plugin import GatewayOnly, heartbeat
from tpmflow.protocol import ReplicaSettings
from tpmflow.schema import ReplicaInfo


class EmbedderContext:
    """What the heartbeat reports for an embedding replica."""

    def __init__(self, engine: Any, args: Namespace, settings: ReplicaSettings) -> None:
        self.settings = settings
        config = engine.model_config
        self.model_name = served_model_name(args)
        self.content_hash = served_version(Path(str(args.model)))
        self.hidden_size = int(config.get_hidden_size())
        self.max_model_len = int(config.max_model_len)
        self.url = replica_url(settings, args)
        self.engine_build = f"vllm {vllm_version()} pooling"

    def info(self) -> ReplicaInfo:
        running, waiting = engine_load()
        return ReplicaInfo(
            replica_id=self.settings.replica_id,
            url=self.url,
            model=self.model_name,
            content_hash=self.content_hash,
            engine=self.engine_build,
            hidden_size=self.hidden_size,
            max_model_len=self.max_model_len,
            group=self.settings.replica_group,
            running=running,
            waiting=waiting,
            probes="none: an embedding model (its /v1/embeddings only)",
            task="embed",
        )


class TpmflowPoolingEndpoints:
    """The ``vllm.endpoint_plugins`` entry point ``tpmflow-pooling``: loaded by servers that embed."""

    name = "tpmflow-pooling"
    required_tasks = ("embed",)

    def __init__(self) -> None:
        self.settings = ReplicaSettings.from_env()

    def attach_router(self, app: FastAPI) -> None:
        if self.settings.pool_secret:
            app.add_middleware(GatewayOnly, secret=self.settings.pool_secret)

    async def init_state(self, engine_client: Any, state: State, args: Namespace) -> None:
        if engine_client is None:
            raise RuntimeError("an embedding replica needs an engine")
        state.tpmflow = EmbedderContext(engine_client, args, self.settings)
        state.tpmflow_heartbeat = asyncio.get_running_loop().create_task(heartbeat(state.tpmflow))
