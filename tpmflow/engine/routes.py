"""tpmflow's endpoint plugin: extra routes on vLLM's own OpenAI server, on the same engine.

Registered under ``vllm.endpoint_plugins`` and allow-listed with ``VLLM_PLUGINS=tpmflow``. Routes
live under ``/v1/tpmflow/`` so vLLM's own ``--api-key`` check guards them: only the gateway,
which holds the pool secret, can call a replica. The gateway tells the replica who is asking in
``X-Tpmflow-Principal`` and under which id in ``X-Tpmflow-Request-Id``.

Everything is validated (shape, dtype, NaN/inf, length, size) before it reaches vLLM, so bad
input gets a typed error and never kills the engine.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import signal
import time
import uuid
from argparse import Namespace
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.datastructures import State

from tpmflow.engine.hooks import capture_array
from tpmflow.errors import InvalidRequest, TpmflowError
from tpmflow.payload import PayloadStore, Reference, Signer, StoreConfig
from tpmflow.schema import (
    AdapterEmbedRequest,
    AdapterGenerateRequest,
    AdapterPredictRequest,
    DigestRequest,
    DigestResponse,
    EmbedItem,
    EmbedRequest,
    EmbedResponse,
    EmbedsGenerateRequest,
    GenerateResult,
    InlineArray,
    ProbeRequest,
    Provenance,
    ReplicaInfo,
    SoftPrompt,
    Usage,
)

log = logging.getLogger("tpmflow.replica")
PRINCIPAL_HEADER = "X-Tpmflow-Principal"
REQUEST_ID_HEADER = "X-Tpmflow-Request-Id"
PRIORITY_HEADER = "X-Tpmflow-Priority"
SALT_HEADER = "X-Tpmflow-Cache-Salt"
LORA_HEADER = "X-Tpmflow-Lora"  # the gateway's choice of a LoRA version this replica serves as an adapter
HEARTBEAT_S = 1.0
CURRENT_LORA: ContextVar[Any] = ContextVar("tpmflow_lora", default=None)
ADAPTER_CACHE_SIZE = 16  # loaded adapters (with their trained parts) kept per replica


class ReplicaContext:
    """Per-server state the routes share: the engine client, model facts, store and signer."""

    def __init__(self, engine: Any, args: Namespace, install_info: dict[str, Any]) -> None:
        self.engine = engine
        self.model_dir = str(args.model)
        self.model_name = (args.served_model_name or [args.model])[0]
        self.hidden_size = int(install_info["hidden_size"])
        self.num_layers = int(install_info["num_layers"])
        self.tensor_parallel = int(getattr(args, "tensor_parallel_size", 1) or 1)
        self.num_heads = int(install_info["num_heads"])
        self.head_dim = int(install_info["head_dim"])
        self.max_model_len = int(engine.model_config.max_model_len)
        self.vocab_size = int(engine.model_config.get_vocab_size())
        self.replica_id = os.environ.get("TPMFLOW_REPLICA_ID", f"replica-{os.getpid()}")
        self.url = os.environ.get("TPMFLOW_REPLICA_URL", f"http://{args.host or '127.0.0.1'}:{args.port}")
        self.content_hash = _content_hash(Path(self.model_dir))
        # Versions served as vLLM LoRA adapters: `--lora-modules <version id>=<folder>`.
        self.lora_versions = [m.name for m in getattr(args, "lora_modules", None) or []]
        self.engine_build = f"vllm {_vllm_version()}"
        self.store = PayloadStore(StoreConfig.model_validate_json(os.environ.get("TPMFLOW_STORE", "{}")))
        self.signer = Signer(os.environ.get("TPMFLOW_POOL_SECRET", ""))
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
        running, waiting = _engine_load()
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
            group=os.environ.get("TPMFLOW_REPLICA_GROUP", "default"),
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


def _content_hash(model_dir: Path) -> str:
    card = model_dir / "tpmflow-card.json"
    if card.is_file():
        return str(json.loads(card.read_text())["content_hash"])
    from tpmflow.models.card import content_hash

    try:
        return content_hash(model_dir)
    except FileNotFoundError:
        return "unknown"


def _engine_load() -> tuple[int, int]:
    """Requests running and waiting in this engine, from vLLM's own Prometheus gauges."""
    from prometheus_client import REGISTRY

    totals = {"vllm:num_requests_running": 0.0, "vllm:num_requests_waiting": 0.0}
    for metric in REGISTRY.collect():
        for sample in metric.samples:
            if sample.name in totals:
                totals[sample.name] += sample.value
    return int(totals["vllm:num_requests_running"]), int(totals["vllm:num_requests_waiting"])


