"""What the model store costs in a continual-training run, measured side by side (prints one JSON line).

The demo model (smiles-llama) goes through 10 versions (the model as built, then 9 updates) in three
scenarios: (a) 1% of the parameters change each step, (b) a rank-8 update of every 2-D matrix
committed as LoRA factors (float32 factors, and again with bfloat16 factors, as PEFT often saves
them), (c) a full fine-tuning step of every weight (gaussian noise of 1e-4 relative size). Each is
reported as store size / one model folder's size (10 full copies would be 10.0), for the store as
shipped and for the same store with deltas disabled (chunk dedup + compression only), with commit
and checkout throughput (MB of weights per second; on a 2.7 MB model fixed costs dominate).

Usage: python bench/versioning.py [--versions 10] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table


def _weights(folder: Path) -> tuple[bytes, dict[str, tuple[int, int, tuple[int, ...]]], np.ndarray]:
    """Verbatim header, tensor name -> (begin, end, shape) in floats, and the data as float32."""
    blob = (folder / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    spans = {
        k: (v["data_offsets"][0] // 4, v["data_offsets"][1] // 4, tuple(v["shape"]))
        for k, v in header.items()
        if k != "__metadata__"
    }
    assert all(v["dtype"] == "F32" for k, v in header.items() if k != "__metadata__")
    return blob[: 8 + n], spans, np.frombuffer(blob, np.float32, offset=8 + n).copy()


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _write_variant(src: Path, dst: Path, header: bytes, data: np.ndarray) -> Path:
    shutil.copytree(src, dst)
    (dst / "model.safetensors").write_bytes(header + data.astype(np.float32).tobytes())
    return dst


def _write_lora(dst: Path, spans: dict[str, Any], rank: int, rng: np.random.Generator, dtype: str) -> Path:
    """A PEFT LoRA folder with a rank-``rank`` update of every 2-D matrix (embedding included)."""
    import torch
    from safetensors.torch import save_file

    dst.mkdir()
    tensors = {}
    for name, (_, _, shape) in spans.items():
        if len(shape) != 2:
            continue
        module = "base_model.model." + name.removesuffix(".weight")
        rows, cols = shape
        if name.endswith("embed_tokens.weight"):  # PEFT's embedding LoRA: A (r, vocab), B (dim, r)
            a, b = rng.standard_normal((rank, rows)) / rows**0.5, rng.standard_normal((cols, rank)) * 1e-3
            keys = (f"{module}.lora_embedding_A", f"{module}.lora_embedding_B")
        else:  # A (r, in), B (out, r)
            a, b = rng.standard_normal((rank, cols)) / cols**0.5, rng.standard_normal((rows, rank)) * 1e-3
            keys = (f"{module}.lora_A.weight", f"{module}.lora_B.weight")
        for key, value in zip(keys, (a, b), strict=True):
            tensors[key] = torch.from_numpy(value).to(getattr(torch, dtype)).contiguous()
    save_file(tensors, str(dst / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": "all-linear"}
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


def run_dense(
    src: Path, work: Path, versions: int, step: Callable[[np.ndarray, np.random.Generator], np.ndarray], seed: int
) -> dict[str, float]:
    """Commit ``versions`` dense versions to a delta store and a dedup-only store; time the former."""
    from tpmflow.versioning import ModelStore

    header, _, data = _weights(src)
    rng = np.random.default_rng(seed)
    folders = [src]
    for i in range(1, versions):
        data = step(data, rng)
        folders.append(_write_variant(src, work / f"v{i}", header, data))
    return _measure(src, work, folders, ModelStore)


def _measure(src: Path, work: Path, folders: list[Path], store_cls: Any) -> dict[str, float]:
    delta = store_cls(work / "store", durable=False)
    dedup = store_cls(work / "dedup", durable=False, deltas=False)
    weights = (src / "model.safetensors").stat().st_size
    ids, t0 = [], time.perf_counter()
    for folder in folders:
        ids.append(delta.commit(folder, folder.name, "bench", parent=ids[-1] if ids else None))
    commit_s = time.perf_counter() - t0
    for folder in folders:
        dedup.commit(folder, folder.name, "bench")
    t0 = time.perf_counter()
    for i, version in enumerate(ids):
        delta.checkout(version, work / f"out{i}")
    checkout_s = time.perf_counter() - t0
    assert delta.verify().ok
    one = _folder_bytes(src)
    return {
        "ratio": delta.disk_usage() / one,
        "ratio_dedup_only": dedup.disk_usage() / one,
        "commit_mb_s": len(folders) * weights / commit_s / 1e6,
        "checkout_mb_s": len(folders) * weights / checkout_s / 1e6,
    }


def run_lora(src: Path, work: Path, versions: int, seed: int, dtype: str) -> dict[str, float]:
    """Commit 1 dense + (versions-1) LoRA versions; the dedup-only store gets their checkouts, dense."""
    from tpmflow.versioning import ModelStore

    _, spans, _ = _weights(src)
    rng = np.random.default_rng(seed)
    delta = ModelStore(work / "store", durable=False)
    dedup = ModelStore(work / "dedup", durable=False, deltas=False)
    weights = (src / "model.safetensors").stat().st_size
    loras = [_write_lora(work / f"lora{i}", spans, 8, rng, dtype) for i in range(1, versions)]
    t0 = time.perf_counter()
    ids = [delta.commit(src, "base", "bench")]
    for i, lora in enumerate(loras, start=1):
        ids.append(delta.commit(None, f"lora {i}", "bench", parent=ids[-1], lora=lora))
    commit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    outs = [delta.checkout(version, work / f"out{i}") for i, version in enumerate(ids)]
    checkout_s = time.perf_counter() - t0
    for out in outs:
        dedup.commit(out, out.name, "bench")
    assert delta.verify().ok
    one = _folder_bytes(src)
    return {
        "ratio": delta.disk_usage() / one,
        "ratio_dedup_only": dedup.disk_usage() / one,
        "commit_mb_s": versions * weights / commit_s / 1e6,
        "checkout_mb_s": versions * weights / checkout_s / 1e6,
    }


def sparse_step(data: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """1% of the parameters move by about their own scale's 1%."""
    out = data.copy()
    idx = rng.choice(out.size, out.size // 100, replace=False)
    out[idx] += (0.01 * float(np.std(data)) * rng.standard_normal(idx.size)).astype(np.float32)
    return out


def full_step(data: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Every parameter moves by gaussian noise of 1e-4 of its own size."""
    return (data * (1 + 1e-4 * rng.standard_normal(data.size))).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from tpmflow.models.catalog import DEMO_MODEL, model_path

    src = model_path(DEMO_MODEL)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="tpmflow-bench-versioning-") as tmp:
        root = Path(tmp)
        results["sparse_1pct"] = run_dense(src, root / "a", args.versions, sparse_step, args.seed)
        results["lora_rank8_f32"] = run_lora(src, root / "b", args.versions, args.seed, "float32")
        results["lora_rank8_bf16"] = run_lora(src, root / "b16", args.versions, args.seed, "bfloat16")
        results["full_step_1e-4"] = run_dense(src, root / "c", args.versions, full_step, args.seed)
    aims = {"sparse_1pct": 1.2, "lora_rank8_f32": 1.5, "lora_rank8_bf16": 1.5, "full_step_1e-4": None}
    table = Table(
        title=f"{DEMO_MODEL}, {args.versions} versions: store size / one model folder (full copies: {args.versions}.0)"
    )
    for col in ("scenario", "store", "aim", "dedup only", "commit MB/s", "checkout MB/s"):
        table.add_column(col, justify="left" if col == "scenario" else "right")
    for name, r in results.items():
        aim = aims[name]
        met = "" if aim is None else ("[green]" if r["ratio"] <= aim else "[red]")
        table.add_row(
            name,
            f"{met}{r['ratio']:.2f}",
            "-" if aim is None else f"<= {aim}",
            f"{r['ratio_dedup_only']:.2f}",
            f"{r['commit_mb_s']:.1f}",
            f"{r['checkout_mb_s']:.1f}",
        )
    Console(stderr=True).print(table)
    line: dict[str, Any] = {"bench": "versioning", "model": DEMO_MODEL, "versions": args.versions}
    line["model_mbytes"] = round(_folder_bytes(src) / 1e6, 3)
    for name, r in results.items():
        for key, value in r.items():
            line[f"{name}_{key}"] = round(value, 3 if "ratio" in key else 1)
    print(json.dumps(line))


if __name__ == "__main__":
    main()
