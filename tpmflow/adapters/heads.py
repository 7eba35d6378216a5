"""Heads on pooled final hidden states: trained on embeddings fetched from the pool, served by name@version.

vLLM has no backward pass, so heads are fitted here, on embeddings the pool returns, and saved as
safetensors with a card. A head belongs to one core model (its content hash): the replica refuses to
apply it to another.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from tpmflow.config import tpmflow_home
from tpmflow.errors import InvalidRequest

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class HeadCard(BaseModel):
    """Everything a reader needs to trust (or distrust) a head's numbers."""

    adapter: str
    name: str
    version: str
    kind: str = "ridge-regression"
    owner: str = "facility"
    modality: str
    base_model: str
    base_content_hash: str
    hidden_size: int
    target: str
    training_data: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict, description="held-out metrics, head and baselines")


@dataclass
class RidgeHead:
    """Standardised ridge regression: y = ((x - mean) / scale) @ weight + bias."""

    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray
    bias: float

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, alpha: float) -> RidgeHead:
        mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
        z = (x - mean) / scale
        bias = float(y.mean())
        weight = np.linalg.solve(z.T @ z + alpha * np.eye(z.shape[1]), z.T @ (y - bias))
        return cls(mean.astype(np.float32), scale.astype(np.float32), weight.astype(np.float32), bias)

    @classmethod
    def fit_with_validation(cls, x: np.ndarray, y: np.ndarray, seed: int = 0) -> tuple[RidgeHead, float]:
        """Pick alpha on a validation fifth of the training data (never the held-out set), refit on all."""
        order = np.random.default_rng(seed).permutation(len(x))
        cut = len(x) // 5
        val, tr = order[:cut], order[cut:]
        alphas = [10.0**k for k in range(-2, 5)]
        scores = [r2(y[val], cls.fit(x[tr], y[tr], a).predict(x[val])) for a in alphas]
        best = alphas[int(np.argmax(scores))]
        return cls.fit(x, y, best), best

    def predict(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.scale) @ self.weight + self.bias

    def tensors(self) -> dict[str, np.ndarray]:
        return {
            "mean": self.mean,
            "scale": self.scale,
            "weight": self.weight,
            "bias": np.array([self.bias], dtype=np.float32),
        }


def r2(y: np.ndarray, pred: np.ndarray) -> float:
    """Coefficient of determination."""
    return float(1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum())


def heads_dir() -> Path:
    """Where heads live: ``$TPMFLOW_HEADS`` (a pool's ``heads_path``) or ``$TPMFLOW_HOME/heads``."""
    import os

    env = os.environ.get("TPMFLOW_HEADS")
    return Path(env) if env else tpmflow_home() / "heads"


def head_path(adapter: str, spec: str) -> Path:
    """Folder of ``name`` (newest version) or ``name@version`` for an adapter."""
    name, _, version = spec.partition("@")
    if (
        not _NAME.match(adapter)
        or not _NAME.match(name)
        or (version and not re.match(r"^[0-9A-Za-z._-]{1,32}$", version))
    ):
        raise InvalidRequest(f"bad head name {spec!r}")
    root = heads_dir() / adapter
    if version:
        path = root / f"{name}@{version}"
    else:
        found = sorted(root.glob(f"{name}@*"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise InvalidRequest(f"no head {name!r} for adapter {adapter!r} (fit one with `tpmflow adapters fit`)")
        path = found[-1]
    if not (path / "head.json").is_file():
        raise InvalidRequest(f"no head {spec!r} for adapter {adapter!r}")
    return path


def save_head(head: RidgeHead, card: HeadCard) -> Path:
    from safetensors.numpy import save_file

    path = heads_dir() / card.adapter / f"{card.name}@{card.version}"
    path.mkdir(parents=True, exist_ok=True)
    save_file(head.tensors(), str(path / "head.safetensors"))
    (path / "head.json").write_text(card.model_dump_json(indent=2) + "\n")
    return path


def load_head(adapter: str, spec: str) -> tuple[RidgeHead, HeadCard]:
    from safetensors.numpy import load_file

    path = head_path(adapter, spec)
    card = HeadCard.model_validate(json.loads((path / "head.json").read_text()))
    t = load_file(str(path / "head.safetensors"))
    return RidgeHead(t["mean"], t["scale"], t["weight"], float(t["bias"][0])), card


def list_heads() -> list[HeadCard]:
    return [HeadCard.model_validate(json.loads(p.read_text())) for p in sorted(heads_dir().glob("*/*/head.json"))]
