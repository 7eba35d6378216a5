"""Shared fixtures. Engines are expensive (~20-30 s to start), so tests share them per session."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tpmflow.config import models_dir
from tpmflow.models.catalog import DEMO_MODEL, TINY_MODEL

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
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
        gateway=GatewayConfig(request_timeout_s=60, max_inflight=64, queue_limit=512),
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
