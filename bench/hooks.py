"""What intermediary access costs, measured side by side in one run (prints one JSON line).

A ~100M-parameter Llama (random weights, built once into a temporary folder: per-layer compute,
not Python overhead, dominates, as it does at scale) serves the same prompts through one engine
without tpmflow's worker extension, then one with it: no specs, capture of one layer, capture of
all layers, one steering vector, and the logit lens at all layers. Each is reported as a ratio of
wall time to the engine without the extension, plus the bytes of activations per second the
worker writes to the pool's store. (For context only, different hardware and model: vllm-lens
reports +12% wall time for one layer and +317% for all 80 layers of a 70B model on GPUs.)

The same is measured on a random Mixtral (8 experts, top-2) of comparable active parameters: the
same attention, layers and embeddings, each expert half the Llama's MLP width, so the two experts a
token runs through do the Llama MLP's work (~100M active of ~300M total). The Llama's figures keep
their top-level keys (older readings compare); the Mixtral's are under ``"mixtral"``.

Usage: python bench/hooks.py [--models llama,mixtral] [--prompts 16] [--prompt-len 96] [--tokens 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

SHAPE = {"hidden": 768, "layers": 14, "heads": 12, "intermediate": 2048, "max_positions": 512}
# Mixtral: the Llama's attention, layers and embeddings; 8 experts, top-2, each of half the Llama's
# MLP width, so the active parameters per token equal the Llama's (plus a 768x8 router per layer).
MOE = {"experts": 8, "experts_per_token": 2, "expert_intermediate": SHAPE["intermediate"] // 2}
MODELS = ("llama", "mixtral")


def _save(model: Any, out: Path) -> None:
    from transformers import GenerationConfig

    from tpmflow.models.char_tokenizer import PRINTABLE_ASCII, build_char_tokenizer

    model.save_pretrained(str(out), safe_serialization=True)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(str(out))
    build_char_tokenizer(PRINTABLE_ASCII, out, model_max_length=SHAPE["max_positions"])


def build_model(root: Path) -> tuple[Path, int]:
    import torch
    from transformers import LlamaForCausalLM

    from tpmflow.models.build_common import llama_config
    from tpmflow.models.char_tokenizer import PRINTABLE_ASCII, SPECIAL_TOKENS

    out = root / "llama-100m"
    config = llama_config(vocab_size=len(SPECIAL_TOKENS) + len(PRINTABLE_ASCII), **SHAPE)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    _save(model, out)
    return out, sum(p.numel() for p in model.parameters())


def build_mixtral(root: Path) -> tuple[Path, int, int]:
    """A random Mixtral of the Llama's shape with MoE MLPs; returns its folder, total and active parameters."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from tpmflow.models.build_common import HEAD_DIM
    from tpmflow.models.char_tokenizer import PRINTABLE_ASCII, SPECIAL_TOKENS

    out = root / "mixtral-100m-active"
    config = MixtralConfig(
        vocab_size=len(SPECIAL_TOKENS) + len(PRINTABLE_ASCII),
        hidden_size=SHAPE["hidden"],
        intermediate_size=MOE["expert_intermediate"],
        num_hidden_layers=SHAPE["layers"],
        num_attention_heads=SHAPE["heads"],
        num_key_value_heads=SHAPE["heads"],
        head_dim=HEAD_DIM,
        max_position_embeddings=SHAPE["max_positions"],
        num_local_experts=MOE["experts"],
        num_experts_per_tok=MOE["experts_per_token"],
        rms_norm_eps=1e-5,
        sliding_window=None,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        dtype="float32",
    )
    torch.manual_seed(0)
    model = MixtralForCausalLM(config).to(torch.float32)
    _save(model, out)
    total = sum(p.numel() for p in model.parameters())
    # An expert is gate + up + down projections; a token runs through experts_per_token of them.
    per_expert = 3 * SHAPE["hidden"] * MOE["expert_intermediate"]
    active = total - SHAPE["layers"] * (MOE["experts"] - MOE["experts_per_token"]) * per_expert
    return out, total, active


def timed(llm: Any, prompts: list[str], make_params: Any, repeats: int) -> float:
    """Median wall seconds of generating every prompt (each with its own params)."""
    times = []
    for r in range(repeats):
        params = [make_params(f"r{r}-{i}") for i in range(len(prompts))]
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def shut_down(llm: Any) -> None:
    """Stop the engine's core process now (as ``bench/pool_overhead.py`` does), not at some later
    finalizer: its memory is back before the next engine loads, and nothing is left at exit."""
    llm.llm_engine.engine_core.shutdown()


