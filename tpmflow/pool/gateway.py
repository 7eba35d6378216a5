"""The gateway: a thin authenticating, metering, routing proxy in front of the replicas.

authenticate → permission check → validate → rate limits (per principal and class, in memory) →
reserve (projects with an allocation) → admit (bounded queue) → route to the least-loaded live
replica → meter (one ledger row per attempt, with its charge in service units) → settle the
reservation. It injects the principal's ``cache_salt`` and its service class's priority and strips
client-supplied ones; it forces usage reporting on streams so the ledger always has token counts.
OpenAI-compatible routes pass through to vLLM's own handlers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from tpmflow.access import AccessDB, LedgerRow, LedgerWriter, Principal, Reservation
from tpmflow.access.allocations import EXPIRY_MARGIN_S, RENEW_EVERY_S
from tpmflow.access.costs import Limits, max_charge
from tpmflow.config import PoolConfig
from tpmflow.engine.routes import LORA_HEADER, PRINCIPAL_HEADER, PRIORITY_HEADER, REQUEST_ID_HEADER, SALT_HEADER
from tpmflow.errors import (
    Forbidden,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    QuotaExceeded,
    ReplicaFailed,
    TpmflowError,
    Unauthorized,
)
from tpmflow.payload import PayloadStore, Reference, Signer
from tpmflow.pool.admission import PrioritySlots
from tpmflow.pool.metrics import GatewayMetrics
from tpmflow.pool.ratelimit import RateLimiter
from tpmflow.pool.registry import ReplicaRegistry, ReplicaState, lora_for
from tpmflow.pool.uptime import Uptime
from tpmflow.schema import ReplicaInfo, SignRequest

log = logging.getLogger("tpmflow.gateway")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,80}$")
# vLLM would torch.load prompt_embeds (pickle) unchecked, and extra args reach the workers' hooks.
_REFUSED_FIELDS = ("prompt_embeds", "kv_transfer_params", "vllm_xargs")
# Fields only the gateway may set on a forwarded OpenAI request.
_GATEWAY_OWNED = ("cache_salt", "priority", "request_id")


@dataclass
class Call:
    """One request's bookkeeping as it goes through the gateway."""

    endpoint: str
    principal: Principal
    request_id: str
    started: float = field(default_factory=time.monotonic)
    queue_ms: float = 0.0
    model: str = ""
    content_hash: str = ""
    version: str = ""  # X-Tpmflow-Version: only replicas serving this version may answer
    body_bytes: int = 0  # size of the JSON body as received (bounds inline payload bytes)
    reservation: Reservation | None = None  # SUs set aside at admission (projects with an allocation)
    charged_su: float = 0.0  # SUs its ledger rows charged so far; settled when the request is done


def _typed_error(payload: Any, status: int) -> dict[str, Any]:
    """vLLM's own error bodies (``BadRequestError``…) become tpmflow's classes, keeping the message
    and the OpenAI-style shape, so every client sees one hierarchy."""
    from tpmflow.errors import ERROR_CLASSES, type_for_status

    err = payload.get("error") if isinstance(payload, dict) else None
    err = dict(err) if isinstance(err, dict) else {"message": str(payload)[:500]}
    if err.get("type") not in ERROR_CLASSES:
        err["type"] = type_for_status(status)
    err.setdefault("message", "")
    return {**(payload if isinstance(payload, dict) else {}), "error": err}


@dataclass
class Attempts:
    """Retry state of one request: replicas tried, and the id of the last failed attempt."""

    tried: set[str] = field(default_factory=set)
    count: int = 0
    previous: str | None = None

    def next_id(self, request_id: str) -> str:
        return request_id if self.count == 0 else f"{request_id}.r{self.count}"

    def failed(self, attempt_id: str) -> None:
        self.previous, self.count = attempt_id, self.count + 1


