"""Forwarding: pick the least-loaded live replica, send, retry a dropped connection on another,
relay the answer (JSON whole, Server-Sent Events chunk by chunk) with provenance headers."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
from starlette.responses import JSONResponse, Response, StreamingResponse

from tpmflow.access import AccessDB, Principal
from tpmflow.config import PoolConfig
from tpmflow.errors import ERROR_CLASSES, ReplicaFailed, TpmflowError, type_for_status
from tpmflow.gateway.admission import Admission
from tpmflow.gateway.billing import Billing, served_version
from tpmflow.gateway.call import Attempts, Call
from tpmflow.gateway.metrics import GatewayMetrics
from tpmflow.pool.registry import ReplicaRegistry, ReplicaState, lora_for
from tpmflow.protocol import Headers

log = logging.getLogger("tpmflow.gateway")


GENERIC_FAILURE = (
    "the replica failed while serving this request; it is still up, so retry, or give the facility the "
    "X-Tpmflow-Request-Id of this answer"
)


def typed_error(payload: Any, status: int) -> dict[str, Any]:
    """The one error envelope every client gets, ``{"error": {"type", "message", "item"?, "param"?}}``:
    vLLM's own bodies (``BadRequestError``…, with ``code`` and ``param``) become tpmflow's classes
    with their message; a server-side failure's text (an exception, "see the stack trace above")
    is replaced by one written for the user."""
    err = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(err, dict):  # older vLLM: {"object": "error", "message", "type", "code"}
        err = payload if isinstance(payload, dict) and "message" in payload else {}
    kind = err.get("type")
    message = err.get("message")
    if kind not in ERROR_CLASSES:
        kind = type_for_status(status)
        if status >= 500:  # not one of tpmflow's own messages: nothing in it is for the client
            message = GENERIC_FAILURE
    out: dict[str, Any] = {"type": kind, "message": message if isinstance(message, str) and message else kind}
    for key in ("item", "param"):
        if err.get(key) is not None:
            out[key] = err[key]
    return {"error": out}


class Sent:
    """An attempt whose response headers arrived: the response, its replica and its ledger ids."""

    __slots__ = ("resp", "replica", "attempt_id", "previous", "t0")

    def __init__(
        self, resp: aiohttp.ClientResponse, replica: ReplicaState, attempt_id: str, previous: str | None, t0: float
    ) -> None:
        self.resp, self.replica, self.attempt_id, self.previous, self.t0 = resp, replica, attempt_id, previous, t0


class Forwarder:
    """Sends calls to replicas over one pooled HTTP session."""

    def __init__(
        self,
        cfg: PoolConfig,
        registry: ReplicaRegistry,
        metrics: GatewayMetrics,
        billing: Billing,
        admission: Admission,
        access: AccessDB,
        secret: str,
    ) -> None:
        self.cfg = cfg
        self.registry = registry
        self.metrics = metrics
        self.billing = billing
        self.admission = admission
        self.access = access
        self.secret = secret
        self.model_name = cfg.model_name()
        self._http: aiohttp.ClientSession | None = None
        self._inflight_gauges: dict[str, Any] = {}

    @property
    def http(self) -> aiohttp.ClientSession:
        # aiohttp, not httpx, on this hot path: it costs the gateway several times less CPU per
        # forwarded request, and on a small node every cycle the gateway uses the engine loses.
        if self._http is None:
            # Keep-alive below uvicorn's 5 s, so a pooled connection is never one the replica closed.
            connector = aiohttp.TCPConnector(limit=self.cfg.gateway.max_inflight * 2, keepalive_timeout=3)
            self._http = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    # -- headers ---------------------------------------------------------------------------------

    def _headers(self, call: Call) -> dict[str, str]:
        return {
            Headers.AUTHORIZATION: f"Bearer {self.secret}",
            Headers.PRINCIPAL: call.principal.name,
            Headers.PRIORITY: str(self.admission.priority(call.principal)),
            Headers.SALT: call.principal.cache_salt,
            Headers.REQUEST_ID: call.request_id,
            "Content-Type": "application/json",
        }

    def provenance(self, call: Call, sent: Sent) -> dict[str, str]:
        """Provenance of every answer, in headers, so vLLM's own OpenAI bodies stay untouched."""
        replica = sent.replica
        return {
            Headers.REQUEST_ID: call.request_id,
            Headers.ATTEMPT_ID: sent.attempt_id,  # the answering attempt's ledger row
            Headers.MODEL: replica.info.model if replica.info.task == "embed" else self.model_name,
            Headers.CONTENT_HASH: served_version(call, replica),
            Headers.REPLICA: replica.info.replica_id,
            Headers.ENGINE: replica.info.engine,
        }

    # -- replica bookkeeping ---------------------------------------------------------------------

    def _busy(self, replica: ReplicaState, delta: int) -> None:
        replica.inflight += delta
        rid = replica.info.replica_id
        gauge = self._inflight_gauges.get(rid)
        if gauge is None:
            gauge = self._inflight_gauges[rid] = self.metrics.replica_inflight.labels(rid)
        gauge.set(replica.inflight)

    def _dropped(self, call: Call, sent: Sent, attempts: Attempts, exc: Exception) -> None:
        replica = sent.replica
        log.warning("replica %s failed (%s); leaving rotation", replica.info.replica_id, exc)
        self.registry.mark_dead(replica.info.replica_id)
        self.metrics.replica_failures.labels(replica.info.replica_id).inc()
        self.billing.record(
            call, 502, attempt_id=sent.attempt_id, retry_of=sent.previous, replica=replica, error_type="ReplicaFailed"
        )
        attempts.failed(sent.attempt_id)

    def _timed_out(self, call: Call, sent: Sent, exc: Exception) -> ReplicaFailed:
        self.billing.record(
            call,
            504,
            attempt_id=sent.attempt_id,
            retry_of=sent.previous,
            replica=sent.replica,
            error_type="ReplicaFailed",
        )
        failed = ReplicaFailed(f"replica {sent.replica.info.replica_id} did not answer within the timeout")
        failed.__cause__ = exc
        return failed

    # -- sending ---------------------------------------------------------------------------------

    async def _send(
        self,
        call: Call,
        method: str,
        path: str,
        data: bytes | None,
        body: dict[str, Any] | None,
        deadline: float,
        attempts: Attempts,
        stream: bool = False,
    ) -> Sent:
        """Open a response from the least-loaded live replica. A dropped connection takes that replica
        out of the rotation and retries on another (same request id; the failed attempt gets its own
        ledger row and the next one ``retry_of`` it) until the deadline, then ``ReplicaFailed``.

        The replica counts as busy from the moment the request is sent (vLLM answers headers only
        when it is done), so least-loaded routing sees work in progress; the caller un-busies it.
        """
        headers = self._headers(call)
        group = self.admission.group(call)
        # A stream may outlive the request timeout while tokens keep coming; a silence as long as
        # the timeout ends it.
        stream_timeout = aiohttp.ClientTimeout(sock_connect=10, sock_read=self.cfg.gateway.request_timeout_s)
        while True:
            attempt_id = Attempts.new_id()
            try:
                replica = await self.registry.wait_pick(
                    deadline, attempts.tried, call.version, group, self.cfg.gateway.replica_wait_s
                )
            except TpmflowError as exc:  # no replica (Overloaded, ReplicaFailed) or no such version
                self.billing.record(
                    call,
                    exc.status_code,
                    attempt_id=attempt_id,
                    retry_of=attempts.previous,
                    error_type=type(exc).__name__,
                )
                raise
            headers[Headers.ATTEMPT_ID] = attempt_id
            headers[Headers.REQUEST_ID] = attempt_id  # vLLM takes its request id from this header first
            payload, lora = data, lora_for(replica, call.version)
            if lora is not None:  # a LoRA version: vLLM's OpenAI routes pick adapters by model name
                headers[Headers.LORA] = lora
            else:
                headers.pop(Headers.LORA, None)
            if payload is None and body is not None:  # an OpenAI body: vLLM's request id is the attempt's
                payload = orjson.dumps({**body, "request_id": attempt_id, **({"model": lora} if lora else {})})
            sent = Sent(None, replica, attempt_id, attempts.previous, 0.0)  # type: ignore[arg-type]
            attempts.tried.add(replica.info.replica_id)
            self.billing.opened(call, attempt_id, attempts.previous, replica)
            sent.t0 = time.monotonic()
            self._busy(replica, +1)
            try:
                sent.resp = await self.http.request(
                    method,
                    replica.info.url + path,
                    data=payload,
                    headers=headers,
                    timeout=stream_timeout if stream else aiohttp.ClientTimeout(total=max(0.1, deadline - sent.t0)),
                )
            except TimeoutError as exc:
                self._busy(replica, -1)
                raise self._timed_out(call, sent, exc) from exc
            except aiohttp.ClientError as exc:
                self._busy(replica, -1)
                self._dropped(call, sent, attempts, exc)
                continue
            except BaseException:  # cancelled (the client left, or shutdown): the attempt ends here
                self._busy(replica, -1)
                self.billing.record(
                    call,
                    499,
                    attempt_id=attempt_id,
                    retry_of=sent.previous,
                    replica=replica,
                    error_type="ClientDisconnected",
                )
                raise
            return sent

    async def forward(
        self, call: Call, method: str, path: str, data: bytes | None, body: dict[str, Any] | None = None
    ) -> Response:
        """Forward ``data`` (the JSON body's bytes; ``body`` its parse, needed only to rename the
        model for a LoRA version) and relay the replica's JSON answer, its bytes untouched."""
        deadline = call.started + self.cfg.gateway.request_timeout_s
        attempts = Attempts()
        while True:
            sent = await self._send(call, method, path, data, body, deadline, attempts)
            try:
                raw = await sent.resp.read()
            except TimeoutError as exc:
                raise self._timed_out(call, sent, exc) from exc
            except aiohttp.ClientError as exc:
                # The replica died mid-answer: nothing reached the caller yet, so retry elsewhere.
                self._dropped(call, sent, attempts, exc)
                continue
            finally:
                sent.resp.release()
                self._busy(sent.replica, -1)
            sent.replica.served += 1
            break
        engine_ms = (time.monotonic() - sent.t0) * 1000
        status = sent.resp.status
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError:
            payload = None
        if not isinstance(payload, dict):  # not JSON (a proxy's or a crashed server's page)
            payload = {"error": {"type": "ReplicaFailed", "message": GENERIC_FAILURE}}
            raw = orjson.dumps(payload)
            status = 502 if status < 400 else status  # never an answered 200
        error_type = None
        if status >= 400:
            payload = typed_error(payload, status)
            error_type = payload["error"]["type"]
            raw = orjson.dumps(payload)
        usage = payload.get("usage")
        if status == 200 and isinstance(usage, dict) and usage.get("payload_bytes_out"):
            try:
                await asyncio.to_thread(self._track_outputs, call.principal, payload)
            except Exception:  # noqa: BLE001 - their lifetime goes untracked; the answer still counts
                log.exception("registering the payloads of %s failed", sent.attempt_id)
        self.billing.record(
            call,
            status,
            attempt_id=sent.attempt_id,
            retry_of=sent.previous,
            replica=sent.replica,
            usage=usage if isinstance(usage, dict) else None,
            engine_ms=engine_ms,
            error_type=error_type,
        )
        return Response(raw, status_code=status, media_type="application/json", headers=self.provenance(call, sent))

    def _track_outputs(self, principal: Principal, payload: dict[str, Any]) -> None:
        """Payloads a replica wrote for this principal expire like the ones it sent."""
        for item in payload.get("data") or []:
            emb = item.get("embedding") if isinstance(item, dict) else None
            if isinstance(emb, dict) and emb.get("sig"):
                self.access.register_payload(
                    emb["key"], principal.name, int(emb["nbytes"]), float(emb["expires"]), None
                )

    async def forward_stream(
        self, call: Call, path: str, data: bytes | None, body: dict[str, Any], release: Callable[[], None]
    ) -> Response:
        """Stream Server-Sent Events through; retry only before the first byte."""
        deadline = call.started + self.cfg.gateway.request_timeout_s
        sent = await self._send(call, "POST", path, data, body, deadline, Attempts(), stream=True)
        upstream, replica = sent.resp, sent.replica
        if upstream.status != 200:
            try:
                raw = await upstream.read()
            finally:
                upstream.release()
                self._busy(replica, -1)
            try:
                payload = typed_error(orjson.loads(raw), upstream.status)
            except orjson.JSONDecodeError:
                payload = {"error": {"type": "ReplicaFailed", "message": GENERIC_FAILURE}}
            err = payload["error"]
            self.billing.record(
                call,
                upstream.status,
                attempt_id=sent.attempt_id,
                retry_of=sent.previous,
                replica=replica,
                error_type=str(err.get("type")) if isinstance(err, dict) else "Error",
            )
            release()
            return JSONResponse(payload, status_code=upstream.status, headers=self.provenance(call, sent))
        relay = _Relay(self, call, sent, release)
        return _RelayResponse(relay, media_type="text/event-stream", headers=self.provenance(call, sent))


