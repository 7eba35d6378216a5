"""A client given several gateways of one pool fails over: a gateway that refuses connections, or
one that dies with the request in flight (the connection dropped without an answer), sends the
request to the next with the same request id. Fast: the gateways here are real HTTP servers on
127.0.0.1 that answer a health check and a model list (the pool's own gateways: issue 16)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tpmflow import AsyncClient, Client
from tpmflow.errors import ReplicaFailed


def _dead_url() -> str:
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


class _Gateway(BaseHTTPRequestHandler):
    drop = False  # like a gateway killed mid-request: read it, close without an answer
    seen: list[tuple[str, str]]

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.seen.append((self.path, self.headers.get("X-Request-Id", "")))
        if self.drop:
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if self.path == "/health":
            body: dict = {"status": "ok"}
        elif self.path == "/v1/completions":
            usage = {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
            body = {"choices": [{"text": "CO", "index": 0, "finish_reason": "length"}], "usage": usage}
        else:
            body = {"data": [{"id": "tiny"}]}
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.do_GET()

    def log_message(self, *args: object) -> None:
        pass


def _serve(drop: bool) -> tuple[str, list[tuple[str, str]], ThreadingHTTPServer]:
    seen: list[tuple[str, str]] = []
    handler = type("Handler", (_Gateway,), {"drop": drop, "seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", seen, server


@pytest.fixture
def gateways() -> Iterator[dict[str, tuple[str, list[tuple[str, str]]]]]:
    live, live_seen, a = _serve(drop=False)
    dying, dying_seen, b = _serve(drop=True)
    yield {"live": (live, live_seen), "dying": (dying, dying_seen)}
    a.shutdown(), b.shutdown()


def test_an_unreachable_gateway_is_failed_over(gateways: dict) -> None:
    live, seen = gateways["live"]
    with Client([_dead_url(), live], retries=0) as client:
        assert client.models() == ["tiny"]
        assert client.url == live, "later calls go straight to the gateway that answered"
        assert client.health()["status"] == "ok"
    assert len(seen) == 2


def test_a_gateway_dying_mid_request_sends_it_to_the_next_with_the_same_request_id(gateways: dict) -> None:
    (dying, dropped), (live, served) = gateways["dying"], gateways["live"]
    with Client([dying, live], retries=0) as client:
        assert client.models() == ["tiny"]
    assert len(dropped) == 1 and len(served) == 1
    assert dropped[0][1] == served[0][1], "the same request id: the ledger sees two attempts of one request"


def test_a_post_its_gateway_dropped_goes_to_the_next_gateway_once(gateways: dict) -> None:
    """A generation whose gateway died mid-request is sent to the next gateway with the same request
    id (the dead gateway never charged it); with one gateway it is raised, never sent twice there."""
    (dying, dropped), (live, served) = gateways["dying"], gateways["live"]
    with Client([dying, live], retries=0) as client:
        assert client.generate("CCO", max_tokens=2).text == "CO"
    assert len(dropped) == 1 and len(served) == 1 and dropped[0][1] == served[0][1]
    dropped.clear()
    with Client([dying], retries=0) as client, pytest.raises(ReplicaFailed, match=dying):
        client.generate("CCO", max_tokens=2)
    assert len(dropped) == 1


def test_concurrent_requests_each_try_every_gateway(gateways: dict) -> None:
    """A request fails over from the gateway it tried, not from one another request moved to."""
    from concurrent.futures import ThreadPoolExecutor

    live, _ = gateways["live"]
    with Client([_dead_url(), _dead_url(), live, live + "/"], retries=0) as client:
        assert len(client.urls) == 3, "the same gateway given twice is tried once"
        with ThreadPoolExecutor(8) as threads:
            answers = list(threads.map(lambda _: client.models(), range(16)))
    assert answers == [["tiny"]] * 16


def test_the_async_client_fails_over_too(gateways: dict) -> None:
    live, _ = gateways["live"]

    async def main() -> list[str]:
        async with AsyncClient([_dead_url(), live], retries=0) as client:
            return await client.models()

    assert asyncio.run(main()) == ["tiny"]


def test_every_gateway_gone_is_one_clear_error_naming_the_last(gateways: dict) -> None:
    first, second = _dead_url(), _dead_url()
    with Client([first, second], retries=0) as client, pytest.raises(ReplicaFailed, match="cannot reach the pool"):
        client.models()
    with pytest.raises(ValueError, match="at least one gateway"):
        Client([])


@pytest.mark.engine
def test_a_real_pool_behind_a_dead_gateway_answers_through_the_live_one(pool: object) -> None:
    with Client([_dead_url(), pool.url], pool.token) as client:  # type: ignore[attr-defined]
        gen = client.generate("CCO", max_tokens=2, temperature=0.0)
    assert gen.usage["completion_tokens"] == 2 and client.url == pool.url  # type: ignore[attr-defined]
