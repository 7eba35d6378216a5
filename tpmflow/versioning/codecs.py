"""How one tensor's bytes are stored: whole chunks, or a delta against the same tensor of the parent.

* ``chunks``: fixed-size chunks of the raw bytes, each a blob, so unchanged chunks of a large tensor
  are shared between versions without any delta logic.
* ``sparse``: the flat indices (gap-coded) and new values of the elements whose bits changed; pays
  off when few elements change (one optimiser step on a frozen-mostly model, a patched row).
* ``xor``: byte-wise XOR against the parent, chunked; the blob store's shuffle + zstd squeezes the
  zero high bytes of small dense changes (a full fine-tuning step with a small learning rate).

The committer encodes all that apply and keeps the smallest; every delta is decoded once before it
is written, so a codec bug cannot silently publish a version that does not rebuild.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tpmflow.errors import StoreCorrupted
from tpmflow.versioning.blobs import BlobStore, Prepared
from tpmflow.versioning.tensorfile import ITEMSIZE, element_view

CHUNK_SIZE = 1 << 20


@dataclass
class Encoded:
    """A candidate encoding of one tensor: the blobs it needs and the parameters to decode it."""

    encoding: str
    blobs: list[Prepared]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def cost(self) -> int:
        """Bytes this encoding adds to the store (a blob shared within the tensor counts once)."""
        return sum({b.id: b.cost for b in self.blobs}.values())


def _spans(n: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(i, min(i + chunk_size, n)) for i in range(0, n, chunk_size)]


def encode_chunks(raw: np.ndarray, dtype: str, blobs: BlobStore, chunk_size: int = CHUNK_SIZE) -> Encoded:
    """Split the raw bytes into fixed chunks (element aligned: chunk sizes are powers of two)."""
    size = ITEMSIZE.get(dtype, 1)
    return Encoded("chunks", [blobs.prepare(raw[a:b], size) for a, b in _spans(raw.size, chunk_size)])


def encode_xor(
    raw: np.ndarray, base: np.ndarray, dtype: str, blobs: BlobStore, chunk_size: int = CHUNK_SIZE
) -> Encoded:
    """XOR against the base, chunk by chunk; an unchanged chunk becomes the all-zero blob, shared."""
    size = ITEMSIZE.get(dtype, 1)
    parts = [blobs.prepare(np.bitwise_xor(raw[a:b], base[a:b]), size) for a, b in _spans(raw.size, chunk_size)]
    return Encoded("xor", parts)


def encode_sparse(raw: np.ndarray, base: np.ndarray, dtype: str, blobs: BlobStore) -> Encoded | None:
    """Indices and new values of the changed elements, or ``None`` when too many changed to pay."""
    new, old = element_view(raw, dtype), element_view(base, dtype)
    changed = np.flatnonzero(new != old)
    if changed.size * (new.itemsize + 2) >= raw.size // 2:
        return None
    index = np.dtype("<u4") if new.size < 2**32 else np.dtype("<u8")
    gaps = np.diff(changed, prepend=0).astype(index)  # small numbers compress; cumsum restores them
    values = new[changed]
    return Encoded(
        "sparse",
        [blobs.prepare(gaps.view(np.uint8), index.itemsize), blobs.prepare(values.view(np.uint8), values.itemsize)],
        {"count": int(changed.size), "index": index.str},
    )


def decode(
    encoding: str, blob_ids: list[str], params: dict[str, Any], base: np.ndarray | None, dtype: str, blobs: BlobStore
) -> np.ndarray:
    """Rebuild a tensor's raw bytes from its blobs (and its base's bytes, for a delta)."""
    parts = [blobs.get(b) for b in blob_ids]
    if encoding == "chunks":
        return np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    if base is None:
        raise StoreCorrupted(f"a {encoding} delta has no base to apply to")
    if encoding == "xor":
        data = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
        if data.size != base.size:
            raise StoreCorrupted("an xor delta does not match its base's size")
        return np.bitwise_xor(base, data)
    if encoding == "sparse":
        out = np.array(base, dtype=np.uint8, copy=True)
        elements = element_view(out, dtype)
        index = parts[0].view(params["index"]).cumsum(dtype=np.uint64)
        values = parts[1].view(elements.dtype)
        if index.size != params["count"] or values.size != index.size or (index.size and index[-1] >= elements.size):
            raise StoreCorrupted("a sparse delta does not match its base")
        elements[index] = values
        return out
    raise StoreCorrupted(f"unknown tensor encoding {encoding!r}")
