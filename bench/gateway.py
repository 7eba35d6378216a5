"""The gateway's own cost per request, measured side by side in one run (prints one JSON line).

Against one fake replica (tpmflow.pool.fake_replica, answering at once, in its own process), the
same load goes (0) straight to the replica, (1) through a bare pass-through proxy on the same web
stack (uvicorn + aiohttp, no checks: the floor), (2) through the tpmflow gateway with 1 worker and
(3) with N workers. For each: bursts of 256 and 2,048 concurrent requests and a sustained open-loop
rate, giving requests/s, the latency each adds over the direct path (p50/p99) and the server's CPU
microseconds per request (user + system time of its process tree, from /proc via psutil).

Usage: python bench/gateway.py [--workers 2] [--rate 400] [--seconds 5] [--server-cores 1]
``--server-cores`` confines the server under test (proxy or gateway) to that many cores, keeping
the rest for the fake replica and the load generator; 0 leaves everything unconfined.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import psutil

PROXY_SOURCE = """
import os, aiohttp, uvicorn
UPSTREAM = os.environ["UPSTREAM"]
session = None
async def app(scope, receive, send):
    global session
    if scope["type"] == "lifespan":
        while True:
            m = await receive()
            if m["type"] == "lifespan.startup":
                session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512))
                await send({"type": "lifespan.startup.complete"})
            else:
                await session.close(); await send({"type": "lifespan.shutdown.complete"}); return
    body = b""
    while True:
        m = await receive(); body += m.get("body", b"")
        if not m.get("more_body"): break
    async with session.request(scope["method"], UPSTREAM + scope["path"], data=body,
                               headers={"Content-Type": "application/json"}) as r:
        raw = await r.read()
    await send({"type": "http.response.start", "status": r.status, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": raw})
uvicorn.run(app, host="127.0.0.1", port=int(os.environ["PORT"]), log_level="warning", access_log=False)
"""


# An older tpmflow's single-process gateway (``--before-src``), for before/after figures.
BEFORE_SOURCE = """
import os, uvicorn
from tpmflow.access import AccessDB, LedgerWriter
from tpmflow.config import PoolConfig
from tpmflow.payload import PayloadStore
from tpmflow.pool.gateway import Gateway
cfg = PoolConfig.model_validate_json(os.environ["TPMFLOW_GATEWAY_CONFIG"])
access = AccessDB(cfg.database_url)
gw = Gateway(cfg, access, LedgerWriter(access.engine), PayloadStore(cfg.store), os.environ["TPMFLOW_POOL_SECRET"])
uvicorn.run(gw.app, host="127.0.0.1", port=int(os.environ["PORT"]), log_level="warning", access_log=False)
"""


def _free_port() -> int:
    from tpmflow.pool.launch import free_port

    return free_port()


def _start(
    cmd: list[str], env: dict[str, str], cores: set[int] | None, cwd: str | None = None
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        cmd,
        cwd=cwd,  # `python -c` puts the working directory first on sys.path
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None,  # noqa: PLW1509
    )


def _stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


def _cpu_s(proc: subprocess.Popen[bytes]) -> float:
    """User + system seconds of a process and its children so far."""
    total = 0.0
    try:
        root = psutil.Process(proc.pid)
        for p in [root, *root.children(recursive=True)]:
            t = p.cpu_times()
            total += t.user + t.system
    except psutil.NoSuchProcess:
        pass
    return total


async def _wait_ready(url: str, headers: dict[str, str], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.post(
                    url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=headers
                ) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer a completion in {timeout_s} s")
            await asyncio.sleep(0.2)


async def _one(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> float:
    t0 = time.perf_counter()
    async with http.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=headers) as r:
        await r.read()
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}")
    return (time.perf_counter() - t0) * 1000


async def _burst(url: str, headers: dict[str, str], n: int) -> tuple[float, list[float]]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        started = time.perf_counter()
        latencies = await asyncio.gather(*(_one(http, url, headers) for _ in range(n)))
        return time.perf_counter() - started, list(latencies)


async def _sustained(url: str, headers: dict[str, str], rate: float, seconds: float) -> tuple[float, list[float]]:
    """Open loop: a request every 1/rate s whether or not the earlier ones are answered."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        tasks = []
        started = time.perf_counter()
        for i in range(int(rate * seconds)):
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(_one(http, url, headers)))
        latencies = await asyncio.gather(*tasks)
        return time.perf_counter() - started, list(latencies)


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


async def _measure(
    url: str, headers: dict[str, str], server: subprocess.Popen[bytes] | None, args: Any
) -> dict[str, Any]:
    await _wait_ready(url, headers)
    await _burst(url, headers, 64)  # warm connections and caches
    out: dict[str, Any] = {}
    for name, run in (
        ("burst256", lambda: _burst(url, headers, 256)),
        ("burst2048", lambda: _burst(url, headers, 2048)),
        ("sustained", lambda: _sustained(url, headers, args.rate, args.seconds)),
    ):
        cpu0 = _cpu_s(server) if server else 0.0
        wall, lat = await run()
        cpu = (_cpu_s(server) - cpu0) if server else 0.0
        out[name] = {
            "requests": len(lat),
            "req_per_s": round(len(lat) / wall, 1),
            "p50_ms": round(_pct(lat, 50), 2),
            "p99_ms": round(_pct(lat, 99), 2),
            "server_cpu_us_per_req": round(cpu / len(lat) * 1e6, 1) if server else None,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rate", type=float, default=400.0, help="sustained requests/s")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--server-cores", type=int, default=1)
    parser.add_argument("--before-src", help="a checkout of an older tpmflow: also measure its gateway (1 process)")
    args = parser.parse_args()

    from tpmflow.access import AccessDB
    from tpmflow.config import GatewayConfig, PoolConfig
    from tpmflow.gateway.serve import CONFIG_ENV, SECRET_ENV, WORKERS_ENV
    from tpmflow.payload import StoreConfig
    from tpmflow.protocol import ReplicaSettings

    ncores = len(os.sched_getaffinity(0))
    server_cores = set(range(ncores - args.server_cores, ncores)) if 0 < args.server_cores < ncores else None
    client_cores = set(range(ncores)) - (server_cores or set()) or None
    if client_cores:
        os.sched_setaffinity(0, client_cores)  # the load generator stays off the server's cores

    secret = "bench-secret"
    root = Path(tempfile.mkdtemp(prefix="tpmflow-bench-gateway-"))
    cfg = PoolConfig(
        model="fake-model",
        gateway=GatewayConfig(
            max_inflight=256, queue_limit=8192, request_timeout_s=120
        ),  # 512 connections, as the proxy
        store=StoreConfig(path=str(root / "store")),
        database_url=f"sqlite:///{root / 'access.db'}",
    )
    access = AccessDB(cfg.database_url)
    access.ensure_principal("bench", "bench", {"generate"})
    token = access.create_token("bench")
    auth = {"Authorization": f"Bearer {token}"}

    results: dict[str, Any] = {}
    replica_port = _free_port()
    replica_url = f"http://127.0.0.1:{replica_port}"

    def fake(gateway_url: str) -> subprocess.Popen[bytes]:
        settings = ReplicaSettings(replica_id="replica-0", gateway_url=gateway_url, pool_secret=secret)
        env = {**settings.to_env(), "PORT": str(replica_port)}
        return _start([sys.executable, "-m", "tpmflow.pool.fake_replica"], env, client_cores)

    # (0) direct and (1) bare proxy: the fake replica takes no secret here.
    replica = _start([sys.executable, "-m", "tpmflow.pool.fake_replica"], {"PORT": str(replica_port)}, client_cores)
    try:
        results["direct"] = asyncio.run(_measure(replica_url, {}, None, args))
        port = _free_port()
        proxy = _start([sys.executable, "-c", PROXY_SOURCE], {"PORT": str(port), "UPSTREAM": replica_url}, server_cores)
        try:
            results["bare_proxy"] = asyncio.run(_measure(f"http://127.0.0.1:{port}", {}, proxy, args))
        finally:
            _stop(proxy)
    finally:
        _stop(replica)

    runs: list[tuple[str, int, str | None]] = [("gateway_1w", 1, None), (f"gateway_{args.workers}w", args.workers, None)]
    if args.before_src:
        runs.insert(0, ("gateway_before", 1, args.before_src))
    for name, workers, source in runs:
        port = _free_port()
        gateway_url = f"http://127.0.0.1:{port}"
        cfg.gateway.workers = workers
        env = {CONFIG_ENV: cfg.model_dump_json(), SECRET_ENV: secret, WORKERS_ENV: str(workers)}
        if source is None:
            cmd = [sys.executable, "-m", "tpmflow.gateway.serve", "--port", str(port), "--workers", str(workers)]
        else:
            cmd = [sys.executable, "-c", BEFORE_SOURCE]
            env.update(PYTHONPATH=source, PORT=str(port))
        gateway = _start(cmd, env, server_cores, cwd=source)
        replica = fake(gateway_url)
        try:
            results[name] = asyncio.run(_measure(gateway_url, auth, gateway, args))
        finally:
            _stop(replica)
            _stop(gateway)

    floor = results["bare_proxy"]
    summary: dict[str, Any] = {"bench": "gateway", "server_cores": args.server_cores, "cores": ncores}
    for name in [n for n, _, _ in runs]:
        g = results[name]
        summary[name] = {
            "cpu_vs_bare_proxy": round(
                g["burst2048"]["server_cpu_us_per_req"] / floor["burst2048"]["server_cpu_us_per_req"], 2
            ),
            "added_p50_ms_burst256": round(g["burst256"]["p50_ms"] - results["direct"]["burst256"]["p50_ms"], 1),
            "req_per_s_burst2048": g["burst2048"]["req_per_s"],
        }
    summary["workers_speedup_burst2048"] = round(
        results[f"gateway_{args.workers}w"]["burst2048"]["req_per_s"] / results["gateway_1w"]["burst2048"]["req_per_s"],
        2,
    )
    summary["detail"] = results
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
