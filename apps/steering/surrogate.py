"""A small exact Gaussian-process surrogate and expected improvement, in numpy.

Why not scikit-learn: it is not a tpmflow dependency, and a campaign's surrogate sees a few dozen
observations, where an exact GP with an RBF kernel is a few lines and fast. Inputs are expected
standardised (``whiten``); the length scale and noise are chosen by log marginal likelihood over a
small grid at every fit, so there is no optimiser to tune. Shared by both steering apps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

LENGTH_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)  # multiples of sqrt(dimension)
NOISES = (1e-3, 1e-2, 1e-1, 0.3)  # variance, on standardised targets


def whiten(x: np.ndarray, components: int) -> np.ndarray:
    """Centre, project on the top principal components and scale each to unit variance.

    Unsupervised (no targets are used), so fitting it on every candidate leaks nothing; it keeps a
    GP on 128-wide embeddings from being dominated by directions that carry only noise."""
    centred = x - x.mean(axis=0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    k = int(min(components, int((s > 1e-9 * s[0]).sum())))
    return u[:, :k] * math.sqrt(len(x))  # unit variance per component


def _rbf(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.exp(-0.5 * np.maximum(d2, 0.0) / scale**2)


@dataclass
class GaussianProcess:
    """Zero-mean GP on standardised targets; ``fit`` then ``predict`` (mean and standard deviation)."""

    scale: float = 1.0
    noise: float = 1e-2
    _x: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    _alpha: np.ndarray = field(default_factory=lambda: np.zeros(0))
    _chol: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    _mean: float = 0.0
    _std: float = 1.0

    def fit(self, x: np.ndarray, y: np.ndarray) -> GaussianProcess:
        self._mean, self._std = float(y.mean()), float(y.std() + 1e-12)
        z = (y - self._mean) / self._std
        root = math.sqrt(x.shape[1])
        best = -math.inf
        for scale in LENGTH_SCALES:
            for noise in NOISES:
                chol, alpha, evidence = _solve(x, z, scale * root, noise)
                if evidence > best:
                    best, self.scale, self.noise = evidence, scale * root, noise
                    self._chol, self._alpha = chol, alpha
        self._x = x
        return self

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k = _rbf(x, self._x, self.scale)
        mean = k @ self._alpha
        v = np.linalg.solve(self._chol, k.T)
        var = np.maximum(1.0 - (v * v).sum(axis=0), 1e-12)
        return mean * self._std + self._mean, np.sqrt(var) * self._std


def _solve(x: np.ndarray, z: np.ndarray, scale: float, noise: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Cholesky factor, weights and log marginal likelihood of one (scale, noise) setting."""
    chol = np.linalg.cholesky(_rbf(x, x, scale) + (noise + 1e-8) * np.eye(len(x)))
    alpha = np.linalg.solve(chol.T, np.linalg.solve(chol, z))
    evidence = -0.5 * float(z @ alpha) - float(np.log(np.diag(chol)).sum())
    return chol, alpha, evidence


_erf = np.vectorize(math.erf, otypes=[float])


def expected_improvement(mean: np.ndarray, std: np.ndarray, best: float, maximize: bool = True) -> np.ndarray:
    """Expected improvement over ``best`` (Jones et al. 1998): exploits a high mean, explores a large spread."""
    gain = (mean - best) if maximize else (best - mean)
    z = gain / std
    cdf = 0.5 * (1.0 + _erf(z / math.sqrt(2.0)))
    pdf = np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return gain * cdf + std * pdf
