"""Adapter throughput, measured side by side in one run (prints one JSON line).

Encode items/s of each built-in adapter at batch 1 and batch 64 (in process; the soft-token ones
with an untrained encoder + projector, whose speed does not depend on its weights; beamline items
are NeXus files, so this includes the sandboxed reader). Then end-to-end latency through one
replica of the demo model, 64 items per request: SMILES via the text adapter vs plain text, and the
soft-token route (point clouds -> 16 soft tokens in the replica) vs text prompts of the same
number of positions.
"""

from __future__ import annotations

import json
import os
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
    import tempfile

    from tpmflow_beamline.synthetic import make_dataset, nexus_bytes
    from tpmflow_pointcloud.synthetic import make_shapes

    from tpmflow.adapters import load_adapter
    from tpmflow.adapters.training import save_projector
    from tpmflow.config import PoolConfig
    from tpmflow.models.card import content_hash
    from tpmflow.models.catalog import model_path
    from tpmflow.models.smiles_data import load_split
    from tpmflow.pool import Pool

    molecules = load_split().heldout[:256]
    smiles = load_adapter("smiles")
    result: dict[str, object] = {
        "bench": "adapters",
        "smiles_encode_items_s_batch1": round(_rate(smiles.encode, molecules, 1)),
        "smiles_encode_items_s_batch64": round(_rate(smiles.encode, molecules, 64)),
    }
    clouds, _, _ = make_shapes(128, seed=0)
    frames = [nexus_bytes([f]) for f in make_dataset(64, seed=0)[0]]
    soft = {}
    for name, items in (("pointcloud", clouds), ("beamline", frames), ("smiles-fp", molecules)):
        adapter = load_adapter(name)
        adapter.use_model(adapter.new_model(128, seed=0))
        soft[name] = adapter
        result[f"{name}_encode_items_s_batch1"] = round(_rate(adapter.encode, items[:32], 1, repeats=1), 1)
        result[f"{name}_encode_items_s_batch64"] = round(_rate(adapter.encode, items[:64], 64, repeats=2), 1)

    model_dir = model_path("smiles-llama")
    parts = tempfile.mkdtemp(prefix="tpmflow-bench-parts-")
    cfg = PoolConfig(model=str(model_dir), replicas=1, parts_path=parts)
    cfg.engine.max_model_len = 256
    os.environ["TPMFLOW_PARTS"] = parts
    spec = save_projector(
        soft["pointcloud"],
        soft["pointcloud"].model,
        "bench",
        "0.0.0",
        base_model="smiles-llama",
        base_content_hash=content_hash(model_dir),
        hidden_size=128,
        training_data={"untrained": "benchmark"},
        metrics={},
    )
    batch = molecules[:64]
    clouds64 = clouds[:64]
    with Pool(cfg) as pool, pool.client() as client:
        client.embed(batch[:4], adapter="smiles")  # warm-up
        client.embed(clouds64[:4], adapter="pointcloud", adapter_config={"part": spec})
        # Text prompts with as many positions as a cloud's (BOS + 16 soft tokens).
        n_positions = client.embed(clouds64[:1], adapter="pointcloud", adapter_config={"part": spec}).n_tokens[0]
        same_length = [("CCO" * 20)[: n_positions - 1] for _ in range(64)]
        timings: dict[str, list[float]] = {"smiles_adapter": [], "smiles_text": [], "soft": [], "soft_text": []}
        for _ in range(5):
            for key, call in (
                ("smiles_adapter", lambda: client.embed(batch, adapter="smiles")),
                ("smiles_text", lambda: client.embed(batch)),
                ("soft", lambda: client.embed(clouds64, adapter="pointcloud", adapter_config={"part": spec})),
                ("soft_text", lambda: client.embed(same_length)),
            ):
                t0 = time.perf_counter()
                call()
                timings[key].append(time.perf_counter() - t0)
    ms = {k: statistics.median(v) * 1000 for k, v in timings.items()}
    result.update(
        {
            "embed64_ms_via_adapter": round(ms["smiles_adapter"], 1),
            "embed64_ms_as_text": round(ms["smiles_text"], 1),
            "ratio_adapter_over_text": round(ms["smiles_adapter"] / ms["smiles_text"], 3),
            "soft_token_positions": n_positions,
            "embed64_ms_soft_tokens_pointcloud": round(ms["soft"], 1),
            "embed64_ms_text_same_positions": round(ms["soft_text"], 1),
            "ratio_soft_over_text": round(ms["soft"] / ms["soft_text"], 3),
        }
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
