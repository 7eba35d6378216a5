"""The beamline adapter: NeXus/Eiger frames read safely from bytes, cleaned, patched and encoded.

Synthetic frames only (``tpmflow_beamline.synthetic``); no core model, no pool.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from typing import Any

import h5py
import numpy as np
import pytest
import torch
from tpmflow_beamline import BeamlineAdapter, BeamlineSettings
from tpmflow_beamline import adapter as adapter_module
from tpmflow_beamline.frames import bad_pixels, clean, patchify, prepare_frame
from tpmflow_beamline.nexus import read_frame
from tpmflow_beamline.peaks import count_peaks
from tpmflow_beamline.synthetic import GAP_VALUE, eiger_bundle, make_dataset, nexus_bytes, simulate

from tpmflow.adapters import ItemError, available_adapters, load_adapter
from tpmflow.adapters.testing import check_adapter

SIZE = 128


@pytest.fixture(scope="module")
def sample() -> Any:
    return simulate(np.random.default_rng(7), 6, SIZE, beamstop=True, gaps=True)


@pytest.fixture(scope="module")
def frames(sample: Any) -> np.ndarray:
    return np.stack([sample.frame, sample.frame // 3])


@pytest.fixture(scope="module")
def adapter() -> BeamlineAdapter:
    a = BeamlineAdapter()
    a.use_model(a.new_model(hidden_size=128, seed=0))
    return a


def _expected(frame: np.ndarray) -> np.ndarray:
    out = frame.astype(np.float32)
    out[frame == GAP_VALUE] = np.nan  # the dtype-maximum marker comes back as "no value"
    return out


def _h5(build: Callable[[h5py.File], object]) -> bytes:
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        build(f)
    return buffer.getvalue()


def _zip(members: dict[str, bytes], symlink: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = 0o120777 << 16
            archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def _external(target: str) -> Callable[[h5py.File], object]:
    def build(f: h5py.File) -> None:
        f.create_group("entry/data")
        f["entry/data/data_000001"] = h5py.ExternalLink(target, "/entry/data/data")

    return build


def _dataset(data: np.ndarray) -> Callable[[h5py.File], object]:
    return lambda f: f.create_dataset("entry/data/data", data=data)


# -- reading --------------------------------------------------------------------------------------


@pytest.mark.parametrize("packing", ["nexus", "eiger"])
def test_frames_and_mask_read_back_exactly(packing: str, sample: Any, frames: np.ndarray) -> None:
    data = (nexus_bytes if packing == "nexus" else eiger_bundle)(frames, sample.mask, 1e5)
    for i in range(2):
        got = read_frame({"data": data, "path": None, "frame": i})
        assert got["frame"].dtype == np.float32 and got["frame"].shape == (SIZE, SIZE)
        np.testing.assert_array_equal(got["frame"], _expected(frames[i]))
        np.testing.assert_array_equal(got["mask"], sample.mask)
        assert got["saturation"] == 1e5
    explicit = "/entry/data/data" if packing == "nexus" else "/entry/data/data_000001"
    np.testing.assert_array_equal(
        read_frame({"data": data, "path": explicit, "frame": 1})["frame"], _expected(frames[1])
    )


def test_soft_links_and_in_file_virtual_datasets_are_fine() -> None:
    ones = np.arange(9.0).reshape(3, 3)

    def build(f: h5py.File) -> None:
        f.create_dataset("entry/real", data=ones)
        f["entry/alias"] = h5py.SoftLink("/entry/real")
        layout = h5py.VirtualLayout((3, 3), "f8")
        layout[:] = h5py.VirtualSource(".", "/entry/real", shape=(3, 3))
        f.create_virtual_dataset("entry/data/data", layout)

    data = _h5(build)
    for path in ("/entry/alias", None):
        np.testing.assert_array_equal(read_frame({"data": data, "path": path, "frame": 0})["frame"], ones)


def test_bundle_virtual_sources_come_from_the_bundle_only(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    stack = np.arange(2 * 4 * 4, dtype=np.uint16).reshape(2, 4, 4)
    source = _h5(lambda f: f.create_dataset("data", data=stack))

    def build(f: h5py.File) -> None:
        layout = h5py.VirtualLayout((2, 4, 4), "u2")
        layout[:] = h5py.VirtualSource("src_000001.h5", "/data", shape=(2, 4, 4))
        f.create_virtual_dataset("entry/data/data", layout)

    master = _h5(build)
    decoy = _h5(lambda f: f.create_dataset("data", data=stack + 1000))
    (tmp_path / "src_000001.h5").write_bytes(decoy)  # a same-named file, other data, in the working directory
    monkeypatch.chdir(tmp_path)
    both = _zip({"vds_master.h5": master, "src_000001.h5": source})
    np.testing.assert_array_equal(read_frame({"data": both, "frame": 1})["frame"], stack[1])
    with pytest.raises(ValueError, match="outside the payload"):
        read_frame({"data": _zip({"vds_master.h5": master}), "frame": 1})


def _vds_outside(f: h5py.File) -> None:
    layout = h5py.VirtualLayout((3, 3), "f8")
    layout[:] = h5py.VirtualSource("/etc/x.h5", "/data", shape=(3, 3))
    f.create_virtual_dataset("entry/data/data", layout)


def _loop(f: h5py.File) -> None:
    f.create_group("entry")
    f["entry/a"] = h5py.SoftLink("/entry/b")
    f["entry/b"] = h5py.SoftLink("/entry/a")


REFUSALS: list[tuple[str, Callable[[bytes], dict[str, Any]], str]] = [
    ("truncated", lambda good: {"data": good[: len(good) // 2]}, "truncated"),
    ("random bytes", lambda good: {"data": np.random.default_rng(0).bytes(4096)}, "neither signature"),
    ("missing path", lambda good: {"data": good, "path": "/entry/nope"}, "no frame dataset at '/entry/nope'"),
    ("frame out of range", lambda good: {"data": good, "frame": 2}, "out of range"),
    ("complex", lambda _: {"data": _h5(_dataset(np.ones((4, 4), complex)))}, "frames of dtype complex128"),
    ("string", lambda _: {"data": _h5(_dataset(np.array([[b"ab", b"cd"]] * 2)))}, "frames of dtype |S2"),
    ("bool", lambda _: {"data": _h5(_dataset(np.ones((4, 4), bool)))}, "frames of dtype bool"),
    ("1-D", lambda _: {"data": _h5(_dataset(np.ones(16)))}, "must be (H, W) or (N, H, W)"),
    ("too big", lambda _: {"data": _h5(_dataset(np.ones((64, 64)))), "max_pixels": 1000}, "cap: 1000 pixels"),
    ("external to /etc/passwd", lambda _: {"data": _h5(_external("/etc/passwd"))}, "may not reach other files"),
    (
        "external in bundle to /etc/passwd",
        lambda _: {"data": _zip({"m_master.h5": _h5(_external("/etc/passwd"))})},
        "only relative names",
    ),
    (
        "external in bundle to ../x.h5",
        lambda _: {"data": _zip({"m_master.h5": _h5(_external("../x.h5"))})},
        "outside the payload",
    ),
    (
        "external raw data",
        lambda _: {
            "data": _h5(
                lambda f: f.create_dataset("entry/data/data", (2, 2), "i4", external=[("/etc/hostname", 0, 16)])
            )
        },
        "external raw files",
    ),
    ("virtual source outside", lambda _: {"data": _h5(_vds_outside)}, "sources must sit beside it"),
    ("link loop", lambda _: {"data": _h5(_loop), "path": "/entry/a"}, "link loop"),
    ("zip ../ member", lambda good: {"data": _zip({"../evil_master.h5": good})}, "'..'"),
    ("zip absolute member", lambda good: {"data": _zip({"/tmp/evil_master.h5": good})}, "absolute"),
    (
        "zip symlink member",
        lambda good: {"data": _zip({"a_master.h5": good}, symlink="data_000001.h5")},
        "symbolic link",
    ),
    ("zip bomb", lambda good: {"data": _zip({"a_master.h5": good}), "max_unzipped_bytes": 1000}, "more than"),
    ("not a NeXus file", lambda _: {"data": _h5(lambda f: f.create_dataset("x", data=np.ones((2, 2))))}, "no /entry"),
]


@pytest.mark.parametrize(("case", "make", "reason"), REFUSALS, ids=[c for c, _, _ in REFUSALS])
def test_hostile_or_malformed_payloads_are_refused(
    case: str, make: Callable[[bytes], dict[str, Any]], reason: str, frames: np.ndarray
) -> None:
    item = {"path": None, "frame": 0, **make(nexus_bytes(frames))}
    with pytest.raises(ValueError) as err:
        read_frame(item)
    assert reason in str(err.value), str(err.value)


# -- the adapter ----------------------------------------------------------------------------------


def test_found_through_its_entry_point() -> None:
    assert "beamline" in available_adapters()
    a = load_adapter("beamline", {"size": 32, "patch": 8})
    assert isinstance(a, BeamlineAdapter) and a.input_shape == (16, 64)


def test_conformance(adapter: BeamlineAdapter, sample: Any, frames: np.ndarray) -> None:
    nexus = nexus_bytes(frames, sample.mask, 1e5)
    good = [nexus, eiger_bundle(frames, sample.mask), {"data": nexus, "frame": 1}, sample.frame]
    bad = [
        nexus[: len(nexus) // 2],
        np.random.default_rng(1).bytes(2048),
        {"data": nexus, "path": "/entry/missing"},
        _h5(_dataset(np.ones((8, 8), complex))),
        _h5(_external("/etc/passwd")),
        _zip({"m_master.h5": _h5(_external("../x.h5"))}),
        _zip({"../evil_master.h5": nexus}),
        "/etc/hostname",
        {"data": nexus, "frame": 5},
    ]
    check_adapter(adapter, good=good, bad=bad, hidden_size=128)


def test_one_sandboxed_parse_per_batch_and_reasons(
    adapter: BeamlineAdapter, frames: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = adapter_module.run_capped

    def counted(fn: Any, items: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(len(items))
        return real(fn, items, *args, **kwargs)

    monkeypatch.setattr(adapter_module, "run_capped", counted)
    nexus = nexus_bytes(frames)
    items = ["/etc/hostname", nexus, {"data": nexus, "frame": 9}, 42, np.ones((4, 4), complex), frames[0]]
    out = adapter.prepare(items)
    assert calls == [2]  # the two byte items, in one capped call; the rest never reach a parser
    reasons = {o.item: o.reason for o in out if isinstance(o, ItemError)}
    assert set(reasons) == {0, 2, 3, 4}
    assert "never opened" in reasons[0] and "out of range" in reasons[2] and "int" in reasons[3]
    assert out[1].shape == adapter.input_shape and out[1].dtype == np.float32  # type: ignore[union-attr]
    np.testing.assert_array_equal(out[1], out[5])  # bytes and the decoded array agree


def test_encoder_shapes(adapter: BeamlineAdapter) -> None:
    assert adapter.input_shape == (16, 256) and adapter.encoder_dim == 128
    x = torch.zeros(3, *adapter.input_shape)
    assert adapter.build_encoder()(x).shape == (3, 16, 128)
    assert adapter.soft_tokens(x.numpy()).shape == (3, 16, 128)


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="multiple of patch"):
        BeamlineSettings(size=60, patch=16)


# -- frames ---------------------------------------------------------------------------------------


def test_bad_pixels_are_zeroed_and_peaks_kept(sample: Any) -> None:
    frame = _expected(sample.frame)
    frame[3, 3] = 2e5  # over saturation, but not isolated by itself: caught by the saturation rule
    bad = bad_pixels(frame, sample.mask, saturation=1e5)
    out = clean(frame, sample.mask, saturation=1e5)
    hy, hx = sample.hot.T
    assert bad[hy, hx].all() and (out[hy, hx] == 0).all()  # hot pixels found without any mask
    hot_only = bad_pixels(np.nan_to_num(frame), None, None)
    assert hot_only[hy, hx].all()
    dy, dx = sample.dead.T
    assert bad[dy, dx].all()
    assert (out[sample.mask] == 0).all() and out[3, 3] == 0 and np.isfinite(out).all()
    py, px = np.round(sample.peaks).astype(int).T
    assert not bad[py, px].any()  # a Bragg peak spreads over its neighbours: never "hot"
    assert out[py, px].min() > 0
    assert bad.sum() <= sample.mask.sum() + len(sample.hot) + 1  # nothing else is thrown away


def test_patches_shapes_and_determinism(sample: Any) -> None:
    image = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    patches = patchify(image, 16)
    assert patches.shape == (16, 256)
    np.testing.assert_array_equal(patches[1], image[:16, 16:32].ravel())  # row-major patches
    a = prepare_frame(_expected(sample.frame), sample.mask, 1e5)
    b = prepare_frame(_expected(sample.frame), sample.mask, 1e5)
    assert a.shape == (16, 256) and a.dtype == np.float32 and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert prepare_frame(np.ones((100, 37)), size=32, patch=8).shape == (16, 64)  # any H, W


def test_classical_peak_count_is_close_to_truth() -> None:
    frames, truth = make_dataset(30, seed=0, size=256)
    found = np.array([count_peaks(f) for f in frames])
    mae = float(np.abs(found - truth).mean())
    print(f"count_peaks MAE on 30 synthetic frames: {mae:.3f}")
    assert mae <= 0.5
    with_gaps = [simulate(np.random.default_rng(s), 10, 256, beamstop=True, gaps=True) for s in range(5)]
    assert [count_peaks(_expected(s.frame), s.mask) for s in with_gaps] == [10] * 5


def test_a_thin_long_frame_is_cheap_and_an_over_long_one_refused() -> None:
    import tracemalloc

    from tpmflow_beamline.frames import MAX_SIDE, prepare_frame

    thin = np.ones((4, MAX_SIDE), np.float32)
    tracemalloc.start()
    assert prepare_frame(thin).shape == (16, 256)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # the padding square would be MAX_SIDE² floats; memory, not time, says it was never built
    assert peak < MAX_SIDE * MAX_SIDE * 4 / 16, f"{peak / 2**20:.0f} MiB: the padding square was built"
    with pytest.raises(ValueError, match="exceeds the limit"):
        prepare_frame(np.ones((2, MAX_SIDE + 1), np.float32))
