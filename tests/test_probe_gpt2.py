"""The probe hooks on a second architecture: GPT-2 (LayerNorm, learned positions, unfused
residual), built locally with random weights, against transformers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tpmflow.schema import Add, Capture, LogitLens

PROMPT = "gpt-2 keeps its residual unfused"


@pytest.fixture(scope="module")
def gpt2_dir() -> Path:
    from tpmflow.config import models_dir
    from tpmflow.models.catalog import TINY_GPT2_MODEL
    from tpmflow.models.tiny import build_tiny_gpt2

    path = models_dir() / TINY_GPT2_MODEL
    return path if (path / "tpmflow-card.json").is_file() else build_tiny_gpt2()


@pytest.fixture(scope="module")
def gpt2_client(gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tpmflow.config import PoolConfig
    from tpmflow.payload import StoreConfig
    from tpmflow.pool import Pool

    root = tmp_path_factory.mktemp("gpt2-pool")
    cfg = PoolConfig(
        model=str(gpt2_dir),
        replicas=1,
        store=StoreConfig(path=str(root / "store")),
        database_url=f"sqlite:///{root / 'access.db'}",
    )
    cfg.engine.max_model_len = 256
    with Pool(cfg) as pool, pool.client() as client:
        yield client


def _hf(gpt2_dir: Path, vector: np.ndarray | None = None, at: int = -1) -> dict[str, np.ndarray]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(gpt2_dir), dtype=torch.float32).eval()
    ids = torch.tensor([AutoTokenizer.from_pretrained(str(gpt2_dir))(PROMPT)["input_ids"]])
    seen: dict[str, np.ndarray] = {}
    for i, block in enumerate(model.transformer.h):

        def out_hook(module: Any, args: Any, output: Any, i: int = i) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output
            if vector is not None and i == at:
                hidden = hidden + torch.from_numpy(vector)
            seen[f"blocks.{i}.hook_resid_post"] = hidden[0].detach().numpy().copy()
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        def attn_hook(module: Any, args: Any, output: Any, i: int = i) -> None:
            seen[f"blocks.{i}.hook_attn_out"] = output[0][0].detach().numpy().copy()

        def mlp_hook(module: Any, args: Any, output: Any, i: int = i) -> None:
            seen[f"blocks.{i}.hook_mlp_out"] = output[0].detach().numpy().copy()

        block.register_forward_hook(out_hook)
        block.attn.register_forward_hook(attn_hook)
        block.mlp.register_forward_hook(mlp_hook)
    with torch.no_grad():
        seen["logits"] = model(ids).logits[0].numpy()
    seen["c_proj_w"] = model.transformer.h[1].attn.c_proj.weight.detach().numpy()
    seen["c_proj_b"] = model.transformer.h[1].attn.c_proj.bias.detach().numpy()
    return seen


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_gpt2_captures_lens_and_steering_equal_transformers(gpt2_client: Any, gpt2_dir: Path) -> None:
    sites = ("hook_resid_post", "hook_attn_out", "hook_mlp_out")
    trace = gpt2_client.probe(
        PROMPT, capture=[Capture(site=s) for s in (*sites, "hook_z")], lens=LogitLens(layers=[1], top_k=3)
    )
    ref = _hf(gpt2_dir)
    for layer in range(2):
        for site in sites:
            name = f"blocks.{layer}.{site}"
            assert _rel(trace[name], ref[name]) < 1e-4, name
    z = trace["blocks.1.hook_z"]
    assert _rel(z.reshape(len(z), -1) @ ref["c_proj_w"] + ref["c_proj_b"], trace["blocks.1.hook_attn_out"]) < 1e-4
    probs = torch.softmax(torch.from_numpy(ref["logits"]), dim=-1).numpy()
    last = trace.lens[0]
    for r, pos in enumerate(last["positions"]):
        assert last["token_ids"][r] == np.argsort(-probs[pos])[:3].tolist()

    vector = np.random.default_rng(0).normal(size=128).astype(np.float32)
    steered = gpt2_client.probe(
        PROMPT,
        capture=[Capture(site="hook_resid_post")],
        interventions=[Add(site="blocks.0.hook_resid_post", vector=vector)],
    )
    ref = _hf(gpt2_dir, vector, at=0)
    for layer in range(2):
        name = f"blocks.{layer}.hook_resid_post"
        assert _rel(steered[name], ref[name]) < 1e-4, name
