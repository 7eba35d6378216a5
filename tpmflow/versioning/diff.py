"""What changed between two versions, tensor by tensor, and by how much."""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel

from tpmflow.versioning.tensorfile import NUMERIC, element_view, to_float64

Status = Literal["added", "removed", "changed", "retyped", "unchanged"]


class TensorDiff(BaseModel):
    """One tensor's change. ``fraction_changed`` counts elements whose bits differ; ``relative_l2`` is
    ``‖b − a‖₂ / ‖a‖₂`` in float64 (``None`` when the tensor is not numeric or its shape changed)."""

    name: str
    status: Status
    elements: int
    fraction_changed: float
    relative_l2: float | None = None


class VersionDiff(BaseModel):
    """Every tensor of either version, plus the non-weight files that differ."""

    a: str
    b: str
    tensors: list[TensorDiff]
    files: dict[str, Literal["added", "removed", "changed"]]

    @property
    def changed(self) -> list[TensorDiff]:
        return [t for t in self.tensors if t.status != "unchanged"]


def compare(name: str, a: np.ndarray, b: np.ndarray, dtype: str) -> TensorDiff:
    """Compare two tensors of the same dtype and shape, given as raw bytes."""
    ea, eb = element_view(a, dtype), element_view(b, dtype)
    changed = int(np.count_nonzero(ea != eb))
    rel: float | None = None
    if dtype in NUMERIC or dtype == "BF16":
        fa, fb = to_float64(a, dtype), to_float64(b, dtype)
        norm = float(np.linalg.norm(fa))
        delta = float(np.linalg.norm(fb - fa))
        rel = delta / norm if norm else (0.0 if delta == 0 else float("inf"))
    status: Status = "changed" if changed else "unchanged"
    return TensorDiff(
        name=name, status=status, elements=ea.size, fraction_changed=changed / max(1, ea.size), relative_l2=rel
    )
