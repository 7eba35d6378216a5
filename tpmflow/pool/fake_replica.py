"""A stand-in replica: answers the gateway like vLLM's OpenAI server + tpmflow's routes would,
instantly or with scripted delays and failures, and heartbeats like a real one.

For the gateway's fast tests and for ``bench/gateway.py``: routing, admission, billing, failover
and the gateway's own cost per request, measured without an engine. It never replaces the
real-vLLM tests; it runs beside them. A facility can also load-test a gateway with it before any
accelerator is allocated.

    with FakeReplica(gateway_url=url, secret=secret) as fake:
        fake.script.append(Fault(status=500))      # the next request fails
        fake.delay_s = 0.05                        # then every answer takes 50 ms
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson

from tpmflow.protocol import Headers, Routes
from tpmflow.schema import ReplicaInfo

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


@dataclass
class Fault:
    """What the next request gets instead of an answer: an HTTP ``status`` with a vLLM-style
    error body, a dropped connection (``drop``), or an answer after ``delay_s``."""

    status: int | None = None
    drop: bool = False
    delay_s: float = 0.0
    message: str = "scripted failure"


@dataclass
class Seen:
    """One request as the fake replica received it (tests assert on what the gateway sent)."""

    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class FakeReplica:
    """A replica server on a thread of this process (its own event loop), real HTTP on ``host``."""

    gateway_url: str = ""
    secret: str = ""
    replica_id: str = "fake-0"
    group: str = "default"
    model: str = "fake-model"
    content_hash: str = "blake3:" + "f" * 64
    host: str = "127.0.0.1"
    port: int = 0
    delay_s: float = 0.0  # every answer waits this long (a stand-in for engine time)
    # While set and not open, answers wait for it (a plain answer before it is sent, a stream after
    # its first chunk): a test decides when work "finishes", so its checks never race the clock.
    gate: threading.Event | None = None
    stream_chunks: int = 4  # SSE chunks per streamed completion
    linger_s: float = 0.0  # how long a stream stays open after its "[DONE]"
    heartbeat_s: float = 0.5
    record: bool = True  # keep what each request carried in ``seen`` (off for benchmarks)
    script: deque[Fault] = field(default_factory=deque)  # consumed one per request, in order
    seen: list[Seen] = field(default_factory=list)
    served: int = 0

    def __post_init__(self) -> None:
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._heartbeats: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def info(self) -> ReplicaInfo:
        return ReplicaInfo(
            replica_id=self.replica_id,
            url=self.url,
            model=self.model,
            content_hash=self.content_hash,
            engine="fake",
            hidden_size=8,
            max_model_len=1024,
            group=self.group,
        )

    def start(self) -> FakeReplica:
        import uvicorn

        if not self.port:
            with socket.socket() as s:
                s.bind((self.host, 0))
                self.port = s.getsockname()[1]
        config = uvicorn.Config(
            self,
            host=self.host,
            port=self.port,
            log_level="warning",
            access_log=False,
            lifespan="on",
            timeout_keep_alive=60,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name=f"fake-{self.replica_id}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError(f"fake replica did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> FakeReplica:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- ASGI ------------------------------------------------------------------------------------

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        headers = {k.decode().lower(): v.decode() for k, v in scope.get("headers", [])}
        if path == Routes.HEALTH:
            await _respond(send, 200, b"{}")
            return
        if self.secret and headers.get("authorization") != f"Bearer {self.secret}":
            await _respond(send, 401, b'{"error":{"type":"Unauthorized","message":"replicas answer the gateway only"}}')
            return
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        body = orjson.loads(raw) if raw else None
        if self.record:
            self.seen.append(Seen(path, headers, body))
        fault = self.script.popleft() if self.script else None
        delay = fault.delay_s if fault and fault.delay_s else self.delay_s
        if delay:
            await asyncio.sleep(delay)
        if fault is not None and fault.drop:
            # Headers promising a body, then an error: uvicorn aborts the connection mid-answer, as
            # a replica whose process died would leave it.
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")],
                }
            )
            raise ConnectionAbortedError("scripted drop")
        if fault is not None and fault.status is not None:
            error = {
                "error": {"message": fault.message, "type": "BadRequestError", "param": None, "code": fault.status}
            }
            await _respond(send, fault.status, orjson.dumps(error))
            return
        self.served += 1
        if isinstance(body, dict) and body.get("stream"):
            await self._stream(send, body)
            return
        await self._gated()
        await _respond(send, 200, orjson.dumps(self._answer(path, body)))

    async def _gated(self) -> None:
        while self.gate is not None and not self.gate.is_set():
            await asyncio.sleep(0.01)

    def _answer(self, path: str, body: Any) -> dict[str, Any]:
        body = body if isinstance(body, dict) else {}
        if path == Routes.MODELS:
            return {"object": "list", "data": [{"id": self.model, "object": "model"}]}
        tokens = int(body.get("max_tokens") or 16)
        usage = {"prompt_tokens": 4, "completion_tokens": tokens, "total_tokens": 4 + tokens}
        if path == Routes.COMPLETIONS:
            choice = {"index": 0, "text": " x" * tokens, "finish_reason": "length", "token_ids": None}
            return {
                "id": "cmpl-fake",
                "object": "text_completion",
                "model": self.model,
                "choices": [choice],
                "usage": usage,
            }
        if path == Routes.CHAT:
            message = {"role": "assistant", "content": " x" * tokens}
            return {
                "id": "chat-fake",
                "object": "chat.completion",
                "model": self.model,
                "choices": [{"index": 0, "message": message, "finish_reason": "length"}],
                "usage": usage,
            }
        return {"data": [], "usage": {"prompt_tokens": 4, "completion_tokens": 0}, "provenance": {}}

    async def _stream(self, send: Send, body: dict[str, Any]) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
        for i in range(self.stream_chunks):
            usage = {"prompt_tokens": 4, "completion_tokens": i + 1, "total_tokens": 5 + i}
            chunk = {"id": "cmpl-fake", "choices": [{"index": 0, "text": " x", "finish_reason": None}], "usage": usage}
            await send(
                {"type": "http.response.body", "body": b"data: " + orjson.dumps(chunk) + b"\n\n", "more_body": True}
            )
            if i == 0:
                await self._gated()
            if self.delay_s:
                await asyncio.sleep(self.delay_s / self.stream_chunks)
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": bool(self.linger_s)})
        if self.linger_s:  # the stream's end arrives late: a client may close first, answer in hand
            await asyncio.sleep(self.linger_s)
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if self.gateway_url:
                    self._heartbeats = asyncio.get_running_loop().create_task(self._heartbeat())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._heartbeats is not None:
                    self._heartbeats.cancel()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _heartbeat(self) -> None:
        import httpx

        from tpmflow.protocol import gateway_urls

        headers = {Headers.AUTHORIZATION: f"Bearer {self.secret}", "Content-Type": "application/json"}
        async with httpx.AsyncClient(timeout=5.0) as http:

            async def beat_forever(gateway: str) -> None:
                while True:  # one loop per gateway, like a real replica: a dead one delays no other
                    try:
                        await http.post(
                            gateway + Routes.HEARTBEAT, content=self.info().model_dump_json(), headers=headers
                        )
                    except httpx.HTTPError:
                        pass  # the gateway may not be up yet, or restarting: keep trying like a real replica
                    await asyncio.sleep(self.heartbeat_s)

            await asyncio.gather(*(beat_forever(g) for g in gateway_urls(self.gateway_url)))


async def _respond(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


if __name__ == "__main__":  # a fake replica for a gateway started elsewhere: env as a real replica's
    from tpmflow.protocol import ReplicaSettings

    settings = ReplicaSettings.from_env()
    FakeReplica(
        gateway_url=settings.gateway_url,
        secret=settings.pool_secret,
        replica_id=settings.replica_id,
        port=int(os.environ.get("PORT", "0")),
        record=False,
    ).start()
    threading.Event().wait()


@contextmanager
def holding(replicas: list[FakeReplica]) -> Iterator[threading.Event]:
    """Every replica of ``replicas`` holds its answers (a stream after its first chunk) until the
    event is set: the test decides when work finishes. Set, and the replicas freed, on leaving."""
    gate = threading.Event()
    for fake in replicas:
        fake.gate = gate
    try:
        yield gate
    finally:
        gate.set()
        for fake in replicas:
            fake.gate = None
