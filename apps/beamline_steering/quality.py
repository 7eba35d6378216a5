"""Scoring one measured frame: integrated Bragg intensity, from the beamline adapter's classical
spot finder (``tpmflow_beamline.peaks.find_peaks``) and bad-pixel cleaning (``frames.clean``).

For each spot found, the counts in a 7x7 box around it minus the box's share of the local
background (the median of the surrounding 15x15 ring). Summed over spots, it grows with how many
reflections rise above the noise and how strong they are: the usual "how well does this spot
diffract" figure of a grid scan, computed blind (no knowledge of the forward model).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tpmflow_beamline.frames import clean
from tpmflow_beamline.peaks import find_peaks

BOX = 3  # half-width of the integration box
RING = 7  # half-width of the background box around it


@dataclass(frozen=True)
class Reading:
    intensity: float  # integrated Bragg intensity, counts above background
    spots: int


def integrate(frame: np.ndarray) -> Reading:
    """Integrated Bragg intensity and spot count of one frame (see the module docstring)."""
    pixels = clean(frame.astype(np.float32))
    centres = find_peaks(frame.astype(np.float32))
    h, w = pixels.shape
    total = 0.0
    for cy, cx in np.rint(centres).astype(int):
        ring = pixels[max(cy - RING, 0) : cy + RING + 1, max(cx - RING, 0) : cx + RING + 1]
        core = pixels[max(cy - BOX, 0) : min(cy + BOX + 1, h), max(cx - BOX, 0) : min(cx + BOX + 1, w)]
        outer = np.ones(ring.shape, dtype=bool)
        oy, ox = min(cy, RING), min(cx, RING)
        outer[max(oy - BOX, 0) : oy + BOX + 1, max(ox - BOX, 0) : ox + BOX + 1] = False
        background = float(np.median(ring[outer])) if outer.any() else 0.0
        total += max(float(core.sum()) - background * core.size, 0.0)
    return Reading(total, len(centres))
