"""One collection's vector index: usearch's HNSW on disk, keyed by item id, rebuilt from the
database whenever its file is missing, corrupt or behind.

usearch over faiss-cpu: it adds and removes single keys in an HNSW graph (faiss' HNSW indexes
cannot remove), stores f16/i8 vectors, saves and memory-maps one file, and its wheel is small; the
measured comparison is ``bench/knowledge.py``. The index is a cache: the database commits an item
(vector included) before it is acknowledged, so a process killed mid-ingestion loses no
acknowledged item and leaves no half-written one; the next open sees the file behind the database
(its sidecar records what it holds) and rebuilds.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Rows = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]  # batches of (ids, vectors) of live items

# Up to this many items a search scans every vector (about a millisecond per query at 384
# dimensions): exact, and deterministic. The HNSW graph of a small collection built by several
# threads can miss a near-tie neighbour (recall 0.935 at 200 items was seen); its speed only
# matters past this size.
EXACT_UP_TO = 10_000


@dataclass(frozen=True)
class Generation:
    """What the database holds for a collection: live items, the newest id, deleted items."""

    live: int
    max_id: int
    deleted: int


class VectorIndex:
    def __init__(self, path: Path, dim: int, dtype: str = "f32") -> None:
        from usearch.index import Index

        self.path = path
        self.dim = dim
        self.dtype = dtype
        self.index = Index(ndim=dim, metric="cos", dtype=dtype)
        self.rebuilt = False  # the last open rebuilt from the database (tests, logs)
        self.held = Generation(0, 0, 0)  # what the index holds of the database

    @property
    def sidecar(self) -> Path:
        return self.path.with_suffix(".json")

    @classmethod
    def open(cls, path: Path, dim: int, generation: Generation, rows: Rows, dtype: str = "f32") -> VectorIndex:
        """The index saved at ``path`` if its bytes are intact (``held`` says what it holds: the
        store catches it up with the database), else one rebuilt from ``rows``, which hold
        ``generation``."""
        ix = cls(path, dim, dtype)
        if ix._load():
            return ix
        ix.rebuilt = True
        for ids, vectors in rows():
            ix.add(ids, vectors)
        ix.held = generation
        ix.save(generation)
        return ix

    def _load(self) -> bool:
        from usearch.index import Index

        try:
            meta = json.loads(self.sidecar.read_text())
            if meta["dim"] != self.dim or _digest(self.path) != meta["sha256"]:
                return False  # another size, or corrupt (a torn write, a disk error): rebuild
            held = Generation(**meta["generation"])
            loaded = Index.restore(str(self.path))
        except (OSError, ValueError, KeyError, TypeError, RuntimeError):
            return False
        if loaded is None or len(loaded) != held.live:
            return False
        self.index, self.held = loaded, held
        return True

    def save(self, generation: Generation | None = None) -> None:
        """Write the index and then its sidecar, each atomically: a crash leaves the old pair, or a
        new file whose sidecar does not match it (rebuilt at the next open), never a wrong index."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tag = f".{os.getpid()}-{threading.get_ident()}.tmp"  # processes sharing the folder never collide
        tmp = self.path.with_suffix(tag)
        self.index.save(str(tmp))
        os.replace(tmp, self.path)
        held = generation or self.held
        meta = {"generation": held.__dict__, "dim": self.dim, "sha256": _digest(self.path)}
        tmp_meta = self.sidecar.with_suffix(".json" + tag)
        tmp_meta.write_text(json.dumps(meta))
        os.replace(tmp_meta, self.sidecar)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add the items it does not hold yet (a catch-up may read some it already has)."""
        fresh = [n for n, key in enumerate(ids) if int(key) not in self.index]
        if fresh:
            self.index.add(ids[fresh].astype(np.uint64), vectors[fresh].astype(np.float32))

    def remove(self, ids: Iterable[int]) -> None:
        for key in ids:
            if int(key) in self.index:
                self.index.remove(int(key))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Ids and cosine distances of the ``k`` nearest per query row ([n, k]; id -1 past the end)."""
        if len(self.index) == 0:
            return np.full((len(queries), k), -1, dtype=np.int64), np.full((len(queries), k), np.inf)
        exact = len(self.index) <= EXACT_UP_TO
        found = self.index.search(queries.astype(np.float32), min(k, len(self.index)), exact=exact)
        keys = np.atleast_2d(np.asarray(found.keys)).astype(np.int64)
        dist = np.atleast_2d(np.asarray(found.distances)).astype(np.float64)
        # One query row gives usearch's Matches (no counts), several its BatchMatches.
        counts = np.atleast_1d(np.asarray(found.counts)) if hasattr(found, "counts") else [keys.shape[1]]
        for row, count in enumerate(counts):
            keys[row, count:] = -1
            dist[row, count:] = np.inf
        if keys.shape[1] < k:
            pad = k - keys.shape[1]
            keys = np.pad(keys, ((0, 0), (0, pad)), constant_values=-1)
            dist = np.pad(dist, ((0, 0), (0, pad)), constant_values=np.inf)
        return keys, dist

    def __len__(self) -> int:
        return len(self.index)

    def nbytes(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
