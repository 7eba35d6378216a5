"""SYNTHETIC detector frames with a known number of Bragg peaks, and NeXus/Eiger files holding them.

These are simulated data, not measurements: 2-D Gaussian peaks (random positions, intensities and
widths, kept apart so each is countable) on a smooth radial background, with Poisson noise, a few
hot pixels (isolated, huge counts) and dead pixels (0, listed in the mask), and optionally a
beamstop shadow and module gaps (Eiger's uint32-max marker, masked). They serve the tests, the
examples, and the peak-counting task the encoder is trained and judged on (``make_dataset``).
"""

from __future__ import annotations

import io
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

GAP_VALUE = np.iinfo(np.uint32).max  # what an Eiger writes into gap pixels
DATA_FILE = "data_000001.h5"
MASTER_FILE = "series_master.h5"


@dataclass(frozen=True)
class SyntheticFrame:
    """One simulated frame and its truth."""

    frame: np.ndarray  # uint32 counts [size, size]
    mask: np.ndarray  # bool [size, size], True = bad: dead pixels, gaps, beamstop (a pixel_mask)
    peaks: np.ndarray  # [n_peaks, 2] peak centres (y, x)
    hot: np.ndarray  # [k, 2] hot pixels (y, x), NOT in the mask: finding them is the reader's job
    dead: np.ndarray  # [k, 2] dead pixels (y, x), in the mask


def simulate(
    rng: np.random.Generator,
    n_peaks: int,
    size: int = 256,
    *,
    n_hot: int = 3,
    n_dead: int = 3,
    beamstop: bool = False,
    gaps: bool = False,
) -> SyntheticFrame:
    """A ``size`` x ``size`` frame with exactly ``n_peaks`` separated Bragg peaks."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    c = (size - 1) / 2
    r = np.hypot(yy - c, xx - c)
    expected = rng.uniform(5, 20) + rng.uniform(20, 80) * np.exp(-r / (size / 4))  # air/solvent scatter
    gap = _gaps(size) if gaps else np.zeros((size, size), dtype=bool)
    shadow = ((r < size / 20) | ((np.abs(yy - c) < 2) & (xx < c))) & ~gap if beamstop else np.zeros_like(gap)
    blocked = gap | shadow  # pixels with no usable signal, all masked
    # Peaks: away from edges, blocked pixels and each other, so the truth is unambiguous.
    margin, apart = 8, 16
    keep_out = _grow(blocked, margin)
    peaks: list[tuple[float, float]] = []
    for _ in range(200 * max(n_peaks, 1)):
        if len(peaks) == n_peaks:
            break
        y, x = rng.uniform(margin, size - 1 - margin, size=2)
        if keep_out[int(round(y)), int(round(x))] or any(np.hypot(y - py, x - px) < apart for py, px in peaks):
            continue
        peaks.append((y, x))
    if len(peaks) < n_peaks:
        raise ValueError(f"cannot place {n_peaks} separated peaks on a {size}x{size} frame")
    for y, x in peaks:
        amplitude = np.exp(rng.uniform(np.log(40), np.log(5000)))
        sigma = rng.uniform(0.9, 2.0)
        expected = expected + amplitude * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * sigma**2))
    counts = rng.poisson(expected).astype(np.uint32)
    counts[shadow] = rng.poisson(0.5, size=int(shadow.sum()))  # disc + arm of the beamstop
    counts[gap] = GAP_VALUE
    near_peak = _grow(_points(size, peaks), 6) | blocked
    free = np.flatnonzero(~near_peak)
    picked = rng.choice(free, size=n_hot + n_dead, replace=False)
    hot = np.stack(np.unravel_index(picked[:n_hot], counts.shape), axis=1)
    dead = np.stack(np.unravel_index(picked[n_hot:], counts.shape), axis=1)
    counts[hot[:, 0], hot[:, 1]] = rng.integers(20_000, 1_000_000, size=n_hot)
    counts[dead[:, 0], dead[:, 1]] = 0
    mask = blocked.copy()
    mask[dead[:, 0], dead[:, 1]] = True
    return SyntheticFrame(counts, mask, np.array(peaks, dtype=np.float64).reshape(-1, 2), hot, dead)


def make_frame(rng: np.random.Generator, n_peaks: int, size: int = 256, **options: bool | int) -> np.ndarray:
    """Just the uint32 frame of ``simulate`` (same options)."""
    return simulate(rng, n_peaks, size, **options).frame  # type: ignore[arg-type]


def make_dataset(n: int, seed: int = 0, size: int = 256, max_peaks: int = 20) -> tuple[list[np.ndarray], np.ndarray]:
    """``n`` frames and their peak counts (uniform over 0..max_peaks), reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, max_peaks + 1, size=n)
    return [make_frame(rng, int(k), size) for k in counts], counts


