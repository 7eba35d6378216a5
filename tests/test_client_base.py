"""The client without an engine: a small real HTTP server on 127.0.0.1 answers scripted responses,
so retries, error mapping and payload decisions run in milliseconds, and ``Client`` and
``AsyncClient`` are held to the same requests and the same results."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import numpy as np
import pytest

import tpmflow
from tpmflow.client import AsyncClient, Client, LazyArray, error_from_response
from tpmflow.errors import (
    AdapterInputError,
    InvalidRequest,
    Overloaded,
    QuotaExceeded,
    ReplicaFailed,
    TpmflowError,
    Unauthorized,
)
from tpmflow.payload import PayloadStore, Reference, StoreConfig
from tpmflow.protocol import Headers, Routes
from tpmflow.schema import Add, Capture, InlineArray, LogitLens, Replace, Zero

INLINE_LIMIT = 1 << 20
PROVENANCE = {Headers.MODEL: "tiny", Headers.CONTENT_HASH: "blake3:00", Headers.REPLICA: "r0", Headers.ENGINE: "fake"}
Answer = tuple[int, Any, dict[str, str]]


class ScriptedPool:
    """A pool stand-in: answers queued per path first (``script``), then a default per route;
    records every request as it arrived."""

    def __init__(self, store_dir: Path) -> None:
        self.store_dir = store_dir
        self.store = PayloadStore(StoreConfig(path=str(store_dir)))
        self.requests: list[dict[str, Any]] = []
        self._queued: dict[str, list[Answer]] = defaultdict(list)
        self._lock = threading.Lock()
        pool = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the gateway's server does

            def do_GET(self) -> None:
                self._serve()

            def do_POST(self) -> None:
                self._serve()

            def _serve(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                url = urlsplit(self.path)
                request = {
                    "method": self.command,
                    "path": url.path,
                    "query": dict(parse_qsl(url.query)),
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": json.loads(raw) if raw else None,
                }
                status, body, headers = pool.answer(request)
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if not isinstance(body, str) else "text/plain")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def script(self, path: str, *answers: Answer) -> None:
        with self._lock:
            self._queued[path].extend(answers)

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self._queued.clear()

    def answer(self, request: dict[str, Any]) -> Answer:
        with self._lock:
            self.requests.append(request)
            queued = self._queued.get(request["path"])
            if queued:
                return queued.pop(0)
        route: Callable[[Any], Any] | None = getattr(
            self, "_route_" + request["path"].strip("/").replace("/", "_"), None
        )
        return 200, route(request["body"]) if route else {}, dict(PROVENANCE)

    # -- default answers, one per route, shaped like the gateway's ------------------------------

    def _route_health(self, body: Any) -> Any:
        return {"status": "ok", "replicas": []}

    def _route_v1_models(self, body: Any) -> Any:
        return {"data": [{"id": "tiny"}]}

    def _route_v1_tpmflow_usage(self, body: Any) -> Any:
        return {"usage": [{"principal": "alice", "requests": 3}]}

    def _route_v1_tpmflow_store(self, body: Any) -> Any:
        return {
            "connector": "file",
            "path": str(self.store_dir),
            "inline_limit_bytes": INLINE_LIMIT,
            "max_payload_bytes": 64 << 20,
            "principal": "alice",
        }

    def _route_v1_tpmflow_payloads_sign(self, body: Any) -> Any:
        return {**body, "connector": "file", "principal": "alice", "expires": 4e9, "sig": "signed"}

    def _route_v1_completions(self, body: Any) -> Any:
        prompts = [body["prompt"]] if isinstance(body["prompt"], str) else body["prompt"]
        choices = [{"index": i, "text": p[::-1], "finish_reason": "length"} for i, p in enumerate(prompts)]
        return {"choices": choices[::-1], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}

    def _route_v1_tpmflow_generate_embeds(self, body: Any) -> Any:
        n = len(body["prompt_embeds"].get("shape", [0]))
        return {"text": f"from {n}-d vectors", "finish_reason": "stop", "usage": {"prompt_tokens": 2}}

    def _route_v1_tpmflow_embed(self, body: Any) -> Any:
        data = [
            {"index": i, "embedding": InlineArray.from_numpy(np.full(4, i, np.float32)).model_dump(), "n_tokens": i + 1}
            for i in range(len(body["input"]))
        ]
        return {"data": data, "usage": {"prompt_tokens": len(data)}, "provenance": {"replica_id": "r0"}}

    def _route_v1_tpmflow_adapters_embed(self, body: Any) -> Any:
        data = []
        for i, item in enumerate(body["items"]):
            if item == "bad":
                data.append({"index": i, "error": {"message": "not a molecule"}})
            else:
                data.append({"index": i, "embedding": InlineArray.from_numpy(np.ones(4, np.float32)).model_dump()})
        return {"data": data}

    def _route_v1_tpmflow_adapters_generate(self, body: Any) -> Any:
        data = []
        for i, item in enumerate(body["items"]):
            if item == "bad":
                data.append({"index": i, "error": {"message": "not a prefix"}})
            else:
                outputs = [{"text": f"{item}C{k}", "value": f"{item}C", "reason": None} for k in range(body["n"])]
                data.append({"index": i, "outputs": outputs})
        return {"data": data[::-1]}

    def _route_v1_tpmflow_adapters_predict(self, body: Any) -> Any:
        data = [{"index": i, "value": float(i) / 2} for i in range(len(body["items"]))]
        return {"data": data, "head": {"name": body["head"]}}

    def _route_v1_tpmflow_probe(self, body: Any) -> Any:
        small = np.arange(6, dtype=np.float32).reshape(2, 3)
        big = np.arange(2 * 600, dtype=np.float32).reshape(2, 600)
        ref = self.store.put("alice", big).model_copy(update={"sig": "signed"})
        captures = [
            {
                "site": "hook_resid_post",
                "layer": 0,
                "positions": [0, 1],
                "array": InlineArray.from_numpy(small).model_dump(),
            },
            {"site": "hook_resid_post", "layer": 1, "positions": [0, 1], "array": ref.model_dump()},
        ]
        lens = [{"layer": 0, "positions": [0, 1], "tokens": [["a", "b"], ["c", "d"]]}]
        return {"text": "out", "prompt_tokens": ["C", "O"], "captures": captures, "lens": lens, "usage": {}}

    def _route_v1_tpmflow_digest(self, body: Any) -> Any:
        return {"digest": "blake3:" + str(body["payload"].get("nbytes", body["payload"].get("shape")))}


@pytest.fixture
def scripted(tmp_path: Path) -> Iterator[ScriptedPool]:
    pool = ScriptedPool(tmp_path / "store")
    yield pool
    pool.close()


def _error(status: int, kind: str, message: str = "no", headers: dict[str, str] | None = None) -> Answer:
    return status, {"error": {"type": kind, "message": message}}, headers or {}


# -- errors mapped from the body's type, retry_after kept ----------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "headers", "cls", "retry_after", "item"),
    [
        (429, {"error": {"type": "QuotaExceeded", "message": "m"}}, {"Retry-After": "7"}, QuotaExceeded, 7.0, None),
        (429, {"error": {"type": "QuotaExceeded", "message": "m"}}, {}, QuotaExceeded, None, None),
        (
            429,
            {"error": {"type": "QuotaExceeded", "retry_after": 0.25}},
            {"Retry-After": "1"},
            QuotaExceeded,
            0.25,
            None,
        ),
        (503, {"error": {"type": "Overloaded", "message": "m"}}, {"Retry-After": "5"}, Overloaded, 5.0, None),
        (503, {"error": {"type": "Overloaded", "message": "m"}}, {}, Overloaded, 1.0, None),
        (400, {"error": {"type": "AdapterInputError", "message": "m", "item": 3}}, {}, AdapterInputError, None, 3),
        (400, {"error": {"type": "BadRequestError", "message": "vLLM's own"}}, {}, InvalidRequest, None, None),
        (401, {"error": {"type": "Unauthorized", "message": "m"}}, {}, Unauthorized, None, None),
        (500, "Internal Server Error", {}, ReplicaFailed, None, None),
        (429, {"error": "a string"}, {"Retry-After": "2"}, QuotaExceeded, 2.0, None),
    ],
)
def test_errors_are_the_class_the_body_names_with_retry_after_kept(
    status: int, body: Any, headers: dict[str, str], cls: type, retry_after: float | None, item: int | None
) -> None:
    resp = (
        httpx.Response(status, json=body, headers=headers)
        if not isinstance(body, str)
        else httpx.Response(status, text=body, headers=headers)
    )
    exc = error_from_response(resp)
    assert type(exc) is cls
    assert getattr(exc, "retry_after", None) == retry_after and exc.item == item
    assert error_from_response(httpx.Response(200, json={})) is None


def test_retry_decisions() -> None:
    client = Client("http://127.0.0.1:1", retries=2, backoff_s=0.5)
    try:
        assert client._retry_delay(0, QuotaExceeded("rate", retry_after=3.0)) == 3.0  # the server's wait
        assert client._retry_delay(1, Overloaded("full", retry_after=0.0)) == 1.0  # backoff 0.5 * 2**1
        assert client._retry_delay(2, Overloaded("full")) is None  # budget spent
        assert client._retry_delay(0, QuotaExceeded("allocation spent")) is None  # waiting does not help
        assert client._retry_delay(0, InvalidRequest("bad")) is None
    finally:
        client.close()


# -- retries over HTTP -----------------------------------------------------------------------------


def test_rate_limit_429_with_retry_after_is_retried_then_succeeds(scripted: ScriptedPool) -> None:
    scripted.script(Routes.COMPLETIONS, _error(429, "QuotaExceeded", "rate limited", {"Retry-After": "0"}))
    with Client(scripted.url, token="t", backoff_s=0.01) as client:
        out = client.generate("CCO", request_id="rid-1")
    assert out.text == "OCC" and out.provenance["replica_id"] == "r0"
    tried = [r for r in scripted.requests if r["path"] == Routes.COMPLETIONS]
    assert len(tried) == 2
    assert {r["headers"]["x-request-id"] for r in tried} == {"rid-1"}  # one ledger key for every attempt
    assert tried[0]["body"] == tried[1]["body"] and tried[0]["headers"]["authorization"] == "Bearer t"


def test_spent_allocation_429_without_retry_after_is_raised_at_once(scripted: ScriptedPool) -> None:
    scripted.script(Routes.COMPLETIONS, _error(429, "QuotaExceeded", "balance 0 SU"))
    with Client(scripted.url, backoff_s=0.01) as client, pytest.raises(QuotaExceeded, match="balance") as info:
        client.generate("CCO")
    assert info.value.retry_after is None
    assert len([r for r in scripted.requests if r["path"] == Routes.COMPLETIONS]) == 1


def test_retry_after_survives_when_retries_run_out(scripted: ScriptedPool) -> None:
    limited = _error(429, "QuotaExceeded", "rate limited", {"Retry-After": "0"})
    scripted.script(Routes.COMPLETIONS, limited, limited, limited)
    with Client(scripted.url, retries=2, backoff_s=0.01) as client, pytest.raises(QuotaExceeded) as info:
        client.generate("CCO")
    assert info.value.retry_after == 0.0 and info.value.status_code == 429
    assert len([r for r in scripted.requests if r["path"] == Routes.COMPLETIONS]) == 3

    scripted.reset()
    scripted.script(Routes.MODELS, _error(429, "QuotaExceeded", "rate limited", {"Retry-After": "9"}))
    with Client(scripted.url, retries=0) as client, pytest.raises(QuotaExceeded) as info:
        client.models()
    assert info.value.retry_after == 9.0


def test_overloaded_503_is_retried_by_both_clients(scripted: ScriptedPool) -> None:
    full = _error(503, "Overloaded", "pool queue is full", {"Retry-After": "0"})
    scripted.script(Routes.MODELS, full, full)
    with Client(scripted.url, backoff_s=0.01) as client:
        assert client.models() == ["tiny"]
    assert len(scripted.requests) == 3

    async def run() -> list[str]:
        async with AsyncClient(scripted.url, backoff_s=0.01) as client:
            return await client.models()

    scripted.reset()
    scripted.script(Routes.MODELS, full, full)
    assert asyncio.run(run()) == ["tiny"]
    assert len(scripted.requests) == 3


def test_unreachable_pool_is_replica_failed() -> None:
    with Client("http://127.0.0.1:9", retries=0) as client, pytest.raises(ReplicaFailed, match="cannot reach"):
        client.models()


# -- Client and AsyncClient: same requests, same results -------------------------------------------


def _calls() -> list[tuple[str, tuple[Any, ...], dict[str, Any]]]:
    """Every public call once, with payloads on both sides of the inline limit and the request budget."""
    near_limit = np.ones(INLINE_LIMIT // 4 - 16, np.float32)  # just under 1 MiB: inline, 4 fit the budget
    return [
        ("health", (), {}),
        ("models", (), {}),
        ("usage", (), {"by": "project"}),
        ("generate", ("CCO",), {"max_tokens": 4, "seed": 7, "request_id": "g1"}),
        ("generate", (["CCO", "c1ccccc1"],), {"temperature": 0.0, "request_id": "g2", "logprobs": 1}),
        ("generate", (["", "bad", "CC"],), {"adapter": "smiles", "n": 2, "request_id": "g3"}),
        ("generate", (), {"prompt_embeds": np.ones((3, 8), np.float32), "request_id": "g4"}),
        ("embed", (["CCO", "c1ccccc1O"],), {"request_id": "e1"}),
        ("embed", (["CCO", "bad"],), {"adapter": "smiles", "adapter_config": {"k": 1}, "request_id": "e2"}),
        ("embed", ([np.ones((2, 8), np.float32), {"prompt_embeds": np.zeros((1, 8), np.float32)}],), {}),
        ("predict", (["CCO", b"file bytes"],), {"adapter": "pointcloud", "head": "shape", "request_id": "p1"}),
        ("put", (np.arange(10, dtype=np.int32),), {}),
        ("digest", (np.arange(5, dtype=np.float32),), {}),
        (
            "probe",
            ("CCO",),
            {
                "capture": [Capture(site="hook_resid_post"), {"site": "blocks.1.hook_z"}],
                "interventions": [
                    Add(site="hook_resid_post", layer=0, vector=near_limit),  # inline (budget: 3 left)
                    {"op": "add", "site": "hook_mlp_out", "layer": 1, "vector": near_limit * 2},  # inline
                    Replace(site="blocks.0.hook_resid_pre", values=np.ones((2, 3))),  # small: inline
                    Add(site="hook_attn_out", layer=0, vector=near_limit * 3),  # inline
                    Add(site="hook_attn_out", layer=1, vector=near_limit * 4),  # inline: the budget's 4th
                    Add(site="hook_resid_pre", layer=1, vector=near_limit * 5),  # budget spent: by reference
                    Replace(site="hook_mlp_out", layer=0, values=np.ones(INLINE_LIMIT // 4 + 1, np.float32)),
                    Zero(site="hook_mlp_out", layer=1, positions=[0]),
                ],
                "lens": LogitLens(top_k=2),
                "max_tokens": 2,
                "request_id": "t1",
            },
        ),
    ]


def _plain(value: Any) -> Any:
    """Results as plain data, so two clients' answers compare with ``==``."""
    if isinstance(value, LazyArray):
        return ("array", value.numpy().dtype.name, value.numpy().tolist())
    if isinstance(value, np.ndarray):
        return ("array", value.dtype.name, value.tolist())
    if isinstance(value, TpmflowError):
        return (type(value).__name__, value.message, value.item)
    if isinstance(value, Reference):
        return _plain(value.model_dump(exclude={"key", "expires"}))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _keys_masked(value: Any) -> Any:
    """Store keys are fresh per write; everything else in a request must match exactly."""
    if isinstance(value, dict):
        return {k: "<key>" if k in ("key", "expires") else _keys_masked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_keys_masked(v) for v in value]
    return value


