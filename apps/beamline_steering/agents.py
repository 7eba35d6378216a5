"""Agents with bluesky-adaptive's shape: ``ingest(independent, dependent)`` takes a motor position
``(x, y)`` in mm and its measured score, ``suggest(batch_size)`` returns the next positions,
``report()`` a dict. Plain classes (no bluesky needed); the selection logic is the index-based
agents of ``apps.steering.agents``, wrapped to speak in motor positions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from apps.steering.agents import FixedOrderAgent, SurrogateAgent


class PositionAgent:
    """Adapts an index agent over grid positions to bluesky-adaptive's position interface."""

    def __init__(self, positions: np.ndarray, inner: FixedOrderAgent | SurrogateAgent) -> None:
        self.positions = positions
        self.inner = inner
        self._index = {self._key(p): i for i, p in enumerate(positions)}

    @staticmethod
    def _key(position: Sequence[float]) -> tuple[float, float]:
        return (round(float(position[0]), 6), round(float(position[1]), 6))

    def index_of(self, position: Sequence[float]) -> int:
        """The grid index of a motor position this agent suggested."""
        return self._index[self._key(position)]

    def ingest(self, independent: Sequence[float], dependent: float) -> None:
        self.inner.ingest(self.index_of(independent), dependent)

    def suggest(self, batch_size: int = 1) -> list[tuple[float, float]]:
        return [(float(self.positions[i, 0]), float(self.positions[i, 1])) for i in self.inner.suggest(batch_size)]

    def report(self) -> dict[str, Any]:
        return self.inner.report()


def raster_order(nx: int, ny: int, budget: int) -> list[int]:
    """A raster scan sized to the budget: a k x k serpentine grid (k = floor(sqrt(budget))) over the
    whole sample, then every other position in plain serpentine order. Fairer than a fine raster
    from one corner, which would never reach most of the sample."""
    k = max(1, math.isqrt(budget))
    cols = sorted({int((i + 0.5) * nx / min(k, nx)) for i in range(min(k, nx))})
    rows = sorted({int((j + 0.5) * ny / min(k, ny)) for j in range(min(k, ny))})
    coarse = [r * nx + c for n, r in enumerate(rows) for c in (cols if n % 2 == 0 else cols[::-1])]
    fine = [r * nx + c for r in range(ny) for c in (range(nx) if r % 2 == 0 else range(nx - 1, -1, -1))]
    done = set(coarse)
    return coarse + [i for i in fine if i not in done]
