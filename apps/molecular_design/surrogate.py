"""The campaign's surrogate: a bootstrap ensemble of ridge regressions, and UCB ranking.

Ridge is solved in its dual form, so a few hundred results on 2,048-bit fingerprints or the
model's hidden states cost one small linear solve per member. The ensemble's spread is the
uncertainty the upper-confidence-bound acquisition explores with.
"""

from __future__ import annotations

import numpy as np


class BootstrapRidge:
    """``members`` ridge models, each fit on a bootstrap resample of the standardised features."""

    def __init__(self, alpha: float = 1.0, members: int = 8, seed: int = 0) -> None:
        self.alpha, self.members = alpha, members
        self.rng = np.random.default_rng(seed)
        self._fits: list[tuple[np.ndarray, float]] = []
        self._mu = self._sd = np.zeros(0)

    def fit(self, x: np.ndarray, y: np.ndarray) -> BootstrapRidge:
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        self._mu, self._sd = x.mean(0), x.std(0) + 1e-6
        z = (x - self._mu) / self._sd
        self._fits = []
        for _ in range(self.members):
            idx = self.rng.integers(0, len(y), len(y))
            zb, yb = z[idx], y[idx]
            offset = float(yb.mean())
            gram = zb @ zb.T + self.alpha * zb.shape[1] ** 0.5 * np.eye(len(yb))
            dual = np.linalg.solve(gram, yb - offset)
            self._fits.append((zb.T @ dual, offset))
        return self

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean and standard deviation over the ensemble, per row of ``x``."""
        z = (np.asarray(x, dtype=np.float64) - self._mu) / self._sd
        preds = np.stack([z @ w + b for w, b in self._fits])
        return preds.mean(0), preds.std(0)


def ucb(mean: np.ndarray, std: np.ndarray, kappa: float = 1.0) -> np.ndarray:
    return mean + kappa * std