class Gateway:
    """Builds the FastAPI app; holds the registry, admission state, ledger and metrics."""

    def __init__(
        self, cfg: PoolConfig, access: AccessDB, ledger: LedgerWriter, store: PayloadStore, secret: str
    ) -> None:
        self.cfg = cfg
        self.access = access
        self.ledger = ledger
        self.store = store
        self.secret = secret
        self.signer = Signer(secret)
        self.registry = ReplicaRegistry(cfg.gateway.heartbeat_timeout_s)
        self.metrics = GatewayMetrics()
        self.uptime = Uptime(self.registry, self.metrics)
        self.model_name = cfg.model_name()
        self._slots = PrioritySlots(cfg.gateway.max_inflight)  # waiters served by class priority
        self._waiting = 0
        self.rate_limits = RateLimiter(cfg)  # per principal and per service class, in this gateway's memory
        self._http: aiohttp.ClientSession | None = None
        self.app = self._build_app()

    # -- plumbing --------------------------------------------------------------------------------

    @property
    def http(self) -> aiohttp.ClientSession:
        # aiohttp, not httpx, on this hot path: it costs the gateway several times less CPU per
        # forwarded request, and on a small node every cycle the gateway uses the engine loses.
        if self._http is None:
            # Keep-alive below uvicorn's 5 s, so a pooled connection is never one the replica closed.
            connector = aiohttp.TCPConnector(limit=self.cfg.gateway.max_inflight * 2, keepalive_timeout=3)
            self._http = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        return self._http

    def note_restart(self, replica_id: str) -> None:
        """The launcher restarted a replica: its old address is gone until it heartbeats again."""
        self.registry.mark_dead(replica_id)
        self.metrics.replica_restarts.labels(replica_id).inc()

    async def _authenticate(self, request: Request) -> Principal:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("missing bearer token (Authorization: Bearer tpm_...)")
        token = token.strip()
        # Cached answers on the loop; a database round trip only off it.
        return self.access.cached(token) or await asyncio.to_thread(self.access.authenticate, token)

    async def _authorise(self, request: Request, permission: str | None, endpoint: str = "") -> Principal:
        principal = await self._authenticate(request)
        if permission is not None and not principal.can(permission):
            exc = Forbidden(f"principal {principal.name!r} lacks the {permission!r} permission")
            self._record(Call(endpoint, principal, self._request_id(request)), 403, error_type="Forbidden")
            raise exc
        return principal

    async def _call(self, request: Request, endpoint: str, permission: str | None) -> Call:
        """A request's bookkeeping, once its principal may use ``permission``; its clock starts
        before the token check, so latencies cover the whole time at the gateway."""
        started = time.monotonic()
        principal = await self._authorise(request, permission, endpoint)
        version = request.headers.get("X-Tpmflow-Version", "")
        if len(version) > 80:
            raise InvalidRequest("X-Tpmflow-Version is a content hash (blake3:...) or a prefix of one")
        return Call(endpoint, principal, self._request_id(request), started=started, version=version)

    def _request_id(self, request: Request) -> str:
        rid = request.headers.get("X-Request-Id")
        return rid if rid and _REQUEST_ID.match(rid) else uuid.uuid4().hex

    async def _json_body(self, request: Request, call: Call | None = None) -> dict[str, Any]:
        limit = self.cfg.gateway.max_body_bytes
        too_big = PayloadTooLarge(
            f"request body exceeds {limit} bytes; send large arrays by reference (tpmflow payloads)"
        )
        declared = request.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_big  # refused before a byte of it is buffered
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_big
            chunks.append(chunk)
        raw = b"".join(chunks)
        if call is not None:
            call.body_bytes = len(raw)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise InvalidRequest(f"malformed JSON body: {exc}") from exc
        if not isinstance(body, dict):
            raise InvalidRequest("the JSON body must be an object")
        return body

    def _priority(self, principal: Principal) -> int:
        cls = self.cfg.service_classes.get(principal.service_class)
        return cls.priority if cls else 0

    def _group(self, call: Call) -> str:
        """The replica group serving the caller's service class (unknown classes: ``default``)."""
        cls = self.cfg.service_classes.get(call.principal.service_class)
        return cls.replica_group if cls else "default"

    @asynccontextmanager
    async def _admitted(self, call: Call, body: dict[str, Any] | None = None) -> AsyncIterator[None]:
        """Bounded admission: at most max_inflight forwarded, queue_limit waiting, else 503.

        First, a project with an allocation reserves the request's largest possible charge (from
        ``body``) or is refused with ``QuotaExceeded``; on the way out — answered, failed, refused
        by the queue — the reservation is settled with what the request's ledger rows charged.
        Before both, rate limits: a rate-limited request reserves nothing.
        """
        self._rate_limit(call)
        await self._reserve(call, body)
        try:
            if self._slots.locked() and self._waiting >= self.cfg.gateway.queue_limit:
                self._record(call, 503, error_type="Overloaded")
                raise Overloaded(f"pool queue is full ({self._waiting} waiting)", retry_after=1.0)
            self._waiting += 1
            self.metrics.queue_depth.set(self._waiting)
            remaining = call.started + self.cfg.gateway.request_timeout_s - time.monotonic()
            try:
                await asyncio.wait_for(
                    self._slots.acquire(self._priority(call.principal)), timeout=max(0.01, remaining)
                )
            except TimeoutError:
                self._record(call, 503, error_type="Overloaded")
                raise Overloaded("waited in the pool queue for the whole request timeout", retry_after=5.0) from None
            finally:
                self._waiting -= 1
                self.metrics.queue_depth.set(self._waiting)
            call.queue_ms = (time.monotonic() - call.started) * 1000
            self.metrics.inflight.inc()
            try:
                yield
            finally:
                self.metrics.inflight.dec()
                self._slots.release()
        finally:
            await self._settle(call)

    def _rate_limit(self, call: Call) -> None:
        """Per-principal and per-class rate limits (tpmflow.pool.ratelimit): refused with a 429
        ``QuotaExceeded`` + Retry-After, and a ledger row whose error_type ``RateLimited`` tells it
        from a spent allocation (waiting helps; a top-up is not needed)."""
        try:
            self.rate_limits.admit(call.principal)
        except QuotaExceeded:
            self._record(call, 429, error_type="RateLimited")
            raise

    # -- allocations: reserve before admission, settle after -----------------------------------

    def _limits(self) -> Limits:
        """The pool limits that bound one request's use (replicas report their engine's own)."""
        live = self.registry.live()
        return Limits(
            max_model_len=max([r.info.max_model_len for r in live] + [self.cfg.engine.max_model_len]),
            hidden_size=max((r.info.hidden_size for r in live), default=0),
            max_activation_bytes=self.cfg.max_activation_bytes,
            request_timeout_s=self.cfg.gateway.request_timeout_s,
        )

    async def _reserve(self, call: Call, body: dict[str, Any] | None) -> None:
        """Reserve the most this request can cost from its project's allocation (atomic in the
        database, so gateways sharing it cannot overspend together). Unlimited projects — no
        allocation at all — pass on a cached answer without touching the database."""
        allocations = self.access.allocations
        project = call.principal.project
        if allocations.unlimited(project):
            return
        bound = max_charge(
            self.cfg.costs, call.principal.service_class, call.endpoint, body, call.body_bytes, self._limits()
        )
        # Expires at the request's deadline plus a margin; _keep_reservations renews it meanwhile.
        ttl_s = self.cfg.gateway.request_timeout_s + EXPIRY_MARGIN_S
        reserving = asyncio.ensure_future(
            asyncio.to_thread(allocations.reserve, project, call.principal.name, bound, ttl_s=ttl_s)
        )
        try:
            call.reservation = await asyncio.shield(reserving)
        except QuotaExceeded:
            self._record(call, 429, error_type="QuotaExceeded")
            raise
        except asyncio.CancelledError:
            # The client left while the database reserved: the thread finishes anyway, so give the
            # SUs back once it has, or they would stay held with no request to settle them.
            reserving.add_done_callback(self._release_abandoned)
            raise

    def _release_abandoned(self, reserving: asyncio.Future[Reservation | None]) -> None:
        if reserving.cancelled() or reserving.exception() is not None or reserving.result() is None:
            return
        threading.Thread(target=self.access.allocations.settle, args=(reserving.result(), 0.0), daemon=True).start()

    async def _settle(self, call: Call) -> None:
        """Swap the reservation for the real charge (at most the reservation). Runs in a thread that
        completes even if the request task is cancelled meanwhile."""
        reservation, call.reservation = call.reservation, None
        if reservation is None:
            return
        try:
            await asyncio.to_thread(self.access.allocations.settle, reservation, call.charged_su)
        except Exception:  # noqa: BLE001 - held until it expires and a sweep frees it (never an overspend)
            log.exception("settling %s SU reserved for %s failed", reservation.su, call.request_id)

    async def _keep_reservations(self) -> None:
        """Every RENEW_EVERY_S: renew this gateway's reservations in flight (a stream may outlive its
        deadline, and must not lose its reservation), then release any gateway's expired ones (it
        crashed between reserving and settling)."""
        while True:
            await asyncio.sleep(RENEW_EVERY_S)
            try:
                await asyncio.to_thread(self.keep_reservations_now)
            except Exception:  # noqa: BLE001 - the sweep must never take the gateway down
                log.exception("renewing or sweeping reservations failed")

    def keep_reservations_now(self, now: float | None = None) -> int:
        """One renewal and sweep (``now``: a wall-clock time, for tests); returns how many expired
        reservations it released."""
        self.access.allocations.renew(now)
        return len(self.access.allocations.sweep(now))

    def _charge(self, call: Call, row: LedgerRow) -> float:
        """This row's SUs from its own counters. A request never costs more than it reserved: only a
        stream outliving the request timeout could, and its excess engine time goes unbilled."""
        charge = self.cfg.costs.charge_of(row)
        if call.reservation is not None:
            charge = max(0.0, min(charge, call.reservation.su - call.charged_su))
        call.charged_su += charge
        return charge

    def _record(
        self,
        call: Call,
        status: int,
        *,
        attempt_id: str | None = None,
        retry_of: str | None = None,
        replica: ReplicaState | None = None,
        usage: dict[str, Any] | None = None,
        engine_ms: float = 0.0,
        error_type: str | None = None,
        first_output: float | None = None,
    ) -> None:
        """One ledger row and the metrics of one attempt. ``first_output``: when a stream relayed its
        first chunk (time.monotonic); any other answer reaches its client whole, at the end."""
        usage = usage or {}
        latency_ms = (time.monotonic() - call.started) * 1000
        if first_output is not None:
            ttft_ms: float | None = (first_output - call.started) * 1000
        else:
            ttft_ms = latency_ms if status == 200 else None
        p = call.principal
        prompt = int(usage.get("prompt_tokens") or 0)
        output = int(usage.get("completion_tokens") or 0)
        row = LedgerRow(
            request_id=attempt_id or call.request_id,
            retry_of=retry_of,
            principal=p.name,
            project=p.project,
            service_class=p.service_class,
            endpoint=call.endpoint,
            model=self.model_name,
            content_hash=self._served(call, replica) if replica else call.content_hash,
            replica_id=replica.info.replica_id if replica else None,
            prompt_tokens=prompt,
            output_tokens=output,
            payload_bytes_in=int(usage.get("payload_bytes_in") or 0),
            payload_bytes_out=int(usage.get("payload_bytes_out") or 0),
            activation_bytes=int(usage.get("activation_bytes") or 0),
            queue_ms=call.queue_ms,
            engine_ms=engine_ms,
            status=status,
            error_type=error_type,
            latency_ms=latency_ms,
            ttft_ms=ttft_ms,
        )
        row.charge_su = self._charge(call, row)
        self.ledger.record(row)
        # Token rate limits are debited with the same counts the ledger row gets, once known.
        self.rate_limits.debit_tokens(p, prompt + output)
        self.metrics.requests.labels(call.endpoint, p.service_class, str(status)).inc()
        self.metrics.latency.labels(call.endpoint).observe(latency_ms / 1000)
        if status == 200:
            self.metrics.observe_answer(p.service_class, latency_ms, ttft_ms, output, engine_ms)
        if error_type:
            self.metrics.errors.labels(call.endpoint, p.service_class, error_type).inc()
        self.metrics.tokens.labels("prompt").inc(prompt)
        self.metrics.tokens.labels("output").inc(output)

    def _headers(self, call: Call) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {self.secret}",
            PRINCIPAL_HEADER: call.principal.name,
            REQUEST_ID_HEADER: call.request_id,
            PRIORITY_HEADER: str(self._priority(call.principal)),
            SALT_HEADER: call.principal.cache_salt,
            "X-Request-Id": call.request_id,
        }

    # -- forwarding ------------------------------------------------------------------------------

    async def _sweep_payloads(self) -> None:
        """Evict payloads whose lifetime is over (store lifetimes), once a minute."""
        while True:
            await asyncio.sleep(self.cfg.gateway.payload_sweep_s)
            try:
                await asyncio.to_thread(self.sweep_payloads_now)
            except Exception:  # noqa: BLE001 - the sweep must never take the gateway down
                log.exception("payload sweep failed")

    def sweep_payloads_now(self, now: float | None = None) -> int:
        expired = self.access.pop_expired_payloads(now)
        for key, principal in expired:
            ref = Reference(
                connector=self.store.config.connector,
                key=key,
                principal=principal,
                kind="bytes",
                nbytes=0,
                digest="",
                expires=0,
            )
            try:
                self.store.evict(ref)
            except Exception:  # noqa: BLE001 - already gone is fine
                log.debug("evicting %s failed", key)
        return len(expired)

    def _track_outputs(self, principal: Principal, payload: dict[str, Any]) -> None:
        """Payloads a replica wrote for this principal expire like the ones it sent."""
        for item in payload.get("data") or []:
            emb = item.get("embedding") if isinstance(item, dict) else None
            if isinstance(emb, dict) and emb.get("sig"):
                self.access.register_payload(
                    emb["key"], principal.name, int(emb["nbytes"]), float(emb["expires"]), None
                )

    def _provenance(self, call: Call, replica: ReplicaState) -> dict[str, str]:
        """Provenance of every answer, in headers, so vLLM's own OpenAI bodies stay untouched."""
        return {
            "X-Request-Id": call.request_id,
            "X-Tpmflow-Model": self.model_name,
            "X-Tpmflow-Content-Hash": self._served(call, replica),
            "X-Tpmflow-Replica": replica.info.replica_id,
            "X-Tpmflow-Engine": replica.info.engine,
        }

    @staticmethod
    def _served(call: Call, replica: ReplicaState) -> str:
        """The version answering ``call`` on ``replica``: a pinned LoRA adapter's, else its weights'."""
        return lora_for(replica, call.version) or replica.info.content_hash

    def _busy(self, replica: ReplicaState, delta: int) -> None:
        replica.inflight += delta
        self.metrics.replica_inflight.labels(replica.info.replica_id).set(replica.inflight)

    def _replica_dropped(
        self,
        call: Call,
        replica: ReplicaState,
        attempt_id: str,
        previous: str | None,
        attempts: Attempts,
        exc: Exception,
    ) -> None:
        log.warning("replica %s failed (%s); leaving rotation", replica.info.replica_id, exc)
        self.registry.mark_dead(replica.info.replica_id)
        self.metrics.replica_failures.labels(replica.info.replica_id).inc()
        self._record(call, 502, attempt_id=attempt_id, retry_of=previous, replica=replica, error_type="ReplicaFailed")
        attempts.failed(attempt_id)

    def _timed_out(
        self, call: Call, replica: ReplicaState, attempt_id: str, previous: str | None, exc: Exception
    ) -> ReplicaFailed:
        self._record(call, 504, attempt_id=attempt_id, retry_of=previous, replica=replica, error_type="ReplicaFailed")
        failed = ReplicaFailed(f"replica {replica.info.replica_id} did not answer within the timeout")
        failed.__cause__ = exc
        return failed

    async def _send(
        self,
        call: Call,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        deadline: float,
        attempts: Attempts,
        stream: bool = False,
    ) -> tuple[aiohttp.ClientResponse, ReplicaState, str, str | None, float]:
        """Open a response from the least-loaded live replica. A dropped connection takes that replica
        out of the rotation and retries on another (same request id; the failed attempt gets its own
        ledger row and the next one ``retry_of`` it) until the deadline, then ``ReplicaFailed``.

        The replica counts as busy from the moment the request is sent (vLLM answers headers only
        when it is done), so least-loaded routing sees work in progress; the caller un-busies it.
        """
        plain = json.dumps(body).encode() if body is not None else None
        headers = {**self._headers(call), "Content-Type": "application/json"}
        while True:
            replica = await self.registry.wait_pick(deadline, attempts.tried, call.version, self._group(call))
            data, lora = plain, lora_for(replica, call.version)
            if lora is not None:  # a LoRA version: vLLM's OpenAI routes pick adapters by model name
                headers[LORA_HEADER] = lora
                if body is not None and "model" in body:
                    data = json.dumps({**body, "model": lora}).encode()
            else:
                headers.pop(LORA_HEADER, None)
            attempt_id, previous = attempts.next_id(call.request_id), attempts.previous
            attempts.tried.add(replica.info.replica_id)
            t0 = time.monotonic()
            self._busy(replica, +1)
            try:
                resp = await self.http.request(
                    method,
                    replica.info.url + path,
                    data=data,
                    headers=headers,
                    # A stream may outlive the request timeout while tokens keep coming; a silence
                    # as long as the timeout ends it.
                    timeout=aiohttp.ClientTimeout(sock_connect=10, sock_read=self.cfg.gateway.request_timeout_s)
                    if stream
                    else aiohttp.ClientTimeout(total=max(0.1, deadline - t0)),
                )
            except TimeoutError as exc:
                self._busy(replica, -1)
                raise self._timed_out(call, replica, attempt_id, previous, exc) from exc
            except aiohttp.ClientError as exc:
                self._busy(replica, -1)
                self._replica_dropped(call, replica, attempt_id, previous, attempts, exc)
                continue
            except BaseException:
                self._busy(replica, -1)
                raise
            return resp, replica, attempt_id, previous, t0

    async def forward(self, call: Call, method: str, path: str, body: dict[str, Any] | None) -> Response:
        """Forward a request and relay the replica's JSON answer (its bytes, untouched)."""
        deadline = call.started + self.cfg.gateway.request_timeout_s
        attempts = Attempts()
        while True:
            resp, replica, attempt_id, previous, t0 = await self._send(call, method, path, body, deadline, attempts)
            try:
                raw = await resp.read()
            except TimeoutError as exc:
                raise self._timed_out(call, replica, attempt_id, previous, exc) from exc
            except aiohttp.ClientError as exc:
                # The replica died mid-answer: nothing reached the caller yet, so retry elsewhere.
                self._replica_dropped(call, replica, attempt_id, previous, attempts, exc)
                continue
            finally:
                resp.release()
                self._busy(replica, -1)
            replica.served += 1
            break
        engine_ms = (time.monotonic() - t0) * 1000
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            payload = {"error": {"type": "ReplicaFailed", "message": raw[:500].decode(errors="replace")}}
            raw = json.dumps(payload).encode()
        error_type = None
        if resp.status >= 400:
            payload = _typed_error(payload, resp.status)
            error_type = payload["error"]["type"]
            raw = json.dumps(payload).encode()
        usage = payload.get("usage")
        if resp.status == 200 and isinstance(usage, dict) and usage.get("payload_bytes_out"):
            await asyncio.to_thread(self._track_outputs, call.principal, payload)
        self._record(
            call,
            resp.status,
            attempt_id=attempt_id,
            retry_of=previous,
            replica=replica,
            usage=usage if isinstance(usage, dict) else None,
            engine_ms=engine_ms,
            error_type=error_type,
        )
        return Response(
            raw, status_code=resp.status, media_type="application/json", headers=self._provenance(call, replica)
        )

    async def forward_stream(
        self, call: Call, path: str, body: dict[str, Any], release: Callable[[], None]
    ) -> Response:
        """Stream Server-Sent Events through; retry only before the first byte."""
        deadline = call.started + self.cfg.gateway.request_timeout_s
        upstream, replica, attempt_id, previous, t0 = await self._send(
            call, "POST", path, body, deadline, Attempts(), stream=True
        )
        if upstream.status != 200:
            try:
                raw = await upstream.read()
            finally:
                upstream.release()
                self._busy(replica, -1)
            try:
                payload = _typed_error(json.loads(raw), upstream.status)
            except ValueError:
                payload = {"error": {"type": "ReplicaFailed", "message": raw[:500].decode(errors="replace")}}
            err = payload["error"]
            self._record(
                call,
                upstream.status,
                attempt_id=attempt_id,
                retry_of=previous,
                replica=replica,
                error_type=str(err.get("type")) if isinstance(err, dict) else "Error",
            )
            release()
            return JSONResponse(payload, status_code=upstream.status)

        state: dict[str, Any] = {
            "status": 200,
            "error_type": None,
            "usage_line": None,
            "done": False,
            "first_output": None,  # when the first chunk went to the client: its time to first token
        }

        def finish() -> None:
            """Idempotent cleanup: runs from the generator and from the response, whichever gets
            the chance (Starlette may cancel a stream before its generator ever starts)."""
            if state["done"]:
                return
            state["done"] = True
            upstream.close()
            self._busy(replica, -1)
            usage = None
            if state["usage_line"] is not None:
                try:
                    usage = json.loads(state["usage_line"][6:]).get("usage")
                except ValueError:
                    usage = None
            if state["status"] == 200:
                replica.served += 1
            self._record(
                call,
                state["status"],
                attempt_id=attempt_id,
                retry_of=previous,
                replica=replica,
                usage=usage if isinstance(usage, dict) else None,
                engine_ms=(time.monotonic() - t0) * 1000,
                error_type=state["error_type"],
                first_output=state["first_output"],
            )
            release()

        async def relay() -> AsyncIterator[bytes]:
            buffer = b""
            try:
                async for chunk in upstream.content.iter_any():
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        # Usage rides in every chunk (continuous_usage_stats): keep the latest line and
                        # parse it once at the end, so a client that hangs up early is still billed.
                        if line.startswith(b"data: {") and b'"usage":{' in line.replace(b" ", b""):
                            state["usage_line"] = line
                    if state["first_output"] is None:
                        state["first_output"] = time.monotonic()
                    yield chunk
            except (asyncio.CancelledError, GeneratorExit):
                state["status"], state["error_type"] = 499, "ClientDisconnected"  # closing upstream aborts in vLLM
                raise
            except TimeoutError:
                state["status"], state["error_type"] = 504, "ReplicaFailed"
                raise
            except aiohttp.ClientError:
                state["status"], state["error_type"] = 502, "ReplicaFailed"
                self.registry.mark_dead(replica.info.replica_id)
                raise
            finally:
                finish()

        class _Relay(StreamingResponse):
            async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
                try:
                    await super().__call__(scope, receive, send)
                finally:
                    if not state["done"]:
                        state["status"], state["error_type"] = 499, "ClientDisconnected"
                    finish()

        return _Relay(relay(), media_type="text/event-stream", headers=self._provenance(call, replica))

    # -- validation of OpenAI bodies -------------------------------------------------------------

    def _validate_openai(self, body: dict[str, Any], chat: bool) -> dict[str, Any]:
        model = body.get("model", self.model_name)
        if model != self.model_name:
            raise ModelNotFound(f"unknown model {model!r}; this pool serves {self.model_name!r}")
        body["model"] = self.model_name
        for key in _REFUSED_FIELDS:
            if key in body:
                raise InvalidRequest(
                    f"{key!r} is not accepted here; send vectors to /v1/tpmflow/generate_embeds "
                    "(validated, by reference, never unpickled)"
                )
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise InvalidRequest("messages must be a non-empty list")
            for i, message in enumerate(messages):
                content = message.get("content") if isinstance(message, dict) else None
                parts = content if isinstance(content, list) else []
                if any(not isinstance(part, dict) or part.get("type") != "text" for part in parts):
                    raise InvalidRequest(f"message {i}: only text content parts are accepted", item=i)
        else:
            prompt = body.get("prompt")
            if prompt is None or (isinstance(prompt, (str, list)) and len(prompt) == 0):
                raise InvalidRequest("prompt must be a non-empty string or list")
            if isinstance(prompt, list) and any(isinstance(p, (str, list)) and len(p) == 0 for p in prompt):
                raise InvalidRequest("prompt list contains an empty prompt")
        limit = self.cfg.gateway.max_tokens_limit
        for key in ("max_tokens", "max_completion_tokens"):
            value = body.get(key)
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1 or value > limit:
                raise InvalidRequest(f"{key} must be an integer in [1, {limit}], got {value!r}")
        n = body.get("n", 1)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= self.cfg.gateway.max_n:
            raise InvalidRequest(f"n must be an integer in [1, {self.cfg.gateway.max_n}], got {n!r}")
        for key in _GATEWAY_OWNED:
            body.pop(key, None)
        if body.get("stream"):
            # Usage in every chunk: the ledger has token counts even when a client hangs up mid-stream.
            body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
        return body

    # -- the app ---------------------------------------------------------------------------------

    def _build_app(self) -> FastAPI:
        @asynccontextmanager
        async def lifespan(_: FastAPI) -> AsyncIterator[None]:
            sweeper = asyncio.get_running_loop().create_task(self._sweep_payloads())
            keeper = asyncio.get_running_loop().create_task(self._keep_reservations())
            watcher = asyncio.get_running_loop().create_task(self.uptime.watch())
            yield
            sweeper.cancel()
            keeper.cancel()
            watcher.cancel()
            if self._http is not None:
                await self._http.close()

        app = FastAPI(title="tpmflow gateway", docs_url="/docs", lifespan=lifespan)

        @app.exception_handler(TpmflowError)
        async def _typed(_: Request, exc: TpmflowError) -> JSONResponse:
            # Overloaded always, QuotaExceeded when a rate limit refused it (whole seconds, rounded up).
            retry_after = getattr(exc, "retry_after", None) if isinstance(exc, (Overloaded, QuotaExceeded)) else None
            headers = {"Retry-After": str(math.ceil(max(1.0, retry_after)))} if retry_after is not None else None
            return JSONResponse(exc.to_body(), status_code=exc.status_code, headers=headers)

        @app.get("/health")
        async def health() -> JSONResponse:
            live = self.registry.live()
            body = {
                "status": "ok" if live else "unavailable",
                "model": self.model_name,
                "replicas": [
                    {
                        "id": r.info.replica_id,
                        "group": r.info.group,
                        "inflight": r.inflight,
                        "served": r.served,
                        "running": r.info.running,
                        "waiting": r.info.waiting,
                    }
                    for r in live
                ],
            }
            return JSONResponse(body, status_code=200 if live else 503)

        @app.get("/metrics")
        async def metrics() -> Response:
            self.metrics.replicas_live.set(len(self.registry.live()))
            self.uptime.export()
            return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        @app.post("/internal/replicas/heartbeat")
        async def heartbeat(request: Request) -> JSONResponse:
            if request.headers.get("Authorization") != f"Bearer {self.secret}":
                raise Unauthorized("replicas authenticate with the pool secret")
            try:
                info = ReplicaInfo.model_validate(await request.json())
            except (ValidationError, ValueError) as exc:
                raise InvalidRequest(f"bad heartbeat: {exc}") from exc
            self.uptime.heartbeat(info)  # into the registry, noting a (re)join
            self.metrics.replica_running.labels(info.replica_id).set(info.running)
            self.metrics.replica_waiting.labels(info.replica_id).set(info.waiting)
            return JSONResponse({"ok": True})

        @app.get("/v1/models")
        async def models(request: Request) -> Response:
            call = await self._call(request, "models", None)
            async with self._admitted(call):
                return await self.forward(call, "GET", "/v1/models", None)

        async def openai(request: Request, path: str, endpoint: str, chat: bool) -> Response:
            call = await self._call(request, endpoint, "generate")
            try:
                body = self._validate_openai(await self._json_body(request, call), chat)
            except TpmflowError as exc:
                self._record(call, exc.status_code, error_type=type(exc).__name__)
                raise
            body["request_id"] = call.request_id
            body["cache_salt"] = call.principal.cache_salt
            body["priority"] = self._priority(call.principal)
            if body.get("stream"):
                cm = self._admitted(call, body)
                await cm.__aenter__()
                released = False

                def release() -> None:
                    nonlocal released
                    if not released:
                        released = True
                        asyncio.ensure_future(cm.__aexit__(None, None, None))

                try:
                    return await self.forward_stream(call, path, body, release)
                except BaseException:
                    release()
                    raise
            async with self._admitted(call, body):
                return await self.forward(call, "POST", path, body)

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            return await openai(request, "/v1/completions", "completions", chat=False)

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request) -> Response:
            return await openai(request, "/v1/chat/completions", "chat", chat=True)

        async def tpmflow_route(request: Request, name: str, permission: str) -> Response:
            call = await self._call(request, name, permission)
            try:
                body = await self._json_body(request, call)
            except TpmflowError as exc:
                self._record(call, exc.status_code, error_type=type(exc).__name__)
                raise
            async with self._admitted(call, body):
                return await self.forward(call, "POST", f"/v1/tpmflow/{name}", body)

        @app.post("/v1/tpmflow/embed")
        async def embed(request: Request) -> Response:
            return await tpmflow_route(request, "embed", "embed")

        @app.post("/v1/tpmflow/adapters/embed")
        async def adapter_embed(request: Request) -> Response:
            return await tpmflow_route(request, "adapters/embed", "embed")

        @app.post("/v1/tpmflow/adapters/predict")
        async def adapter_predict(request: Request) -> Response:
            return await tpmflow_route(request, "adapters/predict", "embed")

        @app.post("/v1/tpmflow/adapters/generate")
        async def adapter_generate(request: Request) -> Response:
            return await tpmflow_route(request, "adapters/generate", "generate")

        @app.post("/v1/tpmflow/generate_embeds")
        async def generate_embeds(request: Request) -> Response:
            return await tpmflow_route(request, "generate_embeds", "generate")

        @app.post("/v1/tpmflow/probe")
        async def probe(request: Request) -> Response:
            return await tpmflow_route(request, "probe", "probe")

        @app.post("/v1/tpmflow/digest")
        async def digest(request: Request) -> Response:
            return await tpmflow_route(request, "digest", "embed")

        @app.get("/v1/tpmflow/store")
        async def store_info(request: Request) -> JSONResponse:
            principal = await self._authorise(request, None)
            c = self.store.config
            where = (
                {"path": str(c.root())}
                if c.connector == "file"
                else {"redis_host": c.redis_host, "redis_port": c.redis_port}
            )
            return JSONResponse(
                {
                    "principal": principal.name,
                    "project": principal.project,
                    "permissions": sorted(principal.permissions),
                    "connector": c.connector,
                    **where,
                    "inline_limit_bytes": c.inline_limit_bytes,
                    "max_payload_bytes": c.max_payload_bytes,
                    "ttl_s": c.ttl_s,
                }
            )

        @app.post("/v1/tpmflow/payloads/sign")
        async def sign(request: Request) -> JSONResponse:
            principal = await self._authorise(request, None)
            try:
                req = SignRequest.model_validate(await self._json_body(request))
            except ValidationError as exc:
                raise InvalidRequest(f"bad sign request: {exc.errors()[0]['msg']}") from exc
            if req.nbytes > self.store.config.max_payload_bytes:
                raise PayloadTooLarge(f"payload of {req.nbytes} bytes exceeds {self.store.config.max_payload_bytes}")
            ref = Reference(
                connector=self.store.config.connector,
                key=req.key,
                principal=principal.name,
                kind=req.kind,
                nbytes=req.nbytes,
                digest=req.digest,
                expires=time.time() + self.store.config.ttl_s,
            )
            size = await asyncio.to_thread(self.store.size, ref)
            if size is None:
                raise InvalidRequest(f"no payload {req.key!r} in {principal.name}'s store folder")
            if size != req.nbytes:
                raise InvalidRequest(f"payload {req.key!r} holds {size} bytes, not the {req.nbytes} declared")
            await asyncio.to_thread(
                self.access.register_payload,
                ref.key,
                principal.name,
                ref.nbytes,
                ref.expires,
                self.store.config.principal_quota_bytes,
            )
            return JSONResponse(self.signer.sign(ref).model_dump())

        @app.get("/v1/tpmflow/usage")
        async def usage(request: Request, by: str = "principal") -> JSONResponse:
            principal = await self._authorise(request, None)
            if by not in ("principal", "project"):
                raise InvalidRequest("by must be 'principal' or 'project'")
            await asyncio.to_thread(self.ledger.flush)
            mine = None if principal.can("admin") else principal.name
            rows = await asyncio.to_thread(self.access.usage, by, mine, charges=True)
            return JSONResponse({"usage": rows})

        return app
