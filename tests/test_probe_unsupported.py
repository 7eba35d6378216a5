"""Serving never depends on the probe hooks: a replica of an architecture the layout table does
not cover (GPT-J) starts, joins the
pool and generates; probes to it are refused naming the class vLLM loaded and what is supported,
and ``/health`` says why probes are off."""

from __future__ import annotations

from pathlib import Path

import pytest

from tpmflow.errors import InvalidRequest
from tpmflow.schema import Capture


@pytest.mark.engine
def test_unsupported_architecture_serves_and_refuses_probes_clearly(tmp_path: Path) -> None:
    from tpmflow.config import PoolConfig
    from tpmflow.models.tiny_families import build_tiny_family
    from tpmflow.payload import StoreConfig
    from tpmflow.pool import Pool

    cfg = PoolConfig(
        model=str(build_tiny_family("gpt-j")),
        replicas=1,
        store=StoreConfig(path=str(tmp_path / "store")),
        database_url=f"sqlite:///{tmp_path / 'access.db'}",
    )
    cfg.engine.max_model_len = 64
    with Pool(cfg) as pool, pool.client() as client:
        assert client.generate("hello", max_tokens=4).finish_reason == "length"  # served
        with pytest.raises(InvalidRequest) as err:
            client.probe("hello", capture=[Capture(site="hook_resid_post")])
        message = str(err.value)
        assert "GPTJForCausalLM" in message
        assert "LlamaForCausalLM" in message  # what is supported
        (replica,) = client.health()["replicas"]
        assert replica["probes"].startswith("disabled: probes are not available")
        with pytest.raises(InvalidRequest, match="embeddings need tpmflow's hooks"):  # a clear 400, not a 502
            client.embed(["hello"])
        assert client.generate("still serving", max_tokens=2).finish_reason == "length"
