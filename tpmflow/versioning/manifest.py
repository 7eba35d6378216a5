"""A version's manifest: everything needed to rebuild the model folder, and where it came from.

Manifests are immutable JSON named by the version id. The id itself is the model's content hash
(``tpmflow.models.card.content_hash``: blake3 over each weight file's name and bytes, files in name
order) of the folder a checkout produces. A safetensors file is its header (every tensor's name,
dtype, shape and offsets) followed by the tensor bytes in offset order, so the id is a hash of a
canonical listing of tensor contents, and a model's card hash and its store version id coincide.
Message, author, metrics and non-weight files are recorded but do not enter the id.
"""

from __future__ import annotations

import json
from pathlib import PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from tpmflow.errors import StoreCorrupted

FORMAT = 1
Encoding = Literal["chunks", "sparse", "xor", "lora"]


class TensorRecord(BaseModel):
    """How one tensor is stored. ``base`` names the version whose record of the same tensor a delta
    applies to; ``depth`` counts the deltas down to a ``chunks`` record (it bounds checkout work)."""

    dtype: str
    shape: list[int]
    nbytes: int
    hash: str = Field(description="blake3 hex of the tensor's raw bytes")
    encoding: Encoding
    blobs: list[str]
    base: str | None = None
    depth: int = 0
    params: dict[str, Any] = Field(default_factory=dict)


class WeightFile(BaseModel):
    """One safetensors file: its verbatim header blob and its tensors in data order."""

    name: str
    header: str
    tensors: list[str]

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        if "/" in v or v.startswith(".") or not v.endswith(".safetensors"):
            raise ValueError(f"bad weight file name {v!r}")
        return v


class Manifest(BaseModel):
    """One version of a model."""

    format: int = FORMAT
    id: str
    parent: str | None = None
    message: str
    author: str
    created: str
    metrics: dict[str, Any] = Field(default_factory=dict)
    lora: dict[str, Any] | None = Field(None, description="the adapter config, for a version committed as factors")
    weights: list[WeightFile]
    tensors: dict[str, TensorRecord]
    files: dict[str, str] = Field(default_factory=dict, description="non-weight file path -> blob id")

    @field_validator("files")
    @classmethod
    def _relative_paths(cls, v: dict[str, str]) -> dict[str, str]:
        for path in v:
            parts = PurePosixPath(path).parts
            if not parts or path.startswith("/") or ".." in parts or "\0" in path or "\\" in path:
                raise ValueError(f"unsafe file path {path!r}")  # a tampered manifest must not write outside
        return v

    def blob_ids(self) -> set[str]:
        """Every blob this version references directly (its deltas' bases are other versions)."""
        ids = {w.header for w in self.weights} | set(self.files.values())
        for record in self.tensors.values():
            ids.update(record.blobs)
        return ids

    @property
    def nbytes(self) -> int:
        """Size of the weights when checked out (tensor data plus headers are not counted)."""
        return sum(r.nbytes for r in self.tensors.values())

    def to_json(self) -> bytes:
        """Canonical serialisation: sorted keys, no whitespace, so equal manifests are equal bytes."""
        return json.dumps(self.model_dump(), sort_keys=True, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes, expected_id: str) -> Manifest:
        try:
            manifest = cls.model_validate_json(data)
        except ValueError as exc:
            raise StoreCorrupted(f"manifest of {expected_id} is unreadable: {exc}") from exc
        if manifest.id != expected_id:
            raise StoreCorrupted(f"manifest file of {expected_id} names version {manifest.id}")
        return manifest