def _vllm_version() -> str:
    import vllm

    return str(vllm.__version__)


def _error(exc: TpmflowError) -> JSONResponse:
    return JSONResponse(exc.to_body(), status_code=exc.status_code)


def _caller(request: Request) -> tuple[str, str, int, str | None]:
    principal = request.headers.get(PRINCIPAL_HEADER)
    if not principal:
        raise InvalidRequest(f"missing {PRINCIPAL_HEADER}: replicas are called through the gateway")
    request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
    priority = int(request.headers.get(PRIORITY_HEADER, "0"))
    return principal, request_id, priority, request.headers.get(SALT_HEADER)


async def _body(request: Request, model: type) -> Any:
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        raise InvalidRequest(_first_error(exc)) from exc


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ()))
    return f"{where}: {err.get('msg')}" if where else str(err.get("msg"))


def check_embeds(array: np.ndarray, hidden: int, max_len: int) -> np.ndarray:
    if array.ndim != 2:
        raise InvalidRequest(f"prompt_embeds must have rank 2 [n_tokens, hidden], got shape {list(array.shape)}")
    if array.shape[1] != hidden:
        raise InvalidRequest(f"prompt_embeds hidden size {array.shape[1]} != model hidden size {hidden}")
    if array.shape[0] == 0:
        raise InvalidRequest("prompt_embeds has zero tokens")
    if array.shape[0] >= max_len:
        raise InvalidRequest(f"prompt_embeds has {array.shape[0]} tokens; max_model_len is {max_len}")
    if array.dtype.name not in ("float16", "float32", "float64"):
        raise InvalidRequest(f"prompt_embeds must be floating point, got {array.dtype}")
    if not np.isfinite(array).all():
        raise InvalidRequest("prompt_embeds contains NaN or inf")
    return array.astype(np.float32)


def _lora_request(request: Request) -> Any:
    """The vLLM ``LoRARequest`` the gateway chose (by version id), from vLLM's own table of the
    adapters loaded at start, so the engine sees the same adapter id as on its OpenAI routes."""
    name = request.headers.get(LORA_HEADER)
    if not name:
        return None
    loaded = request.app.state.openai_serving_models.lora_requests
    if name not in loaded:
        raise InvalidRequest(f"this replica serves no LoRA version {name!r}; it serves {sorted(loaded)}")
    return loaded[name]


async def run_request(engine: Any, prompt: Any, params: Any, request_id: str, priority: int) -> Any:
    """One engine request to its final output (on the request's LoRA adapter, if it has one)."""
    final = None
    try:
        async for out in engine.generate(
            prompt, params, request_id, priority=priority, lora_request=CURRENT_LORA.get()
        ):
            final = out
    except (ValueError, TypeError) as exc:  # vLLM's own input validation
        raise InvalidRequest(str(exc)) from exc
    if final is None:
        raise InvalidRequest("the engine returned no output")
    return final


def _endpoint(model: type, handler: Callable[..., Awaitable[Any]]) -> Callable[[Request], Awaitable[JSONResponse]]:
    async def endpoint(request: Request) -> JSONResponse:
        ctx: ReplicaContext = request.app.state.tpmflow
        try:
            principal, request_id, priority, salt = _caller(request)
            body = await _body(request, model)
            # Each request runs in its own context (copied into the tasks it starts), so the adapter
            # reaches every engine call of the request without being threaded through each handler.
            lora = CURRENT_LORA.set(_lora_request(request))
            try:
                result = await handler(ctx, body, principal, request_id, priority, salt)
            finally:
                CURRENT_LORA.reset(lora)
        except TpmflowError as exc:
            return _error(exc)
        return JSONResponse(result.model_dump() if isinstance(result, BaseModel) else result)

    return endpoint


async def _digest_route(
    ctx: ReplicaContext, body: DigestRequest, principal: str, request_id: str, priority: int, salt: str | None
) -> dict[str, Any]:
    """Resolve an inline array or a reference and report what arrived (verifies transfers)."""
    return await asyncio.to_thread(_digest, ctx, body.payload, principal)


