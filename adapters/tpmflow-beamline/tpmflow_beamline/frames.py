"""One detector frame into fixed-shape encoder input: bad pixels zeroed, area-resized, log-scaled,
normalised and cut into ViT patches. Deterministic (no randomness, no thresholds learned from data).

What one frame can tell about bad pixels, and so what is masked:

* the file's pixel mask (gaps between modules, known dead or noisy pixels);
* pixels without a value: NaN/inf, and integers at their dtype's maximum (``nexus.read_frame``
  turns those into NaN) — Eiger's marker for gaps and defective pixels;
* negative counts (Pilatus marks gaps with -1 and bad pixels with -2);
* pixels at or above the detector's saturation value (their count is unknown);
* hot pixels: isolated outliers, far above the median of their eight neighbours (a real Bragg peak
  spreads over neighbours, a hot pixel does not).

A dead pixel stuck at 0 looks like an honest zero count in a single frame; telling them apart takes
a series of frames (or a flat field), so such pixels are left to the file's mask.
"""

from __future__ import annotations

import functools

import numpy as np

HOT_K = 50.0  # hot: above median + HOT_K x robust spread of the 3x3 neighbourhood


# Longest frame side accepted (Eiger2 16M is 4148 x 4362): bounds the work on a thin, long frame.
MAX_SIDE = 16384


def _neighbours(x: np.ndarray) -> list[np.ndarray]:
    """The eight 3x3 neighbours of every pixel (edges reflected), as shifted views."""
    p = np.pad(x, 1, mode="reflect") if min(x.shape) > 1 else np.pad(x, 1, mode="edge")
    h, w = x.shape
    return [p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


def hot_pixels(frame: np.ndarray, k: float = HOT_K) -> np.ndarray:
    """Isolated outliers: above all eight neighbours and above their median + ``k`` x spread, where
    the spread is the neighbours' MAD (x1.4826), at least the Poisson sqrt(median) and 1 count.
    NaN pixels (already known bad) are left out of the neighbourhoods; a pixel with fewer than three
    usable neighbours is not judged."""
    x = np.where(np.isfinite(frame), frame, np.nan).astype(np.float32)
    around = _neighbours(x)
    top = functools.reduce(np.fmax, around)  # pairwise, NaN-skipping: no [8, H, W] stack
    low = functools.reduce(np.fmin, around)  # median >= min, so this bounds the threshold below
    floor = low + k * np.sqrt(np.maximum(low, 1.0))
    hot = np.zeros(x.shape, dtype=bool)
    with np.errstate(invalid="ignore"):
        ys, xs = np.nonzero((x > top) & (x > floor))  # few candidates: medians of eight only for them
    if ys.size == 0:
        return hot
    values = np.stack([a[ys, xs] for a in around], axis=1)
    usable = np.isfinite(values).sum(axis=1) >= 3
    ys, xs, values = ys[usable], xs[usable], values[usable]
    med = np.nanmedian(values, axis=1)
    mad = 1.4826 * np.nanmedian(np.abs(values - med[:, None]), axis=1)
    spread = np.maximum(np.maximum(mad, np.sqrt(np.maximum(med, 0.0))), 1.0)
    hot[ys, xs] = x[ys, xs] > med + k * spread
    return hot


def bad_pixels(
    frame: np.ndarray, mask: np.ndarray | None = None, saturation: float | None = None, hot_k: float = HOT_K
) -> np.ndarray:
    """Bool ``[H, W]``, True where the count cannot be trusted (see the module docstring)."""
    bad = ~np.isfinite(frame) | (np.nan_to_num(frame, nan=0.0) < 0)
    if mask is not None:
        if mask.shape != frame.shape:
            raise ValueError(f"mask shape {mask.shape} does not match frame shape {frame.shape}")
        bad |= mask.astype(bool)
    if saturation is not None:
        bad |= np.nan_to_num(frame, nan=0.0) >= saturation
    return bad | hot_pixels(np.where(bad, np.nan, frame), hot_k)


def clean(
    frame: np.ndarray, mask: np.ndarray | None = None, saturation: float | None = None, hot_k: float = HOT_K
) -> np.ndarray:
    """Float32 frame with every bad pixel set to 0 (the background-free value after log1p)."""
    bad = bad_pixels(frame, mask, saturation, hot_k)
    return np.where(bad, 0.0, np.nan_to_num(frame, nan=0.0)).astype(np.float32)


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` weights: each output bin averages the input pixels it overlaps, in
    proportion to the overlap (block-mean when n_in is a multiple of n_out; no aliasing of
    one-pixel-wide peaks, unlike sampling)."""
    edges = np.linspace(0.0, n_in, n_out + 1)
    lo, hi = edges[:-1, None], edges[1:, None]
    left = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, left + 1) - np.maximum(lo, left), 0.0, None)
    return overlap / overlap.sum(axis=1, keepdims=True)


def resize(frame: np.ndarray, size: int) -> np.ndarray:
    """``[size, size]`` by area averaging, after zero-padding to a square (bottom/right) so the
    detector's geometry is not stretched."""
    h, w = frame.shape
    n = max(h, w)
    # The padding is zeros, so only the frame's own rows and columns of the averaging matrices
    # matter: never build the (possibly huge) square itself.
    area = _area_matrix(n, size)
    return (area[:, :h] @ frame.astype(np.float64) @ area[:, :w].T).astype(np.float32)


def scale(frame: np.ndarray) -> np.ndarray:
    """log1p of the counts (peaks span orders of magnitude), then zero mean and unit spread per
    frame (exposure and flux differ between frames; the encoder sees the pattern)."""
    x = np.log1p(np.clip(frame, 0.0, None)).astype(np.float64)
    x -= x.mean()
    return (x / max(float(x.std()), 1e-3)).astype(np.float32)


def patchify(image: np.ndarray, patch: int) -> np.ndarray:
    """``[S, S]`` into ``[(S/patch)^2, patch*patch]`` ViT tokens, patches row-major."""
    s = image.shape[0]
    if image.shape != (s, s) or s % patch:
        raise ValueError(f"image of shape {image.shape} does not split into {patch}x{patch} patches")
    g = s // patch
    return np.ascontiguousarray(image.reshape(g, patch, g, patch).transpose(0, 2, 1, 3).reshape(g * g, patch * patch))


def prepare_frame(
    frame: np.ndarray,
    mask: np.ndarray | None = None,
    saturation: float | None = None,
    size: int = 64,
    patch: int = 16,
    hot_k: float = HOT_K,
) -> np.ndarray:
    """The whole pipeline: float32 ``[(size/patch)^2, patch*patch]`` encoder input."""
    if frame.ndim != 2 or min(frame.shape) < 1:
        raise ValueError(f"a frame must be 2-D (H, W), got shape {frame.shape}")
    if max(frame.shape) > MAX_SIDE:
        raise ValueError(f"a frame side of {max(frame.shape)} pixels exceeds the limit of {MAX_SIDE}")
    return patchify(scale(resize(clean(frame, mask, saturation, hot_k), size)), patch)
