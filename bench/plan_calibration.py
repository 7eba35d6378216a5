"""How far this machine's decode runs from its memory-bandwidth roofline (prints one JSON line).

``tpmflow plan`` predicts decode tokens/s as bandwidth x efficiency / bytes streamed per step. This
measures both sides here and stores the ratio as the efficiency the planner uses for CPU nodes:

1. Bandwidth: one numpy thread per core sums (reads) its slice of a 512 MiB array, best of 5; a
   copy (read + write) is reported beside it. Decode reads weights, so the read figure is the peak.
2. Decode: the ~100M-parameter Llama of ``bench/hooks.py`` (random weights, float32) on vLLM's
   offline engine: each batch generates 1 token, then 1 + N; decode tokens/s is batch x N over the
   difference, so prefill cancels out.
3. Roofline: the planner's own ``decode()`` of that model (from its ``config.json``) at the measured
   bandwidth, efficiency 1, same batch and mean context.

The batch-1 ratio is the stored efficiency (batch 1 is all bandwidth; at batch 16 a CPU also
spends time computing, reported beside it). ``tpmflow/planning/calibration.json`` keeps the figures
and the date; other device kinds already in it are kept.

Usage: python bench/plan_calibration.py [--tokens 64] [--prompt-len 32] [--batches 1,16] [--repeats 3] [--no-write]
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ARRAY_BYTES = 512 << 20


def bandwidth_gb_s(repeats: int = 5) -> tuple[float, float]:
    """Best read and copy bandwidth (GB/s) over all cores."""
    import numpy as np

    workers = os.cpu_count() or 1
    data = np.ones(ARRAY_BYTES // 8, dtype=np.float64)
    out = np.empty_like(data)
    parts = np.array_split(np.arange(data.size), workers)
    bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts if p.size]

    def timed(task: Any) -> float:
        best = float("inf")
        with ThreadPoolExecutor(workers) as pool:
            for _ in range(repeats):
                t0 = time.perf_counter()
                list(pool.map(task, bounds))
                best = min(best, time.perf_counter() - t0)
        return best

    read = ARRAY_BYTES / timed(lambda b: float(data[b[0] : b[1]].sum())) / 1e9
    copy = 2 * ARRAY_BYTES / timed(lambda b: np.copyto(out[b[0] : b[1]], data[b[0] : b[1]])) / 1e9
    return read, copy


def median_seconds(llm: Any, prompts: list[str], params: Any, repeats: int) -> float:
    """Median wall seconds of generating ``prompts`` with ``params``."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decode_rates(model_dir: Path, batches: list[int], args: argparse.Namespace) -> dict[int, float]:
    """Measured decode tokens/s of each batch size (prefill subtracted)."""
    from vllm import SamplingParams

    from bench.hooks import SHAPE, shut_down
    from tpmflow.models.offline_engine import open_offline_engine

    llm = open_offline_engine(model_dir, max_model_len=SHAPE["max_positions"], enable_prefix_caching=False)
    base: dict[str, Any] = {"temperature": 0.0, "ignore_eos": True}
    text = "CCO" * 400
    llm.generate([text[: args.prompt_len]], SamplingParams(max_tokens=4, **base), use_tqdm=False)  # warm-up
    rates = {}
    for batch in batches:
        prompts = [text[i : i + args.prompt_len] for i in range(batch)]
        prefill = median_seconds(llm, prompts, SamplingParams(max_tokens=1, **base), args.repeats)
        both = median_seconds(llm, prompts, SamplingParams(max_tokens=1 + args.tokens, **base), args.repeats)
        rates[batch] = batch * args.tokens / max(both - prefill, 1e-9)
    shut_down(llm)
    return rates


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64, help="decode tokens per sequence")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-write", action="store_true", help="print only; leave calibration.json as it is")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    sys.path.insert(0, str(REPO))

    from bench.hooks import build_model
    from tpmflow.planning.hardware import Accelerator
    from tpmflow.planning.model import ModelSpec
    from tpmflow.planning.roofline import CALIBRATION_FILE, decode, load_calibration

    read, copy = bandwidth_gb_s()
    model_dir, n_params = build_model(Path(tempfile.mkdtemp(prefix="tpmflow-bench-plan-")))
    gc.collect()  # the transformers copy, before vLLM loads its own
    measured = decode_rates(model_dir, batches, args)

    spec = ModelSpec.from_file(model_dir)
    here = Accelerator(name="local", memory_gib=1, bandwidth_gb_s=read, per_node=1, kind="cpu")
    context = args.prompt_len + args.tokens // 2  # the mean KV length a decode step reads
    result: dict[str, Any] = {
        "bench": "plan_calibration",
        "bandwidth_gb_s": round(read, 2),
        "copy_gb_s": round(copy, 2),
        "model": f"llama-100m ({spec.dtype})",
        "parameters": n_params,
        "decode_tokens": args.tokens,
        "mean_context": context,
    }
    for batch, rate in measured.items():
        roof = decode(spec, here, 1, 1, batch=batch, context=context, efficiency=1.0).tokens_per_s
        result[f"batch_{batch}"] = {
            "tokens_per_s": round(rate, 2),
            "roofline_tokens_per_s": round(roof, 2),
            "ratio": round(rate / roof, 3),
            "off_roofline_pct": round(100 * (1 - rate / roof), 1),
        }
    first = result[f"batch_{batches[0]}"]
    result["efficiency"] = first["ratio"]
    if not args.no_write:
        stored = load_calibration()
        stored["cpu"] = {
            "efficiency": first["ratio"],
            "bandwidth_gb_s": result["bandwidth_gb_s"],
            "copy_gb_s": result["copy_gb_s"],
            "model": result["model"],
            "parameters": n_params,
            "measurements": {k: v for k, v in result.items() if k.startswith("batch_")},
            "machine": f"{platform.machine()} {platform.processor() or platform.node()}, {os.cpu_count()} cores",
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        CALIBRATION_FILE.write_text(json.dumps(stored, indent=2) + "\n")
        result["written"] = str(CALIBRATION_FILE.relative_to(REPO))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
