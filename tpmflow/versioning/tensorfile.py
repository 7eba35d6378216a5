"""The byte layout of a safetensors file, kept exactly so a checkout can rebuild it bit for bit.

The ``safetensors`` library validates a file but re-serialising would not reproduce its header
(padding, key order, ``__metadata__``), and bit-identity is what lets the store's version id equal
the model card's content hash. So the header is kept verbatim and each tensor is addressed by its
byte range; numpy views those bytes without copying (``np.memmap``).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tpmflow.errors import InvalidRequest

# safetensors dtype -> element size in bytes; sub-byte and exotic types are stored as opaque bytes.
ITEMSIZE: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
# dtypes whose values numpy can read as numbers (BF16 through its upper float32 half).
NUMERIC = {"U8": "u1", "I8": "i1", "I16": "<i2", "U16": "<u2", "F16": "<f2", "I32": "<i4", "U32": "<u4", "F32": "<f4"}
NUMERIC |= {"I64": "<i8", "U64": "<u8", "F64": "<f8", "BOOL": "u1"}
FLOATS = {"F16", "BF16", "F32", "F64"}
MAX_HEADER = 100 << 20  # the limit the safetensors format itself sets


@dataclass(frozen=True)
class TensorSpan:
    """One tensor of a file: its dtype, shape and ``[begin, end)`` byte range in the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class FileLayout:
    """A safetensors file split into its verbatim header (length prefix included) and tensor spans."""

    path: Path
    header: bytes
    tensors: tuple[TensorSpan, ...]  # in data order

    def data(self) -> np.memmap | np.ndarray:
        """The data section as a read-only uint8 view (never copied into memory whole)."""
        size = self.path.stat().st_size - len(self.header)
        if size == 0:
            return np.zeros(0, np.uint8)
        return np.memmap(self.path, dtype=np.uint8, mode="r", offset=len(self.header), shape=(size,))


def read_layout(path: Path) -> FileLayout:
    """Parse and validate a safetensors file; raises ``InvalidRequest`` for anything malformed.

    The ``safetensors`` library checks the header first (it is the reference parser); the spans must
    then tile the data section with no gap or overlap, which the verbatim rebuild relies on.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as fh:
            keys = set(fh.keys())
    except Exception as exc:  # the library raises its own and OS errors alike
        raise InvalidRequest(f"{path.name} is not a valid safetensors file: {exc}") from exc
    with path.open("rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > MAX_HEADER:
            raise InvalidRequest(f"{path.name}: header of {n} bytes exceeds the format's limit")
        raw = fh.read(n)
    meta = json.loads(raw)
    spans = []
    for name, info in meta.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        spans.append(TensorSpan(name, info["dtype"], tuple(info["shape"]), begin, end))
    spans.sort(key=lambda s: (s.begin, s.end))
    position = 0
    for span in spans:
        if span.begin != position:
            raise InvalidRequest(f"{path.name}: tensor {span.name} leaves a gap or overlaps in the data section")
        size = ITEMSIZE.get(span.dtype)
        if size is not None and span.nbytes != size * int(np.prod(span.shape, dtype=np.int64)):
            raise InvalidRequest(f"{path.name}: tensor {span.name} has {span.nbytes} bytes for shape {span.shape}")
        position = span.end
    if position != path.stat().st_size - 8 - n or {s.name for s in spans} != keys:
        raise InvalidRequest(f"{path.name}: the data section does not match the header")
    return FileLayout(path, struct.pack("<Q", n) + raw, tuple(spans))


def element_view(raw: np.ndarray, dtype: str) -> np.ndarray:
    """The tensor's elements as unsigned integers of their width, for bitwise comparison.

    Comparing bit patterns (not values) is what makes deltas exact: -0.0 vs 0.0 and NaN payloads
    count as changes. Opaque dtypes fall back to bytes.
    """
    size = ITEMSIZE.get(dtype, 1)
    return raw.view(np.dtype(f"<u{size}")) if raw.size % size == 0 else raw


def to_float64(raw: np.ndarray, dtype: str) -> np.ndarray:
    """The tensor's values as float64 (exact for every numeric dtype; BF16 via its float32 upper half)."""
    if dtype == "BF16":
        return (raw.view("<u2").astype(np.uint32) << 16).view("<f4").astype(np.float64)
    if dtype not in NUMERIC:
        raise InvalidRequest(f"dtype {dtype} has no numeric view")
    return raw.view(NUMERIC[dtype]).astype(np.float64)


def from_float64(values: np.ndarray, dtype: str) -> np.ndarray:
    """Cast float64 values to a float dtype's bytes with round-to-nearest-even, one canonical way.

    BF16 goes float64 -> float32 -> bfloat16 (both steps round-to-nearest-even, NaN kept quiet):
    the rule is fixed so every machine produces the same bits.
    """
    if dtype == "F64":
        return values.astype("<f8").view(np.uint8)
    if dtype == "F32":
        return values.astype("<f4").view(np.uint8)
    if dtype == "F16":
        return values.astype("<f2").view(np.uint8)
    if dtype == "BF16":
        bits = values.astype("<f4").view("<u4")
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
        nan = np.isnan(values)
        rounded[nan] = ((bits[nan] >> 16) | 0x40).astype("<u2")
        return rounded.view(np.uint8)
    raise InvalidRequest(f"cannot write float values as {dtype}")
