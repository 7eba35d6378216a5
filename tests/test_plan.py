"""`tpmflow plan` against published deployments, and its answers to bad input (no engine).

Published shapes checked: ALCF serves Llama 3.1 405B (bf16) on 2 Aurora nodes at TP=8 x PP=2 with
a short --max-model-len (user guide, "Inference with vLLM" on Aurora); vLLM runs the FP8 405B on
one 8x H100 node (vLLM blog, Llama 3.1 support, 2024-07-23); Moonshot's Kimi K2 deploy guide gives
16 GPUs as the smallest unit for its FP8 weights at 128k on H200; ALCF serves Llama 3.1 70B (bf16,
8192 tokens) on one Polaris node at TP=4, or on 2 nodes at TP=4 x PP=2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tpmflow.access.costs import CostModel
from tpmflow.cli import app
from tpmflow.planning import ModelSpec, ProbeTraffic, Workload, fit, lookup, plan, roofline
from tpmflow.planning.roofline import decode, efficiency_for

LLAMA_405B = {
    "model_type": "llama",
    "hidden_size": 16384,
    "num_hidden_layers": 126,
    "num_attention_heads": 128,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "intermediate_size": 53248,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
LLAMA_70B = {**LLAMA_405B, "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64}
LLAMA_70B["intermediate_size"] = 28672
KIMI_K2 = {  # DeepSeek-V3 architecture, FP8 block-quantised checkpoint
    "model_type": "kimi_k2",
    "architectures": ["DeepseekV3ForCausalLM"],
    "hidden_size": 7168,
    "num_hidden_layers": 61,
    "first_k_dense_replace": 1,
    "n_routed_experts": 384,
    "num_experts_per_tok": 8,
    "n_shared_experts": 1,
    "moe_intermediate_size": 2048,
    "intermediate_size": 18432,
    "num_attention_heads": 64,
    "num_key_value_heads": 64,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_rope_head_dim": 64,
    "qk_nope_head_dim": 128,
    "v_head_dim": 128,
    "vocab_size": 163840,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]},
}


def spec(config: dict[str, Any], name: str, dtype: str | None = None) -> ModelSpec:
    return ModelSpec.from_hf_config(config, name=name, dtype=dtype)


# -- published deployments ---------------------------------------------------------------------


@pytest.mark.parametrize("context", [1024, 8192])
def test_llama_405b_bf16_on_aurora_is_tp8_pp2_over_two_nodes(context: int) -> None:
    model = spec(LLAMA_405B, "llama-3.1-405b")
    assert model.total_params() == pytest.approx(405.85e9, rel=0.005)
    result = plan(model, lookup("aurora"), Workload(context=context))
    shape = result.smallest
    # 128 heads do not divide over a node's 12 tiles: TP=8, and a second stage on a second node.
    assert (shape.tp, shape.pp, shape.nodes, shape.devices) == (8, 2, 2, 16)
    assert result.shape == shape and result.replicas == 1 and result.total_nodes == 2
    assert not fit(model, lookup("aurora"), 4, 3, context=context).fits, "one node's 12 tiles are too few"


def test_llama_405b_fp8_fits_one_node_of_8_h100() -> None:
    model = spec(LLAMA_405B, "llama-3.1-405b-fp8", dtype="fp8")
    assert model.dtype == "fp8" and model.compute_dtype == "bf16"
    shape = plan(model, lookup("h100-80gb"), Workload(context=8192)).smallest
    assert (shape.tp, shape.pp, shape.nodes) == (8, 1, 1)
    # Meta's FP8 checkpoint keeps attention in bf16 in every layer, and the MLPs of its first and
    # last layers (fbgemm_fp8, modules_to_not_convert, as it ships): still one node.
    attention = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(126) for p in "qkvo"]
    mlps = [f"model.layers.{i}.mlp.{p}_proj" for i in (0, 125) for p in ("gate", "up", "down")]
    meta = {**LLAMA_405B, "quantization_config": {"quant_method": "fbgemm_fp8",
                                                  "modules_to_not_convert": [*attention, *mlps, "lm_head"]}}  # fmt: skip
    meta_model = spec(meta, "llama-3.1-405b-instruct-fp8")
    assert meta_model.unquantized == ("attention",), "two layers' MLPs are not every layer's"
    routers = {"quant_method": "compressed-tensors", "ignore": ["lm_head", "re:.*mlp.gate$"]}
    assert spec({**KIMI_K2, "quantization_config": routers}, "k2-ct").unquantized == ()
    assert meta_model.weight_bytes() > model.weight_bytes() * 1.1
    shape = plan(meta_model, lookup("h100"), Workload(context=8192)).smallest
    assert (shape.tp, shape.pp, shape.nodes) == (8, 1, 1)


def test_kimi_k2_fp8_at_128k_needs_16_h200s() -> None:
    model = spec(KIMI_K2, "kimi-k2")
    assert model.total_params() == pytest.approx(1.03e12, rel=0.01)
    assert model.active_params() == pytest.approx(32.5e9, rel=0.03)
    assert model.dtype == "fp8"
    # MLA caches one 512 + 64 latent per token per layer, in bf16, whole on every TP rank.
    assert model.kv_bytes_per_token() == 61 * 576 * 2
    h200 = lookup("h200")
    one_node = fit(model, h200, 8, 1, context=131072)
    assert not one_node.fits and "needs" in one_node.problems[0]
    result = plan(model, h200, Workload(context=131072))
    assert result.smallest.devices == 16 and result.smallest.nodes == 2
    assert (result.smallest.tp, result.smallest.pp) == (8, 2)
    # With a short context the same weights do fit one node (people serve K2 so): the KV cache decides.
    assert fit(model, h200, 8, 1, context=16384).fits


def test_llama_70b_on_polaris() -> None:
    model = spec(LLAMA_70B, "llama-3-70b")
    polaris = lookup("polaris")
    # ALCF: one node at TP=4 holds it with max_model_len 8192 (one sequence, little room to spare).
    alone = plan(model, polaris, Workload(context=8192))
    assert (alone.smallest.tp, alone.smallest.pp, alone.smallest.nodes) == (4, 1, 1)
    assert alone.smallest.max_sequences < 4
    # Sixteen such sequences at once: a 2-node replica (TP=4 x PP=2) beats 16 one-node replicas.
    busy = plan(model, polaris, Workload(context=8192, concurrent=16))
    assert busy.smallest == alone.smallest
    assert (busy.shape.tp, busy.shape.pp, busy.shape.nodes) == (4, 2, 2)
    assert busy.replicas == 1 and busy.total_nodes == 2
    assert any("smallest shape" in note for note in busy.notes)


def test_parameter_counts_of_other_families() -> None:
    deepseek_v3 = {**KIMI_K2, "n_routed_experts": 256, "first_k_dense_replace": 3, "vocab_size": 129280}
    deepseek_v3 |= {"num_attention_heads": 128, "num_key_value_heads": 128}
    assert spec(deepseek_v3, "dsv3").total_params() == pytest.approx(671e9, rel=0.01)
    assert spec(deepseek_v3, "dsv3").active_params() == pytest.approx(37e9, rel=0.03)
    mixtral = {**LLAMA_70B, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32}
    mixtral |= {"vocab_size": 32000, "intermediate_size": 14336, "num_local_experts": 8, "num_experts_per_tok": 2}
    assert spec(mixtral, "mixtral").total_params() == pytest.approx(46.7e9, rel=0.01)
    assert spec(mixtral, "mixtral").active_params() == pytest.approx(12.9e9, rel=0.01)
    gpt2 = spec({"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257,
                 "n_positions": 1024, "n_inner": None}, "gpt2")  # fmt: skip
    assert not gpt2.gated_mlp and gpt2.tied_embeddings
    assert gpt2.total_params() == pytest.approx(124.4e6, rel=0.005)
    falcon = spec({"model_type": "falcon", "hidden_size": 4544, "num_hidden_layers": 32, "num_attention_heads": 71,
                   "multi_query": True, "vocab_size": 65024}, "falcon-7b")  # fmt: skip
    assert falcon.kv_heads == 1 and falcon.total_params() == pytest.approx(6.92e9, rel=0.01)
    explicit = ModelSpec.from_params(
        {"layers": "80", "hidden": "8192", "heads": "64", "kv_heads": "8", "vocab": "128256", "intermediate": "28672"}
    )
    assert explicit.total_params() == spec(LLAMA_70B, "x").total_params()


# -- throughput, probe traffic, cost ---------------------------------------------------------


def test_decode_roofline() -> None:
    model, h100 = spec(LLAMA_70B, "llama-3-70b"), lookup("h100")
    one = decode(model, h100, 4, 1, batch=1, context=4096, efficiency=1.0)
    # One sequence streams the rank's weights (~35 GB / 4 ranks) each step at 3.35 TB/s.
    assert one.tokens_per_s == pytest.approx(3.35e12 / (model.weight_bytes() / 4), rel=0.05)
    many = decode(model, h100, 4, 1, batch=64, context=4096, efficiency=1.0)
    assert many.tokens_per_s > 20 * one.tokens_per_s and many.step_ms > one.step_ms
    staged = decode(model, h100, 4, 2, batch=1, context=4096, efficiency=1.0)
    assert staged.tokens_per_s == pytest.approx(one.tokens_per_s, rel=0.02), "stages add memory, not speed"
    kimi = spec(KIMI_K2, "kimi-k2")
    light = decode(kimi, lookup("h200"), 8, 2, batch=1, context=1024, efficiency=1.0)
    heavy = decode(kimi, lookup("h200"), 8, 2, batch=512, context=1024, efficiency=1.0)
    assert heavy.gib_per_step > 5 * light.gib_per_step, "a big batch routes to every expert"


def test_targets_size_the_pool_and_cost_follows_the_cost_model() -> None:
    model = spec(LLAMA_70B, "llama-3-70b")
    costs = CostModel(su_per_output_token=0.001, su_per_engine_second=0.01, su_per_mb_activations=0.0001)
    probe = ProbeTraffic(layers=4, sites=2, positions=256, requests_per_s=2.0)
    result = plan(
        model,
        lookup("h100"),
        Workload(context=4096, tokens_per_s=20000),
        probe=probe,
        costs=costs,
        service_class="batch",
    )
    assert result.replicas >= 2 and result.pool_tokens_per_s >= 20000
    assert result.probe is not None and result.probe.bytes_per_request == 4 * 2 * 256 * 8192 * 4
    assert result.probe.store_mb_s == pytest.approx(2 * 4 * 2 * 256 * 8192 * 4 / 1e6)
    in_flight = result.replicas * result.batch_per_replica
    expected = costs.charge(
        "batch",
        output_tokens=20000 * 3600,
        activation_bytes=result.probe.bytes_per_request * 2 * 3600,
        engine_ms=in_flight * 3600 * 1000,
    )
    assert result.cost.su_per_hour == pytest.approx(expected)
    assert result.cost.engine_seconds == in_flight * 3600


def test_efficiency_is_calibrated_where_a_measurement_exists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(roofline, "CALIBRATION_FILE", tmp_path / "calibration.json")
    assert efficiency_for(lookup("h100")).source == "documented default"
    assert "uncalibrated" in efficiency_for(lookup("cpu")).source
    with pytest.raises(ValueError, match="plan_calibration"):
        lookup("local")
    (tmp_path / "calibration.json").write_text(
        json.dumps({"cpu": {"efficiency": 0.31, "bandwidth_gb_s": 12.5, "date": "2025-01-01", "model": "llama-100m"}})
    )
    measured = efficiency_for(lookup("cpu"))
    assert measured.value == 0.31 and "measured 2025-01-01" in measured.source
    assert lookup("local").bandwidth_gb_s == 12.5
    result = plan(spec(LLAMA_70B, "llama-3-70b"), lookup("cpu-node"), Workload(context=2048))
    assert result.efficiency.value == 0.31 and result.efficiency.source.startswith("measured")


# -- bad input ------------------------------------------------------------------------------------


def test_a_config_missing_keys_names_them() -> None:
    config = {k: v for k, v in LLAMA_70B.items() if k not in ("num_hidden_layers", "vocab_size")}
    with pytest.raises(ValueError, match="lacks num_hidden_layers / n_layer / num_layers, vocab_size"):
        spec(config, "broken")
    with pytest.raises(ValueError, match="lack intermediate"):
        ModelSpec.from_params({"layers": 2, "hidden": 64, "heads": 4, "vocab": 100})
    with pytest.raises(ValueError, match="unknown model parameters layer"):
        ModelSpec.from_params({"layer": 2, "hidden": 64, "heads": 4, "vocab": 100, "intermediate": 128})
    with pytest.raises(ValueError, match="unknown quant_method 'hqq'"):
        spec({**LLAMA_70B, "quantization_config": {"quant_method": "hqq"}}, "odd")
    with pytest.raises(ValueError, match="unknown dtype 'fp6'"):
        spec(LLAMA_70B, "x", dtype="fp6")


def test_unknown_hardware_lists_the_known() -> None:
    with pytest.raises(ValueError, match="unknown hardware 'tpu-v5'; known: a100-40gb, .*h200-141gb.*aurora"):
        lookup("tpu-v5")


def test_a_model_too_big_for_the_nodes_allowed_says_so() -> None:
    with pytest.raises(ValueError) as info:
        plan(spec(KIMI_K2, "kimi-k2"), lookup("polaris"), Workload(context=131072), max_nodes=4)
    message = str(info.value)
    assert "does not fit on 4 a100-40gb node(s)" in message and "TP=4 x PP=4 needs" in message
    assert "--max-nodes" in message


# -- the command --------------------------------------------------------------------------------


def _write(folder: Path, config: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, ["plan", *args], env={"COLUMNS": "200"})


def test_plan_command_json_and_table(tmp_path: Path) -> None:
    folder = _write(tmp_path / "llama-405b", LLAMA_405B)
    out = invoke("--model", str(folder / "config.json"), "--hardware", "h100", "--dtype", "fp8", "--json")
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert (data["shape"]["tp"], data["shape"]["pp"], data["shape"]["nodes"]) == (8, 1, 1)
    assert data["model"]["dtype"] == "fp8" and data["cost"]["su_per_hour"] > 0
    table = invoke("--model", str(folder), "--hardware", "aurora", "--context", "1024")
    assert table.exit_code == 0, table.output
    assert "TP=8 x PP=2: 16 device(s) on 2 node(s)" in table.output and "SU per hour" in table.output
    arch = "layers=80,hidden=8192,heads=64,kv_heads=8,vocab=128256,intermediate=28672"
    explicit = invoke("--arch", arch, "--hardware", "polaris", "--probe-layers", "80", "--probe-positions", "512")
    assert explicit.exit_code == 0 and "probe traffic" in explicit.output
    assert "over the pool's max_activation_bytes" in explicit.output


def test_plan_command_refuses_bad_input(tmp_path: Path) -> None:
    out = invoke("--arch", "layers=2,hidden=64,heads=4,vocab=100,intermediate=128", "--hardware", "tpu")
    assert out.exit_code == 2 and "unknown hardware 'tpu'" in out.output
    out = invoke("--hardware", "h100")
    assert out.exit_code == 2 and "say which model" in out.output
    out = invoke("--model", str(tmp_path / "nowhere"), "--hardware", "h100")
    assert out.exit_code == 2 and "no config.json" in out.output


def test_a_pool_config_whose_shape_cannot_hold_the_model_is_warned_about(tmp_path: Path) -> None:
    folder = _write(tmp_path / "llama-405b", LLAMA_405B)
    pool = tmp_path / "pool.yaml"
    pool.write_text(
        f"name: big\nmodel: {folder}\nengine:\n  dtype: bfloat16\n  max_model_len: 8192\n"
        "  tensor_parallel_size: 12\n  pipeline_parallel_size: 1\n"
    )
    out = invoke("--config", str(pool), "--hardware", "aurora", "--json")
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert (data["shape"]["tp"], data["shape"]["pp"]) == (8, 2), "the plan itself still answers"
    warning = " ".join(data["warnings"])
    assert "pool 'big' (TP=12 x PP=1, max_model_len 8192) cannot hold llama-405b" in warning
    assert "128 attention heads do not divide over tensor_parallel_size 12" in warning
    pool.write_text(pool.read_text().replace("tensor_parallel_size: 12", "tensor_parallel_size: 8"))
    out = invoke("--config", str(pool), "--hardware", "aurora")
    assert out.exit_code == 0 and "needs" in out.output and "GiB per device" in out.output


def test_impossible_architecture_numbers_are_refused_by_name() -> None:
    from tpmflow.planning.model import ModelSpec

    base = {"layers": 2, "hidden": 64, "heads": 8, "vocab": 100, "intermediate": 128}
    with pytest.raises(ValueError, match="kv_heads must be positive"):
        ModelSpec.from_params({**base, "kv_heads": 0})
    with pytest.raises(ValueError, match=r"heads \(8\) must be a multiple of kv_heads \(3\)"):
        ModelSpec.from_params({**base, "kv_heads": 3})
    with pytest.raises(ValueError, match="intermediate='abc' is not a whole number"):
        ModelSpec.from_params({**base, "intermediate": "abc"})
    with pytest.raises(ValueError, match="needs experts_per_token and expert_intermediate"):
        ModelSpec.from_params({**base, "experts": 8})
    with pytest.raises(ValueError, match="layers must not be negative|layers must be positive"):
        ModelSpec.from_params({**base, "layers": -2})