class _Relay:
    """One stream's relay state: chunks pass through; the latest usage line is kept (usage rides in
    every chunk with continuous_usage_stats) and parsed once at the end, so a client that hangs up
    early is still billed for what it received."""

    def __init__(self, fwd: Forwarder, call: Call, sent: Sent, release: Callable[[], None]) -> None:
        self.fwd, self.call, self.sent, self.release = fwd, call, sent, release
        self.status = 200
        self.error_type: str | None = None
        self.usage_line: bytes | None = None
        self.done = False
        self.first_output: float | None = None  # when the first chunk went out: its time to first token
        self.answered = False  # the replica's closing "[DONE]" went to the client

    def hung_up(self) -> None:
        """The client went away: a hang-up (499) unless it already had the whole answer."""
        if not self.answered:
            self.status, self.error_type = 499, "ClientDisconnected"

    async def chunks(self) -> AsyncIterator[bytes]:
        buffer = b""
        try:
            async for chunk in self.sent.resp.content.iter_any():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.startswith(b"data: {") and b'"usage":{' in line.replace(b" ", b""):
                        self.usage_line = line
                    elif line.rstrip() == b"data: [DONE]":
                        self.answered = True  # a client closing after this has its whole answer
                if self.first_output is None:
                    self.first_output = time.monotonic()
                yield chunk
        except (asyncio.CancelledError, GeneratorExit):
            self.hung_up()  # closing upstream aborts the request in vLLM
            raise
        except TimeoutError:
            self.status, self.error_type = 504, "ReplicaFailed"
            raise
        except aiohttp.ClientError:
            self.status, self.error_type = 502, "ReplicaFailed"
            self.fwd.registry.mark_dead(self.sent.replica.info.replica_id)
            raise
        finally:
            self.finish()

    def finish(self) -> None:
        """Idempotent cleanup: runs from the generator and from the response, whichever gets the
        chance (Starlette may cancel a stream before its generator ever starts)."""
        if self.done:
            return
        self.done = True
        sent = self.sent
        sent.resp.close()
        self.fwd._busy(sent.replica, -1)
        usage = None
        if self.usage_line is not None:
            try:
                usage = orjson.loads(self.usage_line[6:]).get("usage")
            except orjson.JSONDecodeError:
                usage = None
        if self.status == 200:
            sent.replica.served += 1
        self.fwd.billing.record(
            self.call,
            self.status,
            attempt_id=sent.attempt_id,
            retry_of=sent.previous,
            replica=sent.replica,
            usage=usage if isinstance(usage, dict) else None,
            engine_ms=(time.monotonic() - sent.t0) * 1000,
            error_type=self.error_type,
            first_output=self.first_output,
        )
        self.release()


class _RelayResponse(StreamingResponse):
    def __init__(self, relay: _Relay, **kwargs: Any) -> None:
        super().__init__(relay.chunks(), **kwargs)
        self.relay = relay

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self.relay.done:
                self.relay.hung_up()
            self.relay.finish()
