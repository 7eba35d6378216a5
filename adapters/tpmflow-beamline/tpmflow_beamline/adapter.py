"""``BeamlineAdapter``: X-ray detector frames (NeXus/HDF5 bytes, Eiger zip bundles or arrays) in,
soft tokens out — one token per frame patch, through a small ViT encoder and the projector."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import nn

from tpmflow.adapters.base import ItemError
from tpmflow.adapters.sandbox import Caps, run_capped
from tpmflow.adapters.soft import SoftTokenAdapter
from tpmflow_beamline.encoder import PatchEncoder
from tpmflow_beamline.frames import HOT_K, prepare_frame
from tpmflow_beamline.nexus import MAX_FRAME_PIXELS, read_frame

_ITEM_KEYS = frozenset({"data", "path", "frame"})


@dataclass(frozen=True)
class BeamlineSettings:
    """What ``config()`` carries; every field has a safe default."""

    part: str | None = None  # trained encoder + projector, "name@version"
    prefix: str = ""
    suffix: str = ""
    dataset_path: str | None = None  # frames dataset for bare-bytes items; None: the NeXus default
    size: int = 64  # frames are area-resized to size x size ...
    patch: int = 16  # ... and cut into (size/patch)^2 tokens of patch*patch values
    max_frame_pixels: int = MAX_FRAME_PIXELS
    max_unzipped_mb: int = 1024  # zip bundles: cap on the extracted size (zip bombs)
    parse_seconds: float = 30.0  # per item, in the sandbox
    parse_memory_mb: int = 2048
    parse_workers: int = 2
    hot_k: float = HOT_K

    def __post_init__(self) -> None:
        if self.size < 1 or self.patch < 1 or self.size % self.patch:
            raise ValueError(f"size ({self.size}) must be a positive multiple of patch ({self.patch})")


class BeamlineAdapter(SoftTokenAdapter):
    """Detector frames as soft tokens. Items: the bytes of an HDF5/NeXus file or of a zip bundle
    (frame 0 at ``settings.dataset_path`` or the NeXus default), ``{"data": bytes, "path": str,
    "frame": int}``, or a decoded ``[H, W]`` numpy array. File paths are never opened."""

    name = "beamline"
    version = "0.1.0"
    modality = "detector-frame"
    settings_type = BeamlineSettings
    encoder_dim = 128
    settings: BeamlineSettings

    @property
    def input_shape(self) -> tuple[int, int]:
        """``(P, patch*patch)``: what ``prepare`` returns per item and the encoder takes."""
        s = self.settings
        return (s.size // s.patch) ** 2, s.patch * s.patch

    def build_encoder(self) -> nn.Module:
        n_patches, patch_dim = self.input_shape
        return PatchEncoder(n_patches, patch_dim, dim=self.encoder_dim)

    def prepare(self, items: Sequence[Any]) -> list[np.ndarray | ItemError]:
        """Every bytes/dict item of the batch is parsed in ONE sandboxed ``run_capped`` call."""
        s = self.settings
        out: list[np.ndarray | ItemError | None] = [None] * len(items)
        decoded: dict[int, dict[str, Any]] = {}
        jobs: list[dict[str, Any]] = []
        where: list[int] = []
        for i, item in enumerate(items):
            try:
                job = self._job(item)
            except ValueError as exc:
                out[i] = ItemError(i, str(exc))
                continue
            if "data" in job:
                jobs.append(job)
                where.append(i)
            else:
                decoded[i] = job
        if jobs:
            caps = Caps(seconds=s.parse_seconds, memory_bytes=s.parse_memory_mb << 20)
            for i, result in zip(where, run_capped(read_frame, jobs, caps, workers=s.parse_workers), strict=True):
                if not isinstance(result, ItemError):
                    decoded[i] = result
                elif result.reason.startswith("ValueError: "):  # the reader's own words, for the user
                    out[i] = ItemError(i, result.reason.removeprefix("ValueError: "))
                else:  # over a cap, or the parser died: the sandbox's reason, said as such
                    out[i] = ItemError(i, f"parsing the file failed: {result.reason}")
        for i, d in decoded.items():
            try:
                out[i] = prepare_frame(d["frame"], d["mask"], d["saturation"], s.size, s.patch, s.hot_k)
            except ValueError as exc:
                out[i] = ItemError(i, str(exc))
            except MemoryError:
                out[i] = ItemError(i, f"a frame of shape {d['frame'].shape} is too big to process")
        return out  # type: ignore[return-value]  # every slot is filled above

    def _job(self, item: Any) -> dict[str, Any]:
        """A ``read_frame`` job for bytes/dict items, or an already-decoded frame for arrays."""
        s = self.settings
        limits = {"max_pixels": s.max_frame_pixels, "max_unzipped_bytes": s.max_unzipped_mb << 20}
        if isinstance(item, (str, os.PathLike)):
            raise ValueError(
                "file paths are never opened on the server: send the file's bytes "
                "(client.put(path.read_bytes())) or a decoded array"
            )
        if isinstance(item, (bytes, bytearray, memoryview)):
            return {"data": bytes(item), "path": s.dataset_path, "frame": 0, **limits}
        if isinstance(item, dict):
            unknown = set(item) - _ITEM_KEYS
            if unknown:
                raise ValueError(f"unknown item keys {sorted(unknown)} (expected data, path, frame)")
            data, path, frame = item.get("data"), item.get("path", s.dataset_path), item.get("frame", 0)
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise ValueError("item['data'] must be the file's bytes")
            if path is not None and not isinstance(path, str):
                raise ValueError("item['path'] must be a dataset path (str)")
            if isinstance(frame, bool) or not isinstance(frame, (int, np.integer)) or frame < 0:
                raise ValueError(f"item['frame'] must be a non-negative integer, got {frame!r}")
            return {"data": bytes(data), "path": path, "frame": int(frame), **limits}
        if isinstance(item, np.ndarray):
            if item.ndim != 2 or item.dtype.kind not in "iuf":
                raise ValueError(f"array items must be 2-D integer or float frames, got {item.dtype} {item.shape}")
            if item.size == 0 or item.size > s.max_frame_pixels:
                raise ValueError(f"frames of {item.shape} are refused (cap: {s.max_frame_pixels} pixels)")
            pixels = item.astype(np.float32)
            if item.dtype.kind in "iu":
                pixels[item == np.iinfo(item.dtype).max] = np.nan  # as read_frame does: "no value"
            return {"frame": pixels, "mask": None, "saturation": None}
        raise ValueError(
            f"items are HDF5/NeXus or zip bytes, a dict with 'data', or an array; not {type(item).__name__}"
        )
