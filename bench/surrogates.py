"""The campaigns' surrogates: the hand-written ones against scikit-learn's, side by side in one run
(prints tables).

Issue 17 asks that hand-written surrogates become scikit-learn's models unless a measurement says
the hand-written ones are better. This is that measurement. The previous hand-written models are
kept here as the baselines (``Hand*``, same behaviour); the apps' current classes and other
scikit-learn candidates are measured beside them.

(a) Molecular design (``apps.molecular_design.surrogate``): a fixed random subset of the NCI
    library is simulated (``simulate``: MMFF94 dipole objective, 2 processes); on random
    train/test splits of 32 and 64 training rows, each model is fit on Morgan fingerprints and
    scored on the held-out rows: Spearman rank correlation (what UCB ranking needs), RMSE, the
    fraction of targets inside mean ± 2 std, and fit + predict time. The campaign's other feature
    set, a model's pooled hidden states, needs the model pool, which this bench does not start.
(b) Steering GP (``apps.steering.surrogate``): held-out RMSE over the target's std, mean log
    predictive density (lpd; in units of the target's std) and ±2 std coverage, noise included,
    and time, on the beamline app's own pool-free features of 20x20 grids (standardised position,
    2-D; classical survey reading + position, 3-D) and on synthetic 16-D whitened "embeddings" of
    a bumpy 4-D latent (the point-cloud app's shape; its real embeddings need the pool); then the
    apps' steering loop itself (5 random warm-up picks, then the argmax of expected improvement):
    normalised simple regret ``(best - best found) / (best - median)`` after 10, 20 and 40 picks.

Every model sees the same data and splits; the last column is the paired difference from the
baseline (first row) ± its standard error, so "not measurably worse" has a number behind it.

Usage: python bench/surrogates.py [--molecules 200] [--splits 20] [--gp-splits 16] [--repeats 16]
       [--worlds 4] [--only molecules|steering]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from scipy.stats import spearmanr

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

warnings.filterwarnings("ignore", module="sklearn")  # GP optimiser bound/convergence notes


class Surrogate(Protocol):
    def fit(self, x: np.ndarray, y: np.ndarray) -> Any: ...
    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


# --- the previous hand-written models (baselines) ---------------------------------------------


class HandBootstrapRidge:
    """The campaign's previous surrogate: bootstrap ensemble of dual ridge fits on standardised features."""

    def __init__(self, alpha: float = 1.0, members: int = 8, seed: int = 0) -> None:
        self.alpha, self.members, self.rng = alpha, members, np.random.default_rng(seed)

    def fit(self, x: np.ndarray, y: np.ndarray) -> HandBootstrapRidge:
        self._mu, self._sd = x.mean(0), x.std(0) + 1e-6
        z = (x - self._mu) / self._sd
        self._fits = []
        for _ in range(self.members):
            idx = self.rng.integers(0, len(y), len(y))
            zb, yb = z[idx], y[idx]
            gram = zb @ zb.T + self.alpha * zb.shape[1] ** 0.5 * np.eye(len(yb))
            self._fits.append((zb.T @ np.linalg.solve(gram, yb - yb.mean()), float(yb.mean())))
        return self

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z = (x - self._mu) / self._sd
        preds = np.stack([z @ w + b for w, b in self._fits])
        return preds.mean(0), preds.std(0)


def _rbf(a: np.ndarray, b: np.ndarray, scale: float) -> np.ndarray:
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.exp(-0.5 * np.maximum(d2, 0.0) / scale**2)


class HandGP:
    """The steering apps' previous GP: exact, RBF, length scale and noise grid-searched by evidence."""

    def fit(self, x: np.ndarray, y: np.ndarray) -> HandGP:
        self._mean, self._std = float(y.mean()), float(y.std() + 1e-12)
        z = (y - self._mean) / self._std
        best = -math.inf
        for scale in (0.25, 0.5, 1.0, 2.0, 4.0):
            for noise in (1e-3, 1e-2, 1e-1, 0.3):
                s = scale * math.sqrt(x.shape[1])
                chol = np.linalg.cholesky(_rbf(x, x, s) + (noise + 1e-8) * np.eye(len(x)))
                alpha = np.linalg.solve(chol.T, np.linalg.solve(chol, z))
                evidence = -0.5 * float(z @ alpha) - float(np.log(np.diag(chol)).sum())
                if evidence > best:
                    best, self.scale, self.noise, self._chol, self._alpha = evidence, s, noise, chol, alpha
        self._x = x
        return self

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k = _rbf(x, self._x, self.scale)
        v = np.linalg.solve(self._chol, k.T)
        var = np.maximum(1.0 - (v * v).sum(axis=0), 1e-12)
        return k @ self._alpha * self._std + self._mean, np.sqrt(var) * self._std


