"""What intermediary access costs, measured side by side in one run (prints one JSON line).

A ~100M-parameter Llama (random weights, built once into a temporary folder: per-layer compute,
not Python overhead, dominates, as it does at scale) serves the same prompts through one engine
without tpmflow's worker extension, then one with it: no specs, capture of one layer, capture of
all layers, one steering vector, and the logit lens at all layers. Each is reported as a ratio of
wall time to the engine without the extension, plus the bytes of activations per second the
worker writes to the pool's store. (For context only, different hardware and model: vllm-lens
reports +12% wall time for one layer and +317% for all 80 layers of a 70B model on GPUs.)

Usage: python bench/hooks.py [--prompts 16] [--prompt-len 96] [--tokens 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

SHAPE = {"hidden": 768, "layers": 14, "heads": 12, "intermediate": 2048, "max_positions": 512}


def build_model(root: Path) -> tuple[Path, int]:
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    from tpmflow.models.build_common import llama_config
    from tpmflow.models.char_tokenizer import PRINTABLE_ASCII, SPECIAL_TOKENS, build_char_tokenizer

    out = root / "llama-100m"
    config = llama_config(vocab_size=len(SPECIAL_TOKENS) + len(PRINTABLE_ASCII), **SHAPE)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(str(out), safe_serialization=True)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(str(out))
    build_char_tokenizer(PRINTABLE_ASCII, out, model_max_length=SHAPE["max_positions"])
    return out, sum(p.numel() for p in model.parameters())


def timed(llm: Any, prompts: list[str], make_params: Any, repeats: int) -> float:
    """Median wall seconds of generating every prompt (each with its own params)."""
    times = []
    for r in range(repeats):
        params = [make_params(f"r{r}-{i}") for i in range(len(prompts))]
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=96)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import numpy as np
    from vllm import SamplingParams

    from tpmflow.models.offline_engine import open_offline_engine
    from tpmflow.payload import StoreConfig

    root = Path(tempfile.mkdtemp(prefix="tpmflow-bench-hooks-"))
    model_dir, n_params = build_model(root)
    # Every capture goes to the store (inline limit 0), as big activations do in a pool.
    os.environ["TPMFLOW_STORE"] = StoreConfig(path=str(root / "store"), inline_limit_bytes=0).model_dump_json()
    prompts = [("CCO" * 200)[i : i + args.prompt_len] for i in range(args.prompts)]
    base = {"max_tokens": args.tokens, "temperature": 0.0, "ignore_eos": True}

    def without_extension() -> float:
        llm = open_offline_engine(model_dir, max_model_len=SHAPE["max_positions"], enable_prefix_caching=False)
        llm.generate(prompts[:2], SamplingParams(**base), use_tqdm=False)  # warm-up
        seconds = timed(llm, prompts, lambda key: SamplingParams(**base), args.repeats)
        del llm
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
    vector = np.random.default_rng(0).normal(size=SHAPE["hidden"]).astype(np.float32)
    specs: dict[str, dict[str, Any] | None] = {
        "no_specs": None,
        "capture_one_layer": {"captures": [{"site": "hook_resid_post", "layers": [7]}]},
        "capture_all_layers": {"captures": [{"site": "hook_resid_post", "layers": layers}]},
        "one_steering_vector": {
            "edits": [{"op": "add", "site": "hook_resid_post", "layer": 7, "values": vector.tobytes(), "shape": [768]}]
        },
        "logit_lens_all_layers": {"lens": {"layers": layers, "top_k": 5}},
    }
    result: dict[str, Any] = {"bench": "hooks", "parameters": n_params, "prompts": args.prompts}
    result["prompt_tokens"] = args.prompt_len + 1
    result["output_tokens"] = args.tokens
    measured: dict[str, float] = {}
    for name, spec in specs.items():
        keys: list[str] = []

        def make(key: str, spec: dict[str, Any] | None = spec, keys: list[str] = keys) -> SamplingParams:
            if spec is None:
                return SamplingParams(**base)
            keys.append(key)
            probe = {**spec, "key": key, "n_prompt": args.prompt_len + 1}
            return SamplingParams(**base, skip_reading_prefix_cache=True, extra_args={"tpmflow": {"probe": probe}})

        measured[name] = timed(llm, prompts, make, args.repeats)
        t0 = time.perf_counter()
        taken = llm.collective_rpc("tpmflow_take_probe", args=(keys, "bench"))[0] if keys else {}
        store_s = time.perf_counter() - t0
        nbytes = sum(c["nbytes"] for r in taken.values() if r for c in r["captures"])
        if nbytes:
            result[f"activation_mb_{name}"] = round(nbytes / 1e6, 1)
            result[f"store_mb_s_{name}"] = round(nbytes / 1e6 / max(store_s, 1e-9), 1)
    del llm
    # The engine without the extension runs before and after (A-B-A), so drift in the machine's
    # speed over the run shows up as the spread of the two, not as a fake ratio.
    after = without_extension()
    without = (before + after) / 2
    result["seconds_without_extension"] = [round(before, 3), round(after, 3)]
    for name, seconds in measured.items():
        result[f"ratio_{name}"] = round(seconds / without, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