def build_router() -> APIRouter:
    # The adapter routes build on this module's primitives, so they are imported here, not at the top.
    from tpmflow.engine.adapter_routes import adapter_embed, adapter_generate, adapter_predict
    from tpmflow.engine.probe_routes import probe

    router = APIRouter(prefix="/v1/tpmflow")

    @router.get("/info")
    async def info(request: Request) -> JSONResponse:
        ctx: ReplicaContext = request.app.state.tpmflow
        stats = await ctx.engine.collective_rpc("tpmflow_stats")
        return JSONResponse({**ctx.info().model_dump(), "hooks": stats[0]})

    # Every POST route: who is asking (from the gateway's headers), a validated body, a typed error.
    for path, model, handler in (
        ("/embed", EmbedRequest, _embed),
        ("/adapters/embed", AdapterEmbedRequest, adapter_embed),
        ("/adapters/predict", AdapterPredictRequest, adapter_predict),
        ("/adapters/generate", AdapterGenerateRequest, adapter_generate),
        ("/generate_embeds", EmbedsGenerateRequest, _generate_embeds),
        ("/digest", DigestRequest, _digest_route),
        ("/probe", ProbeRequest, probe),
    ):
        router.add_api_route(path, _endpoint(model, handler), methods=["POST"], name=handler.__name__.strip("_"))
    return router


def _digest(ctx: ReplicaContext, payload: InlineArray | Reference, principal: str) -> dict[str, Any]:
    from tpmflow.payload import decode_payload, digest_of, encode_payload

    if isinstance(payload, InlineArray):
        data = encode_payload(payload.to_numpy())[0]
        nbytes_in = len(payload.b64)
    else:
        ctx.signer.verify(payload, principal)
        data = ctx.store.get_bytes(payload)
        nbytes_in = len(data)
    value = decode_payload(data, "ndarray" if isinstance(payload, InlineArray) else payload.kind)
    is_array = isinstance(value, np.ndarray)
    out = DigestResponse(
        digest=digest_of(data),
        nbytes=len(data),
        kind="ndarray" if is_array else "bytes",
        shape=list(value.shape) if is_array else None,
        dtype=value.dtype.name if is_array else None,
    )
    return {**out.model_dump(), "usage": Usage(payload_bytes_in=nbytes_in).model_dump()}


def prompt_tokens(ctx: ReplicaContext, tokenizer: Any, i: int, item: str | list[int]) -> list[int]:
    """Token ids of one input, checked against the vocabulary and the context length."""
    ids = tokenizer.encode(item) if isinstance(item, str) else list(item)
    if not ids:
        raise InvalidRequest(f"input item {i} has no tokens", item=i)
    if any(t < 0 or t >= ctx.vocab_size for t in ids):
        raise InvalidRequest(f"input item {i} has token ids outside [0, {ctx.vocab_size})", item=i)
    if len(ids) >= ctx.max_model_len:
        raise InvalidRequest(f"input item {i} has {len(ids)} tokens; max_model_len is {ctx.max_model_len}", item=i)
    return ids


def engine_prompt(prompt: list[int] | np.ndarray, salt: str | None) -> dict[str, Any]:
    """vLLM's prompt for token ids or (soft-token) prompt embeddings [n, hidden]."""
    import torch

    out: dict[str, Any] = (
        {"prompt_embeds": torch.from_numpy(prompt)} if isinstance(prompt, np.ndarray) else {"prompt_token_ids": prompt}
    )
    if salt:
        out["cache_salt"] = salt
    return out


async def final_hidden_states(
    ctx: ReplicaContext, prompts: list[list[int] | np.ndarray], request_id: str, priority: int, salt: str | None
) -> list[np.ndarray]:
    """Per-position final hidden states [n, hidden] of each prompt (token ids or prompt embeddings),
    through the worker hook."""
    from vllm import SamplingParams

    keys = [f"{request_id}:{i}:{uuid.uuid4().hex[:8]}" for i in range(len(prompts))]

    async def one(i: int) -> None:
        # max_tokens=1: the prefill computes every prompt position's final state; the one sampled
        # token is discarded. Reading the prefix cache is skipped: a cached prefix is never
        # recomputed, so the hook would never see it.
        params = SamplingParams(
            max_tokens=1, temperature=0.0, skip_reading_prefix_cache=True, extra_args={"tpmflow": {"embed": keys[i]}}
        )
        await run_request(ctx.engine, engine_prompt(prompts[i], salt), params, f"{request_id}-embed-{i}", priority)

    try:
        # A TaskGroup cancels (and so aborts in vLLM) the other items when one fails.
        async with asyncio.TaskGroup() as group:
            for i in range(len(prompts)):
                group.create_task(one(i))
    except* TpmflowError as errors:
        raise errors.exceptions[0] from None
    finally:
        # Always collect, so no capture of this request lingers in the worker.
        results = await ctx.engine.collective_rpc("tpmflow_take", args=(keys,))
    # With pipeline parallelism only the last stage runs the final norm: merge what each worker saw.
    captured: dict[str, Any] = {}
    for worker_result in results:
        captured.update({k: v for k, v in worker_result.items() if v is not None})
    hidden: list[np.ndarray] = []
    for i, key in enumerate(keys):
        cap = captured.get(key)
        if cap is None or not cap["complete"]:
            raise RuntimeError(
                f"final-norm hook did not see every prompt position of item {i} "
                "(is the model compiled or graph-captured? tpmflow needs --enforce-eager)"
            )
        hidden.append(capture_array(cap))
    return hidden


