"""A SYNTHETIC shape-classification task, generated in code: no real scans, no downloaded data set.

Six classes of surfaces (sphere, cube, cylinder, cone, torus) and one volumetric cluster (a
3x3x3 lattice of Gaussian blobs). Each cloud gets a random anisotropic scale per axis (0.7-1.3),
Gaussian noise (1-3 % of the size), a random 3-D rotation, a random overall size and offset, and a
random number of points (512-4096), so a classifier must learn shape, not pose, size or density.
It exists to train and test the adapter end to end; numbers on it say nothing about real data.

The file writers are re-exported here for examples that write the clouds as files.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from tpmflow_pointcloud.writers import to_npy_bytes, to_pcd_bytes, to_ply_bytes, to_xyz_bytes

__all__ = [
    "CLASS_NAMES",
    "make_shapes",
    "random_rotation",
    "to_npy_bytes",
    "to_pcd_bytes",
    "to_ply_bytes",
    "to_xyz_bytes",
]

MIN_POINTS, MAX_POINTS = 512, 4096


def _sphere(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _cube(rng: np.random.Generator, n: int) -> np.ndarray:
    p = rng.uniform(-1.0, 1.0, (n, 3))
    axis = rng.integers(0, 3, n)
    p[np.arange(n), axis] = rng.choice([-1.0, 1.0], n)  # push each point onto one of the 6 faces
    return p


def _cylinder(rng: np.random.Generator, n: int) -> np.ndarray:
    """Radius 1, height 2, with caps; side and caps by area (4 pi : 2 pi)."""
    theta = rng.uniform(0.0, 2 * np.pi, n)
    r = np.ones(n)
    z = rng.uniform(-1.0, 1.0, n)
    cap = rng.random(n) < 1 / 3
    r[cap] = np.sqrt(rng.random(cap.sum()))
    z[cap] = rng.choice([-1.0, 1.0], cap.sum())
    return np.stack([r * np.cos(theta), r * np.sin(theta), z], axis=1)


def _cone(rng: np.random.Generator, n: int) -> np.ndarray:
    """Base radius 1, height 2, apex up, with its base disc; side and base by area (sqrt 5 : 1)."""
    theta = rng.uniform(0.0, 2 * np.pi, n)
    t = np.sqrt(rng.random(n))  # uniform over the side: density grows linearly from the apex
    r, z = t, 1.0 - 2.0 * t
    base = rng.random(n) < 1 / (1 + np.sqrt(5))
    r[base] = np.sqrt(rng.random(base.sum()))
    z[base] = -1.0
    return np.stack([r * np.cos(theta), r * np.sin(theta), z], axis=1)


def _torus(rng: np.random.Generator, n: int) -> np.ndarray:
    """Major radius 1, minor 0.35, uniform over the surface (rejection on the area element)."""
    big, small = 1.0, 0.35
    u = np.empty(0)
    v = np.empty(0)
    while len(u) < n:
        cu, cv = rng.uniform(0, 2 * np.pi, 2 * n), rng.uniform(0, 2 * np.pi, 2 * n)
        keep = rng.random(2 * n) < (big + small * np.cos(cv)) / (big + small)
        u, v = np.concatenate([u, cu[keep]]), np.concatenate([v, cv[keep]])
    u, v = u[:n], v[:n]
    ring = big + small * np.cos(v)
    return np.stack([ring * np.cos(u), ring * np.sin(u), small * np.sin(v)], axis=1)


def _lattice(rng: np.random.Generator, n: int) -> np.ndarray:
    """Gaussian blobs on the 27 nodes of a 3x3x3 grid spanning [-1, 1]^3."""
    nodes = np.stack(np.meshgrid(*[np.array([-1.0, 0.0, 1.0])] * 3, indexing="ij"), axis=-1).reshape(-1, 3)
    return nodes[rng.integers(0, len(nodes), n)] + rng.normal(0.0, 0.08, (n, 3))


_SHAPES: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "sphere": _sphere,
    "cube": _cube,
    "cylinder": _cylinder,
    "cone": _cone,
    "torus": _torus,
    "lattice": _lattice,
}
CLASS_NAMES: list[str] = list(_SHAPES)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3-D rotation matrix (QR of a Gaussian matrix, signs fixed, det +1)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def make_shapes(n: int, seed: int) -> tuple[list[np.ndarray], np.ndarray, list[str]]:
    """``n`` synthetic clouds (float32 ``(N_i, 3)``), their int64 labels and the class names.

    Classes are balanced (counts differ by at most one) and shuffled; the same seed gives the same clouds.
    """
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(CLASS_NAMES)).astype(np.int64)
    clouds: list[np.ndarray] = []
    for label in labels:
        points = int(rng.integers(MIN_POINTS, MAX_POINTS + 1))
        shape = _SHAPES[CLASS_NAMES[label]](rng, points) * rng.uniform(0.7, 1.3, 3)
        shape += rng.normal(0.0, rng.uniform(0.01, 0.03), shape.shape)
        size, offset = rng.uniform(0.5, 5.0), rng.uniform(-2.0, 2.0, 3)
        clouds.append(((shape @ random_rotation(rng).T) * size + offset).astype(np.float32))
    return clouds, labels, list(CLASS_NAMES)
