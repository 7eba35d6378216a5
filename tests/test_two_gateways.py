"""Two gateways, one pool (issue 16): two `tpmflow gateway` processes share the facility database
and the pool secret; every replica heartbeats to both. A gateway SIGKILLed with requests in flight:
the client sends each dropped request to the other gateway with the same request id, every one is
answered, none is charged twice, the ledger has each attempt once, and the allocation is exact
once the dead gateway's reservations are swept.

The gateways are real processes on real HTTP; the replicas are fake (a 2 s answer each), so the
kill lands while every request is in flight."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

from tpmflow import Client
from tpmflow.access import AccessDB
from tpmflow.access.ledger import UNFINISHED, close_unfinished
from tpmflow.pool.fake_replica import FakeReplica, holding
from tpmflow.pool.launch import free_port
from tpmflow.protocol import SECRET_ENV, Routes

SECRET = "two-gateways-secret-" + uuid.uuid4().hex


def _start_gateway(config: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, SECRET_ENV: SECRET}
    cmd = [sys.executable, "-m", "tpmflow", "gateway", "--config", str(config), "--port", str(port)]
    with log.open("ab") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_replicas(url: str, n: int, log: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if len(httpx.get(url + Routes.HEALTH, timeout=2).json().get("replicas", [])) >= n:
                return
        except (httpx.HTTPError, ValueError):
            pass
        assert time.monotonic() < deadline, f"gateway {url} never saw {n} replicas:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


@pytest.fixture()
def two_gateways(tmp_path: Path, postgres_url: str) -> Iterator[dict]:
    database = postgres_url  # a facility's database: what several gateway hosts share
    project = "gw2-" + uuid.uuid4().hex[:8]
    access = AccessDB(database)
    access.ensure_principal(project + "-alice", project, {"generate"})
    token = access.create_token(project + "-alice")
    access.allocations.create(project, 100.0)
    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    config = tmp_path / "pool.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": "fake-model",
                "database_url": database,
                "store": {"path": str(tmp_path / "store")},
                "gateway": {"request_timeout_s": 30, "peers": urls},
            }
        )
    )
    logs = [tmp_path / "gateway-a.log", tmp_path / "gateway-b.log"]
    procs = [_start_gateway(config, port, log) for port, log in zip(ports, logs, strict=True)]
    fakes = [
        FakeReplica(gateway_url=",".join(urls), secret=SECRET, replica_id=f"replica-{i}", delay_s=2.0, heartbeat_s=0.3)
        for i in range(2)
    ]
    for fake in fakes:
        fake.start()
    try:
        for url, log in zip(urls, logs, strict=True):
            _wait_replicas(url, 2, log)
        yield {"urls": urls, "procs": procs, "fakes": fakes, "access": access, "token": token, "project": project}
    finally:
        for fake in fakes:
            fake.stop()
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=15)
        access.engine.dispose()


def test_a_gateway_killed_mid_request_loses_nothing_and_charges_once(two_gateways: dict) -> None:
    urls, procs, access = two_gateways["urls"], two_gateways["procs"], two_gateways["access"]
    project = two_gateways["project"]
    n = 8
    fakes = two_gateways["fakes"]
    with holding(fakes) as gate:  # the replicas hold what they get until A is dead
        with Client(urls, two_gateways["token"], retries=0) as client, ThreadPoolExecutor(n) as threads:
            assert client.health()["status"] in ("ok", "degraded") and client.url == urls[0]
            answers = [threads.submit(client.generate, "CCO", max_tokens=2) for _ in range(n)]
            deadline = time.monotonic() + 60  # every request reached a replica through gateway A
            while sum(len(f.seen) for f in fakes) < n and time.monotonic() < deadline:
                time.sleep(0.05)
            assert sum(len(f.seen) for f in fakes) == n, "all requests at the replicas through A"
            os.killpg(procs[0].pid, signal.SIGKILL)
            gate.set()
            results = [a.result(timeout=120) for a in answers]
    assert all(r.usage["completion_tokens"] == 2 for r in results)
    seen = sum(len(f.seen) for f in two_gateways["fakes"])
    assert seen == 2 * n, f"each request reached a replica through A, then once more through B ({seen})"
    ids = {r.request_id for r in results}
    assert len(ids) == n

    # The ledger: every request once answered (by B); A's attempts at most as unfinished rows.
    deadline = time.monotonic() + 60
    while True:
        rows = access.ledger_rows(principal=project + "-alice")
        answered = [r for r in rows if r.status == 200]
        if len(answered) >= n or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert sorted(r.correlation_id for r in answered) == sorted(ids), "each request answered exactly once"
    assert {r.status for r in rows} <= {200, UNFINISHED}, [(r.status, r.error_type) for r in rows]
    assert len({r.request_id for r in rows}) == len(rows), "each attempt is one row"
    assert all(r.charge_su == 0 for r in rows if r.status != 200), "an attempt A never finished is not charged"

    # A's reservations expire and are swept; its unfinished rows close as Interrupted: spent is
    # exactly what B charged, nothing stays reserved.
    later = time.time() + 3600
    access.allocations.sweep(now=later)
    close_unfinished(access.engine, later)
    balance = access.allocations.show(project)[0]
    charged = sum(r.charge_su for r in answered)
    assert charged > 0 and balance["spent_su"] == pytest.approx(charged, abs=1e-6)
    assert balance["reserved_su"] == 0
    assert all(r.status in (200, 502) for r in access.ledger_rows(principal=project + "-alice"))

    # The pool goes on behind B; the replicas still heartbeat there.
    with Client(urls, two_gateways["token"], retries=0) as client:
        assert client.generate("CCO", max_tokens=2).usage["completion_tokens"] == 2
        assert client.url == urls[1]
        assert len(client.health()["replicas"]) == 2


def test_gateway_refuses_to_start_without_the_pool_secret(tmp_path: Path) -> None:
    config = tmp_path / "pool.yaml"
    config.write_text(yaml.safe_dump({"model": "fake-model"}))
    env = {k: v for k, v in os.environ.items() if k != SECRET_ENV}
    out = subprocess.run(
        [sys.executable, "-m", "tpmflow", "gateway", "--config", str(config), "--port", str(free_port())],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and SECRET_ENV in out.stdout + out.stderr


def test_replicas_heartbeat_to_every_gateway_and_advertise_a_reachable_name(tmp_path: Path) -> None:
    import socket

    from tpmflow.config import GatewayConfig, PoolConfig
    from tpmflow.pool.launch import advertised_host
    from tpmflow.pool.replica import replica_env
    from tpmflow.protocol import ReplicaSettings

    cfg = PoolConfig(model="fake-model", gateway=GatewayConfig(peers=["http://gw-b:8321", "http://gw-c:8321/"]))
    env = replica_env(cfg, "replica-0", "http://node7:9000", "http://gw-a:8321", "s", None)
    settings = ReplicaSettings.from_env(env)
    assert settings.gateway_urls == ["http://gw-a:8321", "http://gw-b:8321", "http://gw-c:8321"]
    assert advertised_host("0.0.0.0") == socket.gethostname(), "a wildcard bind means nothing on another node"
    assert advertised_host("10.1.2.3") == "10.1.2.3"


def test_a_pool_whose_peers_could_not_use_its_replicas_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from tpmflow.config import PoolConfig
    from tpmflow.pool import Pool

    remote = {"gateway": {"peers": ["http://gw-b:8321"]}}
    monkeypatch.delenv(SECRET_ENV, raising=False)
    with pytest.raises(ValueError, match=f"set {SECRET_ENV} to the same value"):
        Pool(PoolConfig(model="m", **remote))
    monkeypatch.setenv(SECRET_ENV, "shared")
    with pytest.raises(ValueError, match="replicas listen on 127.0.0.1: set launcher.replica_host"):
        Pool(PoolConfig(model="m", **remote))
    with pytest.raises(ValueError, match="the payload store must be shared"):
        Pool(PoolConfig(model="m", launcher={"replica_host": "0.0.0.0"}, **remote))
    ok = Pool(PoolConfig(model="m", launcher={"replica_host": "0.0.0.0"}, store={"connector": "redis"}, **remote))
    assert ok.secret == "shared", "every gateway of the pool shares the secret"
