"""The gateway's own logic against fake replicas (tpmflow.pool.fake_replica): routing, what it
sends a replica, failover, admission, rate limits, billing and streams, in seconds.

Real HTTP on 127.0.0.1 throughout (uvicorn gateway, uvicorn fake replicas, httpx client); only the
engine is a stand-in. The same behaviours are tested against real vLLM replicas in
test_pool_serving.py, test_pool_load.py, test_allocations.py and test_rate_limits.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tpmflow.access import AccessDB, LedgerWriter
from tpmflow.config import GatewayConfig, PoolConfig, ServiceClass
from tpmflow.gateway import Gateway
from tpmflow.payload import PayloadStore, StoreConfig
from tpmflow.pool.fake_replica import FakeReplica, Fault, holding
from tpmflow.pool.launch import free_port
from tpmflow.protocol import Headers, Routes

SECRET = "s3cret-pool"


@dataclass
class Rig:
    gateway: Gateway
    url: str
    token: str
    access: AccessDB
    ledger: LedgerWriter
    replicas: list[FakeReplica]

    def post(self, path: str, body: Any, **headers: str) -> httpx.Response:
        auth = {"Authorization": f"Bearer {self.token}", **headers}
        return httpx.post(self.url + path, json=body, timeout=60, headers=auth)

    def stream(self, max_tokens: int = 4) -> AbstractContextManager[httpx.Response]:
        """A streamed completion of ``max_tokens`` chunks, as ``with two.stream() as resp``."""
        body = {"prompt": "x", "max_tokens": max_tokens, "stream": True}
        auth = {"Authorization": f"Bearer {self.token}"}
        return httpx.stream("POST", self.url + Routes.COMPLETIONS, json=body, headers=auth, timeout=60)

    def held(self) -> AbstractContextManager[threading.Event]:
        """Every replica holds its answers until the event is set (``fake_replica.holding``)."""
        return holding(self.replicas)

    def rows(self, **where: Any) -> list[Any]:
        self.ledger.flush()
        return self.access.ledger_rows(**where)

    def finished(self, **where: Any) -> list[Any]:
        """The rows of ``where`` once one exists and none is still "Unfinished" (a stream's row is
        completed after its last chunk reached the client)."""
        deadline = time.monotonic() + 60
        while not (rows := self.rows(**where)) or any(r.status == 0 for r in rows):
            assert time.monotonic() < deadline, rows
            time.sleep(0.05)
        return rows


@contextmanager
def rig(tmp_path: Path, n_replicas: int = 2, **gateway: Any) -> Iterator[Rig]:
    import uvicorn

    cfg = PoolConfig(
        model="fake-model",
        gateway=GatewayConfig(request_timeout_s=gateway.pop("request_timeout_s", 10), **gateway),
        store=StoreConfig(path=str(tmp_path / "store")),
        database_url=f"sqlite:///{tmp_path / 'access.db'}",
        service_classes={"batch": ServiceClass(priority=10, requests_per_minute=2)},
    )
    access = AccessDB(cfg.database_url)
    ledger = LedgerWriter(access.engine)
    gw = Gateway(cfg, access, ledger, PayloadStore(cfg.store), SECRET)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(gw.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    url = f"http://127.0.0.1:{port}"
    fakes = [
        FakeReplica(gateway_url=url, secret=SECRET, replica_id=f"replica-{i}", heartbeat_s=0.2).start()
        for i in range(n_replicas)
    ]
    deadline = time.monotonic() + 10
    while len(gw.registry.live()) < n_replicas:
        assert time.monotonic() < deadline, "fake replicas did not register by heartbeat"
        time.sleep(0.02)
    access.ensure_principal("alice", "chem", {"generate", "embed"})
    try:
        yield Rig(gw, url, access.create_token("alice"), access, ledger, fakes)
    finally:
        for fake in fakes:
            fake.stop()
        server.should_exit = True
        thread.join(timeout=10)
        ledger.close()


@pytest.fixture()
def two(tmp_path: Path) -> Iterator[Rig]:
    with rig(tmp_path) as r:
        yield r


def test_completion_reaches_a_replica_with_the_gateways_fields_and_is_recorded(two: Rig) -> None:
    body = {"prompt": "CCO", "max_tokens": 3, "cache_salt": "stolen", "priority": -100, "request_id": "forged"}
    resp = two.post(Routes.COMPLETIONS, body, **{Headers.REQUEST_ID: "corr-1"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["usage"]["completion_tokens"] == 3
    assert resp.headers[Headers.REQUEST_ID] == "corr-1"
    assert resp.headers[Headers.REPLICA] in ("replica-0", "replica-1")
    assert resp.headers[Headers.CONTENT_HASH].startswith("blake3:")
    seen = next(s for f in two.replicas for s in f.seen if s.path == Routes.COMPLETIONS)
    alice = two.access.authenticate(two.token)
    assert seen.body["cache_salt"] == alice.cache_salt and seen.body["priority"] == 0
    attempt = resp.headers[Headers.ATTEMPT_ID]
    assert seen.body["request_id"] == attempt != "corr-1" and seen.body["model"] == "fake-model"
    assert seen.headers[Headers.ATTEMPT_ID.lower()] == attempt
    assert seen.headers[Headers.REQUEST_ID.lower()] == attempt  # vLLM takes its request id from this header
    assert seen.headers[Headers.PRINCIPAL.lower()] == "alice"
    assert seen.headers["authorization"] == f"Bearer {SECRET}"
    rows = two.rows(endpoint="completions")
    assert len(rows) == 1 and rows[0].status == 200 and rows[0].output_tokens == 3
    assert (rows[0].request_id, rows[0].correlation_id) == (attempt, "corr-1")


def test_tpmflow_routes_forward_the_body_untouched(two: Rig) -> None:
    raw = b'{"items": ["CCO"],   "pooling": "mean"}'
    resp = httpx.post(
        two.url + Routes.EMBED,
        content=raw,
        headers={"Authorization": f"Bearer {two.token}", "Content-Type": "application/json"},
    )
    assert resp.status_code == 200, resp.text
    seen = next(s for f in two.replicas for s in f.seen if s.path == Routes.EMBED)
    assert seen.body == {"items": ["CCO"], "pooling": "mean"}


def test_requests_spread_over_replicas(two: Rig) -> None:
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {two.token}"}) as http:
            return await asyncio.gather(
                *(http.post(two.url + Routes.COMPLETIONS, json={"prompt": "x", "max_tokens": 1}) for _ in range(40))
            )

    for fake in two.replicas:
        fake.delay_s = 0.05
    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses)
    served = [f.served for f in two.replicas]
    assert sum(served) == 40 and min(served) >= 10, served


def test_dropped_connections_are_retried_elsewhere_with_one_row_per_attempt(two: Rig) -> None:
    for fake in two.replicas:
        fake.script.append(Fault(drop=True))  # each drops once: two failed attempts, then an answer
    resp = two.post(Routes.COMPLETIONS, {"prompt": "x", "max_tokens": 2}, **{Headers.REQUEST_ID: "retry-me"})
    assert resp.status_code == 200, resp.text
    rows = two.rows(correlation_id="retry-me")
    by_id = {r.request_id: r for r in rows}
    assert len(by_id) == 3 and all(r.status != 0 for r in rows)
    answered = by_id[resp.headers[Headers.ATTEMPT_ID]]  # the answer names its attempt's row
    second = by_id[answered.retry_of]
    first = by_id[second.retry_of]
    assert (first.status, second.status, answered.status) == (502, 502, 200) and first.retry_of is None
    assert first.replica_id != second.replica_id  # the retry went to the other replica
    assert first.error_type == second.error_type == "ReplicaFailed"
    # Both left the rotation when they dropped; the answer came once a heartbeat brought one back.
    assert answered.output_tokens == 2
    sent_ids = [s.body["request_id"] for f in two.replicas for s in f.seen if s.path == Routes.COMPLETIONS]
    assert sorted(sent_ids) == sorted(by_id), "each attempt reached vLLM under its own request id"


def test_requests_reusing_a_client_id_are_separate_rows(two: Rig) -> None:
    """Issue 13: three requests with one X-Request-Id left one ledger row (usage under-reported)."""

    async def same_id() -> list[httpx.Response]:
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {two.token}", Headers.REQUEST_ID: "dup"}) as h:
            first = await h.post(two.url + Routes.COMPLETIONS, json={"prompt": "x", "max_tokens": 1})
            together = await asyncio.gather(
                *(h.post(two.url + Routes.COMPLETIONS, json={"prompt": "x", "max_tokens": 2}) for _ in range(2))
            )
            return [first, *together]

    responses = asyncio.run(same_id())
    assert all(r.status_code == 200 and r.headers[Headers.REQUEST_ID] == "dup" for r in responses)
    rows = two.rows(correlation_id="dup")
    assert len(rows) == 3 and len({r.request_id for r in rows}) == 3
    assert sorted(r.output_tokens for r in rows) == [1, 2, 2]
    assert {r.request_id for r in rows} == {r.headers[Headers.ATTEMPT_ID] for r in responses}


def test_a_row_is_open_while_its_attempt_runs_and_interrupted_rows_are_closed(two: Rig) -> None:
    async def slow() -> httpx.Response:
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {two.token}", Headers.REQUEST_ID: "slow"}) as h:
            return await h.post(two.url + Routes.COMPLETIONS, json={"prompt": "x", "max_tokens": 1}, timeout=60)

    async def watch(gate: threading.Event) -> list[Any]:  # the replica answers once the test has looked
        task = asyncio.ensure_future(slow())
        during: list[Any] = []
        for _ in range(600):  # until the attempt's row is written (the gateway has forwarded it)
            during = await asyncio.to_thread(two.rows, correlation_id="slow")
            if during:
                break
            await asyncio.sleep(0.05)
        usage = await asyncio.to_thread(two.access.usage, "principal", "alice")
        assert usage == [], "an attempt still running is not yet usage"
        gate.set()
        await task
        return during

    with two.held() as gate:
        during = asyncio.run(watch(gate))
    assert [(r.status, r.error_type) for r in during] == [(0, "Unfinished")]
    assert [(r.status, r.error_type) for r in two.rows(correlation_id="slow")] == [(200, None)]
    # A row a crashed gateway left open is closed by the next sweep once no request can still run.
    from tpmflow.access import LedgerRow

    two.ledger.record(
        LedgerRow(request_id="lost", correlation_id="lost", principal="alice", project="chem", service_class="x",
                  endpoint="completions", model="m", content_hash="h", status=0, error_type="Unfinished",
                  created=time.time() - 3600)
    )
    two.ledger.flush()
    assert two.gateway.keep_reservations_now() == 0
    assert [(r.status, r.error_type) for r in two.rows(correlation_id="lost")] == [(502, "Interrupted")]


def test_a_replica_error_is_typed_and_not_retried(two: Rig) -> None:
    for fake in two.replicas:
        fake.script.append(Fault(status=400, message="prompt too long"))
    resp = two.post(Routes.COMPLETIONS, {"prompt": "x", "max_tokens": 2})
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["type"] == "InvalidRequest" and error["message"] == "prompt too long"
    rows = two.rows(endpoint="completions")
    assert len(rows) == 1 and rows[0].error_type == "InvalidRequest"


def test_bad_bodies_and_tokens_are_refused_at_the_gateway(two: Rig) -> None:
    cases = [
        (b"{not json", 400, "InvalidRequest"),
        (b"[1, 2]", 400, "InvalidRequest"),
        (b'{"prompt": "x", "max_tokens": 0}', 400, "InvalidRequest"),
        (b'{"prompt": ""}', 400, "InvalidRequest"),
        (b'{"prompt": "x", "model": "other"}', 404, "ModelNotFound"),
        (b'{"prompt": "x", "prompt_embeds": "AAAA"}', 400, "InvalidRequest"),
        (b"[" * 10_000 + b"]" * 10_000, 400, "InvalidRequest"),  # nested past any parser's depth
    ]
    for raw, status, kind in cases:
        resp = httpx.post(
            two.url + Routes.COMPLETIONS,
            content=raw,
            headers={"Authorization": f"Bearer {two.token}", "Content-Type": "application/json"},
        )
        assert (resp.status_code, resp.json()["error"]["type"]) == (status, kind), raw[:40]
    assert not any(f.seen for f in two.replicas), "nothing bad reached a replica"
    assert httpx.post(two.url + Routes.COMPLETIONS, json={"prompt": "x"}).status_code == 401
    no_probe = two.post(Routes.PROBE, {"prompt": "x"})
    assert no_probe.status_code == 403 and no_probe.json()["error"]["type"] == "Forbidden"
    assert len(two.rows()) == len(cases) + 1  # every refused request with a principal has its row


def test_a_full_queue_answers_503_with_retry_after(tmp_path: Path) -> None:
    with rig(tmp_path, n_replicas=1, max_inflight=1, queue_limit=1) as r:
        assert r.post(Routes.COMPLETIONS, {"prompt": "x", "max_tokens": 1}).status_code == 200  # token cached
        gate = r.replicas[0].gate = threading.Event()  # one request held at the replica, one queued

        async def burst() -> list[httpx.Response]:
            gate.clear()
            async with httpx.AsyncClient(headers={"Authorization": f"Bearer {r.token}"}, timeout=60) as http:
                body = {"prompt": "x", "max_tokens": 1}
                sent = [asyncio.ensure_future(http.post(r.url + Routes.COMPLETIONS, json=body)) for _ in range(5)]
                for _ in range(1200):  # the three turned away answer at once; then the replica may
                    if sum(t.done() for t in sent) >= 3:
                        break
                    await asyncio.sleep(0.05)
                gate.set()
                return list(await asyncio.gather(*sent))

        statuses = sorted(resp.status_code for resp in asyncio.run(burst()))
        assert statuses == [200, 200, 503, 503, 503]
        refused = [resp for resp in asyncio.run(burst()) if resp.status_code == 503]
        assert len(refused) == 3 and all(resp.headers[Headers.RETRY_AFTER] == "1" for resp in refused)
        assert all(resp.json()["error"]["type"] == "Overloaded" for resp in refused)
        assert r.gateway.admission.waiting == 0 and not r.gateway.admission.slots.locked()


def test_a_class_rate_limit_answers_429_with_retry_after(two: Rig) -> None:
    two.access.ensure_principal("bob", "chem", {"generate"}, "batch")  # 2 requests per minute
    token = two.access.create_token("bob")
    statuses = []
    for _ in range(3):
        resp = httpx.post(
            two.url + Routes.COMPLETIONS,
            json={"prompt": "x", "max_tokens": 1},
            headers={"Authorization": f"Bearer {token}"},
        )
        statuses.append(resp.status_code)
    assert statuses == [200, 200, 429]
    assert int(resp.headers[Headers.RETRY_AFTER]) >= 1
    assert resp.json()["error"]["type"] == "QuotaExceeded"
    assert [r.error_type for r in two.rows(principal="bob") if r.status == 429] == ["RateLimited"]


def test_a_stream_is_relayed_and_billed_from_its_last_usage(two: Rig) -> None:
    with two.stream() as resp:
        assert resp.status_code == 200
        lines = [line for line in resp.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and len(lines) == 5
    seen = next(s for f in two.replicas for s in f.seen if s.path == Routes.COMPLETIONS)
    assert seen.body["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    rows = two.finished(endpoint="completions")
    assert rows[0].status == 200 and rows[0].output_tokens == 4
    assert two.gateway.admission.waiting == 0 and not two.gateway.admission.slots.locked()


def test_no_live_replica_waits_a_bounded_time_then_503_with_retry_after(tmp_path: Path) -> None:
    with rig(tmp_path, n_replicas=1, request_timeout_s=60.0, heartbeat_timeout_s=0.5, replica_wait_s=1.0) as r:
        r.replicas[0].stop()
        time.sleep(0.7)  # its heartbeats stop: it leaves the rotation
        t0 = time.monotonic()
        resp = r.post(Routes.COMPLETIONS, {"prompt": "x", "max_tokens": 1})
        waited = time.monotonic() - t0
        assert resp.status_code == 503 and resp.json()["error"]["type"] == "Overloaded", resp.text
        # bounded by replica_wait_s (1 s), far below the request timeout (60 s); a loaded machine adds
        # the token's first lookup and thread hops
        assert int(resp.headers[Headers.RETRY_AFTER]) >= 1 and 0.9 < waited < 30.0, waited
        assert [(row.status, row.error_type) for row in r.rows(endpoint="completions")] == [(503, "Overloaded")]
        # It comes back (same address): a request waiting meanwhile is served. The wait is long here,
        # since a fresh heartbeat client may take seconds on a loaded machine.
        r.gateway.cfg.gateway.replica_wait_s = 30.0
        r.replicas[0].start()
        resp = r.post(Routes.COMPLETIONS, {"prompt": "x", "max_tokens": 1})
        assert resp.status_code == 200


def test_no_live_replica_within_the_request_timeout_is_a_typed_failure(tmp_path: Path) -> None:
    with rig(tmp_path, n_replicas=1, request_timeout_s=1.0, heartbeat_timeout_s=0.5) as r:
        r.replicas[0].stop()
        time.sleep(0.7)
        resp = r.post(Routes.COMPLETIONS, {"prompt": "x", "max_tokens": 1})
        assert resp.status_code == 502 and resp.json()["error"]["type"] == "ReplicaFailed"
        assert [row.status for row in r.rows(endpoint="completions")] == [502]


def test_health_and_metrics_need_no_token(two: Rig) -> None:
    health = httpx.get(two.url + Routes.HEALTH).json()
    assert health["status"] == "ok" and len(health["replicas"]) == 2
    two.post(Routes.COMPLETIONS, {"prompt": "x", "max_tokens": 2})
    metrics = httpx.get(two.url + Routes.METRICS).text
    assert 'tpmflow_requests_total{endpoint="completions",service_class="interactive",status="200"} 1.0' in metrics
    assert 'tpmflow_tokens_total{kind="output"} 2.0' in metrics


def test_a_client_closing_right_after_done_is_answered_not_a_hang_up(two: Rig) -> None:
    for fake in two.replicas:
        fake.linger_s = 1.0  # the replica closes its side late; the client leaves as soon as it has [DONE]
    with two.stream() as resp:
        for line in resp.iter_lines():
            if line == "data: [DONE]":
                break
    rows = two.finished(endpoint="completions")
    assert (rows[0].status, rows[0].error_type, rows[0].output_tokens) == (200, None, 4)


def test_a_client_hanging_up_mid_stream_is_a_499_billed_for_what_it_got(two: Rig) -> None:
    with two.held():  # the replica sends its first chunk, then holds the rest
        with two.stream() as resp:
            next(line for line in resp.iter_lines() if line.startswith("data: {"))
        rows = two.finished(endpoint="completions")
    assert (rows[0].status, rows[0].error_type) == (499, "ClientDisconnected") and rows[0].output_tokens >= 1


def test_a_live_streams_reservation_is_renewed_and_survives_any_gateways_sweep(two: Rig) -> None:
    """A stream held open (a replica holding it after its first chunk) keeps its reservation when the
    renewal runs an hour on, and neither this gateway's sweep nor another's (its own engine)
    releases it; it then settles to its charge. Deterministic here, where a real engine may
    finish a stream before the checks run."""
    from sqlalchemy import text

    from tpmflow.access.costs import CostModel

    two.gateway.cfg.costs = CostModel(su_per_prompt_token=0.001, su_per_output_token=0.003)
    two.access.allocations.create("chem", 10_000)

    def reserved() -> float:
        (row,) = two.access.allocations.show("chem")
        return float(row["reserved_su"])

    with two.held() as gate, two.stream() as resp:  # one chunk, then the replica holds it open
        lines = resp.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
        held = reserved()
        assert held > 0
        later = time.time() + 3600
        two.gateway.keep_reservations_now(now=later)
        other = AccessDB(two.access.engine.url.render_as_string(hide_password=False))
        assert not [r for r in other.allocations.sweep(now=later) if r["project"] == "chem"]
        other.engine.dispose()
        assert reserved() == held
        gate.set()
        assert [line for line in lines if line.startswith("data: ")][-1] == "data: [DONE]"
    (row,) = two.finished(endpoint="completions")
    assert (row.status, row.output_tokens) == (200, 4)
    # The row is written when the last chunk reaches the client; the settle follows on its own task.
    deadline = time.monotonic() + 60
    while reserved() != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    (alloc,) = two.access.allocations.show("chem")
    assert row.charge_su > 0
    assert alloc["reserved_su"] == 0 and alloc["spent_su"] == pytest.approx(row.charge_su, abs=1e-6)
    with two.access.engine.connect() as conn:
        assert not conn.execute(text("SELECT * FROM reservations WHERE project = 'chem'")).all()


def test_a_stream_flag_that_is_not_a_boolean_is_refused(two: Rig) -> None:
    """"false" is truthy to the gateway and False to vLLM: a stream with no usage to bill."""
    resp = two.post(Routes.COMPLETIONS, {"prompt": "x", "max_tokens": 1, "stream": "false"})
    assert resp.status_code == 400 and "stream" in resp.json()["error"]["message"]


def test_unknown_paths_answer_in_the_one_envelope(two: Rig) -> None:
    resp = httpx.get(two.url + "/v1/nothing-here")
    assert resp.status_code == 404 and set(resp.json()["error"]) == {"type", "message"}


def test_a_workers_share_of_a_small_rate_limit_still_admits() -> None:
    from tpmflow.access import Principal
    from tpmflow.gateway.ratelimit import RateLimiter

    cfg = PoolConfig(model="m", service_classes={"slow": ServiceClass(requests_per_minute=1)})
    limiter = RateLimiter(cfg, clock=lambda: 0.0, share=0.5)  # 2 workers: 0.5 request per minute each
    who = Principal(name="p", project="x", permissions=frozenset({"generate"}), service_class="slow", cache_salt="s")
    limiter.admit(who)  # one request fits the bucket at once
    with pytest.raises(Exception, match="rate limited"):
        limiter.admit(who)


def test_a_text_embedder_alone_is_no_service_but_health_lists_it(tmp_path: Path) -> None:
    """The text embedder's replica (task embed) serves only knowledge embeddings: with no model
    replica up the pool is unavailable, and no completion is ever sent to it."""
    from tpmflow.schema import ReplicaInfo

    with rig(tmp_path, n_replicas=0) as r:
        embedder = ReplicaInfo(
            replica_id="text-embedder-0",
            url="http://127.0.0.1:9",  # nothing listens: a request routed here would fail loudly
            model="all-minilm-l6-v2",
            content_hash="blake3:" + "e" * 64,
            engine="fake",
            hidden_size=384,
            max_model_len=256,
            group="text-embedder",
            task="embed",
        )
        beat = httpx.post(
            r.url + Routes.HEARTBEAT, json=embedder.model_dump(), headers={"Authorization": f"Bearer {SECRET}"}
        )
        assert beat.status_code == 200, beat.text
        health = httpx.get(r.url + Routes.HEALTH)
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        assert [(x["id"], x["task"]) for x in health.json()["replicas"]] == [("text-embedder-0", "embed")]
        with FakeReplica(gateway_url=r.url, secret=SECRET, replica_id="replica-0", heartbeat_s=0.2) as fake:
            deadline = time.monotonic() + 10
            while httpx.get(r.url + Routes.HEALTH).status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            for _ in range(4):
                assert r.post(Routes.COMPLETIONS, {"prompt": "x", "max_tokens": 1}).status_code == 200
            assert fake.served == 4


def test_workbench_session_cookie_csrf_and_admin_refusal_over_http(two: Rig) -> None:
    """The workbench's security without a browser (tests/test_workbench.py drives Chromium): the
    sign-in form's nonce, the cookie's flags, the CSRF header the API needs beside the cookie, the
    escaped page, and the admin page refused by the server."""
    import re

    from tpmflow.errors import Unauthorized

    with httpx.Client(base_url=two.url) as browser:
        for path in ("/ui", "/ui/generate", "/ui/inside", "/ui/usage", "/ui/service", "/ui/admin"):
            signed_out = browser.get(path)
            assert signed_out.status_code == 303 and signed_out.headers["location"] == "/ui/signin", path
        page = browser.get("/ui/signin")
        assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
        def nonce(form: httpx.Response) -> str:  # each form rendered has a fresh one
            return re.search(r'name="nonce" value="([^"]+)"', form.text).group(1)  # type: ignore[union-attr]

        refused = browser.post("/ui/signin", data={"token": two.token})
        assert refused.status_code == 400, "no nonce: refused"
        stale = browser.post("/ui/signin", data={"token": two.token, "nonce": nonce(page)})
        assert stale.status_code == 400, "a form rendered before the last one: refused"
        bad = browser.post("/ui/signin", data={"token": "tpm_x", "nonce": nonce(stale)})
        assert bad.status_code == 401
        signed = browser.post("/ui/signin", data={"token": two.token, "nonce": nonce(bad)})
        assert signed.status_code == 303 and signed.headers["location"] == "/ui/generate"
        port = two.url.rsplit(":", 1)[1]
        flags = signed.headers["set-cookie"].lower()
        assert f"tpmflow_session_{port}=tpm_ui_" in flags and "httponly" in flags and "samesite=strict" in flags
        assert "secure" not in flags, "plain HTTP on loopback: a Secure cookie would never come back"
        session = browser.cookies[f"tpmflow_session_{port}"]
        assert session != two.token and two.access.authenticate(session).name == "alice", "a session of its own"
        generate = browser.get("/ui/generate")
        csrf = re.search(r'data-csrf="([0-9a-f]+)"', generate.text).group(1)  # type: ignore[union-attr]
        body = {"prompt": "x", "max_tokens": 1}
        assert browser.post(Routes.COMPLETIONS, json=body).status_code == 401, "the cookie alone is not enough"
        assert browser.post(Routes.COMPLETIONS, json=body, headers={"X-Tpmflow-CSRF": csrf}).status_code == 200
        assert browser.get("/ui/admin").status_code == 403, "alice is no admin"
        forged = browser.post("/ui/admin/tokens", data={"csrf": csrf, "principal": "alice"})
        assert forged.status_code == 403
        assert browser.post("/ui/signout", data={}).status_code == 403, "sign-out needs the page's token"
        out = browser.post("/ui/signout", data={"csrf": csrf})
        assert out.status_code == 303 and f'tpmflow_session_{port}=""' in out.headers["set-cookie"]
        with pytest.raises(Unauthorized, match="revoked"):
            two.access.authenticate(session)  # signed out: the session token is dead everywhere
    # Revoking the token signed in with ends its sessions too.
    with httpx.Client(base_url=two.url) as again:
        page = again.get("/ui/signin")
        signed = again.post("/ui/signin", data={"token": two.token, "nonce": nonce(page)})
        session = again.cookies[f"tpmflow_session_{port}"]
        assert two.access.revoke(two.token) == 1
        with pytest.raises(Unauthorized):
            two.access.authenticate(session)
        gone = again.get("/ui/generate")
        assert gone.status_code == 303 and gone.headers["location"] == "/ui/signin"
    # Reached by another name than loopback (a TLS proxy keeping the Host): Secure cookies.
    proxied = httpx.get(two.url + "/ui/signin", headers={"Host": "pool.example.org"})
    assert "secure" in proxied.headers["set-cookie"].lower()
    two.access.ensure_principal("<b>eve</b>", "chem", {"generate"})
    token = two.access.create_token("<b>eve</b>")
    with httpx.Client(base_url=two.url, cookies={f"tpmflow_session_{port}": token}) as eve:
        html = eve.get("/ui/generate").text
        assert "<b>eve</b>" not in html and "&lt;b&gt;eve&lt;/b&gt;" in html, "names are escaped"


def _browser_session(rig_: Rig, token: str) -> tuple[httpx.Client, str]:
    """A signed-in HTTP 'browser' on the rig's workbench and its page's CSRF token."""
    import re

    browser = httpx.Client(base_url=rig_.url, timeout=60)
    page = browser.get("/ui/signin")
    nonce = re.search(r'name="nonce" value="([^"]+)"', page.text).group(1)  # type: ignore[union-attr]
    assert browser.post("/ui/signin", data={"token": token, "nonce": nonce}).status_code == 303
    csrf = re.search(r'data-csrf="([0-9a-f]+)"', browser.get("/ui/generate").text).group(1)  # type: ignore[union-attr]
    return browser, csrf


def test_workbench_adapters_draw_and_upload_over_http(two: Rig) -> None:
    """The Adapters page's two server helpers: molecules drawn in the sandbox (per-item errors, a
    cap on the batch), and uploads stored as signed payloads and read by the adapter's own
    sandboxed reader (a broken file is the adapter's refusal, an oversized one a 413); both need
    the page's CSRF header; the new pages send signed-out browsers to sign in."""
    import numpy as np

    from tpmflow.payload import Reference

    for path in ("/ui/adapters", "/ui/examples", "/ui/workshop", "/ui/models", "/ui/campaigns"):
        signed_out = httpx.get(two.url + path)
        assert signed_out.status_code == 303 and signed_out.headers["location"] == "/ui/signin", path
    huge_form = httpx.post(two.url + "/ui/signin", data={"token": "x" * 20_000, "nonce": "n"})
    assert huge_form.status_code == 413, "the unauthenticated sign-in form is capped"
    browser, csrf = _browser_session(two, two.token)
    with contextlib.closing(browser):
        page = browser.get("/ui/adapters")
        assert page.status_code == 200 and '<option value="smiles" selected>' in page.text
        assert browser.get("/ui/examples").status_code == 200
        assert browser.get("/ui/workshop").status_code == 403, "alice opens no workshop: no admin"
        body = {"smiles": ["c1ccccc1O", "C1CC1N(", "", "C" * 401, "<script>"]}
        assert browser.post("/ui/adapters/draw", json=body).status_code == 401, "no CSRF header: as the API"
        drawn = browser.post("/ui/adapters/draw", json=body, headers={"X-Tpmflow-CSRF": csrf}).json()["drawings"]
        assert drawn[0]["image"].startswith("data:image/svg+xml;base64,")
        assert [d.get("error") for d in drawn[1:]] == [
            "RDKit cannot read this SMILES",
            "empty",
            "longer than 400 characters",
            "RDKit cannot read this SMILES",
        ]
        many = browser.post("/ui/adapters/draw", json={"smiles": ["C"] * 65}, headers={"X-Tpmflow-CSRF": csrf})
        assert many.status_code == 400 and "at most 64" in many.text

        points = np.random.default_rng(0).normal(size=(500, 3))
        xyz = "\n".join(" ".join(f"{v:.4f}" for v in p) for p in points).encode()
        up = browser.post(
            "/ui/adapters/upload",
            data={"adapter": "pointcloud"},
            files={"file": ("cloud.xyz", xyz)},
            headers={"X-Tpmflow-CSRF": csrf},
        )
        assert up.status_code == 200, up.text
        answer = up.json()
        ref = Reference.model_validate(answer["reference"])
        two.gateway.payloads.signer.verify(ref, "alice")  # signed for alice, as client.put's are
        assert ref.nbytes == answer["nbytes"] == len(xyz) and answer["name"] == "cloud.xyz"
        read = np.asarray(answer["read"]["points"])
        assert read.ndim == 2 and read.shape[1] == 3 and len(read) > 32
        broken = browser.post(
            "/ui/adapters/upload",
            data={"adapter": "pointcloud"},
            files={"file": ("bad.ply", b"ply\nformat ascii 1.0\nelement vertex 3\nend_header\n1 2\n")},
            headers={"X-Tpmflow-CSRF": csrf},
        )
        assert broken.status_code == 200 and broken.json()["read"]["error"], broken.text
        unknown = browser.post(
            "/ui/adapters/upload",
            data={"adapter": "no-such"},
            files={"file": ("x.xyz", xyz)},
            headers={"X-Tpmflow-CSRF": csrf},
        )
        assert unknown.status_code == 400 and "not installed" in unknown.text
        huge = browser.post(
            "/ui/adapters/upload",
            data={"adapter": "pointcloud"},
            files={"file": ("huge.npy", b"\0" * (17 << 20))},
            headers={"X-Tpmflow-CSRF": csrf},
        )
        assert huge.status_code == 413 and "16 MB" in huge.text


def test_workbench_shows_a_detector_frame_as_the_encoder_sees_it(two: Rig) -> None:
    """A NeXus upload is read by the beamline adapter's own sandboxed reader; the page's image is
    the frame it feeds the encoder: re-cut into the adapter's patches (its own ``patchify``), it
    equals what the adapter prepared, up to the 0-255 display scale."""
    import numpy as np
    from tpmflow_beamline import BeamlineAdapter
    from tpmflow_beamline.frames import patchify
    from tpmflow_beamline.synthetic import nexus_bytes

    rng = np.random.default_rng(1)
    frames = rng.poisson(5.0, size=(1, 96, 80)).astype(np.uint32)
    frames[0, 40:44, 30:34] = 500  # a bright spot, so the image has a shape to get wrong
    data = nexus_bytes(frames)
    (prepared,) = BeamlineAdapter().prepare([data])
    browser, csrf = _browser_session(two, two.token)
    with contextlib.closing(browser):
        up = browser.post(
            "/ui/adapters/upload",
            data={"adapter": "beamline"},
            files={"file": ("frame.nxs", data)},
            headers={"X-Tpmflow-CSRF": csrf},
        )
    assert up.status_code == 200, up.text
    frame = up.json()["read"]["frame"]
    size = frame["size"]
    image = np.asarray(frame["pixels"], dtype=np.float64).reshape(size, size)
    lo, hi = float(prepared.min()), float(prepared.max())
    expected = (prepared - lo) / (hi - lo) * 255
    np.testing.assert_allclose(patchify(image, int(np.sqrt(prepared.shape[1]))), expected, atol=1.0)
