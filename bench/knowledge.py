"""The knowledge store's vector index against exact search, side by side in one run (prints one JSON
line, and a table on stderr).

For 10k and 100k clustered vectors of the demo model's hidden size (embeddings of related molecules
cluster; uniform noise would flatter any index): items/s added through ``KnowledgeStore.add``
(database commit + index), query latency p50/p99 of one query at a time, recall@10 against exact
search, index bytes per item, and the same queries by exact NumPy search (a normalised matrix
product, the baseline). With faiss-cpu installed (``pip install faiss-cpu``; not a tpmflow
dependency) its HNSW index is measured beside usearch's with the same graph settings, which is the
comparison behind choosing usearch.

Then, through a real pool (the demo model, with the text embedder beside it; ``--no-pool`` skips
it): items/s added end to end (HTTP, admission, embedding on a replica, database, index) for a
SMILES collection embedded by the model's adapter and for a text collection (the README's and
docs/'s sections, up to 60 words each) embedded by all-MiniLM-L6-v2, and a search's p50/p99 through the gateway.

Aim (issue 17): query p50 at 100k items >= 10x faster than exact search, at recall >= 0.95.

Usage: python bench/knowledge.py [--sizes 10000,100000] [--queries 200] [--dim D] [--no-pool]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def clustered(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    centres = rng.normal(size=(max(10, n // 200), dim)).astype(np.float32)
    return (centres[rng.integers(0, len(centres), n)] + 0.5 * rng.normal(size=(n, dim))).astype(np.float32)


def percentiles(samples: list[float]) -> tuple[float, float]:
    return float(np.percentile(samples, 50)), float(np.percentile(samples, 99))


def exact_top(vectors: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    scores = vectors @ (query / np.linalg.norm(query))
    top = np.argpartition(-scores, k)[:k]
    return top[np.argsort(-scores[top])]


def bench_size(n: int, dim: int, queries: int, rng: np.random.Generator) -> dict[str, Any]:
    from sqlalchemy import create_engine

    from tpmflow.access.principals import Principal
    from tpmflow.knowledge import Embedder, KnowledgeStore, recall_at_k

    vectors = clustered(n, dim, rng)
    normed = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    qs = vectors[rng.choice(n, queries, replace=False)] + 0.1 * rng.normal(size=(queries, dim)).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        engine = create_engine(f"sqlite:///{tmp}/k.db")
        store = KnowledgeStore(engine, Path(tmp) / "ix", save_every=10**9)
        who = Principal("bench", "bench", frozenset({"embed"}), "interactive", "s")
        embedder = Embedder(model="blake3:" + "0" * 64, pooling="mean", dim=dim)
        store.create(who, "bench", embedder)
        t0 = time.perf_counter()
        ids: list[int] = []
        for start in range(0, n, 10_000):
            chunk = vectors[start : start + 10_000]
            ids += store.add(who, "bench", [None] * len(chunk), chunk, embedder)
        add_s = time.perf_counter() - t0
        store.flush()
        index_bytes = sum(p.stat().st_size for p in (Path(tmp) / "ix").glob("*.usearch"))
        position = {i: j for j, i in enumerate(ids)}
        latencies, found = [], []
        for q in qs:
            t = time.perf_counter()
            (hits,) = store.search(who, "bench", q, k=10)
            latencies.append(time.perf_counter() - t)
            found.append([position[h.id] for h in hits])
        exact_lat, truth = [], []
        for q in qs:
            t = time.perf_counter()
            truth.append(list(exact_top(normed, q, 10)))
            exact_lat.append(time.perf_counter() - t)
        index_only = _index_only(store, qs)
        engine.dispose()
    p50, p99 = percentiles(latencies)
    e50, e99 = percentiles(exact_lat)
    out = {
        "items": n,
        "add_items_per_s": round(n / add_s),
        "query_p50_ms": round(p50 * 1000, 3),
        "query_p99_ms": round(p99 * 1000, 3),
        "index_query_p50_ms": round(index_only * 1000, 3),
        "exact_p50_ms": round(e50 * 1000, 3),
        "exact_p99_ms": round(e99 * 1000, 3),
        "speedup_p50": round(e50 / p50, 2),
        "recall_at_10": round(recall_at_k(found, truth), 4),
        "index_bytes_per_item": round(index_bytes / n, 1),
    }
    out.update(_faiss(vectors, normed, qs, truth))
    return out


def _index_only(store: Any, qs: np.ndarray) -> float:
    """p50 of the usearch index alone (no database reads for the hits' items)."""
    (opened,) = store._open.values()
    samples = []
    for q in qs:
        t = time.perf_counter()
        opened.index.search(q[None, :], 10)
        samples.append(time.perf_counter() - t)
    return float(np.percentile(samples, 50))


def _faiss(vectors: np.ndarray, normed: np.ndarray, qs: np.ndarray, truth: list[list[int]]) -> dict[str, Any]:
    try:
        import faiss  # type: ignore[import-not-found]
    except ImportError:
        return {"faiss": "not installed"}
    from tpmflow.knowledge import recall_at_k

    index = faiss.IndexHNSWFlat(normed.shape[1], 16, faiss.METRIC_INNER_PRODUCT)  # usearch's defaults: M=16
    index.hnsw.efConstruction, index.hnsw.efSearch = 128, 64
    t0 = time.perf_counter()
    index.add(normed)
    build = time.perf_counter() - t0
    samples, found = [], []
    for q in qs:
        qn = (q / np.linalg.norm(q))[None, :].astype(np.float32)
        t = time.perf_counter()
        _, ids = index.search(qn, 10)
        samples.append(time.perf_counter() - t)
        found.append(list(ids[0]))
    return {
        "faiss_hnsw_add_items_per_s": round(len(vectors) / build),
        "faiss_hnsw_query_p50_ms": round(float(np.percentile(samples, 50)) * 1000, 3),
        "faiss_hnsw_recall_at_10": round(recall_at_k(found, truth), 4),
        "faiss_hnsw_can_remove": False,  # faiss' HNSW indexes have no remove_ids
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--dim", type=int, default=None, help="default: the demo model's hidden size")
    parser.add_argument("--no-pool", action="store_true", help="skip ingestion and search through a real pool")
    args = parser.parse_args()
    dim = args.dim or _demo_dim()
    rng = np.random.default_rng(0)
    rows = [bench_size(int(n), dim, args.queries, rng) for n in args.sizes.split(",")]
    for row in rows:
        print(
            f"{row['items']:>7} items: add {row['add_items_per_s']:,}/s, query p50 {row['query_p50_ms']} ms "
            f"(index alone {row['index_query_p50_ms']} ms) vs exact {row['exact_p50_ms']} ms "
            f"= {row['speedup_p50']}x, recall@10 {row['recall_at_10']}, {row['index_bytes_per_item']} B/item",
            file=sys.stderr,
        )
    pool = None if args.no_pool else bench_pool()
    if pool is not None:
        for kind, row in pool.items():
            print(
                f"through the pool, {kind}: add {row['add_items_per_s']:,} items/s ({row['items']} items, "
                f"batches of {row['batch']}), search p50 {row['search_p50_ms']} ms, p99 {row['search_p99_ms']} ms",
                file=sys.stderr,
            )
    print(json.dumps({"bench": "knowledge", "dim": dim, "results": rows, "through_pool": pool}))


def bench_pool(batch: int = 64, searches: int = 50) -> dict[str, Any]:
    """Ingestion and search end to end through a real pool: the demo model embeds molecules (the
    SMILES adapter), the text embedder embeds the README's sections."""
    import tpmflow
    from apps.molecular_design.library import nci_smiles_path
    from tpmflow.config import PoolConfig, TextEmbedderConfig
    from tpmflow.knowledge.sources import markdown_sections

    # The NCI file's single-fragment SMILES as written (RDKit's Chem module, imported after the
    # index library, crashes this process; the adapter refuses what it cannot read, per item).
    lines = nci_smiles_path().read_text().split("\n")
    molecules = [w[0] for w in (line.split() for line in lines) if w and "." not in w[0]][:1024]
    docs = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    sections = [item for path in docs for item, _ in markdown_sections(path, max_words=60)]
    cfg = PoolConfig.from_yaml(REPO / "configs" / "local.yaml")
    cfg = cfg.model_copy(update={"text_embedder": TextEmbedderConfig()})
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = cfg.model_copy(update={"database_url": f"sqlite:///{tmp}/access.db"})
        with tpmflow.Pool(cfg) as pool, pool.client() as client:
            for kind, items, create in (
                ("smiles (model, adapter)", molecules, {"adapter": "smiles"}),
                ("text (text embedder)", sections, {"via": "text-embedder"}),
            ):
                collection = client.knowledge(f"bench-{len(out)}")
                collection.create(**create)
                collection.add(items[:batch])  # warm: the adapter loads
                added = 0
                t = time.perf_counter()
                for start in range(batch, len(items), batch):
                    added += sum(i is not None for i in collection.add(items[start : start + batch]).ids)
                rate = added / (time.perf_counter() - t)
                latencies = []
                for i in range(searches):
                    t = time.perf_counter()
                    collection.search([items[(i * 7) % len(items)]], k=10)
                    latencies.append(time.perf_counter() - t)
                p50, p99 = percentiles(latencies)
                out[kind] = {
                    "items": added,
                    "batch": batch,
                    "add_items_per_s": round(rate, 1),
                    "search_p50_ms": round(p50 * 1000, 2),
                    "search_p99_ms": round(p99 * 1000, 2),
                }
    return out


def _demo_dim() -> int:
    from tpmflow.paths import models_dir

    config = models_dir() / "smiles-llama" / "config.json"
    return int(json.loads(config.read_text())["hidden_size"]) if config.exists() else 256


if __name__ == "__main__":
    main()
