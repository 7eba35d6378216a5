"""Evaluation only, after the campaign (no agent sees any of this): how much the features know about
the objective, measured over every candidate, so a loss of the steered arm can be explained."""

from __future__ import annotations

import numpy as np


def cross_validated_r2(x: np.ndarray, y: np.ndarray, folds: int = 5, ridge: float = 1.0, seed: int = 0) -> float:
    """Held-out R² of ridge regression from features to objective, ``folds``-fold, on standardised
    features (pass what the surrogate sees): 0 or below means they say nothing linear about it."""
    rng = np.random.default_rng(seed)
    parts = np.array_split(rng.permutation(len(y)), folds)
    pred = np.empty_like(y, dtype=np.float64)
    for held in parts:
        train = np.setdiff1d(np.arange(len(y)), held)
        mu, sd = x[train].mean(0), x[train].std(0) + 1e-9
        a = (x[train] - mu) / sd
        y_mean = y[train].mean()
        w = np.linalg.solve(a.T @ a + ridge * np.eye(a.shape[1]), a.T @ (y[train] - y_mean))
        pred[held] = ((x[held] - mu) / sd) @ w + y_mean
    return float(1.0 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum())


def rank_of_best_found(values: np.ndarray, best: float, maximize: bool) -> int:
    """1 + how many candidates are strictly better than ``best`` (1 = the best candidate was found)."""
    better = values > best if maximize else values < best
    return int(better.sum()) + 1
