"""SYNTHETIC lattice samples: noisy simple-cubic point clouds with a hidden defect density.

Each sample is an L x L x L simple-cubic lattice (L = 6-8, lattice constant 0.9-1.1) as a scanner
or an atom-probe reconstruction might return it: every site jittered by Gaussian noise (2-5 % of
the lattice constant), a random offset, and defects at a hidden density ``rho``: vacancies
(sites removed, 80 % of ``rho``) and interstitials (points at cell body centres, 20 %). Sizes,
lattice constants and noise vary, so neither the point count nor the scale gives ``rho`` away.
Densities are skewed towards defective samples, so the near-perfect ones are rare (what a screen
is for). The points are generated here; no data set is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_DENSITY = 0.25  # hidden densities lie in [0, MAX_DENSITY)
VACANCY_SHARE = 0.8  # the rest of the defect density are interstitials


@dataclass(frozen=True)
class SampleLibrary:
    """The candidate samples and their hidden truth (never shown to an agent)."""

    clouds: list[np.ndarray]  # float32 (N_i, 3)
    density: np.ndarray  # hidden defect density per sample
    noise: np.ndarray  # jitter, as a fraction of the lattice constant


def make_lattice(rng: np.random.Generator, density: float, size: int, constant: float, noise: float) -> np.ndarray:
    """One noisy simple-cubic lattice with vacancies and body-centre interstitials, shuffled."""
    axis = np.arange(size, dtype=np.float64)
    sites = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), axis=-1).reshape(-1, 3)
    kept = sites[rng.random(len(sites)) >= VACANCY_SHARE * density]
    cells = np.stack(np.meshgrid(axis[:-1], axis[:-1], axis[:-1], indexing="ij"), axis=-1).reshape(-1, 3)
    extra = cells[rng.random(len(cells)) < (1 - VACANCY_SHARE) * density] + 0.5
    points = np.concatenate([kept, extra])
    points = (points + rng.normal(0.0, noise, points.shape)) * constant + rng.uniform(-2.0, 2.0, 3)
    return rng.permutation(points).astype(np.float32)


def make_library(n: int, seed: int) -> SampleLibrary:
    """``n`` samples, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    density = MAX_DENSITY * rng.beta(2.0, 1.3, n)
    noise = rng.uniform(0.02, 0.05, n)
    clouds = [
        make_lattice(rng, float(rho), int(rng.integers(6, 9)), float(rng.uniform(0.9, 1.1)), float(sigma))
        for rho, sigma in zip(density, noise, strict=True)
    ]
    return SampleLibrary(clouds, density, noise)
