"""The point-cloud adapter: readers, geometry, encoder, conformance, and the synthetic task.
No vLLM and no pool: the adapter runs with an untrained encoder + projector."""

from __future__ import annotations

import io
import re
import time
import tracemalloc

import numpy as np
import pytest
import torch
from tpmflow_pointcloud import PointCloudAdapter, PointCloudSettings
from tpmflow_pointcloud.encoder import PatchPointNet
from tpmflow_pointcloud.geometry import farthest_point_sample, make_patches, normalise, presample
from tpmflow_pointcloud.readers import parse_cloud_bytes, sniff_format
from tpmflow_pointcloud.synthetic import (
    CLASS_NAMES,
    make_shapes,
    to_npy_bytes,
    to_pcd_bytes,
    to_ply_bytes,
    to_xyz_bytes,
)

from tpmflow.adapters import ItemError, available_adapters
from tpmflow.adapters.testing import check_adapter

HIDDEN = 128
G, K = PointCloudSettings().groups, PointCloudSettings().neighbours

WRITERS = {
    "npy": to_npy_bytes,
    "xyz": to_xyz_bytes,
    "ply-ascii": lambda c: to_ply_bytes(c, "ascii"),
    "ply-binary": lambda c: to_ply_bytes(c, "binary"),
    "pcd-ascii": lambda c: to_pcd_bytes(c, "ascii"),
    "pcd-binary": lambda c: to_pcd_bytes(c, "binary"),
}


@pytest.fixture(scope="module")
def shapes() -> list[np.ndarray]:
    return make_shapes(6, seed=1)[0]


@pytest.fixture(scope="module")
def adapter() -> PointCloudAdapter:
    a = PointCloudAdapter()
    a.use_model(a.new_model(hidden_size=HIDDEN, seed=0))
    return a


def _npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def _lying_pcd(cloud: np.ndarray) -> bytes:
    n = len(cloud)
    return (
        to_pcd_bytes(cloud)
        .replace(f"WIDTH {n}\n".encode(), f"WIDTH {n + 50}\n".encode())
        .replace(f"POINTS {n}\n".encode(), f"POINTS {n + 50}\n".encode())
    )


# -- readers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", list(WRITERS))
@pytest.mark.parametrize("columns", [3, 6])
def test_every_format_round_trips(fmt: str, columns: int, shapes: list[np.ndarray]) -> None:
    cloud = shapes[0] if columns == 3 else np.concatenate([shapes[0], -shapes[0]], axis=1)
    data = WRITERS[fmt](cloud)
    assert sniff_format(data) == fmt.split("-")[0]
    back = parse_cloud_bytes(data)
    assert back.dtype == np.float32 and back.shape == cloud.shape
    np.testing.assert_array_equal(back, cloud)


def test_ply_colours_and_pcd_packed_rgb_are_read() -> None:
    xyz = np.arange(12, dtype=np.float32).reshape(4, 3)
    rgb = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [1, 2, 3]], dtype=np.uint8)
    record = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    rows = np.empty(4, record)
    for j, name in enumerate("xyz"):
        rows[name] = xyz[:, j]
    for j, name in enumerate(("red", "green", "blue")):
        rows[name] = rgb[:, j]
    header = b"ply\nformat binary_little_endian 1.0\nelement vertex 4\n" + b"".join(
        f"property {t} {n}\n".encode() for t, n in [("float", "x"), ("float", "y"), ("float", "z")]
    )
    header += b"property uchar red\nproperty uchar green\nproperty uchar blue\nelement face 0\n"
    header += b"property list uchar int vertex_indices\nend_header\n"
    got = parse_cloud_bytes(header + rows.tobytes())
    np.testing.assert_array_equal(got, np.concatenate([xyz, rgb.astype(np.float32)], axis=1))

    packed = (rgb[:, 0].astype(np.uint32) << 16) | (rgb[:, 1].astype(np.uint32) << 8) | rgb[:, 2]
    body = np.concatenate([xyz.view(np.uint32), packed[:, None]], axis=1).astype("<u4").tobytes()
    pcd = b"VERSION .7\nFIELDS x y z rgb\nSIZE 4 4 4 4\nTYPE F F F F\nCOUNT 1 1 1 1\nWIDTH 4\nHEIGHT 1\n"
    pcd += b"POINTS 4\nDATA binary\n" + body
    np.testing.assert_array_equal(parse_cloud_bytes(pcd), got)


