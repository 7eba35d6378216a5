"""Shared fixtures. Engines are expensive (~20-30 s to start), so tests share them per session."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tpmflow.config import models_dir
from tpmflow.models.catalog import DEMO_MODEL, TINY_MODEL

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


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

    llm = open_offline_engine(tiny_model_dir)
    yield llm
    del llm
