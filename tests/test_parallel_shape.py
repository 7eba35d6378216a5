"""Split replicas' configuration, without an engine: shapes the model cannot take, cores and
accelerators per rank, and the launcher refusing both before any replica starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tpmflow.config import PoolConfig
from tpmflow.parsl.sites import accelerator_groups
from tpmflow.pool.replica import cpu_binds, parse_cores, rank_binds, replica_env
from tpmflow.pool.shape import check_shape, shape_problems


def test_shapes_a_model_cannot_be_split_into_are_named() -> None:
    llama70b = {"num_attention_heads": 64, "num_key_value_heads": 8, "num_hidden_layers": 80}
    assert shape_problems(llama70b, 8, 2) == []
    assert shape_problems(llama70b, 16, 1) == [], "8 KV heads copied to 16 ranks: vLLM replicates them"
    problems = shape_problems(llama70b, 3, 1)
    assert any("64 attention heads" in p for p in problems) and any("8 key/value heads" in p for p in problems)
    assert shape_problems({"num_attention_heads": 2, "num_hidden_layers": 2}, 1, 4) == [
        "its 2 layers cannot fill 4 pipeline stages"
    ]
    # A multimodal config keeps the decoder's numbers under text_config.
    assert shape_problems({"text_config": {"num_attention_heads": 6, "num_hidden_layers": 4}}, 4, 1)


def test_a_shape_is_checked_from_the_models_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 2, "num_hidden_layers": 2}))
    check_shape(tmp_path, 2, 2)
    with pytest.raises(ValueError, match="TP=4 x PP=1 does not fit .*2 attention heads"):
        check_shape(tmp_path, 4, 1)


def test_each_rank_gets_cores_of_its_own() -> None:
    assert parse_cores("0-3,6") == [0, 1, 2, 3, 6]
    assert rank_binds([0, 1, 2, 3], 2) == "0-1|2-3"
    assert rank_binds([0, 1], 2) == "0|1", "what vLLM's CPU build needs for TP=2 on this machine"
    assert rank_binds([4, 5, 6, 9], 1) == "4-6,9"
    with pytest.raises(ValueError, match="2 ranks need at least 2 cores"):
        rank_binds([3], 2)
    tp2 = PoolConfig(model="m", replicas=2, engine={"tensor_parallel_size": 2, "process_cores": ["0-1", "2-5"]})
    assert cpu_binds(tp2) == ["0|1", "2-3|4-5"]
    explicit = PoolConfig(model="m", engine={"pipeline_parallel_size": 2, "cpu_threads_bind": ["0-3"]})
    with pytest.raises(ValueError, match="names 1 rank"):
        cpu_binds(explicit)
    many = PoolConfig(model="m", replicas=64, engine={"tensor_parallel_size": 4})
    with pytest.raises(ValueError, match="64 replica\\(s\\) of 4 ranks need 256 cores"):
        cpu_binds(many)


def test_a_split_replica_gets_as_many_accelerators_as_ranks() -> None:
    assert accelerator_groups(4, 1) == ["0", "1", "2", "3"], "one GPU per replica, as before"
    assert accelerator_groups(4, 4) == ["0,1,2,3"], "a TP=4 replica on a 4-GPU node gets all four"
    assert accelerator_groups(["0.0", "0.1", "1.0", "1.1"], 2) == ["0.0,0.1", "1.0,1.1"]
    with pytest.raises(ValueError, match="4 accelerators per node cannot be split into replicas of 3"):
        accelerator_groups(4, 3)


def test_replicas_keep_the_model_runner_the_hooks_patch() -> None:
    env = replica_env(PoolConfig(model="m"), "replica-0", "http://r", "http://g", "s", None)
    assert env["VLLM_USE_V2_MODEL_RUNNER"] == "0"


def test_the_launcher_refuses_a_shape_before_starting_anything(tmp_path: Path) -> None:
    from tpmflow.pool.launch import LocalLauncher

    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 2, "num_hidden_layers": 2}))
    cfg = PoolConfig(model=str(tmp_path), engine={"tensor_parallel_size": 2, "pipeline_parallel_size": 3,
                                                  "cpu_threads_bind": ["0|1|0|1|0|1"]})  # fmt: skip
    with pytest.raises(ValueError, match="2 layers cannot fill 3 pipeline stages"):
        LocalLauncher(cfg, "http://g", "s", tmp_path / "logs")
    from tpmflow.pool.parsl_launcher import ParslLauncher

    parsl_cfg = cfg.model_copy(update={"launcher": cfg.launcher.model_copy(update={"kind": "parsl"})})
    with pytest.raises(ValueError, match="2 layers cannot fill 3 pipeline stages"):
        ParslLauncher(parsl_cfg, "http://g", "s", tmp_path / "logs")


def test_a_block_that_reduces_attention_and_mlp_together_refuses_probes_under_tp() -> None:
    """Falcon's parallel block under TP skips the output projection's all-reduce (one reduce of
    attention + MLP): a rank's hook_attn_out would be a partial sum, so probes are refused by name."""
    from torch import nn

    from tpmflow.engine.hooks import partial_sum_reason
    from tpmflow.engine.layouts import LAYOUTS

    def falcon_block(reduce_results: bool) -> nn.Module:
        block, attn, dense = nn.Module(), nn.Module(), nn.Linear(2, 2)
        dense.reduce_results = reduce_results  # what vLLM's RowParallelLinear keeps
        attn.dense, block.self_attention, block.mlp = dense, attn, nn.Identity()
        return block

    falcon = LAYOUTS["FalconForCausalLM"]
    reason = partial_sum_reason(falcon, [falcon_block(False)])
    assert reason is not None and "partial sums" in reason and "tensor_parallel_size 1" in reason
    assert partial_sum_reason(falcon, [falcon_block(True)]) is None