# --- scikit-learn candidates -------------------------------------------------------------------


class SkEnsemble:
    """Any fitted scikit-learn ensemble's mean and spread over its members (bagging, forest)."""

    def __init__(self, make: Callable[[int], Any], scale: bool, seed: int) -> None:
        self.model, self.scale = make(seed), scale

    def fit(self, x: np.ndarray, y: np.ndarray) -> SkEnsemble:
        from sklearn.preprocessing import StandardScaler

        self.scaler = StandardScaler().fit(x) if self.scale else None
        self.model.fit(self.scaler.transform(x) if self.scaler else x, y)
        return self

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        z = self.scaler.transform(x) if self.scaler else x
        features = getattr(self.model, "estimators_features_", [slice(None)] * len(self.model.estimators_))
        preds = np.stack([e.predict(z[:, f]) for e, f in zip(self.model.estimators_, features, strict=True)])
        return preds.mean(0), preds.std(0)


class SkBayesianRidge:
    def fit(self, x: np.ndarray, y: np.ndarray) -> SkBayesianRidge:
        from sklearn.linear_model import BayesianRidge
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        self.model = make_pipeline(StandardScaler(), BayesianRidge()).fit(x, y)
        return self

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.model.predict(x, return_std=True)


class SkGP:
    """GaussianProcessRegressor fit by its default L-BFGS (with restarts): constant x RBF + white noise
    on standardised targets; predict gives the latent (noise-free) std like the apps' GP, ``noise`` the
    fitted noise variance. Length-scale bounds are multiples of ``scale0`` (default sqrt(width))."""

    def __init__(
        self,
        seed: int = 0,
        amplitude: str | tuple[float, float] = (1e-2, 1e2),
        scales: tuple[float, float] = (0.05, 20),
        noises: tuple[float, float] = (1e-6, 1.0),
        scale0: float | None = None,
        restarts: int = 2,
    ) -> None:
        self.seed, self.amplitude, self.scales, self.noises = seed, amplitude, scales, noises
        self.scale0, self.restarts = scale0, restarts

    def fit(self, x: np.ndarray, y: np.ndarray) -> SkGP:
        from sklearn.gaussian_process import GaussianProcessRegressor
        from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel

        self._mean, self._std = float(y.mean()), float(y.std() + 1e-12)
        root = self.scale0 or math.sqrt(x.shape[1])
        rbf = RBF(root, (self.scales[0] * root, self.scales[1] * root))
        kernel = ConstantKernel(1.0, self.amplitude) * rbf + WhiteKernel(1e-2, self.noises)
        self.model = GaussianProcessRegressor(kernel, n_restarts_optimizer=self.restarts, random_state=self.seed)
        self.model.fit(x, (y - self._mean) / self._std)
        self.noise = float(self.model.kernel_.k2.noise_level)
        return self

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean, std = self.model.predict(x, return_std=True)
        latent = np.sqrt(np.maximum(std**2 - self.noise, 1e-12))
        return mean * self._std + self._mean, latent * self._std


# --- (a) molecular design -----------------------------------------------------------------------


def molecule_models(d: int) -> dict[str, Callable[[int], Surrogate]]:
    from sklearn.ensemble import BaggingRegressor, RandomForestRegressor
    from sklearn.linear_model import Ridge

    from apps.molecular_design.surrogate import BootstrapRidge

    def bagged(members: int) -> Callable[[int], Surrogate]:
        ridge = Ridge(alpha=math.sqrt(d))  # the hand-written model's alpha x sqrt(width)
        return lambda s: SkEnsemble(lambda r: BaggingRegressor(ridge, n_estimators=members, random_state=r), True, s)

    return {
        "hand BootstrapRidge x8 (baseline)": lambda s: HandBootstrapRidge(seed=s),
        "apps BootstrapRidge (sk Bagging x8)": lambda s: BootstrapRidge(seed=s),
        "sk Bagging(Ridge) x32": bagged(32),
        "sk BayesianRidge": lambda s: SkBayesianRidge(),
        "sk GPR C*RBF+White (bits)": lambda s: SkGP(seed=s, scale0=10.0, scales=(0.1, 100), restarts=1),
        "sk RandomForest x100 (mf 0.3)": lambda s: SkEnsemble(
            lambda r: RandomForestRegressor(100, max_features=0.3, random_state=r), False, s
        ),
    }


def _simulate(smiles: str) -> float:
    from apps.molecular_design.simulate import simulate

    return float(simulate(smiles, seed=0)["objective"])