def test_malformed_files_are_refused_with_a_reason(shapes: list[np.ndarray]) -> None:
    cloud = shapes[0]
    ply, pcd = to_ply_bytes(cloud), to_pcd_bytes(cloud)
    cases = {
        "truncated PLY": ply[:-100],
        "more than the": to_ply_bytes(cloud) + b"\0" * 64,
        "no vertex element": b"ply\nformat ascii 1.0\nelement face 1\nproperty float q\nend_header\n1\n",
        "exceeds the limit": b"ply\nformat binary_little_endian 1.0\nelement vertex 60000000\n"
        b"property float x\nproperty float y\nproperty float z\nend_header\n",
        "no z coordinate": ply.replace(b"property float z\n", b"property float w\n"),
        "WIDTH x HEIGHT": pcd.replace(f"POINTS {len(cloud)}\n".encode(), f"POINTS {len(cloud) + 1}\n".encode()),
        "truncated PCD": _lying_pcd(cloud),
        "POINTS 90, the data has 100 rows": to_pcd_bytes(cloud[:100], "ascii")
        .replace(b"POINTS 100\n", b"POINTS 90\n")
        .replace(b"WIDTH 100\n", b"WIDTH 90\n"),
        "binary_compressed": pcd.replace(b"DATA binary", b"DATA binary_compressed"),
        "disagree": pcd.replace(b"SIZE 4 4 4", b"SIZE 4 4"),
        "truncated .npy": to_npy_bytes(cloud)[:-12],
        r"shape \(N, 3\) or \(N, 6\)": _npy(np.zeros((10, 2), np.float32)),
        "3 or 6 columns": b"1 2\n3 4\n",
        "number of columns changed": b"1 2 3\n4 5\n",
        "empty file": b"  \n",
        "not xyz text": b"\xff\xfe\x00garbage\x81",
    }
    for reason, data in cases.items():
        with pytest.raises(ValueError, match=reason):
            parse_cloud_bytes(data)


# -- geometry -----------------------------------------------------------------------------------


def test_normalise_fits_the_unit_sphere(shapes: list[np.ndarray]) -> None:
    xyz = normalise(presample(shapes[2], 8192, seed=0))
    assert np.isclose(np.linalg.norm(xyz, axis=1).max(), 1.0)
    assert np.allclose(xyz.mean(axis=0), 0.0, atol=1e-9)


def test_farthest_point_sampling_spreads_distinct_centres() -> None:
    rng = np.random.default_rng(0)
    sphere = rng.standard_normal((4000, 3))
    sphere /= np.linalg.norm(sphere, axis=1, keepdims=True)
    chosen = farthest_point_sample(sphere, 16)
    assert len(set(chosen.tolist())) == 16
    centres = sphere[chosen]
    gaps = np.linalg.norm(centres[:, None] - centres[None], axis=-1) + np.eye(16) * 9
    random = sphere[rng.choice(4000, 16, replace=False)]
    random_gaps = np.linalg.norm(random[:, None] - random[None], axis=-1) + np.eye(16) * 9
    assert gaps.min() > 0.5 > random_gaps.min()  # 16 well-spread points on a unit sphere are ~0.9 apart
    # Every point is near some centre: FPS covers the sphere.
    assert np.linalg.norm(sphere[:, None] - centres[None], axis=-1).min(axis=1).max() < gaps.min()


def test_patches_are_deterministic_and_relative_to_their_centres(shapes: list[np.ndarray]) -> None:
    a = make_patches(shapes[3], G, K, 8192, 16, seed=0)
    assert a.shape == (G, K + 1, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, make_patches(shapes[3].copy(), G, K, 8192, 16, seed=0))
    assert np.abs(a[:, 1]).max() == 0.0  # each centre's nearest point is itself
    assert np.linalg.norm(a[:, 0], axis=1).max() <= 1.0 + 1e-6
    big = np.random.default_rng(0).standard_normal((20000, 3))
    b0, b1 = make_patches(big, G, K, 2048, 16, seed=0), make_patches(big, G, K, 2048, 16, seed=1)
    np.testing.assert_array_equal(b0, make_patches(big, G, K, 2048, 16, seed=0))
    assert not np.array_equal(b0, b1)  # the seed picks the subsample


def test_ten_million_points_prepare_fast_without_copying_the_cloud(adapter: PointCloudAdapter) -> None:
    cloud = np.random.default_rng(0).standard_normal((10_000_000, 3), dtype=np.float32)  # 114 MiB
    tracemalloc.start()
    start = time.perf_counter()
    (out,) = adapter.prepare([cloud])
    elapsed = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    data = to_npy_bytes(cloud)
    start = time.perf_counter()
    (from_file,) = adapter.prepare([data])  # parsed, checked and subsampled in the sandbox
    file_elapsed = time.perf_counter() - start
    print(
        f"\n10M-point prepare: array {elapsed:.3f} s (peak new memory {peak / 2**20:.1f} MiB for a "
        f"{cloud.nbytes >> 20} MiB cloud); .npy bytes through the sandbox {file_elapsed:.2f} s"
    )
    assert isinstance(out, np.ndarray) and out.shape == (G, K + 1, 3)
    assert elapsed < 120.0 and file_elapsed < 120.0  # generous: a loaded machine; the memory is the check
    assert peak < cloud.nbytes / 4  # no full copy of the cloud (measured: a few MiB)
    np.testing.assert_array_equal(from_file, out)  # a file and its array give the same patches


