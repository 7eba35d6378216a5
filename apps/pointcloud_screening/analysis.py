"""The "simulation": a coordination-number defect analysis of one point cloud (numpy only).

It knows nothing of the hidden truth. It estimates the lattice constant as the median
nearest-neighbour distance, counts each point's neighbours within 1.2 of it (between the first
shell at 1 and the second at sqrt 2, so thermal noise rarely moves a pair across), and reports the
fraction of interior points whose coordination differs from the simple-cubic 6: a vacancy leaves
its six neighbours under-coordinated, an interstitial adds a neighbour to eight. Points within
0.6 lattice constants of the bounding box are surface sites (fewer neighbours by construction)
and are left out. Noise alone produces a small floor of false defects, as in a real measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CUTOFF = 1.2  # neighbour shell radius, in lattice constants
MARGIN = 0.6  # surface layer excluded, in lattice constants
IDEAL_COORDINATION = 6


@dataclass(frozen=True)
class Analysis:
    defect_fraction: float  # interior points whose coordination is not 6
    lattice_constant: float
    interior_points: int


def pairwise_distances(points: np.ndarray) -> np.ndarray:
    """Dense ``[N, N]`` distances, self-pairs at infinity; clouds here have < 1,000 points."""
    p = points.astype(np.float64)
    sq = (p * p).sum(axis=1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * p @ p.T, 0.0)
    np.fill_diagonal(d2, np.inf)
    return np.sqrt(d2)


def analyse(points: np.ndarray) -> Analysis:
    """Measured defect fraction of one cloud (see the module docstring)."""
    if len(points) < 27:
        raise ValueError(f"too few points ({len(points)}) for a coordination analysis")
    dist = pairwise_distances(points)
    constant = float(np.median(dist.min(axis=1)))
    coordination = (dist < CUTOFF * constant).sum(axis=1)
    low, high = points.min(axis=0), points.max(axis=0)
    interior = np.all((points >= low + MARGIN * constant) & (points <= high - MARGIN * constant), axis=1)
    if not interior.any():
        raise ValueError("no interior points: the cloud is too thin for a coordination analysis")
    defects = coordination[interior] != IDEAL_COORDINATION
    return Analysis(float(defects.mean()), constant, int(interior.sum()))
