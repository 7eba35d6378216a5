"""Selection agents over a fixed set of candidates, with bluesky-adaptive's ``ingest`` / ``suggest`` /
``report`` shape so either can drive the same loop.

Both arms of a repeat start from the same warm-up picks (one random order per repeat): the random
arm keeps following that order, the surrogate arm fits a GP on the candidates' features after the
warm-up and picks the unseen candidate of highest expected improvement. Differences between the
arms are then due to the steering, not to a luckier start.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from apps.steering.surrogate import GaussianProcess, expected_improvement


class FixedOrderAgent:
    """Candidates in a fixed order, whatever is observed: a random order is the random baseline,
    a raster order the raster scan."""

    def __init__(self, order: np.ndarray | list[int], name: str = "random") -> None:
        self.order = [int(i) for i in order]
        self.name = name
        self.seen: dict[int, float] = {}

    def ingest(self, independent: int, dependent: float) -> None:
        self.seen[int(independent)] = float(dependent)

    def suggest(self, batch_size: int = 1) -> list[int]:
        return [i for i in self.order if i not in self.seen][:batch_size]

    def report(self) -> dict[str, Any]:
        return {"agent": self.name, "n_observed": len(self.seen)}


class SurrogateAgent:
    """GP on per-candidate features (here: TPM embeddings) with expected improvement."""

    def __init__(self, features: np.ndarray, warmup: np.ndarray, maximize: bool) -> None:
        self.features = features
        self.warmup = [int(i) for i in warmup]
        self.maximize = maximize
        self.seen: dict[int, float] = {}
        self.gp: GaussianProcess | None = None

    def ingest(self, independent: int, dependent: float) -> None:
        self.seen[int(independent)] = float(dependent)

    def suggest(self, batch_size: int = 1) -> list[int]:
        picks = [i for i in self.warmup if i not in self.seen][:batch_size]
        if len(picks) == batch_size:
            return picks
        unseen = np.array([i for i in range(len(self.features)) if i not in self.seen and i not in picks])
        seen = np.array(list(self.seen))
        y = np.array([self.seen[i] for i in seen])
        self.gp = GaussianProcess().fit(self.features[seen], y)
        mean, std = self.gp.predict(self.features[unseen])
        best = float(y.max() if self.maximize else y.min())
        gain = expected_improvement(mean, std, best, self.maximize)
        return picks + [int(i) for i in unseen[np.argsort(-gain)[: batch_size - len(picks)]]]

    def report(self) -> dict[str, Any]:
        gp = {} if self.gp is None else {"gp_length_scale": self.gp.scale, "gp_noise": self.gp.noise}
        return {"agent": "gp-expected-improvement", "n_observed": len(self.seen), **gp}