# -- encoder ------------------------------------------------------------------------------------


def test_encoder_maps_patches_to_one_token_each_and_ignores_point_order(adapter: PointCloudAdapter) -> None:
    torch.manual_seed(0)
    encoder = PatchPointNet(dim=adapter.encoder_dim).eval()
    x = torch.randn(2, G, K + 1, 3)
    y = encoder(x)
    assert y.shape == (2, G, adapter.encoder_dim)
    shuffled = x.clone()
    shuffled[:, :, 1:] = x[:, :, 1:][:, :, torch.randperm(K)]
    torch.testing.assert_close(encoder(shuffled), y)


# -- the adapter --------------------------------------------------------------------------------


def test_conformance(adapter: PointCloudAdapter, shapes: list[np.ndarray]) -> None:
    nan = shapes[1].copy()
    nan[5, 1] = np.nan
    inf = shapes[1].copy()
    inf[7, 2] = np.inf
    good = [
        shapes[0],
        np.concatenate([shapes[1], shapes[1]], axis=1).astype(np.float64),
        shapes[2][:300].tolist(),
        to_ply_bytes(shapes[3]),
        to_pcd_bytes(shapes[4], "ascii"),
    ]
    bad = [nan, inf, np.zeros((0, 3), np.float32), shapes[0][:, :2], "/etc/passwd", to_ply_bytes(shapes[0])[:-50]]
    bad += [_lying_pcd(shapes[5])]
    check_adapter(adapter, good=good, bad=bad, hidden_size=HIDDEN)
    reasons = [r.reason for r in adapter.prepare(bad) if isinstance(r, ItemError)]
    assert len(reasons) == len(bad)
    expected = ["NaN", "infinite", "empty", r"\(N, 3\)", "never opened", "truncated PLY", "POINTS"]
    for reason, pattern in zip(reasons, expected, strict=True):
        assert re.search(pattern, reason), (pattern, reason)
    tokens = adapter.encode(good[:1])[0]
    assert tokens.embeds.shape == (G, HIDDEN)


def test_bad_lists_and_types_are_item_errors(adapter: PointCloudAdapter) -> None:
    out = adapter.prepare(
        [[[1, 2, 3], [4, 5]], [["a", "b", "c"]] * 20, 42, [[True, False, True]] * 20, [[0, 0, 0]] * 20]
    )
    assert [type(o) for o in out] == [ItemError] * 5
    assert "rectangular" in out[0].reason and "real numbers" in out[1].reason and "int" in out[2].reason
    assert "coincide" in out[4].reason


def test_settings_are_validated_and_travel_as_json() -> None:
    with pytest.raises(ValueError):
        PointCloudSettings(groups=0)
    with pytest.raises(ValueError):
        PointCloudSettings(max_points=8)
    a = PointCloudAdapter.from_config({"groups": 8, "neighbours": 16, "prefix": "A shape: "})
    assert (a.input_shape, a.config()["prefix"]) == ((8, 17, 3), "A shape: ")


def test_found_through_its_entry_point() -> None:
    assert "pointcloud" in available_adapters()
    assert available_adapters()["pointcloud"].load() is PointCloudAdapter


# -- synthetic task -----------------------------------------------------------------------------


def test_synthetic_shapes_are_balanced_and_reproducible() -> None:
    clouds, labels, names = make_shapes(62, seed=3)
    assert names == CLASS_NAMES and len(names) == 6 and len(clouds) == len(labels) == 62
    counts = np.bincount(labels, minlength=len(names))
    assert counts.max() - counts.min() <= 1 and labels.min() >= 0 and labels.max() < len(names)
    assert all(c.dtype == np.float32 and c.ndim == 2 and c.shape[1] == 3 and 512 <= len(c) <= 4096 for c in clouds)
    assert all(np.isfinite(c).all() for c in clouds)
    again, labels_again, _ = make_shapes(62, seed=3)
    assert np.array_equal(labels, labels_again) and all(
        np.array_equal(a, b) for a, b in zip(clouds, again, strict=True)
    )
    other, labels_other, _ = make_shapes(62, seed=4)
    assert not np.array_equal(labels, labels_other) or not np.array_equal(clouds[0], other[0])
