"""TPM calls per second for a Colmena campaign: the shared pool vs models loaded by the tasks.

    .venv/bin/python bench/campaign.py [--calls 24] [--batch 32] [--model smiles-llama]

One run, the same Colmena queue and task server, the same calls (embed ``--batch`` SMILES:
mean-pooled final hidden states), three ways:

* pool       — ``tpm_embed`` tasks (tpmflow.colmena) call the shared vLLM pool (1 replica);
* per task   — each Parsl task loads the model itself (transformers, on an HTEX worker);
* per worker — each HTEX worker loads the model once and caches it in a module global, the
  strongest way to go without a pool.

The HTEX has one worker and the pool one replica, so each way gets one core for the model.
Printed: calls/s, the ratio to the pool, and the peak resident memory of the processes that hold
the model (the replica's process tree, or the HTEX worker).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
_CACHED: dict[str, Any] = {}  # per worker: model dir -> (tokenizer, model)


def _load(model_dir: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()
    return tokenizer, model


def _embed(tokenizer: Any, model: Any, smiles: list[str]) -> list[list[float]]:
    import torch

    with torch.inference_mode():
        out = []
        for s in smiles:  # one at a time, as the pool embeds each item by itself
            ids = tokenizer(s, return_tensors="pt")
            hidden = model(**ids, output_hidden_states=True).hidden_states[-1][0]
            out.append(hidden.mean(0).tolist())
    return out


def embed_loading_model(model_dir: str, smiles: list[str]) -> int:
    """(a) The task loads the model, uses it once, and drops it."""
    import torch

    torch.set_num_threads(1)
    tokenizer, model = _load(model_dir)
    return len(_embed(tokenizer, model, smiles))


def embed_cached_model(model_dir: str, smiles: list[str]) -> int:
    """(b) The worker keeps the model between tasks."""
    import torch

    torch.set_num_threads(1)
    module = sys.modules[__name__]
    if model_dir not in module._CACHED:
        module._CACHED[model_dir] = _load(model_dir)
    return len(_embed(*module._CACHED[model_dir], smiles))


class PeakRSS:
    """Samples the summed RSS of the processes ``pick`` returns, every 0.2 s, keeping the peak."""

    def __init__(self, pick: Any) -> None:
        self.pick, self.peak, self._stop = pick, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(0.2):
            total = 0
            for proc in self.pick():
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _processes(*needles: str) -> list[Any]:
    """Every process whose command line holds all ``needles``, and its children. (HTEX's worker
    pools are started in the background by a shell that exits, so they are nobody's children.)"""
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            line = " ".join(proc.cmdline())
            if all(n in line for n in needles):
                found.append(proc)
                found += [c for c in proc.children(recursive=True) if c not in found]
        except psutil.Error:  # gone, or a zombie, between the listing and the look
            continue
    return list({proc.pid: proc for proc in found}.values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=24)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument(
        "--model",
        default="llama-100m",
        help="llama-100m: a 99M-parameter Llama built here (bench/hooks.py's); or a model name or folder",
    )
    args = parser.parse_args()

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    sys.path.insert(0, str(REPO))
    from colmena.task_server import ParslTaskServer
    from parsl.config import Config
    from parsl.executors import HighThroughputExecutor, ThreadPoolExecutor
    from parsl.providers import LocalProvider

    from apps.molecular_design.library import load_library
    from bench.campaign import embed_cached_model, embed_loading_model
    from tpmflow.colmena import SafePipeQueues, tpm_methods
    from tpmflow.config import PoolConfig
    from tpmflow.pool import Pool
    from tpmflow.pool.launch import free_port
    from tpmflow.versioning.checkout import replica_model_dir

    library = load_library()
    batches = [library[i * args.batch : (i + 1) * args.batch] for i in range(args.calls)]
    cfg = PoolConfig.from_yaml(REPO / "configs" / "local.yaml")
    if args.model == "llama-100m":  # big enough that loading it is a real cost, small enough for CI
        import tempfile

        from bench.hooks import build_model

        args.model = str(build_model(Path(tempfile.mkdtemp(prefix="tpmflow-bench-campaign-")))[0])
    cfg.model, cfg.gateway.port = args.model, free_port()
    model_dir = str(replica_model_dir(cfg))
    rates: dict[str, tuple[float, int]] = {}
    with Pool(cfg) as pool:
        queues = SafePipeQueues(topics=["bench"])
        config = Config(
            executors=[
                HighThroughputExecutor(label="htex", max_workers_per_node=1, provider=LocalProvider(init_blocks=1)),
                ThreadPoolExecutor(label="tpm", max_threads=4),
            ],
            run_dir=str(REPO / "runs" / "bench_campaign"),
        )
        methods = [
            (embed_loading_model, {"executors": ["htex"]}),
            (embed_cached_model, {"executors": ["htex"]}),
            *tpm_methods(pool.url, pool.token, calls=("embed",), executors=["tpm"]),
        ]
        server = ParslTaskServer(methods, queues, config)
        server.start()
        try:
            queues.send_inputs(model_dir, ["C"], method="embed_cached_model", topic="bench")  # start the worker
            assert queues.get_result(topic="bench").success
            ways = {
                "pool": (
                    "tpm_embed",
                    lambda b: ((b,), {"adapter": "smiles"}),
                    lambda: _processes("vllm.entrypoints", model_dir),
                ),
                "per task": (
                    "embed_loading_model",
                    lambda b: ((model_dir, b), {}),
                    lambda: _processes("process_worker_pool", "bench_campaign"),
                ),
                "per worker": (
                    "embed_cached_model",
                    lambda b: ((model_dir, b), {}),
                    lambda: _processes("process_worker_pool", "bench_campaign"),
                ),
            }
            for name, (method, make_args, procs) in ways.items():
                with PeakRSS(procs) as rss:
                    started = time.perf_counter()
                    for batch in batches:
                        a, kw = make_args(batch)
                        queues.send_inputs(*a, method=method, input_kwargs=kw, topic="bench")
                    for _ in batches:
                        result = queues.get_result(topic="bench")
                        assert result.success, result.failure_info
                    seconds = time.perf_counter() - started
                rates[name] = (args.calls / seconds, rss.peak)
                print(f"{name:>10}: {args.calls} calls of {args.batch} SMILES in {seconds:.1f} s", flush=True)
        finally:
            queues.send_kill_signal()
            server.join()
    pool_rate = rates["pool"][0]
    print(f"\nTPM calls/s through one Colmena queue, {args.calls} calls x {args.batch} SMILES, model {args.model}")
    print(f"{'way':>10} {'calls/s':>9} {'pool / way':>11} {'peak RSS of the model holders':>31}")
    for name, (rate, peak) in rates.items():
        print(f"{name:>10} {rate:9.2f} {pool_rate / rate:10.2f}x {peak / 2**20:27.0f} MiB")
    print(
        json.dumps(
            {
                "calls": args.calls,
                "batch": args.batch,
                "model": Path(args.model).name,
                **{f"{k}_calls_per_s": round(v[0], 3) for k, v in rates.items()},
                **{f"{k}_peak_rss_mib": round(v[1] / 2**20) for k, v in rates.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
