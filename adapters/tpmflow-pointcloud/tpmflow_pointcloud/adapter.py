"""``PointCloudAdapter``: point clouds in, G soft tokens per cloud out (see README.md)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from torch import nn

from tpmflow.adapters.base import ItemError
from tpmflow.adapters.sandbox import Caps, run_capped
from tpmflow.adapters.soft import SoftTokenAdapter
from tpmflow_pointcloud.encoder import PatchPointNet
from tpmflow_pointcloud.geometry import make_patches, sample_file
from tpmflow_pointcloud.readers import MAX_POINTS

_PATH_REFUSAL = (
    "a str item is refused: file paths are never opened on the replica; send the file's bytes "
    "(client.put(path.read_bytes())), an array, or a nested list of numbers"
)


@dataclass(frozen=True)
class PointCloudSettings:
    """What ``config()`` carries; every field has a safe default."""

    part: str | None = None  # trained encoder + projector, "name@version"
    prefix: str = ""  # text embedded before the soft tokens
    suffix: str = ""  # and after them
    groups: int = 16  # G patches = G soft tokens per cloud
    neighbours: int = 32  # k points per patch
    max_points: int = 8192  # larger clouds are randomly (seeded) subsampled to this many first
    min_points: int = 16  # fewer is refused: nothing to group
    seed: int = 0  # of the subsampling, so a cloud always gives the same tokens
    parse_seconds: float = 30.0  # per file, in the sandbox
    parse_memory_mb: int = 2048  # per file, in the sandbox (address space)
    parse_workers: int = 2  # sandboxed parser processes at a time

    def __post_init__(self) -> None:
        for name in ("groups", "neighbours", "min_points", "parse_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not self.groups <= self.max_points <= MAX_POINTS:
            raise ValueError(f"max_points must be between groups ({self.groups}) and {MAX_POINTS}")
        if self.parse_seconds <= 0 or self.parse_memory_mb < 256:
            raise ValueError("parse caps must be positive (memory at least 256 MiB)")


class PointCloudAdapter(SoftTokenAdapter):
    """3-D point clouds (arrays, nested lists, or PLY/PCD/XYZ/NPY file bytes) as soft tokens:
    G patches, each encoded by a small PointNet and projected to the core model's hidden size."""

    name: ClassVar[str] = "pointcloud"
    version: ClassVar[str] = "0.1.0"
    modality: ClassVar[str] = "point-cloud"
    settings_type: ClassVar[type] = PointCloudSettings
    encoder_dim: ClassVar[int] = 128
    settings: PointCloudSettings

    def build_encoder(self) -> nn.Module:
        return PatchPointNet(dim=self.encoder_dim)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One prepared item: ``[groups, neighbours + 1, 3]`` (row 0 of each patch is its centre)."""
        return (self.settings.groups, self.settings.neighbours + 1, 3)

    def prepare(self, items: Sequence[Any]) -> list[np.ndarray | ItemError]:
        """Each item to float32 ``[G, k + 1, 3]`` patches or its ``ItemError``. File bytes are parsed,
        checked and subsampled in the sandbox (``geometry.sample_file``), all of a request's files in
        one ``run_capped`` call; a file and the array it holds give the same patches."""
        s = self.settings
        out: list[np.ndarray | ItemError | None] = [None] * len(items)
        clouds: dict[int, np.ndarray] = {}
        files: list[int] = []
        for i, item in enumerate(items):
            if isinstance(item, bytes | bytearray | memoryview):
                files.append(i)
            elif isinstance(item, str):
                out[i] = ItemError(i, _PATH_REFUSAL)
            elif isinstance(item, np.ndarray):
                clouds[i] = item
            elif isinstance(item, list | tuple):
                try:
                    clouds[i] = np.asarray(item)
                except ValueError:
                    out[i] = ItemError(i, "the nested list is not rectangular: expected N rows of 3 or 6 numbers")
            else:
                out[i] = ItemError(
                    i, f"expected file bytes, an array or a nested list of numbers, got {type(item).__name__}"
                )
        if files:
            caps = Caps(seconds=s.parse_seconds, memory_bytes=s.parse_memory_mb << 20)
            jobs = [(bytes(items[i]), s.min_points, s.max_points, s.seed) for i in files]
            for i, result in zip(files, run_capped(sample_file, jobs, caps, workers=s.parse_workers), strict=True):
                if not isinstance(result, ItemError):
                    clouds[i] = result
                elif result.reason.startswith("ValueError: "):  # the reader's or check's own words
                    out[i] = ItemError(i, result.reason.removeprefix("ValueError: "))
                else:  # over a cap, or the parser died
                    out[i] = ItemError(i, f"parsing the file failed: {result.reason}")
        for i, cloud in clouds.items():
            try:
                out[i] = make_patches(cloud, s.groups, s.neighbours, s.max_points, s.min_points, s.seed)
            except ValueError as exc:
                out[i] = ItemError(i, str(exc))
        return out  # type: ignore[return-value]  # every slot is filled above
