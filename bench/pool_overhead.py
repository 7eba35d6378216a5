"""What the gateway costs, measured side by side in one run (prints one JSON line).

(a) vLLM offline ``LLM.generate``, (b) vLLM's own OpenAI server (the replica, called directly),
(c) the tpmflow gateway in front of that same replica. The same 64 prompts x 64 tokens through
each give output tokens/s and the ratios c/a and c/b; 256 concurrent max_tokens=1 requests
through (b) and (c) give the milliseconds the gateway adds at p50 and p99.

Usage: python bench/pool_overhead.py [--model tiny-llama] [--prompts 64] [--tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from typing import Any

import httpx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/serve_process.py


def _prompts(n: int) -> list[str]:
    return [f"Prompt number {i}: the campaign asks" for i in range(n)]


async def _throughput(url: str, token: str, prompts: list[str], tokens: int) -> float:
    body = {"max_tokens": tokens, "temperature": 0.0, "ignore_eos": True}
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=512)) as http:
        started = time.perf_counter()
        responses = await asyncio.gather(
            *(
                http.post(
                    url + "/v1/completions",
                    json={**body, "model": "bench", "prompt": p},
                    headers={"Authorization": f"Bearer {token}"},
                )
                for p in prompts
            )
        )
        elapsed = time.perf_counter() - started
    out = 0
    for r in responses:
        r.raise_for_status()
        out += r.json()["usage"]["completion_tokens"]
    return out / elapsed


async def _latencies(url: str, token: str, n: int) -> list[float]:
    body = {"model": "bench", "prompt": "latency", "max_tokens": 1}
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=512)) as http:

        async def one() -> float:
            t0 = time.perf_counter()
            r = await http.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {token}"})
            r.raise_for_status()
            return (time.perf_counter() - t0) * 1000

        return list(await asyncio.gather(*(one() for _ in range(n))))


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1]


def _offline_tok_s(model: str, prompts: list[str], tokens: int, rounds: int) -> list[float]:
    """(a): output tokens/s of vLLM's offline ``LLM.generate``, one figure per round."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=256)
    try:
        params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
        llm.generate(prompts[:4], SamplingParams(max_tokens=4), use_tqdm=False)
        runs = []
        for _ in range(rounds):
            started = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            runs.append(sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - started))
        return runs
    finally:
        # The engine core and its worker are child processes: stop them here, while this process is
        # still whole, rather than leave them to finalizers at interpreter exit (the bench printed
        # its line and then never ended, so `make bench` hung).
        llm.llm_engine.engine_core.shutdown()
        del llm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--concurrent", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of (b) and (c); medians")
    parser.add_argument(
        "--split",
        action="store_true",
        help="the replica on the last core (engine.process_cores), the gateway and this load generator on the "
        "others: vLLM's CPU engine spin-waits, so without it the gateway competes with the engine for cores",
    )
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from serve_process import ServedPool

    from tpmflow.models.catalog import model_path

    prompts = _prompts(args.prompts)
    result: dict[str, Any] = {
        "bench": "pool_overhead",
        "model": args.model,
        "prompts": args.prompts,
        "tokens": args.tokens,
    }
    config = {
        "model": str(model_path(args.model)),
        "served_model_name": "bench",
        "replicas": 1,
        "engine": {"max_model_len": 256},
        "gateway": {"max_inflight": 512, "queue_limit": 1024, "request_timeout_s": 600},
    }
    cores = sorted(os.sched_getaffinity(0))
    if args.split and len(cores) > 1:
        config["engine"] = {**config["engine"], "process_cores": [str(cores[-1])]}  # type: ignore[dict-item]
        os.sched_setaffinity(0, set(cores[:-1]))  # the gateway (`tpmflow serve`) inherits this
    result["split"] = bool(args.split and len(cores) > 1)
    # The gateway runs in its own process (as `tpmflow serve` does), not in this client's interpreter.
    with ServedPool(config) as pool:
        replica = pool.replica_urls[0]
        asyncio.run(_throughput(replica, pool.secret, prompts[:4], 4))  # warm-up
        asyncio.run(_throughput(pool.url, pool.token, prompts[:4], 4))
        # Interleave (b) and (c) so drift on a busy machine hits both alike; report medians.
        runs_b: list[float] = []
        runs_c: list[float] = []
        for _ in range(args.rounds):
            runs_b.append(asyncio.run(_throughput(replica, pool.secret, prompts, args.tokens)))
            runs_c.append(asyncio.run(_throughput(pool.url, pool.token, prompts, args.tokens)))
        b, c = statistics.median(runs_b), statistics.median(runs_c)
        lat_b = asyncio.run(_latencies(replica, pool.secret, args.concurrent))
        lat_c = asyncio.run(_latencies(pool.url, pool.token, args.concurrent))

    a = statistics.median(_offline_tok_s(str(model_path(args.model)), prompts, args.tokens, args.rounds))

    result.update(
        {
            "tok_s_offline": round(a, 1),
            "tok_s_vllm_server": round(b, 1),
            "tok_s_gateway": round(c, 1),
            "ratio_gateway_vs_offline": round(c / a, 3),
            "ratio_gateway_vs_server": round(c / b, 3),
            "added_ms_p50": round(_pct(lat_c, 50) - _pct(lat_b, 50), 2),
            "added_ms_p99": round(_pct(lat_c, 99) - _pct(lat_b, 99), 2),
            "server_ms_p50": round(_pct(lat_b, 50), 2),
            "gateway_ms_p50": round(_pct(lat_c, 50), 2),
            "rounds_tok_s_server": [round(x) for x in runs_b],
            "rounds_tok_s_gateway": [round(x) for x in runs_c],
        }
    )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
