"""Split replicas side by side in one run (prints one JSON line): the ~100M-parameter Llama of
``bench/hooks.py`` served unsplit (TP=1), tensor parallel (TP=2) and pipeline parallel (PP=2), one
rank per core, each with tpmflow's worker extension. Per shape: output tokens per second, and the
wall time of probing requests as a ratio to the same requests without specs on the same engine
(capture one layer, capture all layers, the logit lens at all layers), each including handing the
results over as a replica does (merged across workers; under PP the lens of the first stage's
layers is computed by the last stage then). The aim: hook overhead on a
split replica no worse than on an unsplit one, since values all tensor ranks hold alike are
recorded by one rank (not N) and each pipeline stage records its own layers.

On this 2-core machine the split shapes cannot be faster than TP=1 (the same two cores do the same
work, plus the all-reduces or the stage hand-offs); what they show is that splitting works and what
it costs. On a node of GPUs the split is what lets a 70B-1T model fit at all.

Usage: python bench/parallel.py [--shapes 1x1,2x1,1x2] [--prompts 16] [--prompt-len 96] [--tokens 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hooks import SHAPE, build_model, shut_down  # noqa: E402  (the same model)


def timed_run(run: Any, repeats: int) -> float:
    """Median wall seconds of ``run()``."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(model_dir: Path, tp: int, pp: int, args: argparse.Namespace) -> dict[str, Any]:
    from vllm import SamplingParams

    from tpmflow.engine.probe import take_probe_offline
    from tpmflow.models.offline_engine import open_offline_engine
    from tpmflow.pool.replica import rank_binds

    # Every shape on the same cores, split between its ranks ("0-1" for TP=1, "0|1" for two ranks):
    # vLLM's own binding would keep a core back for the engine core when left to choose.
    ranks = tp * pp
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = rank_binds(sorted(os.sched_getaffinity(0)), ranks)
    llm = open_offline_engine(
        model_dir,
        max_model_len=SHAPE["max_positions"],
        enable_prefix_caching=False,
        worker_extension_cls="tpmflow.engine.hooks.TpmflowWorkerExtension",
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        distributed_executor_backend="mp" if ranks > 1 else None,
    )
    try:
        llm.collective_rpc("tpmflow_install")
        prompts = [("CCO" * 200)[i : i + args.prompt_len] for i in range(args.prompts)]
        base = {"max_tokens": args.tokens, "temperature": 0.0, "ignore_eos": True}
        llm.generate(prompts[:2], SamplingParams(**base), use_tqdm=False)  # warm-up
        layers = list(range(SHAPE["layers"]))
        specs: dict[str, dict[str, Any] | None] = {
            "no_specs": None,
            "capture_one_layer": {"captures": [{"site": "hook_resid_post", "layers": [SHAPE["layers"] // 2]}]},
            "capture_all_layers": {"captures": [{"site": "hook_resid_post", "layers": layers}]},
            "logit_lens_all_layers": {"lens": {"layers": layers, "top_k": 5}},
        }
        seconds: dict[str, float] = {}
        for name, spec in specs.items():
            keys: list[str] = []

            def make(key: str, spec: dict[str, Any] | None = spec, keys: list[str] = keys, name: str = name) -> Any:
                if spec is None:
                    return SamplingParams(**base)
                keys.append(f"{tp}x{pp}-{name}-{key}")
                probe = {**spec, "key": keys[-1], "n_prompt": args.prompt_len + 1}
                return SamplingParams(**base, skip_reading_prefix_cache=True, extra_args={"tpmflow": {"probe": probe}})

            def run(make: Any = make, keys: list[str] = keys, llm: Any = llm) -> None:
                """Generate, then hand over what was captured, as a replica does per request: the
                merge across workers and a later stage's lens of earlier layers are timed too."""
                keys.clear()
                llm.generate(prompts, [make(f"{i}") for i in range(len(prompts))], use_tqdm=False)
                for key in keys:
                    found = take_probe_offline(llm, key)
                    assert found is not None and (found["captures"] or found["lens"]), f"{key}: nothing recorded"

            seconds[name] = timed_run(run, args.repeats)
        out: dict[str, Any] = {
            "tokens_per_s": round(args.prompts * args.tokens / seconds["no_specs"], 1),
            "seconds_no_specs": round(seconds["no_specs"], 3),
        }
        for name, s in seconds.items():
            if name != "no_specs":
                out[f"ratio_{name}"] = round(s / seconds["no_specs"], 3)
        return out
    finally:
        shut_down(llm)
        del llm
        gc.collect()
        os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="1x1,2x1,1x2", help="TPxPP, comma-separated")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=96)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",") if s.strip()]
    if not shapes or any(len(s) != 2 or min(s) < 1 for s in shapes):
        ap.error(f"--shapes takes TPxPP pairs, e.g. 1x1,2x1,1x2 (got {args.shapes!r})")

    root = Path(tempfile.mkdtemp(prefix="tpmflow-bench-parallel-"))
    model_dir, n_params = build_model(root)
    gc.collect()
    result: dict[str, Any] = {"bench": "parallel", "parameters": n_params, "prompts": args.prompts}
    result["prompt_tokens"], result["output_tokens"] = args.prompt_len + 1, args.tokens
    for tp, pp in shapes:
        result[f"tp{tp}_pp{pp}"] = measure(model_dir, tp, pp, args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
