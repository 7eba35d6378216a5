"""Replicas split over two ranks, on real vLLM: tensor parallel (TP=2, each layer's heads and MLP
split) and pipeline parallel (PP=2, one layer per stage), each on a tiny random Llama (2 heads, 2 KV
heads, 2 layers, norms randomised) against transformers on the same weights, which the unsplit
replica matches to 1e-7 (tests/test_probe_families.py).

Checked per shape: the start self-check; greedy tokens; final hidden states (embed); captures at
every site and layer, ``hook_z`` with all heads, each recorded once (no rank's duplicate); the lens
at both layers (under PP=2 layer 0's is computed by the other stage); Add, Replace and Zero on
layers of both halves; two requests with different specs in one step.

Two ranks need ``VLLM_CPU_OMP_THREADS_BIND="0|1"`` (one core each); one engine at a time (vLLM's CPU
workers spin while idle).
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import numpy as np
import pytest
import torch
from test_probe_families import IDS, SITES, TOL, _check_batched, _check_edits, _hf, _rel

from tpmflow.engine.hooks import capture_array
from tpmflow.engine.probe import merge_worker_results
from tpmflow.engine.selfcheck import run_self_check_offline
from tpmflow.pool.replica import rank_binds

FAMILY = "llama-split"
PROMPTS = [IDS, IDS[::-1], [1, 7, 9, 11, 3]]


def _engine(tp: int, pp: int, family: str = FAMILY) -> Any:
    from tpmflow.models.offline_engine import open_offline_engine
    from tpmflow.models.tiny_families import build_tiny_family

    # One core set per rank, as the pool's launcher gives them; lens calls of 3 rows (the tiny
    # vocabulary is 101), so a step's lens queue fills and flushes part-way, in several chunks.
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = rank_binds(sorted(os.sched_getaffinity(0)), tp * pp)
    os.environ["TPMFLOW_LENS_LOGITS_ELEMENTS"] = str(3 * 101)
    try:
        return open_offline_engine(
            build_tiny_family(family),
            max_model_len=64,
            enable_prefix_caching=False,
            worker_extension_cls="tpmflow.engine.hooks.TpmflowWorkerExtension",
            tensor_parallel_size=tp,
            pipeline_parallel_size=pp,
            distributed_executor_backend="mp",
        )
    finally:
        del os.environ["VLLM_CPU_OMP_THREADS_BIND"], os.environ["TPMFLOW_LENS_LOGITS_ELEMENTS"]


def _hf_greedy(model: Any, ids: list[int], n: int) -> list[int]:
    out: list[int] = []
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            out.append(nxt)
            seq.append(nxt)
    return out


def _hf_heads_and_lens(model: Any) -> dict[str, np.ndarray]:
    """transformers' per-head attention outputs (the output projection's input) and the lens of
    layer 0 (final norm + unembedding of its output stream)."""
    seen: dict[str, np.ndarray] = {}
    handles = [
        layer.self_attn.o_proj.register_forward_pre_hook(
            lambda m, a, i=i: seen.__setitem__(f"blocks.{i}.hook_z", a[0][0].detach().numpy().copy())
        )
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        with torch.no_grad():
            out = model(torch.tensor([IDS]), output_hidden_states=True)
            stream0 = out.hidden_states[1]  # after layer 0
            seen["lens0"] = torch.softmax(model.lm_head(model.model.norm(stream0))[0], dim=-1).numpy()
            seen["final"] = out.hidden_states[-1][0].numpy()  # after the final norm
            seen["logits"] = out.logits[0].numpy()
    finally:
        for h in handles:
            h.remove()
    return seen


def _embed(llm: Any, ids: list[int]) -> np.ndarray:
    from vllm import SamplingParams

    key = uuid.uuid4().hex
    params = SamplingParams(
        max_tokens=1, temperature=0.0, skip_reading_prefix_cache=True, extra_args={"tpmflow": {"embed": key}}
    )
    llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)
    found = [r[key] for r in llm.collective_rpc("tpmflow_take", args=([key],)) if r.get(key) is not None]
    assert len(found) == 1, f"{len(found)} workers recorded the embedding (one should)"
    assert found[0]["complete"]
    return capture_array(found[0])


def _check_split(tp: int, pp: int) -> dict[str, float]:
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams

    from tpmflow.models.tiny_families import build_tiny_family

    model = AutoModelForCausalLM.from_pretrained(str(build_tiny_family(FAMILY)), dtype=torch.float32).eval()
    heads = model.config.num_attention_heads
    llm = _engine(tp, pp)
    worst: dict[str, float] = {}
    try:
        info = llm.collective_rpc("tpmflow_install")[0]
        assert (info["tensor_parallel"], info["pipeline_parallel"]) == (tp, pp), info
        assert info["num_heads"] == heads and info["num_layers"] == 2 and info["layout"] == "Llama", info
        check = run_self_check_offline(llm, info)
        assert check.ok, check
        worst["self-check"] = check.worst

        # Generation: greedy tokens as the unsplit model's.
        params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        for p, out in zip(PROMPTS, outs, strict=True):
            assert list(out.outputs[0].token_ids) == _hf_greedy(model, p, 8), p

        ref = _hf(model, FAMILY)
        extra = _hf_heads_and_lens(model)
        worst["embed"] = _rel(_embed(llm, IDS), extra["final"])
        assert worst["embed"] < TOL, worst

        # Every site and layer, hook_z with all heads, each once; the lens at both layers.
        from vllm import SamplingParams as SP

        key = uuid.uuid4().hex
        spec = {
            "key": key,
            "captures": [{"site": s, "layers": [0, 1], "positions": None} for s in (*SITES, "hook_z")],
            "edits": [],
            "lens": {"layers": [0, 1], "top_k": 5, "positions": None},
            "n_prompt": len(IDS),
        }
        llm.generate(
            [{"prompt_token_ids": IDS}],
            SP(max_tokens=1, temperature=0.0, skip_reading_prefix_cache=True, extra_args={"tpmflow": {"probe": spec}}),
            use_tqdm=False,
        )
        raw = llm.collective_rpc("tpmflow_take_probe", args=([key], "", True))
        assert sum(len(r[key]["captures"]) for r in raw if r.get(key)) == 2 * (len(SITES) + 1), "each capture once"
        from tpmflow.engine.probe import add_deferred_lens

        found = merge_worker_results(raw, key)
        assert found is not None
        if found["lens_streams"]:
            assert pp > 1, "only a stage without the final norm defers its lens"
            tables = llm.collective_rpc("tpmflow_lens_of", args=(found["lens_streams"], found["top_k"]))
            assert sum(1 for t in tables if t) == 1, "the lens of a layer is computed once"
            add_deferred_lens(found, tables)
        got = {f"blocks.{c['layer']}.{c['site']}": np.frombuffer(c["bytes"], np.float32).reshape(c["shape"])
               for c in found["captures"]}  # fmt: skip
        worst["captures"] = max(_rel(got[f"blocks.{i}.{s}"], ref[f"blocks.{i}.{s}"]) for i in (0, 1) for s in SITES)
        assert worst["captures"] < TOL, worst
        for i in (0, 1):
            z = got[f"blocks.{i}.hook_z"]
            assert z.shape == (len(IDS), heads, model.config.hidden_size // heads), z.shape
            worst["hook_z"] = max(worst.get("hook_z", 0.0), _rel(z.reshape(len(IDS), -1), extra[f"blocks.{i}.hook_z"]))
        assert worst["hook_z"] < TOL, worst
        lens = {e["layer"]: e for e in found["lens"]}
        assert sorted(lens) == [0, 1], lens.keys()
        probs = {0: extra["lens0"], 1: torch.softmax(torch.from_numpy(extra["logits"]), dim=-1).numpy()}
        for layer, entry in lens.items():
            assert entry["positions"] == list(range(len(IDS)))
            for r, pos in enumerate(entry["positions"]):
                assert entry["token_ids"][r] == np.argsort(-probs[layer][pos])[:5].tolist(), (layer, pos)
                np.testing.assert_allclose(entry["probs"][r], np.sort(probs[layer][pos])[::-1][:5], atol=1e-5)

        # Edits on layers of both halves (under PP=2: of both stages), as a PyTorch hook does them.
        hidden = model.config.hidden_size
        worst["edits"] = _check_edits(llm, model, FAMILY, hidden, TOL, zero_rows_layer=1)
        worst["batched"] = _check_batched(llm, hidden, pipelined=pp > 1)
    finally:
        del llm
    return worst


@pytest.mark.engine
def test_a_tensor_parallel_replica_serves_every_probe_feature_as_the_unsplit_model() -> None:
    print("TP=2", _check_split(2, 1))


@pytest.mark.engine
def test_a_pipeline_parallel_replica_serves_every_probe_feature_as_the_unsplit_model() -> None:
    print("PP=2", _check_split(1, 2))


@pytest.mark.engine
def test_falcon_under_tensor_parallelism_refuses_probes_by_name_and_still_embeds() -> None:
    """vLLM's Falcon (parallel attention) all-reduces attention + MLP once: a rank's sites are partial
    sums, so probes are refused with the reason; the final states (embed, heads) stay served."""
    from test_probe_families import _probe
    from transformers import AutoModelForCausalLM

    from tpmflow.models.tiny_families import build_tiny_family

    model = AutoModelForCausalLM.from_pretrained(str(build_tiny_family("falcon-split")), dtype=torch.float32).eval()
    llm = _engine(2, 1, "falcon-split")
    try:
        info = llm.collective_rpc("tpmflow_install")[0]
        assert info["layout"] == "Falcon" and "partial sums" in str(info["probe_error"]), info
        assert "tensor_parallel_size 1" in info["probe_error"]
        assert _probe(llm, ["hook_resid_post"]) is None, "no probe is served"
        with torch.no_grad():
            final = model.transformer(torch.tensor([IDS])).last_hidden_state[0].numpy()
        assert _rel(_embed(llm, IDS), final) < TOL
    finally:
        del llm
