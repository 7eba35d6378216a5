"""Content-addressed blobs: the id is blake3 of the logical bytes, storage may compress them.

Addressing by the uncompressed content makes dedup independent of how a blob is stored, and lets
every read be checked: a blob whose decoded bytes do not hash to its name is corrupt. Numeric data
is byte-shuffled before zstd (byte k of every element grouped together), which is what makes small
float changes compress: their XOR has zero high bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import blake3
import numpy as np
import zstandard

from tpmflow.errors import StoreCorrupted
from tpmflow.versioning.atomic import write_atomic

RAW, ZSTD, SHUFFLED_ZSTD = 0, 1, 2  # first byte of a blob file: how the rest is stored
MIN_SAVING = 0.97  # store compressed only when it saves at least 3%


def blob_id(data: bytes | np.ndarray) -> str:
    """The address of some bytes: blake3 hex digest (arrays are hashed through the buffer protocol)."""
    return blake3.blake3(np.ascontiguousarray(data).data if isinstance(data, np.ndarray) else data).hexdigest()


def shuffle(data: np.ndarray, itemsize: int) -> np.ndarray:
    """Group byte k of every element together (blosc-style); the inverse is ``unshuffle``."""
    return data.reshape(-1, itemsize).T.copy().reshape(-1)


def unshuffle(data: np.ndarray, itemsize: int) -> np.ndarray:
    return data.reshape(itemsize, -1).T.copy().reshape(-1)


@dataclass(frozen=True)
class Prepared:
    """A blob ready to write: its id and stored form (``None`` when the store already holds it)."""

    id: str
    stored: bytes | None

    @property
    def cost(self) -> int:
        """Bytes this blob would add to the store."""
        return 0 if self.stored is None else len(self.stored)


class BlobStore:
    """Blobs under ``root/ab/cdef…``; writes go through ``tmp_dir`` and an atomic rename."""

    def __init__(self, root: Path, tmp_dir: Path, *, compress: bool = True, level: int = 3, durable: bool = True):
        self.root, self.tmp_dir = root, tmp_dir
        self.compress, self.level, self.durable = compress, level, durable

    def path(self, bid: str) -> Path:
        return self.root / bid[:2] / bid[2:]

    def has(self, bid: str) -> bool:
        return self.path(bid).is_file()

    def prepare(self, data: np.ndarray, itemsize: int = 1, bid: str | None = None) -> Prepared:
        """Hash ``data`` (uint8) and, if new, encode it; nothing touches the disk yet, so callers can
        compare the cost of alternative encodings before choosing one."""
        bid = bid or blob_id(data)
        if self.has(bid):
            return Prepared(bid, None)
        raw = np.ascontiguousarray(data, dtype=np.uint8)
        stored = bytes([RAW]) + raw.tobytes()
        if self.compress and raw.size >= 64:
            shuffled = itemsize > 1 and raw.size % itemsize == 0
            body = shuffle(raw, itemsize) if shuffled else raw
            packed = zstandard.ZstdCompressor(level=self.level).compress(body.data)
            if len(packed) + 2 < MIN_SAVING * raw.size:
                stored = bytes([SHUFFLED_ZSTD, itemsize]) + packed if shuffled else bytes([ZSTD]) + packed
        return Prepared(bid, stored)

    def write(self, blob: Prepared) -> int:
        """Publish a prepared blob (idempotent); returns the bytes it added."""
        if blob.stored is None or self.has(blob.id):
            return 0
        write_atomic(self.path(blob.id), blob.stored, self.tmp_dir, durable=self.durable)
        return len(blob.stored)

    def put(self, data: np.ndarray, itemsize: int = 1) -> str:
        """Prepare and write in one step; returns the id."""
        blob = self.prepare(data, itemsize)
        self.write(blob)
        return blob.id

    def get(self, bid: str) -> np.ndarray:
        """The blob's bytes as uint8, checked against its id; raises ``StoreCorrupted`` otherwise."""
        try:
            stored = self.path(bid).read_bytes()
        except FileNotFoundError:
            raise StoreCorrupted(f"blob {bid} is missing from the store") from None
        try:
            data = self._decode(stored)
        except (zstandard.ZstdError, ValueError, IndexError) as exc:
            raise StoreCorrupted(f"blob {bid} cannot be decoded: {exc}") from exc
        if blob_id(data) != bid:
            raise StoreCorrupted(f"blob {bid} does not match its blake3 hash")
        return data

    @staticmethod
    def _decode(stored: bytes) -> np.ndarray:
        kind = stored[0]
        if kind == RAW:
            return np.frombuffer(stored, np.uint8, offset=1)
        if kind == ZSTD:
            return np.frombuffer(zstandard.ZstdDecompressor().decompress(stored[1:]), np.uint8)
        if kind == SHUFFLED_ZSTD:
            body = np.frombuffer(zstandard.ZstdDecompressor().decompress(stored[2:]), np.uint8)
            return unshuffle(body, stored[1])
        raise ValueError(f"unknown blob encoding {kind}")

    def ids(self) -> Iterator[str]:
        """Every blob id on disk (temporary files live elsewhere, so a name here is a whole blob)."""
        if not self.root.is_dir():
            return
        for sub in sorted(self.root.iterdir()):
            if sub.is_dir() and len(sub.name) == 2:
                for f in sorted(sub.iterdir()):
                    yield sub.name + f.name

    def stored_size(self, bid: str) -> int:
        return self.path(bid).stat().st_size

    def remove(self, bid: str) -> int:
        """Delete one blob; returns the bytes freed."""
        path = self.path(bid)
        size = path.stat().st_size
        path.unlink()
        return size
