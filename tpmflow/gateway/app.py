"""The gateway: a thin authenticating, metering, routing proxy in front of the replicas.

intake (token → principal, permission, body) → admission (rate limits, allocation reserve,
priority queue) → forwarding (least-loaded live replica, retries, streams) → billing (one ledger
row per attempt, charged in service units; the reservation settled). It injects the principal's
``cache_salt`` and its service class's priority and strips client-supplied ones; it forces usage
reporting on streams so the ledger always has token counts. OpenAI-compatible routes pass through
to vLLM's own handlers; the routes are one table, :data:`ROUTES`.
"""

from __future__ import annotations

import asyncio
import hmac
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route as StarletteRoute

from tpmflow.access import AccessDB, LedgerWriter
from tpmflow.config import PoolConfig
from tpmflow.errors import InvalidRequest, Overloaded, QuotaExceeded, TpmflowError, Unauthorized
from tpmflow.gateway import knowledge, retrieval
from tpmflow.gateway.admission import Admission
from tpmflow.gateway.billing import Billing
from tpmflow.gateway.forwarding import Forwarder
from tpmflow.gateway.intake import Intake
from tpmflow.gateway.metrics import GatewayMetrics
from tpmflow.gateway.openai import validate_openai
from tpmflow.gateway.payloads import Payloads
from tpmflow.gateway.ratelimit import RateLimiter
from tpmflow.gateway.shared_registry import SharedReplicaRegistry
from tpmflow.gateway.uptime import Uptime
from tpmflow.knowledge import KnowledgeStore
from tpmflow.paths import knowledge_dir
from tpmflow.payload import PayloadStore, Signer
from tpmflow.pool.registry import ReplicaRegistry
from tpmflow.protocol import Headers, Routes
from tpmflow.schema import ReplicaInfo

Handler = Callable[["Gateway", Request, "Route"], Awaitable[Response]]


@dataclass(frozen=True)
class Route:
    """One route of the gateway: its path and method, the permission it needs (None: any valid
    token; "" : no token at all), its ledger name, and how it is served."""

    path: str
    method: str
    permission: str | None
    handler: Handler
    endpoint: str = ""


class Gateway:
    """Holds one gateway's parts (registry, admission, billing, forwarding, payloads, metrics) and
    its ASGI app, built from :data:`ROUTES`."""

    def __init__(
        self,
        cfg: PoolConfig,
        access: AccessDB,
        ledger: LedgerWriter,
        store: PayloadStore,
        secret: str,
        registry: ReplicaRegistry | None = None,
        workers: int = 1,
    ) -> None:
        self.cfg = cfg
        self.access = access
        self.ledger = ledger
        self.store = store
        self.secret = secret
        self.model_name = cfg.model_name()
        self.registry = registry or ReplicaRegistry(cfg.gateway.heartbeat_timeout_s)
        self.metrics = GatewayMetrics()
        self.uptime = Uptime(self.registry, self.metrics)
        # Per principal and per service class, in this process's memory; with several workers each
        # holds an equal share of every limit, so together they never admit more than the limit.
        self.rate_limits = RateLimiter(cfg, share=1.0 / max(1, workers))
        self.billing = Billing(cfg, access, ledger, self.metrics, self.rate_limits, self.registry)
        self.admission = Admission(cfg, self.metrics, self.rate_limits, self.billing, workers)
        self.intake = Intake(cfg.gateway, access, self.billing.refused, secret)
        self.forwarder = Forwarder(cfg, self.registry, self.metrics, self.billing, self.admission, access, secret)
        self.payloads = Payloads(store, access, Signer(secret), cfg.gateway.payload_sweep_s)
        self.knowledge = KnowledgeStore(access.engine, knowledge_dir(access.url))
        self._background: set[asyncio.Task[Any]] = set()  # kept referenced until done
        self.on_stop: list[Callable[[], None]] = [self.knowledge.flush]  # once the app has stopped serving
        self.app = create_app(self)

    def note_restart(self, replica_id: str) -> None:
        """The launcher restarted a replica: its old address is gone until it heartbeats again."""
        self.registry.mark_dead(replica_id)
        self.metrics.replica_restarts.labels(replica_id).inc()

    def keep_reservations_now(self, now: float | None = None) -> int:
        return self.billing.keep_reservations_now(now)

    def sweep_payloads_now(self, now: float | None = None) -> int:
        return self.payloads.sweep_now(now)

    def in_background(self, coro: Awaitable[Any]) -> None:
        """Run ``coro`` to completion on the loop, holding a reference (a bare ``ensure_future``
        may be garbage-collected mid-run)."""
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