def test_gpt2_and_falcon_spellings_of_heads_and_layers_are_read() -> None:
    assert shape_problems({"n_head": 12, "n_layer": 12}, 5, 1), "GPT-2's n_head"
    assert shape_problems({"num_attention_heads": 71, "num_kv_heads": 1, "num_hidden_layers": 32}, 2, 1)


def test_stage_results_merge_into_one_trace_and_unreached_lens_positions_are_no_error() -> None:
    import numpy as np

    from tpmflow.engine.probe import ProbeState, add_deferred_lens, merge_worker_results

    # A later position the request never reached (it stopped early): nothing kept, nothing raised.
    state = ProbeState.from_spec({"key": "k", "lens": {"layers": [0], "positions": [40]}, "n_prompt": 3})
    state.keep_lens_stream(0, np.arange(3), np.zeros((3, 4), np.float32))
    assert state.results()["lens_streams"] == []
    # Two stages: the first kept layer 0's stream for the lens, the second recorded layer 1.
    first = ProbeState.from_spec({"key": "k", "lens": {"layers": [0, 1]}, "n_prompt": 2})
    first.keep_lens_stream(0, np.arange(2), np.ones((2, 4), np.float32))
    second = ProbeState.from_spec({"key": "k", "lens": {"layers": [0, 1]}, "n_prompt": 2})
    second.lens[1] = {0: (np.array([5]), np.array([0.9])), 1: (np.array([6]), np.array([0.8]))}
    per_worker = [{"k": first.results()}, {"k": None}, {"k": second.results()}, {}]
    merged = merge_worker_results(per_worker, "k")
    assert merged is not None and [e["layer"] for e in merged["lens"]] == [1]
    assert [s["layer"] for s in merged["lens_streams"]] == [0] and merged["lens_streams"][0]["shape"] == [2, 4]
    table = [{"layer": 0, "positions": [0, 1], "token_ids": [[1], [2]], "probs": [[0.5], [0.4]]}]
    add_deferred_lens(merged, [None, table])
    assert [e["layer"] for e in merged["lens"]] == [0, 1] and merged["lens_streams"] == []
    assert merge_worker_results([{}, {"k": None}], "k") is None
