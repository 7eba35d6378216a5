"""The tiny model loads in vLLM's CPU build and generates (real engine, no mocks)."""

from __future__ import annotations

from typing import Any


def test_tiny_model_generates(tiny_llm: Any) -> None:
    from vllm import SamplingParams

    out = tiny_llm.generate(
        ["The quick brown fox"], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True), use_tqdm=False
    )
    completion = out[0].outputs[0]
    assert len(completion.token_ids) == 12
    assert isinstance(completion.text, str) and completion.text


def test_seeded_sampling_is_reproducible(tiny_llm: Any) -> None:
    from tpmflow.models.offline_engine import sample_texts

    a = sample_texts(tiny_llm, n=4, seed=11, max_tokens=16)
    b = sample_texts(tiny_llm, n=4, seed=11, max_tokens=16)
    c = sample_texts(tiny_llm, n=4, seed=12, max_tokens=16)
    assert a == b
    assert a != c