# -- route handlers ----------------------------------------------------------------------------


async def _health(gw: Gateway, request: Request, route: Route) -> Response:
    live = gw.registry.live()
    serving = [r for r in live if r.info.task == "generate"]  # a text embedder alone serves no request
    body = {
        "status": "ok" if serving else "unavailable",
        "model": gw.model_name,
        "replicas": [
            {
                "id": r.info.replica_id,
                "group": r.info.group,
                "task": r.info.task,
                "model": r.info.model,
                "inflight": r.inflight,
                "served": r.served,
                "running": r.info.running,
                "waiting": r.info.waiting,
                "probes": r.info.probes,
                # The replica's shape: ranks each layer is split over x pipeline stages.
                "tensor_parallel": r.info.tensor_parallel,
                "pipeline_parallel": r.info.pipeline_parallel,
                "engine": r.info.engine,
            }
            for r in live
        ],
    }
    return JSONResponse(body, status_code=200 if serving else 503)


async def _metrics(gw: Gateway, request: Request, route: Route) -> Response:
    gw.metrics.replicas_live.set(sum(r.info.task == "generate" for r in gw.registry.live()))
    gw.uptime.export()
    return Response(gw.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


async def _heartbeat(gw: Gateway, request: Request, route: Route) -> Response:
    sent = request.headers.get(Headers.AUTHORIZATION, "").encode()
    if not hmac.compare_digest(sent, f"Bearer {gw.secret}".encode()):
        raise Unauthorized("replicas authenticate with the pool secret")
    try:
        info = ReplicaInfo.model_validate_json(await request.body())
    except (ValidationError, ValueError) as exc:
        raise InvalidRequest(f"bad heartbeat: {exc}") from exc
    gw.uptime.heartbeat(info)  # into the registry, noting a (re)join
    gw.metrics.replica_running.labels(info.replica_id).set(info.running)
    gw.metrics.replica_waiting.labels(info.replica_id).set(info.waiting)
    return Response(b'{"ok":true}', media_type="application/json")


async def _models(gw: Gateway, request: Request, route: Route) -> Response:
    call = await gw.intake.call(request, route.endpoint, route.permission)
    async with gw.admission.admitted(call):
        return await gw.forwarder.forward(call, "GET", route.path, None)


async def _openai(gw: Gateway, request: Request, route: Route) -> Response:
    """vLLM's own completions and chat routes, with the body checked and the gateway's fields set."""
    call = await gw.intake.call(request, route.endpoint, route.permission)
    try:
        _, body = await gw.intake.body(request, call)
        wanted = retrieval.take_spec(body) if route.path == Routes.COMPLETIONS else None
        body = validate_openai(body, route.path == Routes.CHAT, gw.model_name, gw.cfg.gateway)
        found = await retrieval.into_completion(gw, call, wanted, body) if wanted else None
    except TpmflowError as exc:
        gw.billing.refused(call, exc.status_code, type(exc).__name__)
        raise
    body["cache_salt"] = call.principal.cache_salt
    body["priority"] = gw.admission.priority(call.principal)
    data = None  # serialised per attempt: each has its own request id
    if body.get("stream"):
        admitted = gw.admission.admitted(call, body)
        await admitted.__aenter__()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                gw.in_background(admitted.__aexit__(None, None, None))

        try:
            return _with_retrieved(await gw.forwarder.forward_stream(call, route.path, data, body, release), found)
        except BaseException:
            release()
            raise
    async with gw.admission.admitted(call, body):
        return _with_retrieved(await gw.forwarder.forward(call, "POST", route.path, data, body), found)


def _with_retrieved(response: Response, found: retrieval.Retrieved | None) -> Response:
    """The answer with what retrieval put into its prompts (before a stream's headers are sent)."""
    if found is not None:
        response.headers[retrieval.HEADER] = found.header()  # ASCII JSON: cannot fail to encode
    return response


async def _adapter_generate(gw: Gateway, request: Request, route: Route) -> Response:
    """The adapters' generate route: forwarded as it came, or, with ``retrieve``, with each item's
    retrieved entries as its context."""
    call = await gw.intake.call(request, route.endpoint, route.permission)
    try:
        raw, body = await gw.intake.body(request, call)
        changed = "retrieve" in body
        wanted = retrieval.take_spec(body)
        found = await retrieval.into_adapter_generate(gw, call, wanted, body) if wanted else None
    except TpmflowError as exc:
        gw.billing.refused(call, exc.status_code, type(exc).__name__)
        raise
    data = orjson.dumps(body) if changed else raw  # without `retrieve`, with the contexts
    async with gw.admission.admitted(call, body):
        return _with_retrieved(await gw.forwarder.forward(call, "POST", route.path, data, body), found)


async def _tpmflow(gw: Gateway, request: Request, route: Route) -> Response:
    """tpmflow's own replica routes: the body is parsed for admission and billing, and forwarded
    as it came (the replica validates it against its wire model)."""
    call = await gw.intake.call(request, route.endpoint, route.permission)
    try:
        raw, body = await gw.intake.body(request, call)
    except TpmflowError as exc:
        gw.billing.refused(call, exc.status_code, type(exc).__name__)
        raise
    async with gw.admission.admitted(call, body):
        return await gw.forwarder.forward(call, "POST", route.path, raw, body)


async def _store(gw: Gateway, request: Request, route: Route) -> Response:
    principal = await gw.intake.authorise(request, None)
    return JSONResponse(gw.payloads.describe(principal))


async def _sign(gw: Gateway, request: Request, route: Route) -> Response:
    principal = await gw.intake.authorise(request, None)
    _, body = await gw.intake.body(request)
    return JSONResponse(await gw.payloads.sign(principal, body))


async def _usage(gw: Gateway, request: Request, route: Route) -> Response:
    principal = await gw.intake.authorise(request, None)
    by = request.query_params.get("by", "principal")
    if by not in ("principal", "project"):
        raise InvalidRequest("by must be 'principal' or 'project'")
    await asyncio.to_thread(gw.ledger.flush)
    mine = None if principal.can("admin") else principal.name
    rows = await asyncio.to_thread(gw.access.usage, by, mine, charges=True)
    return JSONResponse({"usage": rows})


async def _request_usage(gw: Gateway, request: Request, route: Route) -> Response:
    """What one request (its X-Request-Id) was charged: the caller's own rows, any for an admin."""
    principal = await gw.intake.authorise(request, None)
    correlation = request.query_params.get("id", "")
    if not correlation:
        raise InvalidRequest("give the request's id: ?id=<X-Request-Id>")
    await asyncio.to_thread(gw.ledger.flush)
    where: dict[str, Any] = {"correlation_id": correlation}
    if not principal.can("admin"):
        where["principal"] = principal.name
    rows = await asyncio.to_thread(gw.access.ledger_rows, **where)
    return JSONResponse(
        {
            "request_id": correlation,
            "rows": len(rows),
            "finished": bool(rows) and all(r.status != 0 for r in rows),
            "charge_su": sum(r.charge_su or 0.0 for r in rows),
            "prompt_tokens": sum(r.prompt_tokens for r in rows),
            "output_tokens": sum(r.output_tokens for r in rows),
        }
    )


def _proxied(path: str, permission: str, handler: Handler = _tpmflow) -> Route:
    return Route(path, "POST", permission, handler, Routes.endpoint(path))


ROUTES: tuple[Route, ...] = (
    Route(Routes.HEALTH, "GET", "", _health),
    Route(Routes.METRICS, "GET", "", _metrics),
    Route(Routes.HEARTBEAT, "POST", "", _heartbeat),  # the pool secret, checked by the handler
    Route(Routes.MODELS, "GET", None, _models, "models"),
    Route(Routes.COMPLETIONS, "POST", "generate", _openai, "completions"),
    Route(Routes.CHAT, "POST", "generate", _openai, "chat"),
    _proxied(Routes.EMBED, "embed"),
    _proxied(Routes.ADAPTER_EMBED, "embed"),
    _proxied(Routes.ADAPTER_PREDICT, "embed"),
    _proxied(Routes.ADAPTER_GENERATE, "generate", _adapter_generate),
    _proxied(Routes.GENERATE_EMBEDS, "generate"),
    _proxied(Routes.PROBE, "probe"),
    _proxied(Routes.DIGEST, "embed"),
    Route(Routes.STORE, "GET", None, _store),
    Route(Routes.SIGN, "POST", None, _sign),
    Route(Routes.USAGE, "GET", None, _usage),
    Route(Routes.USAGE + "/request", "GET", None, _request_usage),
    # The knowledge store (tpmflow.gateway.knowledge): adds and searches embed through a replica.
    Route(Routes.KNOWLEDGE, "GET", None, knowledge.listing, "knowledge/list"),
    *(
        Route(f"{Routes.KNOWLEDGE}/{name}", "POST", permission, handler, f"knowledge/{name}")
        for name, permission, handler in (
            ("create", "embed", knowledge.create),
            ("show", None, knowledge.show),
            ("add", "embed", knowledge.add),
            ("search", "embed", knowledge.search),
            ("get", None, knowledge.get),
            ("delete", "embed", knowledge.delete),
            ("share", "embed", knowledge.share),
            ("reembed", "embed", knowledge.reembed),
            ("drop", "embed", knowledge.drop),
        )
    ),
)


def create_app(gw: Gateway) -> FastAPI:
    """The ASGI app of ``gw``: one endpoint per entry of :data:`ROUTES`, typed errors as JSON."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        await asyncio.to_thread(gw.billing.close_interrupted)  # rows a crashed gateway left open
        tasks = [
            loop.create_task(gw.payloads.sweep()),
            loop.create_task(gw.billing.keep_reservations()),
            loop.create_task(gw.uptime.watch()),
            loop.create_task(gw.billing.bill_storage(gw.knowledge)),
        ]
        if isinstance(gw.registry, SharedReplicaRegistry):
            tasks.append(loop.create_task(gw.registry.sync_forever()))
        yield
        for task in tasks:
            task.cancel()
        await asyncio.gather(*gw._background, return_exceptions=True)  # settles still running
        await gw.forwarder.close()
        for stop in gw.on_stop:
            await asyncio.to_thread(stop)

    # No Swagger or ReDoc pages: they load scripts from a CDN, inline, on the workbench's origin
    # (and the routes are plain Starlette routes they would not list); the API is in the README.
    app = FastAPI(title="tpmflow gateway", docs_url=None, redoc_url=None, lifespan=lifespan)

    @app.exception_handler(TpmflowError)
    async def _typed(_: Request, exc: TpmflowError) -> JSONResponse:
        # Overloaded always, QuotaExceeded when a rate limit refused it (whole seconds, rounded up).
        retry_after = getattr(exc, "retry_after", None) if isinstance(exc, (Overloaded, QuotaExceeded)) else None
        headers = {Headers.RETRY_AFTER: str(math.ceil(max(1.0, retry_after)))} if retry_after is not None else None
        return JSONResponse(exc.to_body(), status_code=exc.status_code, headers=headers)

    # Plain Starlette routes: FastAPI's per-request dependency solving (it parses the query string
    # of every request, among others) cost as much as the rest of the gateway's own work.
    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Unknown paths and methods in the one envelope too (Starlette's own is {"detail": ...}).
        kind = "ModelNotFound" if exc.status_code == 404 else "InvalidRequest"
        body = {"error": {"type": kind, "message": f"{exc.detail}: see tpmflow.gateway.ROUTES for the routes"}}
        return JSONResponse(body, status_code=exc.status_code)

    for route in ROUTES:
        app.router.routes.append(
            StarletteRoute(route.path, _bind(gw, route), methods=[route.method], name=route.endpoint or route.path)
        )
    from tpmflow.ui.pages import Workbench

    app.router.routes.extend(Workbench(gw).routes())  # the web workbench under /ui
    return app


def _bind(gw: Gateway, route: Route) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        return await route.handler(gw, request, route)

    return endpoint