def _points(size: int, points: list[tuple[float, float]]) -> np.ndarray:
    out = np.zeros((size, size), dtype=bool)
    for y, x in points:
        out[int(round(y)), int(round(x))] = True
    return out


def _gaps(size: int) -> np.ndarray:
    """One horizontal and one vertical module gap, two thirds of the way across."""
    out = np.zeros((size, size), dtype=bool)
    g, width = size * 2 // 3, max(2, size // 64)
    out[g : g + width, :] = True
    out[:, g : g + width] = True
    return out


def _grow(mask: np.ndarray, r: int) -> np.ndarray:
    """``mask`` dilated by a (2r+1)^2 square."""
    out = mask.copy()
    h, w = mask.shape
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] |= mask[
                max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
            ]
    return out


# -- files ----------------------------------------------------------------------------------------


def _stack(frames: np.ndarray | list[np.ndarray]) -> np.ndarray:
    data = np.asarray(frames)
    return data[None] if data.ndim == 2 else data


def write_nexus(
    target: str | Path | BinaryIO,
    frames: np.ndarray | list[np.ndarray],
    mask: np.ndarray | None = None,
    saturation: float | None = None,
    external: bool = False,
) -> None:
    """A NeXus file: ``/entry`` (NXentry) -> ``/entry/data`` (NXdata, ``signal="data"``) holding
    frames ``[N, H, W]``, and ``/entry/instrument/detector`` (NXdetector) with ``pixel_mask``
    (uint32, nonzero = bad) and ``saturation_value``. ``external=True`` writes Eiger style: the
    frames go to ``data_000001.h5`` beside ``target`` (a path), linked from the master as
    ``/entry/data/data_000001`` (an ExternalLink, no ``signal``)."""
    import h5py

    data = _stack(frames)
    with h5py.File(target, "w") as f:
        f.attrs["default"] = "entry"
        entry = f.create_group("entry")
        entry.attrs["NX_class"] = "NXentry"
        entry.attrs["default"] = "data"
        nxdata = entry.create_group("data")
        nxdata.attrs["NX_class"] = "NXdata"
        if external:
            if not isinstance(target, (str, Path)):
                raise ValueError("external=True needs a file path to write the data file beside")
            with h5py.File(Path(target).parent / DATA_FILE, "w") as d:
                _frames_dataset(d.create_group("entry").create_group("data"), data)
            nxdata["data_000001"] = h5py.ExternalLink(DATA_FILE, "/entry/data/data")
        else:
            nxdata.attrs["signal"] = "data"
            _frames_dataset(nxdata, data)
        detector = entry.create_group("instrument").create_group("detector")
        entry["instrument"].attrs["NX_class"] = "NXinstrument"
        detector.attrs["NX_class"] = "NXdetector"
        if mask is not None:
            detector["pixel_mask"] = mask.astype(np.uint32)
        if saturation is not None:
            detector["saturation_value"] = np.float64(saturation)


def _frames_dataset(group: Any, data: np.ndarray) -> None:
    """Frames chunked one per chunk (what readers of one frame want), gzip-compressed."""
    group.create_dataset("data", data=data, chunks=(1, *data.shape[1:]), compression="gzip", compression_opts=1)


def nexus_bytes(
    frames: np.ndarray | list[np.ndarray], mask: np.ndarray | None = None, saturation: float | None = None
) -> bytes:
    """The bytes of a single NeXus file (``write_nexus`` to memory): a ready item."""
    buffer = io.BytesIO()
    write_nexus(buffer, frames, mask, saturation)
    return buffer.getvalue()


def eiger_bundle(
    frames: np.ndarray | list[np.ndarray], mask: np.ndarray | None = None, saturation: float | None = None
) -> bytes:
    """An Eiger-style bundle as zip bytes: ``series_master.h5`` + ``data_000001.h5``."""
    buffer = io.BytesIO()
    with tempfile.TemporaryDirectory(prefix="tpmflow-beamline-") as tmp:
        write_nexus(Path(tmp) / MASTER_FILE, frames, mask, saturation, external=True)
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for name in (MASTER_FILE, DATA_FILE):
                archive.write(Path(tmp) / name, name)
    return buffer.getvalue()
