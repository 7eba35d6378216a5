"""Heads on pooled final hidden states: fitted on embeddings fetched from the pool, saved as
adapter parts (``tpmflow.adapters.parts``) and served by name@version.

Two kinds: ridge regression (a value per item) and a softmax classifier (a label and class
probabilities per item). Both standardise their inputs first; both are plain numpy at serving time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from tpmflow.adapters.parts import PartCard, load_part, save_part


class Head(Protocol):
    def tensors(self) -> dict[str, np.ndarray]: ...


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


@dataclass
class SoftmaxHead:
    """Standardised multinomial logistic regression: p = softmax(((x - mean) / scale) @ weight + bias)."""

    mean: np.ndarray
    scale: np.ndarray
    weight: np.ndarray  # [features, classes]
    bias: np.ndarray  # [classes]
    classes: list[str]

    @classmethod
    def fit(
        cls, x: np.ndarray, y: np.ndarray, classes: list[str], weight_decay: float = 1e-3, steps: int = 300
    ) -> SoftmaxHead:
        """Full-batch L-BFGS on the cross-entropy (torch), L2-regularised."""
        import torch

        mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
        z = torch.from_numpy(((x - mean) / scale).astype(np.float32))
        target = torch.from_numpy(y.astype(np.int64))
        linear = torch.nn.Linear(z.shape[1], len(classes))
        opt = torch.optim.LBFGS(linear.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(linear(z), target) + weight_decay * linear.weight.square().sum()
            loss.backward()
            return loss

        opt.step(closure)
        weight = linear.weight.detach().numpy().T.copy()
        bias = linear.bias.detach().numpy().copy()
        return cls(mean.astype(np.float32), scale.astype(np.float32), weight, bias, list(classes))

    @classmethod
    def fit_with_validation(
        cls, x: np.ndarray, y: np.ndarray, classes: list[str], seed: int = 0
    ) -> tuple[SoftmaxHead, float]:
        """Pick the weight decay on a validation fifth of the training data, refit on all."""
        order = np.random.default_rng(seed).permutation(len(x))
        cut = len(x) // 5
        val, tr = order[:cut], order[cut:]
        decays = [10.0**k for k in range(-4, 1)]
        scores = [accuracy(y[val], cls.fit(x[tr], y[tr], classes, d).predict(x[val])) for d in decays]
        best = decays[int(np.argmax(scores))]
        return cls.fit(x, y, classes, best), best

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        logits = ((x - self.mean) / self.scale) @ self.weight + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Class indices."""
        return self.probabilities(x).argmax(axis=1)

    def tensors(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "scale": self.scale, "weight": self.weight, "bias": self.bias}


def accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    return float((np.asarray(y) == np.asarray(pred)).mean())


def r2(y: np.ndarray, pred: np.ndarray) -> float:
    """Coefficient of determination."""
    return float(1 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum())


def save_head(head: Head, card: PartCard) -> Path:
    return save_part(head.tensors(), card)


def load_head(adapter: str, spec: str) -> tuple[Head, PartCard]:
    """A head by ``name`` or ``name@version``; ``InvalidRequest`` when missing or not a head."""
    from safetensors.numpy import load_file

    path, card = load_part(adapter, spec, kind="head")
    t = load_file(str(path / "weights.safetensors"))
    if card.kind == "softmax-classifier":
        return SoftmaxHead(t["mean"], t["scale"], t["weight"], t["bias"], list(card.classes)), card
    return RidgeHead(t["mean"], t["scale"], t["weight"], float(t["bias"][0])), card
