"""Adapter throughput, measured side by side in one run (prints one JSON line).

Encode items/s of the SMILES adapter at batch 1 and batch 64 (in process, no model), and end-to-end
latency of embedding 64 molecules through the pool via the adapter vs as plain text (the adapter's
own cost inside the replica).
"""

from __future__ import annotations

import json
import statistics
import time


def _rate(fn, items: list[str], batch: int, repeats: int = 3) -> float:  # type: ignore[no-untyped-def]
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for start in range(0, len(items), batch):
            fn(items[start : start + batch])
        best = max(best, len(items) / (time.perf_counter() - t0))
    return best


def main() -> None:
    from tpmflow.adapters import load_adapter
    from tpmflow.models.catalog import model_path
    from tpmflow.models.smiles_data import load_split
    from tpmflow.pool import Pool

    molecules = load_split().heldout[:256]
    smiles = load_adapter("smiles")
    result = {
        "bench": "adapters",
        "smiles_encode_items_s_batch1": round(_rate(smiles.encode, molecules, 1)),
        "smiles_encode_items_s_batch64": round(_rate(smiles.encode, molecules, 64)),
    }
    from tpmflow.config import PoolConfig

    cfg = PoolConfig(model=str(model_path("smiles-llama")), replicas=1)
    cfg.engine.max_model_len = 256
    batch = molecules[:64]
    with Pool(cfg) as pool, pool.client() as client:
        client.embed(batch[:4], adapter="smiles")  # warm-up
        via_adapter, as_text = [], []
        for _ in range(5):
            t0 = time.perf_counter()
            client.embed(batch, adapter="smiles")
            via_adapter.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            client.embed(batch)
            as_text.append(time.perf_counter() - t0)
    result.update(
        {
            "embed64_ms_via_adapter": round(statistics.median(via_adapter) * 1000, 1),
            "embed64_ms_as_text": round(statistics.median(as_text) * 1000, 1),
            "ratio_adapter_over_text": round(statistics.median(via_adapter) / statistics.median(as_text), 3),
        }
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