async def token_embeddings(ctx: ReplicaContext, ids: list[int]) -> dict[int, np.ndarray]:
    """The core's input embedding of each distinct id, from the worker holding the table (one RPC)."""
    unique = sorted(set(ids))
    if not unique:
        return {}
    if any(t < 0 or t >= ctx.vocab_size for t in unique):
        raise InvalidRequest(f"token ids outside [0, {ctx.vocab_size})")
    results = await ctx.engine.collective_rpc("tpmflow_embed_tokens", args=(unique,))
    rows = next((capture_array(r) for r in results if r is not None), None)
    if rows is None:
        raise RuntimeError("no worker holds the input embedding table")
    return dict(zip(unique, rows, strict=True))


async def splice_soft_tokens(
    ctx: ReplicaContext, soft: dict[int, tuple[np.ndarray, str, str]], reserve: int = 0
) -> tuple[dict[int, np.ndarray], dict[int, str]]:
    """Soft tokens with their text around them (``text_around``) as prompt embeddings, per item;
    items that fail validation (shape, NaN/inf, length + ``reserve`` positions) get a reason instead."""
    from tpmflow.adapters.soft import text_around

    tokenizer = ctx.engine.get_tokenizer()
    around = {i: text_around(tokenizer, prefix, suffix) for i, (_, prefix, suffix) in soft.items()}
    table = await token_embeddings(ctx, [t for before, after in around.values() for t in before + after])
    prompts: dict[int, np.ndarray] = {}
    errors: dict[int, str] = {}
    for i, (embeds, _, _) in soft.items():
        before, after = around[i]
        try:
            core = check_embeds(np.asarray(embeds), ctx.hidden_size, ctx.max_model_len)
            rows = [table[t][None, :] for t in before] + [core] + [table[t][None, :] for t in after]
            spliced = np.ascontiguousarray(np.concatenate(rows), dtype=np.float32)
            if spliced.shape[0] + max(reserve, 1) > ctx.max_model_len:  # at least the one sampled token
                raise InvalidRequest(
                    f"{spliced.shape[0]} prompt positions + {reserve} exceed max_model_len {ctx.max_model_len}"
                )
            prompts[i] = spliced
        except InvalidRequest as exc:
            errors[i] = exc.message
    return prompts, errors


def pool_states(hidden: np.ndarray, pooling: str) -> np.ndarray:
    vec = hidden.mean(axis=0) if pooling == "mean" else hidden[-1] if pooling == "last" else hidden
    return np.ascontiguousarray(vec, dtype=np.float32)


async def _embed(
    ctx: ReplicaContext, body: EmbedRequest, principal: str, request_id: str, priority: int, salt: str | None
) -> EmbedResponse:
    started = time.time()
    ctx.check_model(body.model)
    tokenizer = ctx.engine.get_tokenizer()
    prompts: list[list[int] | np.ndarray] = []
    bytes_in = 0
    for i, item in enumerate(body.input):
        if not isinstance(item, SoftPrompt):
            prompts.append(prompt_tokens(ctx, tokenizer, i, item))
            continue
        array, nbytes = await asyncio.to_thread(ctx.resolve_array, item.prompt_embeds, principal)
        bytes_in += nbytes
        spliced, errors = await splice_soft_tokens(ctx, {i: (array, item.prefix, item.suffix)})
        if errors:
            raise InvalidRequest(f"input item {i}: {errors[i]}", item=i)
        prompts.append(spliced[i])
    hidden = await final_hidden_states(ctx, prompts, request_id, priority, salt)
    items: list[EmbedItem] = []
    bytes_out = 0
    for i, states in enumerate(hidden):
        payload, nbytes = ctx.output_array(pool_states(states, body.pooling), principal)
        bytes_out += nbytes
        items.append(EmbedItem(index=i, n_tokens=len(prompts[i]), embedding=payload))
    usage = Usage(prompt_tokens=sum(len(p) for p in prompts), payload_bytes_in=bytes_in, payload_bytes_out=bytes_out)
    return EmbedResponse(
        data=items, usage=usage, provenance=ctx.provenance(request_id, {"pooling": body.pooling}, started)
    )


