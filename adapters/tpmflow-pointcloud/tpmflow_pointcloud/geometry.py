"""A cloud to the encoder's input: validate, subsample, normalise, group into patches.

The pipeline (Point-BERT / Point-MAE style tokenisation):

1. ``check_cloud``: real numbers, shape ``(N, 3)`` or ``(N, 6)``, ``min_points <= N <= MAX_POINTS``,
   finite x, y, z (NaN and inf are errors that say which). Only x, y, z are used from here on:
   colours or normals in columns 4-6 are ignored.
2. ``presample``: a seeded random subset of ``max_points`` points, so huge clouds cost the same
   as small ones. Nothing here copies the whole cloud: the finiteness check is two reductions
   (``min``/``max`` propagate NaN and inf) and only the chosen rows are gathered.
3. ``normalise``: centre on the centroid and scale to the unit sphere (max norm 1).
4. ``farthest_point_sample``: G well-spread patch centres; ``knn_patches``: the k nearest points
   of each centre, expressed relative to it.

Output: float32 ``[G, k + 1, 3]``; row 0 of each patch is its centre (absolute, in the unit
sphere: where the patch is), rows 1..k its neighbours relative to the centre (its local shape).
Every step is deterministic for the same input and settings. For file bytes, steps 1-2 run in
the sandbox (``sample_file``), so only the subsample leaves the capped process.
"""

from __future__ import annotations

import numpy as np

from tpmflow_pointcloud.readers import MAX_POINTS, parse_cloud_bytes


def check_cloud(points: np.ndarray, min_points: int, max_points: int = MAX_POINTS) -> np.ndarray:
    """The x, y, z columns (a view, no copy) of a valid cloud, or ``ValueError`` with the reason."""
    if not isinstance(points, np.ndarray):
        raise ValueError(f"expected an array of points, got {type(points).__name__}")
    if points.dtype.kind not in "iuf":
        raise ValueError(f"coordinates must be real numbers, got dtype {points.dtype}")
    if points.ndim != 2 or points.shape[1] not in (3, 6):
        raise ValueError(f"expected an (N, 3) or (N, 6) array of points, got shape {points.shape}")
    n = points.shape[0]
    if n == 0:
        raise ValueError("empty cloud: no points")
    if n < min_points:
        raise ValueError(f"{n} points is fewer than the minimum of {min_points}")
    if n > max_points:
        raise ValueError(f"{n} points exceeds the limit of {max_points}")
    xyz = points[:, :3]
    if xyz.dtype.kind == "f" and not (np.isfinite(xyz.min()) and np.isfinite(xyz.max())):
        nan = np.isnan(xyz).any(axis=1)  # the error path may allocate: say what and where
        if nan.any():
            raise ValueError(f"NaN coordinates in {int(nan.sum())} of {n} points (first at index {int(nan.argmax())})")
        inf = np.isinf(xyz).any(axis=1)
        raise ValueError(f"infinite coordinates in {int(inf.sum())} of {n} points (first at index {int(inf.argmax())})")
    return xyz


def presample(xyz: np.ndarray, max_points: int, seed: int) -> np.ndarray:
    """At most ``max_points`` rows as float64, a seeded random subset (kept in file order) when larger."""
    if len(xyz) <= max_points:
        return xyz.astype(np.float64)
    rows = np.random.default_rng(seed).choice(len(xyz), size=max_points, replace=False)
    rows.sort()
    return xyz[rows].astype(np.float64)


def normalise(xyz: np.ndarray) -> np.ndarray:
    """Centred on the centroid and scaled so the farthest point has norm 1."""
    centred = xyz - xyz.mean(axis=0)
    radius = float(np.sqrt(np.einsum("ij,ij->i", centred, centred).max()))
    if not np.isfinite(radius):
        raise ValueError("coordinates too large to normalise")
    if radius == 0.0:
        raise ValueError("all points coincide: the cloud has no extent")
    return centred / radius


def farthest_point_sample(xyz: np.ndarray, count: int) -> np.ndarray:
    """Indices of ``count`` centres, each the point farthest from those chosen before it.

    Starts from the point farthest from the origin (the centroid after ``normalise``), so no
    randomness is involved. Each step is one vectorised pass over the points: O(count * N).
    With fewer distinct points than ``count``, centres repeat.
    """
    chosen = np.empty(count, dtype=np.int64)
    chosen[0] = int(np.argmax(np.einsum("ij,ij->i", xyz, xyz)))
    nearest = np.full(len(xyz), np.inf)
    for g in range(1, count):
        delta = xyz - xyz[chosen[g - 1]]
        np.minimum(nearest, np.einsum("ij,ij->i", delta, delta), out=nearest)
        chosen[g] = int(np.argmax(nearest))
    return chosen


def knn_patches(xyz: np.ndarray, centres: np.ndarray, k: int) -> np.ndarray:
    """Indices ``[G, k]`` of each centre's k nearest points, nearest first.

    A cloud with fewer than k points repeats its points cyclically to fill the patch.
    """
    d2 = ((centres[:, None, :] - xyz[None, :, :]) ** 2).sum(axis=-1)  # [G, N]
    kk = min(k, xyz.shape[0])
    near = np.argpartition(d2, kk - 1, axis=1)[:, :kk]
    order = np.argsort(np.take_along_axis(d2, near, axis=1), axis=1, kind="stable")
    near = np.take_along_axis(near, order, axis=1)
    return near if kk == k else near[:, np.arange(k) % kk]


def sample_file(job: tuple[bytes, int, int, int]) -> np.ndarray:
    """``(data, min_points, max_points, seed)`` to the checked, presampled x, y, z of a file.

    What the sandbox runs: parsing, validation and subsampling all happen in the capped process,
    and only ``max_points`` rows travel back instead of the whole cloud. ``make_patches`` on the
    result gives exactly what it gives on the parsed array itself.
    """
    data, min_points, max_points, seed = job
    return presample(check_cloud(parse_cloud_bytes(data), min_points), max_points, seed)


def make_patches(
    points: np.ndarray,
    groups: int,
    neighbours: int,
    max_points: int,
    min_points: int,
    seed: int,
) -> np.ndarray:
    """A cloud ``(N, 3|6)`` to the encoder input, float32 ``[groups, neighbours + 1, 3]``."""
    xyz = normalise(presample(check_cloud(points, min_points), max_points, seed))
    centre_rows = farthest_point_sample(xyz, groups)
    centres = xyz[centre_rows]
    near = knn_patches(xyz, centres, neighbours)
    out = np.empty((groups, neighbours + 1, 3), dtype=np.float32)
    out[:, 0] = centres
    out[:, 1:] = xyz[near] - centres[:, None, :]
    return out