def molecule_data(n: int) -> tuple[np.ndarray, np.ndarray]:
    from apps.molecular_design.library import fingerprints, load_library

    library = load_library()
    subset = [library[i] for i in np.random.default_rng(17).choice(len(library), n, replace=False)]
    with ProcessPoolExecutor(2) as pool:
        y = np.array(list(pool.map(_simulate, subset, chunksize=8)))
    ok = np.isfinite(y)
    print(f"(a) {n} molecules simulated, {int(ok.sum())} with an objective (failures dropped)", flush=True)
    return fingerprints([s for s, good in zip(subset, ok, strict=True) if good]).astype(np.float64), y[ok]


def score_split(model: Surrogate, x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray) -> dict:
    t0 = time.perf_counter()
    mean, std = model.fit(x[train], y[train]).predict(x[test])
    seconds = time.perf_counter() - t0
    return {
        "spearman": float(spearmanr(mean, y[test]).statistic),
        "rmse": float(np.sqrt(np.mean((mean - y[test]) ** 2))),
        "cover2": float(np.mean(np.abs(mean - y[test]) <= 2 * std)),
        "ms": seconds * 1000,
    }


def bench_molecules(args: argparse.Namespace) -> None:
    x, y = molecule_data(args.molecules)
    models = molecule_models(x.shape[1])
    print(f"    target std {y.std():.3f}; {args.splits} random splits per training size, the rest held out")
    for n_train in (32, 64):
        scores: dict[str, list[dict]] = {name: [] for name in models}
        for split in range(args.splits):
            order = np.random.default_rng([n_train, split]).permutation(len(y))
            for name, make in models.items():
                scores[name].append(score_split(make(split), x, y, order[:n_train], order[n_train:]))
        table(f"(a) molecules, fingerprints, {n_train} training rows", scores, "spearman")


def table(title: str, scores: dict[str, list[dict]], paired: str, baseline: str | None = None) -> None:
    """Mean ± standard error per metric, plus the paired difference in ``paired`` vs the baseline."""
    names = list(scores)
    base = np.array([s[paired] for s in scores[baseline or names[0]]])
    keys = list(scores[names[0]][0])
    print(f"\n{title}")
    print(f"  {'model':<36}" + "".join(f"{k:>16}" for k in keys) + f"{'d' + paired + ' vs base':>22}")
    for name in names:
        cols = []
        for k in keys:
            v = np.array([s[k] for s in scores[name]])
            cols.append(f"{v.mean():>9.3f} ±{v.std(ddof=1) / math.sqrt(len(v)):<5.3f}")
        diff = np.array([s[paired] for s in scores[name]]) - base
        se = diff.std(ddof=1) / math.sqrt(len(diff))
        print(f"  {name:<36}" + "".join(f"{c:>16}" for c in cols) + f"{diff.mean():>+14.3f} ±{se:<6.3f}")
    sys.stdout.flush()


# --- (b) steering GP ----------------------------------------------------------------------------


def gp_models() -> dict[str, Callable[[int], Surrogate]]:
    from apps.steering.surrogate import GaussianProcess

    return {
        "hand GP grid (baseline)": lambda s: HandGP(),
        "apps GaussianProcess (sk GPR + grid)": lambda s: GaussianProcess(),
        "sk GPR L-BFGS, grid's ranges": lambda s: SkGP(seed=s, amplitude="fixed", scales=(0.25, 4), noises=(1e-3, 0.3)),
        "sk GPR L-BFGS, broad, C*RBF": lambda s: SkGP(seed=s),
    }


def steering_data(seed: int) -> dict[str, tuple[np.ndarray, np.ndarray, bool]]:
    """Name -> (features, objective, maximize) as the steering apps would hand them to the GP."""
    from apps.beamline_steering import quality
    from apps.beamline_steering.sample import SURVEY_EXPOSURE, make_grid
    from apps.steering.surrogate import whiten

    def standardised(v: np.ndarray) -> np.ndarray:
        v = v.reshape(len(v), -1).astype(np.float64)
        return (v - v.mean(0)) / (v.std(0) + 1e-12)

    grid = make_grid(20, 20, seed=seed)  # the beamline app's default grid, built as its run.py does
    rng = np.random.default_rng([seed, 1_000_003])
    survey = np.array([quality.integrate(grid.render(i, SURVEY_EXPOSURE, rng)).intensity for i in range(400)])
    full = np.array(
        [quality.integrate(grid.render(i, 1.0, np.random.default_rng([seed, 0, i]))).intensity for i in range(400)]
    )
    where = standardised(grid.positions)

    rng = np.random.default_rng([seed, 3])  # a 4-D latent seen through 128 noisy nonlinear features
    latent = rng.uniform(-1, 1, (200, 4))
    embeddings = np.tanh(latent @ rng.normal(0, 1, (4, 128))) + rng.normal(0, 0.1, (200, 128))
    centres, heights = rng.uniform(-0.8, 0.8, (3, 4)), np.array([1.0, 0.8, 0.6])
    bumps = heights * np.exp(-((latent[:, None, :] - centres) ** 2).sum(-1) / (2 * 0.35**2))
    target = -bumps.sum(1) + rng.normal(0, 0.02, 200)  # the point-cloud app minimises
    return {
        "beamline position 2-D, 400 cand.": (where, full, True),
        "beamline survey+position 3-D, 400 cand.": (np.hstack([standardised(np.log1p(survey)), where]), full, True),
        "synthetic embeddings 16-D, 200 cand.": (whiten(embeddings, 16), target, False),
    }


