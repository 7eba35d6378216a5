"""Clouds to file bytes in the formats ``readers`` parses, for tests, examples and clients.

Columns 4-6 of an ``(N, 6)`` cloud are written as float normals (``nx ny nz`` in PLY,
``normal_x normal_y normal_z`` in PCD) so that every format round-trips exactly; ASCII output uses
9 significant digits, enough to round-trip float32.
"""

from __future__ import annotations

import io
from typing import Literal

import numpy as np

Encoding = Literal["ascii", "binary"]


def _as_cloud(cloud: np.ndarray) -> np.ndarray:
    cloud = np.ascontiguousarray(cloud, dtype=np.float32)
    if cloud.ndim != 2 or cloud.shape[1] not in (3, 6):
        raise ValueError(f"expected an (N, 3) or (N, 6) cloud, got shape {cloud.shape}")
    return cloud


def _text_rows(cloud: np.ndarray) -> bytes:
    out = io.StringIO()
    np.savetxt(out, cloud, fmt="%.9g")
    return out.getvalue().encode("ascii")


def to_npy_bytes(cloud: np.ndarray) -> bytes:
    """``.npy`` bytes of the float32 cloud."""
    out = io.BytesIO()
    np.save(out, _as_cloud(cloud), allow_pickle=False)
    return out.getvalue()


def to_xyz_bytes(cloud: np.ndarray) -> bytes:
    """Whitespace-separated text, one point per line."""
    return _text_rows(_as_cloud(cloud))


def to_ply_bytes(cloud: np.ndarray, encoding: Encoding = "binary") -> bytes:
    """PLY 1.0 with one ``vertex`` element (``binary`` is little-endian)."""
    cloud = _as_cloud(cloud)
    names = ["x", "y", "z", "nx", "ny", "nz"][: cloud.shape[1]]
    fmt = "ascii" if encoding == "ascii" else "binary_little_endian"
    header = (
        f"ply\nformat {fmt} 1.0\ncomment written by tpmflow-pointcloud\nelement vertex {len(cloud)}\n"
        + "".join(f"property float {n}\n" for n in names)
        + "end_header\n"
    ).encode("ascii")
    body = _text_rows(cloud) if encoding == "ascii" else cloud.astype("<f4").tobytes()
    return header + body


def to_pcd_bytes(cloud: np.ndarray, encoding: Encoding = "binary") -> bytes:
    """PCD v0.7, ``DATA ascii`` or ``DATA binary`` (unorganised: HEIGHT 1)."""
    cloud = _as_cloud(cloud)
    names = ["x", "y", "z", "normal_x", "normal_y", "normal_z"][: cloud.shape[1]]
    k, n = len(names), len(cloud)
    header = (
        "# .PCD v0.7 - Point Cloud Data file format\nVERSION 0.7\n"
        f"FIELDS {' '.join(names)}\nSIZE {' '.join(['4'] * k)}\nTYPE {' '.join(['F'] * k)}\n"
        f"COUNT {' '.join(['1'] * k)}\nWIDTH {n}\nHEIGHT 1\nVIEWPOINT 0 0 0 1 0 0 0\nPOINTS {n}\nDATA {encoding}\n"
    ).encode("ascii")
    body = _text_rows(cloud) if encoding == "ascii" else cloud.astype("<f4").tobytes()
    return header + body
