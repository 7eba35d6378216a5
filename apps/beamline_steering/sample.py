"""SYNTHETIC sample grid and its diffraction forward model.

The sample is an ``nx`` x ``ny`` grid of positions (mm). Its diffracting power ``crystallinity``
varies smoothly: a few Gaussian grains of random centre, width and strength on a weak floor. The
background (solvent, thickness) varies smoothly too but independently, so total counts mislead.
A frame at one position is ``exposure`` x (background x radial scatter + crystallinity x Bragg
peaks), each peak's intensity jittered per frame (mosaicity), then Poisson-sampled; a few hot
pixels of the detector are set in every frame (the beamline adapter's ``frames.clean`` and the
spot finder must ignore them). Peak positions are the same for all positions (one crystal
orientation), placed apart and away from the edges as ``tpmflow_beamline.synthetic`` does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FRAME = 128  # detector pixels per side
REFLECTIONS = 12
SURVEY_EXPOSURE = 0.02  # of a full measurement: the fast low-dose pass


@dataclass(frozen=True)
class SampleGrid:
    """The grid, its hidden fields, and the detector's fixed patterns."""

    positions: np.ndarray  # [n, 2] (x, y) in mm, row-major over (y, x)
    crystallinity: np.ndarray  # [n] in (0, 1]: hidden diffracting power
    thickness: np.ndarray  # [n]: hidden background level
    scatter: np.ndarray  # [FRAME, FRAME] radial background shape (counts at full exposure)
    peaks: np.ndarray  # [REFLECTIONS, FRAME, FRAME] each reflection's profile x intensity
    hot: np.ndarray  # [k, 2] hot pixels (y, x)
    seed: int

    def render(self, index: int, exposure: float, rng: np.random.Generator) -> np.ndarray:
        """A uint32 frame at position ``index`` (see the module docstring)."""
        jitter = rng.lognormal(0.0, 0.2, REFLECTIONS)
        signal = self.crystallinity[index] * np.tensordot(jitter, self.peaks, axes=1)
        expected = exposure * (self.thickness[index] * self.scatter + signal)
        frame = rng.poisson(expected).astype(np.uint32)
        frame[self.hot[:, 0], self.hot[:, 1]] = rng.integers(20_000, 1_000_000, len(self.hot)).astype(np.uint32)
        return frame


def _fields(rng: np.random.Generator, xy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crystallinity (grains) and thickness (a smooth tilt and bump), both over positions in [0, 1]^2."""
    grains = np.full(len(xy), 0.05)
    for _ in range(3):
        centre, width, strength = rng.uniform(0.1, 0.9, 2), rng.uniform(0.08, 0.2), rng.uniform(0.4, 1.0)
        grains += strength * np.exp(-((xy - centre) ** 2).sum(axis=1) / (2 * width**2))
    bump = rng.uniform(0.2, 0.8, 2)
    thickness = 0.5 + xy @ rng.uniform(-0.3, 0.3, 2) + np.exp(-((xy - bump) ** 2).sum(axis=1) / 0.08)
    return grains / grains.max(), np.clip(thickness, 0.2, None)


def _detector(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Radial scatter, the reflections' profiles (separated, off the edges) and hot pixels."""
    yy, xx = np.mgrid[0:FRAME, 0:FRAME].astype(np.float64)
    c = (FRAME - 1) / 2
    scatter = 20.0 + 40.0 * np.exp(-np.hypot(yy - c, xx - c) / (FRAME / 4))
    centres: list[np.ndarray] = []
    while len(centres) < REFLECTIONS:
        p = rng.uniform(8, FRAME - 9, 2)
        if all(np.hypot(*(p - q)) >= 14 for q in centres):
            centres.append(p)
    intensity = np.exp(rng.uniform(np.log(20), np.log(800), REFLECTIONS))
    sigma = rng.uniform(1.0, 1.8, REFLECTIONS)
    peaks = np.stack(
        [
            a * np.exp(-((yy - p[0]) ** 2 + (xx - p[1]) ** 2) / (2 * s**2))
            for a, p, s in zip(intensity, centres, sigma, strict=True)
        ]
    )
    hot = np.stack([rng.integers(0, FRAME, 3), rng.integers(0, FRAME, 3)], axis=1)
    return scatter, peaks, hot


def make_grid(nx: int, ny: int, seed: int, pitch_mm: float = 0.1) -> SampleGrid:
    """An ``nx`` x ``ny`` sample grid, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    gy, gx = np.mgrid[0:ny, 0:nx]
    unit = np.stack([(gx.ravel() + 0.5) / nx, (gy.ravel() + 0.5) / ny], axis=1)
    crystallinity, thickness = _fields(rng, unit)
    scatter, peaks, hot = _detector(rng)
    positions = np.stack([gx.ravel() * pitch_mm, gy.ravel() * pitch_mm], axis=1)
    return SampleGrid(positions, crystallinity, thickness, scatter, peaks, hot, seed)