def _requests(pool: ScriptedPool) -> list[Any]:
    out = []
    for r in pool.requests:
        headers = {k: v for k, v in r["headers"].items() if k != "x-request-id"}
        explicit = r["headers"]["x-request-id"] if len(r["headers"]["x-request-id"]) < 32 else "<fresh>"
        out.append((r["method"], r["path"], r["query"], headers, explicit, _keys_masked(r["body"])))
    return out


def _script_failures(pool: ScriptedPool) -> None:
    """The same bumps for both clients: a full pool, then a rate limit."""
    pool.script(Routes.COMPLETIONS, _error(503, "Overloaded", "full", {"Retry-After": "0"}))
    pool.script(Routes.PROBE, _error(429, "QuotaExceeded", "rate limited", {"Retry-After": "0"}))


def test_sync_and_async_clients_send_the_same_requests_and_return_the_same_results(scripted: ScriptedPool) -> None:
    options = {"token": "secret", "version": "abc123", "backoff_s": 0.01}
    _script_failures(scripted)
    with Client(scripted.url, **options) as client:
        sync_results = [_plain(getattr(client, name)(*args, **kwargs)) for name, args, kwargs in _calls()]
    sync_requests = _requests(scripted)

    async def run() -> list[Any]:
        async with AsyncClient(scripted.url, **options) as client:
            return [_plain(await getattr(client, name)(*args, **kwargs)) for name, args, kwargs in _calls()]

    scripted.reset()
    _script_failures(scripted)
    async_results = asyncio.run(run())
    assert async_results == sync_results
    assert _requests(scripted) == sync_requests

    # What the shared decisions did, checked once on the recorded requests.
    by_path = defaultdict(list)
    for _, path, _, headers, rid, body in sync_requests:
        by_path[path].append((headers, rid, body))
    assert all(
        h["authorization"] == "Bearer secret" and h["x-tpmflow-version"] == "abc123"
        for h, _, _ in by_path[Routes.MODELS]
    )
    assert len(by_path[Routes.COMPLETIONS]) == 3  # g1 twice (503, then the answer), g2 once
    assert len(by_path[Routes.PROBE]) == 2  # the rate limit, then the answer
    (probe_body,) = {json.dumps(b, sort_keys=True) for _, _, b in by_path[Routes.PROBE]}
    edits = json.loads(probe_body)["interventions"]
    wired = [e.get("vector", e.get("values")) for e in edits]
    assert ["sig" in w for w in wired if w is not None] == [False, False, False, False, False, True, True]
    assert by_path[Routes.STORE] and len(by_path[Routes.STORE]) == 1  # fetched once, kept
    (predict_body,) = [b for _, _, b in by_path[Routes.ADAPTER_PREDICT]]
    assert predict_body["items"][0] == "CCO" and predict_body["items"][1]["kind"] == "bytes"  # file bytes: by reference

    gen, gens, decodings = sync_results[3], sync_results[4], sync_results[5]
    assert gen["text"] == "OCC" and gen["provenance"]["sampling"] == {"max_tokens": 4, "temperature": 1.0, "seed": 7}
    assert [g["text"] for g in gens] == ["OCC", "1ccccc1c"]
    assert decodings[1] == ("AdapterInputError", "not a prefix", 1) and len(decodings[2]) == 2
    trace = sync_results[-1]
    assert (
        trace["captures"]["blocks.1.hook_resid_post"][2] == np.arange(1200, dtype=np.float32).reshape(2, 600).tolist()
    )