def score_gp(model: Surrogate, x: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray) -> dict:
    t0 = time.perf_counter()
    mean, std = model.fit(x[train], y[train]).predict(x[test])
    seconds = time.perf_counter() - t0
    sd = np.sqrt(std**2 + model.noise * y[train].var())  # predictive std of an observation
    err = y[test] - mean
    return {
        "nrmse": float(np.sqrt(np.mean(err**2)) / y.std()),
        "lpd": float(np.mean(-0.5 * (err / sd) ** 2 - np.log(sd / y.std()) - 0.5 * math.log(2 * math.pi))),
        "cover2": float(np.mean(np.abs(err) <= 2 * sd)),
        "ms": seconds * 1000,
    }


def steer(make: Callable[[], Surrogate], x: np.ndarray, y: np.ndarray, maximize: bool, seed: int, budget: int):
    """The SurrogateAgent loop (warm-up picks, then argmax expected improvement); best found per step."""
    from apps.steering.surrogate import expected_improvement

    sign = 1.0 if maximize else -1.0
    seen = [int(i) for i in np.random.default_rng(seed).permutation(len(y))[:5]]
    while len(seen) < budget:
        unseen = np.setdiff1d(np.arange(len(y)), seen)
        mean, std = make().fit(x[seen], y[seen]).predict(x[unseen])
        best = float(y[seen].max() if maximize else y[seen].min())
        seen.append(int(unseen[np.argmax(expected_improvement(mean, std, best, maximize))]))
    found = np.maximum.accumulate(sign * y[seen])
    top, median = float((sign * y).max()), float(np.median(sign * y))
    return (top - found) / (top - median)


def bench_steering(args: argparse.Namespace) -> None:
    """Each split/repeat ``i`` uses world ``i % worlds`` (beamline grid and synthetic latent seed)."""
    models = gp_models()
    worlds = [steering_data(seed) for seed in range(args.worlds)]
    print(f"\n(b) {args.worlds} beamline grids (20x20) and synthetic worlds; held-out: {args.gp_splits} splits each")
    for dataset in worlds[0]:
        for n_train in (10, 20, 40):
            scores: dict[str, list[dict]] = {name: [] for name in models}
            for split in range(args.gp_splits):
                x, y, _ = worlds[split % args.worlds][dataset]
                order = np.random.default_rng([n_train, split]).permutation(len(y))
                for name, make in models.items():
                    scores[name].append(score_gp(make(split), x, y, order[:n_train], order[n_train:]))
            table(f"(b) GP held-out, {dataset}, {n_train} training points", scores, "lpd")
        regrets: dict[str, list[dict]] = {name: [] for name in models}
        for repeat in range(args.repeats):
            x, y, maximize = worlds[repeat % args.worlds][dataset]
            for name, make in models.items():
                t0 = time.perf_counter()
                curve = steer(lambda m=make, r=repeat: m(r), x, y, maximize, repeat, 40)
                row = {f"regret@{k}": float(curve[k - 1]) for k in (10, 20, 40)}
                regrets[name].append({**row, "s/run": time.perf_counter() - t0})
        table(f"(b) steering loop (5 random, then argmax EI), {dataset}, {args.repeats} repeats", regrets, "regret@20")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--molecules", type=int, default=200)
    parser.add_argument("--splits", type=int, default=20)
    parser.add_argument("--gp-splits", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=16)
    parser.add_argument("--worlds", type=int, default=4)
    parser.add_argument("--only", choices=("molecules", "steering"), default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    if args.only != "steering":
        bench_molecules(args)
    if args.only != "molecules":
        bench_steering(args)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
