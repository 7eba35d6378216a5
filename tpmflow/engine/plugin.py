"""tpmflow's endpoint plugin: extra routes on vLLM's own OpenAI server, on the same engine.

Registered under ``vllm.endpoint_plugins`` and allow-listed with ``VLLM_PLUGINS=tpmflow``. Routes
live under ``/v1/tpmflow/`` so vLLM's own ``--api-key`` check guards them, and ``GatewayOnly``
guards the rest: only the gateway, which holds the pool secret, can call a replica. The gateway
tells the replica who is asking in ``Headers.PRINCIPAL`` and under which id in ``Headers.ATTEMPT_ID``.

This module wires things together (settings, context, router, middleware, heartbeat); the route
modules hold the handlers and never import it.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import signal
import time
import uuid
from argparse import Namespace
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.datastructures import State

from tpmflow.engine import adapter_routes, embed_routes, probe_routes
from tpmflow.engine.context import CURRENT_LORA, ReplicaContext
from tpmflow.errors import InvalidRequest, ReplicaFailed, TpmflowError
from tpmflow.protocol import Headers, ReplicaSettings, Routes
from tpmflow.schema import (
    AdapterEmbedRequest,
    AdapterGenerateRequest,
    AdapterPredictRequest,
    DigestRequest,
    EmbedRequest,
    EmbedsGenerateRequest,
    ProbeRequest,
    ReplicaInfo,
)

log = logging.getLogger("tpmflow.replica")

Handler = Callable[..., Awaitable[Any]]  # (ctx, body, principal, request_id, priority, salt) -> model or dict

# Every POST route: its path, body model and handler.
POST_ROUTES: tuple[tuple[str, type[BaseModel], Handler], ...] = (
    (Routes.EMBED, EmbedRequest, embed_routes.embed),
    (Routes.ADAPTER_EMBED, AdapterEmbedRequest, adapter_routes.adapter_embed),
    (Routes.ADAPTER_PREDICT, AdapterPredictRequest, adapter_routes.adapter_predict),
    (Routes.ADAPTER_GENERATE, AdapterGenerateRequest, adapter_routes.adapter_generate),
    (Routes.GENERATE_EMBEDS, EmbedsGenerateRequest, embed_routes.generate_embeds),
    (Routes.DIGEST, DigestRequest, embed_routes.digest),
    (Routes.PROBE, ProbeRequest, probe_routes.probe),
)


def _error(exc: TpmflowError) -> JSONResponse:
    return JSONResponse(exc.to_body(), status_code=exc.status_code)


def _caller(request: Request) -> tuple[str, str, int, str | None]:
    principal = request.headers.get(Headers.PRINCIPAL)
    if not principal:
        raise InvalidRequest(f"missing {Headers.PRINCIPAL}: replicas are called through the gateway")
    request_id = request.headers.get(Headers.ATTEMPT_ID) or uuid.uuid4().hex
    priority = int(request.headers.get(Headers.PRIORITY, "0"))
    return principal, request_id, priority, request.headers.get(Headers.SALT)


async def _body(request: Request, model: type[BaseModel]) -> Any:
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as exc:
        raise InvalidRequest(_first_error(exc)) from exc


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ()))
    return f"{where}: {err.get('msg')}" if where else str(err.get("msg"))


def _lora_request(request: Request) -> Any:
    """The vLLM ``LoRARequest`` the gateway chose (by version id), from vLLM's own table of the
    adapters loaded at start, so the engine sees the same adapter id as on its OpenAI routes."""
    name = request.headers.get(Headers.LORA)
    if not name:
        return None
    loaded = request.app.state.openai_serving_models.lora_requests
    if name not in loaded:
        raise InvalidRequest(f"this replica serves no LoRA version {name!r}; it serves {sorted(loaded)}")
    return loaded[name]


def _endpoint(model: type[BaseModel], handler: Handler) -> Callable[[Request], Awaitable[JSONResponse]]:
    """A route: who is asking (from the gateway's headers), a validated body, a typed error."""

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
        except (ValueError, TypeError, OverflowError, IndexError, KeyError):
            # Input the checks above let through and a library then refused: the client's to fix,
            # but the library's words ("cannot reshape array…") mean nothing to it.
            log.warning("a %s request failed on its values", model.__name__, exc_info=True)
            return _error(
                InvalidRequest(
                    "the replica could not use this request's values (a size, shape, range or type it cannot "
                    "serve); check them against the route's documented limits"
                )
            )
        except Exception:  # noqa: BLE001 - the engine stays up; the client gets a typed answer
            log.exception("a %s request failed", model.__name__)
            return _error(
                ReplicaFailed(
                    "the replica failed while serving this request; it is still up, so retry, or give "
                    "the facility the X-Tpmflow-Request-Id of this answer"
                )
            )
        return JSONResponse(result.model_dump() if isinstance(result, BaseModel) else result)

    return endpoint


def build_router() -> APIRouter:
    """tpmflow's routes on a replica: ``/info`` and every POST route of ``POST_ROUTES``."""
    router = APIRouter()

    @router.get(Routes.INFO)
    async def info(request: Request) -> JSONResponse:
        ctx: ReplicaContext = request.app.state.tpmflow
        stats = await ctx.engine.collective_rpc("tpmflow_stats")
        # Summed over the replica's workers: under PP each stage counts its own; under TP only
        # tensor rank 0 records, the others add zeros.
        hooks = {k: sum(int(w.get(k, 0)) for w in stats) for k in ("hook_calls", "pending")}
        hooks["steps"] = max(int(w.get("steps", 0)) for w in stats)
        return JSONResponse({**ctx.info().model_dump(), "hooks": hooks})

    for path, model, handler in POST_ROUTES:
        router.add_api_route(path, _endpoint(model, handler), methods=["POST"], name=handler.__name__)
    return router


class Registers(Protocol):
    """What the heartbeat needs of a replica: its settings and what it reports."""

    settings: ReplicaSettings

    def info(self) -> ReplicaInfo: ...


async def heartbeat(ctx: Registers) -> None:
    """Register with every gateway of the pool and keep telling them we are alive (replicas may live
    on other nodes). The first gateway is the one whose launcher started this replica: when it has
    not answered for ``orphan_grace_s`` the replica stops (no process outlives its pool, and a
    restarted pool never finds an old generation serving under the same ids); the other gateways
    route to it meanwhile."""
    import httpx

    settings = ctx.settings
    gateways = settings.gateway_urls
    if not gateways:
        return
    headers = {Headers.AUTHORIZATION: f"Bearer {settings.pool_secret}"}
    last_ok = [time.monotonic()]

    async def beat_forever(client: httpx.AsyncClient, gateway: str, owner: bool) -> None:
        # One loop per gateway: an unroutable one (connect timeout) never delays the others' beats.
        while True:
            try:
                resp = await client.post(gateway + Routes.HEARTBEAT, json=ctx.info().model_dump(), headers=headers)
                if resp.status_code == 200:
                    if owner:
                        last_ok[0] = time.monotonic()
                else:  # e.g. 401: a gateway of another pool secret
                    log.warning("heartbeat to %s refused: HTTP %s", gateway, resp.status_code)
            except httpx.HTTPError as exc:
                log.warning("heartbeat to %s failed: %s", gateway, exc)
            await asyncio.sleep(settings.heartbeat_s)

    async with httpx.AsyncClient(timeout=5.0) as client:
        beats = [asyncio.create_task(beat_forever(client, g, i == 0)) for i, g in enumerate(gateways)]
        try:
            while time.monotonic() - last_ok[0] <= settings.orphan_grace_s:
                await asyncio.sleep(settings.heartbeat_s)
        finally:
            for task in beats:
                task.cancel()
    # The launcher's gateway is gone (killed): stop rather than serve with no one to restart us.
    log.error("the pool's gateway %s has not answered for %.0f s; shutting this replica down",
              gateways[0], settings.orphan_grace_s)  # fmt: skip
    os.kill(os.getpid(), signal.SIGTERM)


class GatewayOnly:
    """ASGI middleware: every path but ``/health`` needs the pool secret.

    vLLM's own ``--api-key`` guards only ``/v1``-style prefixes; ``/invocations``, ``/tokenize``
    and ``/metrics`` would otherwise let anyone on the node bypass the gateway (no salt, no meter).
    """

    OPEN_PATHS = (Routes.HEALTH,)

    def __init__(self, app: Any, secret: str) -> None:
        self.app = app
        self.expected = f"Bearer {secret}".encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path") not in self.OPEN_PATHS:
            auth = dict(scope.get("headers") or []).get(Headers.AUTHORIZATION.lower().encode(), b"")
            if not hmac.compare_digest(auth, self.expected):
                response = JSONResponse(
                    {"error": {"type": "Unauthorized", "message": "replicas answer the gateway only"}}, status_code=401
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _self_check(engine_client: Any, info: dict[str, Any]) -> dict[str, Any]:
    """The probe self-check before the replica serves (``tpmflow.engine.selfcheck``): a layout that
    fails it disables probes, and so does a check that cannot run; serving never depends on it."""
    from tpmflow.engine.selfcheck import run_self_check

    if info.get("layout") is None or info.get("probe_error"):
        log.warning("probes disabled: %s", info.get("probe_error"))
        return info
    try:
        check = await run_self_check(engine_client, info)
        summary, error = check.summary(), (None if check.ok else check.summary())
    except Exception as exc:  # noqa: BLE001 - probes off, the replica still serves
        log.exception("the probe self-check could not run")
        summary = error = f"self-check could not run: {type(exc).__name__}: {exc}"
        await engine_client.collective_rpc("tpmflow_set_probes", args=(error,))
    (log.info if error is None else log.error)("%s (%s layout): %s", info["model_class"], info["layout"], summary)
    return {**info, "probe_error": error, "self_check": summary}


class TpmflowEndpoints:
    """The ``vllm.endpoint_plugins`` entry point (see vllm/plugins/endpoint_plugins/interface.py).

    The replica's settings are read from the environment once, here; everything else gets them
    from the ``ReplicaContext``.
    """

    name = "tpmflow"
    required_tasks = ("generate",)

    def __init__(self) -> None:
        self.settings = ReplicaSettings.from_env()

    def attach_router(self, app: FastAPI) -> None:
        app.include_router(build_router())
        if self.settings.pool_secret:
            app.add_middleware(GatewayOnly, secret=self.settings.pool_secret)

    async def init_state(self, engine_client: Any, state: State, args: Namespace) -> None:
        if engine_client is None:
            raise RuntimeError("tpmflow's routes need an engine")
        installed = await engine_client.collective_rpc("tpmflow_install")
        # Every worker's install counts: a later pipeline stage whose layers cannot be hooked
        # switches probes off for the replica (its part of a trace would be missing).
        info = {**installed[0], "probe_error": next((w["probe_error"] for w in installed if w["probe_error"]), None)}
        if info["probe_error"] and info.get("layout"):
            await engine_client.collective_rpc("tpmflow_set_probes", args=(info["probe_error"],))
        state.tpmflow = ReplicaContext(engine_client, args, await _self_check(engine_client, info), self.settings)
        state.tpmflow_heartbeat = asyncio.get_running_loop().create_task(heartbeat(state.tpmflow))
