"""Shared fixtures. Engines are expensive (~20-30 s to start), so tests share them per session."""

from __future__ import annotations

import asyncio
import functools
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest

from tpmflow.config import models_dir
from tpmflow.models.catalog import DEMO_MODEL, TINY_MODEL

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# The pools' gateways wait this long for a heartbeat before a replica leaves the rotation: two
# engines spinning on a small machine's 2 cores can starve a heartbeat for seconds. A replica that
# really dies is marked dead at once (its launcher, or a failed connection), whatever this is.
HEARTBEAT_S = 30.0
# Parsl's HTEX workers and replica children must find the venv's executables (as `make` arranges).
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The tiny model from the real cache, built here if missing (a few seconds)."""
    path = models_dir() / TINY_MODEL
    if not (path / "tpmflow-card.json").is_file():
        from tpmflow.models.tiny import build_tiny

        build_tiny()
    return path


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    """The trained demo model. `make test` builds it first; without it a plain pytest run skips
    these tests loudly, and under `make test` (TPMFLOW_REQUIRE_DEMO=1) its absence is a failure."""
    path = models_dir() / DEMO_MODEL
    if not (path / "tpmflow-card.json").is_file():
        message = f"demo model missing at {path}: run `tpmflow models build-demo` (make test does)"
        if os.environ.get("TPMFLOW_REQUIRE_DEMO") == "1":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def tiny_llm(tiny_model_dir: Path) -> Iterator[Any]:
    """vLLM's offline engine (CPU build) over the tiny model, shared by the session."""
    from tpmflow.models.offline_engine import open_offline_engine

    llm = open_offline_engine(tiny_model_dir, worker_extension_cls="tpmflow.engine.hooks.TpmflowWorkerExtension")
    yield llm
    del llm


@pytest.fixture(scope="session")
def pool(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real pool: gateway + 2 replicas of the tiny model on vLLM's CPU build, shared by the session.

    Its ledger (SQLite) and payload store live in a temporary directory.
    """
    from tpmflow.config import GatewayConfig, PoolConfig
    from tpmflow.payload import StoreConfig
    from tpmflow.pool import Pool

    root = tmp_path_factory.mktemp("pool")
    cfg = PoolConfig(
        model=str(tiny_model_dir),
        served_model_name="tiny-llama",
        replicas=2,
        gateway=GatewayConfig(request_timeout_s=60, max_inflight=64, queue_limit=512, heartbeat_timeout_s=HEARTBEAT_S),
        store=StoreConfig(path=str(root / "store"), inline_limit_bytes=256 << 10, max_payload_bytes=96 << 20),
        database_url=f"sqlite:///{root / 'access.db'}",
        parts_path=str(root / "parts"),
        max_activation_bytes=1 << 20,
    )
    cfg.engine.max_model_len = 1024
    with Pool(cfg) as running:
        yield running


@pytest.fixture(scope="session")
def client(pool: Any) -> Iterator[Any]:
    with pool.client() as c:
        yield c


@contextmanager
def _serving_side_gateway(pool: Any, cfg: Any) -> Iterator[tuple[Any, str, asyncio.AbstractEventLoop]]:
    import uvicorn

    from tpmflow.gateway import Gateway
    from tpmflow.payload import PayloadStore
    from tpmflow.pool.launch import free_port

    gw = Gateway(cfg, pool.access, pool.ledger, PayloadStore(cfg.store), pool.secret)
    for replica in pool.gateway.registry.live():
        gw.registry.heartbeat(replica.info)
    gw.registry.timeout = 1e9  # this gateway gets no heartbeats of its own
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(gw.app, host="127.0.0.1", port=port, log_level="warning"))
    loop = asyncio.new_event_loop()  # the test may schedule work on the server's own loop
    thread = threading.Thread(target=loop.run_until_complete, args=(server.serve(),), daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield gw, f"http://127.0.0.1:{port}", loop
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture()
def side_gateway(pool: Any) -> Callable[[Any], AbstractContextManager[tuple[Any, str, asyncio.AbstractEventLoop]]]:
    """``with side_gateway(cfg) as (gateway, url, loop)``: a second gateway with its own config
    (admission, rate limits…) over the session pool's replicas, ledger and access database."""
    return functools.partial(_serving_side_gateway, pool)


# -- PostgreSQL, a facility's ledger ------------------------------------------------------------

POSTGRES_URL = os.environ.get("TPMFLOW_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _postgres_or_fail() -> str:
    """PostgreSQL is a facility's ledger. CI must have it (.ci/run starts it); elsewhere skip loudly."""
    from sqlalchemy import create_engine, text

    try:
        with create_engine(POSTGRES_URL).connect() as conn:
            conn.execute(text("select 1"))
    except Exception as exc:  # noqa: BLE001
        message = f"PostgreSQL not reachable at {POSTGRES_URL}: {exc}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip("LOUD SKIP: " + message)
    return POSTGRES_URL


@pytest.fixture()
def postgres_url() -> str:
    """The facility's PostgreSQL (CI has it; elsewhere a loud skip)."""
    return _postgres_or_fail()


@pytest.fixture(params=["sqlite", "postgresql"])
def access(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """An access database (principals, tokens, ledger, allocations) on SQLite and on PostgreSQL."""
    from tpmflow.access import AccessDB

    if request.param == "sqlite":
        db = AccessDB(f"sqlite:///{tmp_path / 'access.db'}")
    else:
        db = AccessDB(_postgres_or_fail())
    yield db
    db.engine.dispose()
