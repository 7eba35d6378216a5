"""A gateway of several worker processes on one port (gateway.workers > 1), against fake replicas:
every worker learns every replica from heartbeats any of them received, requests spread over the
workers, the ledger has every request once, /metrics adds the workers up, and a failure one worker
sees takes the replica out of every worker's rotation."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tpmflow.access import AccessDB
from tpmflow.config import GatewayConfig, PoolConfig
from tpmflow.gateway.shared_registry import SharedReplicaRegistry
from tpmflow.gateway.workers import GatewayWorkers
from tpmflow.payload import StoreConfig
from tpmflow.pool.fake_replica import FakeReplica, holding
from tpmflow.pool.launch import free_port
from tpmflow.protocol import Routes
from tpmflow.schema import ReplicaInfo

SECRET = "workers-secret"


@pytest.fixture()
def workers(tmp_path: Path) -> Iterator[tuple[GatewayWorkers, AccessDB, str, list[FakeReplica]]]:
    cfg = PoolConfig(
        model="fake-model",
        gateway=GatewayConfig(workers=2, request_timeout_s=10),
        store=StoreConfig(path=str(tmp_path / "store")),
        database_url=f"sqlite:///{tmp_path / 'access.db'}",
    )
    access = AccessDB(cfg.database_url)
    access.ensure_principal("alice", "chem", {"generate"})
    token = access.create_token("alice")
    gw = GatewayWorkers(cfg, SECRET, "127.0.0.1", free_port(), access.engine, tmp_path / "gateway.log")
    gw.start()
    fakes = [
        FakeReplica(gateway_url=gw.url, secret=SECRET, replica_id=f"replica-{i}", heartbeat_s=0.2).start()
        for i in range(2)
    ]
    try:
        deadline = time.monotonic() + 20
        while len(gw.registry.live()) < 2:
            assert time.monotonic() < deadline, (tmp_path / "gateway.log").read_text()[-2000:]
            time.sleep(0.05)
        yield gw, access, token, fakes
    finally:
        for fake in fakes:
            fake.stop()
        gw.stop()


def _every_worker_sees(gw: GatewayWorkers, replicas: int, timeout_s: float = 60) -> None:
    """Until 10 fresh connections in a row (the kernel spreads them over the workers) report
    ``replicas`` live replicas: each worker pulls the shared registry on its own clock."""
    deadline = time.monotonic() + timeout_s
    while [len(httpx.get(gw.url + Routes.HEALTH, timeout=30).json()["replicas"]) for _ in range(10)] != [replicas] * 10:
        assert time.monotonic() < deadline, f"not every worker saw {replicas} replicas"
        time.sleep(0.1)


def test_workers_share_replicas_ledger_and_metrics(
    workers: tuple[GatewayWorkers, AccessDB, str, list[FakeReplica]],
) -> None:
    gw, access, token, fakes = workers
    _every_worker_sees(gw, 2)

    async def burst(n: int) -> list[httpx.Response]:
        # A fresh connection per request, so the kernel hands them to both workers.
        async def one() -> httpx.Response:
            async with httpx.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=60) as http:
                return await http.post(gw.url + Routes.COMPLETIONS, json={"prompt": "x", "max_tokens": 2})

        return await asyncio.gather(*(one() for _ in range(n)))

    responses = asyncio.run(burst(60))
    assert [r.status_code for r in responses] == [200] * 60, responses[0].text
    assert sum(f.served for f in fakes) == 60 and min(f.served for f in fakes) > 0
    healths = [httpx.get(gw.url + Routes.HEALTH).json() for _ in range(10)]
    assert all(len(h["replicas"]) == 2 for h in healths), "every worker routes to both replicas"

    metrics = ""
    deadline = time.monotonic() + 60
    while 'status="200"} 60.0' not in metrics:
        assert time.monotonic() < deadline, metrics[:3000]
        metrics = httpx.get(gw.url + Routes.METRICS).text  # summed over the workers' files
        time.sleep(0.1)
    assert 'tpmflow_tokens_total{kind="output"} 120.0' in metrics

    deadline = time.monotonic() + 60
    while len(rows := access.ledger_rows(endpoint="completions")) < 60:
        assert time.monotonic() < deadline, len(rows)
        time.sleep(0.1)
    assert len(rows) == 60 and {r.status for r in rows} == {200}


def test_a_replica_gone_leaves_every_workers_rotation(
    workers: tuple[GatewayWorkers, AccessDB, str, list[FakeReplica]],
) -> None:
    gw, _, token, fakes = workers
    fakes[1].stop()
    gw.note_restart("replica-1")  # as the launcher does when it restarts a replica
    _every_worker_sees(gw, 1)
    for _ in range(20):
        resp = httpx.post(
            gw.url + Routes.COMPLETIONS,
            json={"prompt": "x", "max_tokens": 1},
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )
        assert resp.status_code == 200 and resp.headers["X-Tpmflow-Replica"] == "replica-0"
    assert all(len(httpx.get(gw.url + Routes.HEALTH).json()["replicas"]) == 1 for _ in range(10))


def test_the_shared_registry_merges_heartbeats_failures_and_removals(tmp_path: Path) -> None:
    access = AccessDB(f"sqlite:///{tmp_path / 'access.db'}")
    a = SharedReplicaRegistry(5.0, access.engine, SECRET)
    b = SharedReplicaRegistry(5.0, access.engine, SECRET)
    other_pool = SharedReplicaRegistry(5.0, access.engine, "another pool's secret")
    info = ReplicaInfo(
        replica_id="r0",
        url="http://127.0.0.1:1",
        model="m",
        content_hash="h",
        engine="e",
        hidden_size=8,
        max_model_len=64,
    )
    a.heartbeat(info)
    a.flush()
    b.pull()
    other_pool.pull()
    assert [r.info.replica_id for r in b.live()] == ["r0"] and other_pool.live() == []
    b.mark_dead("r0")
    b.flush()
    a.pull()
    assert a.live() == [], "a failure seen by one process takes the replica out everywhere"
    time.sleep(0.01)
    b.heartbeat(info)  # it heartbeats again (to b)
    b.flush()
    a.pull()
    assert [r.info.replica_id for r in a.live()] == ["r0"]
    moved = info.model_copy(update={"url": "http://127.0.0.1:2"})  # restarted at a new address
    a.heartbeat(moved)
    a.flush()
    b.pull()
    assert b.live()[0].info.url == "http://127.0.0.1:2"
    a.remove("r0")
    a.flush()
    b.replicas["r0"].last_seen -= 10  # its removal is older than a write not yet published
    b.pull()
    assert "r0" not in b.replicas


def test_a_gateway_killed_mid_request_leaves_an_unfinished_row_that_is_closed_as_interrupted(
    workers: tuple[GatewayWorkers, AccessDB, str, list[FakeReplica]],
) -> None:
    import os
    import signal
    import threading

    from tpmflow.access.ledger import close_unfinished

    gw, access, token, fakes = workers
    outcome: list[object] = []

    def send() -> None:
        try:
            outcome.append(
                httpx.post(
                    gw.url + Routes.COMPLETIONS,
                    json={"prompt": "x", "max_tokens": 1},
                    headers={"Authorization": f"Bearer {token}", "X-Request-Id": "killed-mid-request"},
                    timeout=30,
                )
            )
        except httpx.HTTPError as exc:
            outcome.append(exc)

    with holding(fakes):  # the request is still running when the gateway dies
        sender = threading.Thread(target=send)
        sender.start()
        deadline = time.monotonic() + 60
        while not access.ledger_rows(correlation_id="killed-mid-request"):  # written when the attempt is sent
            assert time.monotonic() < deadline, "no row while the attempt runs"
            time.sleep(0.1)
        assert gw.proc is not None
        os.killpg(gw.proc.pid, signal.SIGKILL)  # the whole gateway, every worker, at once
        sender.join(timeout=60)
    assert outcome and isinstance(outcome[0], httpx.HTTPError), "the client saw the gateway die"
    (row,) = access.ledger_rows(correlation_id="killed-mid-request")
    assert (row.status, row.error_type) == (0, "Unfinished")
    # Any gateway's sweep closes it once no request can still be running (tested here by its clock).
    assert close_unfinished(access.engine, older_than=time.time() + 1) == 1
    (row,) = access.ledger_rows(correlation_id="killed-mid-request")
    assert (row.status, row.error_type) == (502, "Interrupted")
