"""A classical spot finder, the baseline a trained encoder has to beat on peak counting.

A simplified version of the "dispersion" spot finding of crystallography packages (DIALS, XDS):
a pixel is strong when its count exceeds the local background by ``k`` Poisson standard
deviations; the background is a box mean of the good pixels around it, computed twice so that the
second pass ignores the first pass's strong pixels (a bright peak would otherwise raise its own
background); strong pixels that touch form one spot, and spots of at least ``min_pixels`` count.
It assumes counts (gain 1, Poisson noise), as the synthetic frames are. numpy only; scipy's
``ndimage.label`` is used when installed.
"""

from __future__ import annotations

import numpy as np

from tpmflow_beamline.frames import HOT_K, bad_pixels


def _box_sum(x: np.ndarray, r: int) -> np.ndarray:
    """Sum over the (2r+1)^2 box around each pixel, clipped at the edges (integral image)."""
    h, w = x.shape
    integral = np.zeros((h + 1, w + 1), dtype=np.float64)
    integral[1:, 1:] = x.cumsum(0).cumsum(1)
    y0, y1 = np.clip(np.arange(h) - r, 0, h), np.clip(np.arange(h) + r + 1, 0, h)
    x0, x1 = np.clip(np.arange(w) - r, 0, w), np.clip(np.arange(w) + r + 1, 0, w)
    return (
        integral[y1][:, x1] - integral[y0][:, x1] - integral[y1][:, x0] + integral[y0][:, x0]
    )  # fmt: skip


def _label(strong: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components: ``(labels, n)``."""
    try:
        from scipy import ndimage
    except ImportError:
        pass
    else:
        labels, n = ndimage.label(strong, structure=np.ones((3, 3), dtype=int))
        return labels, int(n)
    labels = np.zeros(strong.shape, dtype=np.int32)
    h, w = strong.shape
    n = 0
    for y0, x0 in zip(*np.nonzero(strong), strict=True):
        if labels[y0, x0]:
            continue
        n += 1
        labels[y0, x0] = n
        stack = [(int(y0), int(x0))]
        while stack:
            y, x = stack.pop()
            for yy in range(max(y - 1, 0), min(y + 2, h)):
                for xx in range(max(x - 1, 0), min(x + 2, w)):
                    if strong[yy, xx] and not labels[yy, xx]:
                        labels[yy, xx] = n
                        stack.append((yy, xx))
    return labels, n


def find_peaks(
    frame: np.ndarray,
    mask: np.ndarray | None = None,
    saturation: float | None = None,
    k: float = 5.0,
    radius: int = 7,
    min_pixels: int = 2,
) -> np.ndarray:
    """Spot centres ``[n, 2]`` (y, x; intensity-weighted) of ``frame``; bad pixels are ignored."""
    good = ~bad_pixels(frame, mask, saturation, HOT_K)
    x = np.where(good, np.nan_to_num(frame, nan=0.0), 0.0).astype(np.float64)

    def strong_over(use: np.ndarray, fallback: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        n = _box_sum(use.astype(np.float64), radius)
        mean = _box_sum(np.where(use, x, 0.0), radius) / np.maximum(n, 1)
        if fallback is not None:
            mean = np.where(n > 0, mean, fallback)
        return good & (x > mean + k * np.sqrt(np.maximum(mean, 1.0))), mean

    first, mean = strong_over(good, None)
    near_strong = _box_sum(first.astype(np.float64), 2) > 0
    strong, _ = strong_over(good & ~near_strong, mean)
    labels, n = _label(strong)
    if n == 0:
        return np.zeros((0, 2))
    index = labels.ravel()
    sizes = np.bincount(index, minlength=n + 1)[1:]
    weight = np.bincount(index, weights=x.ravel(), minlength=n + 1)[1:]
    yy, xx = np.indices(frame.shape)
    cy = np.bincount(index, weights=(x * yy).ravel(), minlength=n + 1)[1:] / np.maximum(weight, 1e-9)
    cx = np.bincount(index, weights=(x * xx).ravel(), minlength=n + 1)[1:] / np.maximum(weight, 1e-9)
    keep = sizes >= min_pixels
    return np.stack([cy[keep], cx[keep]], axis=1)


def count_peaks(
    frame: np.ndarray, mask: np.ndarray | None = None, saturation: float | None = None, k: float = 5.0
) -> int:
    """How many Bragg peaks ``find_peaks`` sees: the classical answer to "how many peaks?"."""
    return int(len(find_peaks(frame, mask, saturation, k)))
