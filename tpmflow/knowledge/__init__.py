"""The knowledge store: collections of items (SMILES, texts, results) with metadata and vectors
from the pool's own embed route, searched by nearest neighbour (usearch HNSW), owned by projects."""

from tpmflow.knowledge.index import Generation, VectorIndex
from tpmflow.knowledge.store import MAX_K, CollectionInfo, Embedder, Hit, KnowledgeStore, recall_at_k

__all__ = [
    "MAX_K",
    "CollectionInfo",
    "Embedder",
    "Generation",
    "Hit",
    "KnowledgeStore",
    "VectorIndex",
    "recall_at_k",
]