async def _generate_embeds(
    ctx: ReplicaContext,
    body: EmbedsGenerateRequest,
    principal: str,
    request_id: str,
    priority: int,
    salt: str | None,
) -> GenerateResult:
    import torch
    from vllm import SamplingParams

    started = time.time()
    ctx.check_model(body.model)
    array, bytes_in = await asyncio.to_thread(ctx.resolve_array, body.prompt_embeds, principal)
    array = check_embeds(array, ctx.hidden_size, ctx.max_model_len)
    if array.shape[0] + body.max_tokens > ctx.max_model_len:
        raise InvalidRequest(
            f"{array.shape[0]} prompt positions + max_tokens {body.max_tokens} exceed max_model_len {ctx.max_model_len}"
        )
    params = SamplingParams(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed)
    prompt: dict[str, Any] = {"prompt_embeds": torch.from_numpy(array)}
    if salt:
        prompt["cache_salt"] = salt
    final = await run_request(ctx.engine, prompt, params, request_id, priority)
    out = final.outputs[0]
    usage = Usage(prompt_tokens=int(array.shape[0]), completion_tokens=len(out.token_ids), payload_bytes_in=bytes_in)
    sampling = body.model_dump(exclude={"prompt_embeds", "model"})
    return GenerateResult(
        text=out.text,
        finish_reason=out.finish_reason,
        usage=usage,
        provenance=ctx.provenance(request_id, sampling, started),
    )


async def _heartbeat(ctx: ReplicaContext) -> None:
    """Register with the gateway and keep telling it we are alive (replicas may live on other nodes)."""
    import httpx

    gateway = os.environ.get("TPMFLOW_GATEWAY_URL")
    if not gateway:
        return
    secret = os.environ.get("TPMFLOW_POOL_SECRET", "")
    grace = float(os.environ.get("TPMFLOW_ORPHAN_GRACE_S", "60"))
    last_ok = time.monotonic()
    async with httpx.AsyncClient(timeout=5.0) as client:
        while True:
            if time.monotonic() - last_ok > grace:
                # The gateway is gone (its process was killed): stop rather than serve nobody forever.
                log.error("no gateway at %s for %.0f s; shutting this replica down", gateway, grace)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            try:
                resp = await client.post(
                    f"{gateway}/internal/replicas/heartbeat",
                    json=ctx.info().model_dump(),
                    headers={"Authorization": f"Bearer {secret}"},
                )
                if resp.status_code == 200:
                    last_ok = time.monotonic()
            except httpx.HTTPError as exc:
                log.warning("heartbeat to %s failed: %s", gateway, exc)
            await asyncio.sleep(HEARTBEAT_S)


class GatewayOnly:
    """ASGI middleware: every path but ``/health`` needs the pool secret.

    vLLM's own ``--api-key`` guards only ``/v1``-style prefixes; ``/invocations``, ``/tokenize``
    and ``/metrics`` would otherwise let anyone on the node bypass the gateway (no salt, no meter).
    """

    OPEN_PATHS = ("/health",)

    def __init__(self, app: Any, secret: str) -> None:
        self.app = app
        self.expected = f"Bearer {secret}".encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path") not in self.OPEN_PATHS:
            auth = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(auth, self.expected):
                response = JSONResponse(
                    {"error": {"type": "Unauthorized", "message": "replicas answer the gateway only"}}, status_code=401
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class TpmflowEndpoints:
    """The ``vllm.endpoint_plugins`` entry point (see vllm/plugins/endpoint_plugins/interface.py)."""

    name = "tpmflow"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(build_router())
        secret = os.environ.get("TPMFLOW_POOL_SECRET")
        if secret:
            app.add_middleware(GatewayOnly, secret=secret)

    async def init_state(self, engine_client: Any, state: State, args: Namespace) -> None:
        if engine_client is None:
            raise RuntimeError("tpmflow's routes need an engine")
        results = await engine_client.collective_rpc("tpmflow_install")
        state.tpmflow = ReplicaContext(engine_client, args, results[0])
        state.tpmflow_heartbeat = asyncio.get_running_loop().create_task(_heartbeat(state.tpmflow))