def measure(model_dir: Path, tag: str, args: argparse.Namespace) -> dict[str, Any]:
    """Ratios of wall time with the extension (per spec) to without, A-B-A, for one model."""
    import numpy as np
    from vllm import SamplingParams

    from tpmflow.models.offline_engine import open_offline_engine

    prompts = [("CCO" * 200)[i : i + args.prompt_len] for i in range(args.prompts)]
    base = {"max_tokens": args.tokens, "temperature": 0.0, "ignore_eos": True}

    def without_extension() -> float:
        llm = open_offline_engine(model_dir, max_model_len=SHAPE["max_positions"], enable_prefix_caching=False)
        llm.generate(prompts[:2], SamplingParams(**base), use_tqdm=False)  # warm-up
        seconds = timed(llm, prompts, lambda key: SamplingParams(**base), args.repeats)
        shut_down(llm)
        del llm
        gc.collect()
        return seconds

    before = without_extension()

    llm = open_offline_engine(
        model_dir,
        max_model_len=SHAPE["max_positions"],
        enable_prefix_caching=False,  # as in the baseline: probes never read the prefix cache
        worker_extension_cls="tpmflow.engine.hooks.TpmflowWorkerExtension",
    )
    llm.collective_rpc("tpmflow_install")
    llm.generate(prompts[:2], SamplingParams(**base), use_tqdm=False)
    layers = list(range(SHAPE["layers"]))
    middle = SHAPE["layers"] // 2
    vector = np.random.default_rng(0).normal(size=SHAPE["hidden"]).astype(np.float32)
    specs: dict[str, dict[str, Any] | None] = {
        "no_specs": None,
        "capture_one_layer": {"captures": [{"site": "hook_resid_post", "layers": [middle]}]},
        "capture_all_layers": {"captures": [{"site": "hook_resid_post", "layers": layers}]},
        "one_steering_vector": {
            "edits": [
                {
                    "op": "add",
                    "site": "hook_resid_post",
                    "layer": middle,
                    "values": vector.tobytes(),
                    "shape": [SHAPE["hidden"]],
                }
            ]
        },
        "logit_lens_all_layers": {"lens": {"layers": layers, "top_k": 5}},
    }
    result: dict[str, Any] = {}
    measured: dict[str, float] = {}
    for name, spec in specs.items():
        keys: list[str] = []

        def make(key: str, spec: dict[str, Any] | None = spec, keys: list[str] = keys) -> SamplingParams:
            if spec is None:
                return SamplingParams(**base)
            keys.append(f"{tag}-{key}")
            probe = {**spec, "key": keys[-1], "n_prompt": args.prompt_len + 1}
            return SamplingParams(**base, skip_reading_prefix_cache=True, extra_args={"tpmflow": {"probe": probe}})

        measured[name] = timed(llm, prompts, make, args.repeats)
        t0 = time.perf_counter()
        taken = llm.collective_rpc("tpmflow_take_probe", args=(keys, "bench"))[0] if keys else {}
        store_s = time.perf_counter() - t0
        nbytes = sum(c["nbytes"] for r in taken.values() if r for c in r["captures"])
        if nbytes:
            result[f"activation_mb_{name}"] = round(nbytes / 1e6, 1)
            result[f"store_mb_s_{name}"] = round(nbytes / 1e6 / max(store_s, 1e-9), 1)
    shut_down(llm)
    del llm
    gc.collect()
    # The engine without the extension runs before and after (A-B-A), so drift in the machine's
    # speed over the run shows up as the spread of the two, not as a fake ratio.
    after = without_extension()
    without = (before + after) / 2
    result["seconds_without_extension"] = [round(before, 3), round(after, 3)]
    for name, seconds in measured.items():
        result[f"ratio_{name}"] = round(seconds / without, 3)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated, of: " + ", ".join(MODELS))
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=96)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or any(m not in MODELS for m in models):
        ap.error(f"--models takes a comma-separated list of {', '.join(MODELS)} (got {args.models!r})")

    from tpmflow.payload import StoreConfig

    root = Path(tempfile.mkdtemp(prefix="tpmflow-bench-hooks-"))
    # Every capture goes to the store (inline limit 0), as big activations do in a pool.
    os.environ["TPMFLOW_STORE"] = StoreConfig(path=str(root / "store"), inline_limit_bytes=0).model_dump_json()
    result: dict[str, Any] = {"bench": "hooks", "models": models, "prompts": args.prompts}
    result["prompt_tokens"] = args.prompt_len + 1
    result["output_tokens"] = args.tokens
    if "llama" in models:
        # The Llama's figures at the top level, under the keys older readings used.
        model_dir, n_params = build_model(root)
        result["parameters"] = n_params
        result.update(measure(model_dir, "llama", args))
    if "mixtral" in models:
        model_dir, total, active = build_mixtral(root)
        gc.collect()  # the transformers copy (~1.2 GB in fp32) before vLLM loads its own
        moe = {"parameters": total, "parameters_active": active, **MOE}
        result["mixtral"] = {**moe, **measure(model_dir, "mixtral", args)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