def test_typed_overloads_pick_the_result_type(scripted: ScriptedPool) -> None:
    with Client(scripted.url) as client:
        one: tpmflow.Generation = client.generate("CCO")
        many: list[tpmflow.Generation] = client.generate(["CCO", "CC"])
        decoded = client.generate(["CC"], adapter="smiles")
    assert isinstance(one, tpmflow.Generation) and len(many) == 2 and decoded[0][0].value == "CCC"  # type: ignore[index,union-attr]


# -- the public namespace ----------------------------------------------------------------------------


def test_public_names_and_a_light_import() -> None:
    assert tpmflow.Client is Client and tpmflow.AsyncClient is AsyncClient
    assert tpmflow.QuotaExceeded is QuotaExceeded and tpmflow.Reference is Reference
    assert {tpmflow.Capture, tpmflow.Add, tpmflow.Replace, tpmflow.Zero, tpmflow.LogitLens} == {
        Capture,
        Add,
        Replace,
        Zero,
        LogitLens,
    }
    assert set(tpmflow.__all__) <= set(dir(tpmflow))
    with pytest.raises(AttributeError):
        tpmflow.NoSuchThing  # noqa: B018
    code = (
        "import sys, tpmflow\n"
        "heavy = ('torch', 'vllm', 'fastapi', 'uvicorn', 'aiohttp', 'httpx')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
        "tpmflow.Client, tpmflow.AsyncClient, tpmflow.Capture, tpmflow.Reference\n"  # all a client-only install has
        "print(sorted(m for m in heavy[:-1] if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout.split("\n")[:2] == ["[]", "[]"], out.stdout + out.stderr
