"""Read one detector frame from NeXus/HDF5 payload bytes, never from a path the request names.

``read_frame`` runs inside ``tpmflow.adapters.sandbox.run_capped`` (a child process with time and
memory caps) because the payload is hostile. Parsing bugs are the sandbox's business; this module
guards what a well-formed file can still do: HDF5 follows external links, virtual-dataset sources
and external raw-data files to any file the server can read (``/etc/passwd``, ``../secrets.h5``).
So no path is ever handed to HDF5 whole: every link is resolved here, one component at a time, and
may only reach a file of the payload itself. A single file may reach no other file; a zip bundle
(Eiger style: a master file plus the data files its external links name) may reach its own
members, extracted to a private temporary folder that is deleted afterwards.
"""

from __future__ import annotations

import io
import math
import operator
import os
import shutil
import stat
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
ZIP_SIGNATURE = b"PK\x03\x04"
MAX_FRAME_PIXELS = 4096 * 4096
MAX_UNZIPPED_BYTES = 1 << 30
MAX_ZIP_MEMBERS = 256
MAX_LINK_HOPS = 32  # soft and external links followed per payload: stops loops
MASK_PATH = "/entry/instrument/detector/pixel_mask"
SATURATION_PATH = "/entry/instrument/detector/saturation_value"
HDF5_SUFFIXES = frozenset({".h5", ".hdf5", ".hdf", ".nxs", ".nx5", ".nx"})


class _Missing(Exception):
    """A path component that does not exist (turned into a ValueError naming the whole path)."""


def read_frame(item: dict[str, Any]) -> dict[str, Any]:
    """One frame of ``item["data"]`` (HDF5 file bytes or a zip bundle's bytes).

    ``item``: ``{"data": bytes, "path": str | None, "frame": int}``, optionally ``max_pixels`` and
    ``max_unzipped_bytes``. Returns ``{"frame": float32 [H, W], "mask": bool [H, W] (True = bad
    pixel) or None, "saturation": float or None}``. Integer pixels at their dtype's maximum (the
    Eiger marker for gaps and defective pixels) come back as NaN. Every refusal is a ValueError.
    """
    data = item.get("data")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"data must be bytes, not {type(data).__name__}")
    data = bytes(data)
    path = item.get("path")
    if path is not None and (not isinstance(path, str) or not path.strip("/")):
        raise ValueError(f"path must be a dataset path inside the file, got {path!r}")
    try:
        frame = operator.index(item.get("frame", 0))
    except TypeError:
        raise ValueError(f"frame must be an integer, got {item.get('frame')!r}") from None
    max_pixels = int(item.get("max_pixels", MAX_FRAME_PIXELS))
    max_unzipped = int(item.get("max_unzipped_bytes", MAX_UNZIPPED_BYTES))
    _use_filter_plugins()
    try:
        if data.startswith(ZIP_SIGNATURE):
            with _unzipped(data, max_unzipped) as root, _Payload(root, max_pixels) as payload:
                master = payload.open(_find_master(root))
                return _read(payload, master, path, frame, max_pixels)
        if not _has_hdf5_signature(data):
            raise ValueError("not an HDF5 file or a zip bundle (neither signature found)")
        with _Payload(None, max_pixels) as payload:
            return _read(payload, payload.open_bytes(data), path, frame, max_pixels)
    # What h5py and zipfile raise on corrupt bytes (found by tests/test_fuzz_parsers.py): OverflowError when a
    # crafted offset is read through the in-memory file, zlib.error and EOFError from damaged zip members.
    except (OSError, RuntimeError, KeyError, TypeError, OverflowError, EOFError, zlib.error, zipfile.BadZipFile) as exc:
        raise ValueError(f"unreadable HDF5 payload ({type(exc).__name__}: {exc})") from exc


def _use_filter_plugins() -> None:
    """Register bitshuffle/LZ4 and friends (what Eiger files use) when hdf5plugin is installed."""
    try:
        import hdf5plugin  # noqa: F401
    except ImportError:
        pass


def _has_hdf5_signature(data: bytes) -> bool:
    """HDF5's signature sits at 0 or, after a user block, at 512, 1024, 2048, ..."""
    offset = 0
    while offset + len(HDF5_SIGNATURE) <= len(data):
        if data[offset : offset + len(HDF5_SIGNATURE)] == HDF5_SIGNATURE:
            return True
        offset = 512 if offset == 0 else offset * 2
    return False


# -- zip bundles ----------------------------------------------------------------------------------


def _check_member(info: zipfile.ZipInfo) -> str:
    """The member's safe relative name, or a ValueError: no absolute paths, ``..``, or links."""
    name = info.filename
    parts = name.rstrip("/").split("/")
    if (
        not name
        or name.startswith("/")
        or "\\" in name
        or "\x00" in name
        or ":" in parts[0]
        or any(p in ("", ".", "..") for p in parts)
    ):
        raise ValueError(f"zip member name {name!r} is refused (absolute, '..' or empty components)")
    if stat.S_ISLNK(info.external_attr >> 16):
        raise ValueError(f"zip member {name!r} is a symbolic link")
    return "/".join(parts)


@contextmanager
def _unzipped(data: bytes, max_bytes: int) -> Iterator[Path]:
    """The bundle extracted to a private temporary folder, removed on exit whatever happens."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ValueError(f"not a readable zip bundle: {exc}") from exc
    root = Path(tempfile.mkdtemp(prefix="tpmflow-beamline-")).resolve()
    try:
        with archive:
            infos = archive.infolist()
            if len(infos) > MAX_ZIP_MEMBERS:
                raise ValueError(f"zip bundle has {len(infos)} members, over the cap of {MAX_ZIP_MEMBERS}")
            if sum(i.file_size for i in infos) > max_bytes:
                raise ValueError(f"zip bundle unpacks to more than {max_bytes >> 20} MiB")
            names = [_check_member(i) for i in infos]
            if len(set(names)) != len(names):
                raise ValueError("zip bundle has duplicate member names")
            total = 0
            for info, name in zip(infos, names, strict=True):
                target = root / name
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with archive.open(info) as src, open(target, "xb") as dst:
                        while chunk := src.read(1 << 20):
                            total += len(chunk)  # counted, not trusted from the header
                            if total > max_bytes:
                                raise ValueError(f"zip bundle unpacks to more than {max_bytes >> 20} MiB")
                            dst.write(chunk)
                except (zipfile.BadZipFile, NotImplementedError, RuntimeError, OSError, EOFError, zlib.error) as exc:
                    raise ValueError(f"zip member {name!r} cannot be extracted: {exc}") from exc
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _find_master(root: Path) -> Path:
    """The bundle's master file: the one named ``*master*``, else the one ``.nxs``, else the one
    HDF5 file with an ``/entry`` group that no other file's name suggests is a data file."""
    import h5py

    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in HDF5_SUFFIXES)
    if not files:
        raise ValueError("zip bundle holds no HDF5/NeXus file (.h5, .nxs, ...)")
    for pick in (
        [p for p in files if "master" in p.name.lower()],
        [p for p in files if p.suffix.lower() == ".nxs"],
    ):
        if len(pick) == 1:
            return pick[0]
    with_entry = []
    for p in files:
        try:
            with h5py.File(p, "r", locking=False) as f:
                if f.id.links.exists(b"entry"):
                    with_entry.append(p)
        except OSError:
            continue
    undecided = [p for p in with_entry if not p.stem.lower().rsplit("_", 1)[-1].isdigit()] or with_entry
    if len(undecided) != 1:
        names = ", ".join(str(p.relative_to(root)) for p in files)
        raise ValueError(f"cannot tell the master file among: {names} (name it *master*)")
    return undecided[0]


# -- link-safe resolution -------------------------------------------------------------------------


class _Payload:
    """The HDF5 files of one payload, opened on demand; links are resolved by hand so that none
    leaves the payload (``root`` is the bundle's folder, or None for a single in-memory file)."""

    def __init__(self, root: Path | None, max_chunk_values: int = MAX_FRAME_PIXELS) -> None:
        self.root = root
        self.max_chunk_values = max_chunk_values
        self.files: dict[Path, Any] = {}
        self.hops = 0

    def __enter__(self) -> _Payload:
        return self

    def __exit__(self, *_: object) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()

    def open_bytes(self, data: bytes) -> Any:
        import h5py

        f = h5py.File(io.BytesIO(data), "r")
        self.files[Path(f"<bytes {len(self.files)}>")] = f
        return f

    def open(self, path: Path) -> Any:
        import h5py

        if path not in self.files:
            self.files[path] = h5py.File(path, "r", locking=False)
        return self.files[path]

    def linked_file(self, container: Any, filename: str, what: str) -> Any:
        """The payload file that ``filename`` (named inside ``container``) means, or a refusal."""
        if self.root is None:
            raise ValueError(
                f"{what} to {filename!r} refused: a single HDF5 file may not reach other files "
                "(send the master and its data files as one zip bundle)"
            )
        if not filename or os.path.isabs(filename) or "%" in filename or "\\" in filename:
            raise ValueError(f"{what} to {filename!r} refused: only relative names inside the bundle")
        target = (Path(container.filename).parent / filename).resolve()
        if not target.is_relative_to(self.root) or not target.is_file():
            raise ValueError(f"{what} to {filename!r} points outside the payload")
        return self.open(target)

    def resolve(self, path: str, where: Any, hard_only: bool = False) -> Any:
        """The object at ``path`` (absolute, or relative to group ``where``), each component's link
        inspected with ``getlink``-style calls before it is followed."""
        import h5py

        node = where.file["/"] if path.startswith("/") else where
        parts = [p for p in path.split("/") if p not in ("", ".")]
        for k, name in enumerate(parts):
            if not isinstance(node, h5py.Group):
                raise ValueError(f"{'/'.join(parts[:k])!r} is not a group")
            if name == "..":
                raise ValueError(f"'..' in dataset path {path!r}")
            key = name.encode()
            if not node.id.links.exists(key):
                raise _Missing(path)
            kind = node.id.links.get_info(key).type
            if kind == h5py.h5l.TYPE_HARD:
                node = node[name]
                continue
            if hard_only:
                raise ValueError(f"link {name!r} in a virtual-dataset source path is refused (hard links only)")
            self.hops += 1
            if self.hops > MAX_LINK_HOPS:
                raise ValueError(f"more than {MAX_LINK_HOPS} links followed (a link loop?)")
            if kind == h5py.h5l.TYPE_SOFT:
                node = self.resolve(node.id.links.get_val(key).decode(errors="replace"), node)
            elif kind == h5py.h5l.TYPE_EXTERNAL:
                filename, inner = node.id.links.get_val(key)
                target = self.linked_file(node.file, filename.decode(errors="replace"), "external link")
                node = self.resolve("/" + inner.decode(errors="replace").lstrip("/"), target["/"])
            else:
                raise ValueError(f"link {name!r} has a user-defined link type, which is refused")
        return node

    def dataset(self, path: str, where: Any, what: str) -> Any:
        """A dataset whose data stay inside the payload: no external raw files, and virtual
        sources only in this file or a bundle file beside it, reached through hard links."""
        import h5py

        try:
            dset = self.resolve(path, where)
        except _Missing:
            raise ValueError(f"no {what} at {path!r}") from None
        if not isinstance(dset, h5py.Dataset):
            raise ValueError(f"{what} {path!r} is a {type(dset).__name__.lower()}, not a dataset")
        self._check_storage(dset, what, nested=False)
        return dset

    def _check_storage(self, dset: Any, what: str, nested: bool) -> None:
        import h5py

        if dset.external:
            raise ValueError(f"{what} keeps its data in external raw files, which are refused")
        # HDF5 decompresses a whole chunk to read any part of it, and a resizable dataset's chunk may be
        # far larger than the data: a 4x4 frame in one 256 MiB chunk of zeros is a 260 KiB file.
        if dset.chunks is not None and math.prod(dset.chunks) > self.max_chunk_values:
            raise ValueError(
                f"{what} is stored in chunks of {dset.chunks} values, over the cap of {self.max_chunk_values} "
                "(one frame's pixels)"
            )
        if not dset.is_virtual:
            return
        if nested:
            raise ValueError("virtual datasets built from virtual datasets are refused")
        for source in dset.virtual_sources():
            if source.file_name == ".":
                container = dset.file
            elif "/" in source.file_name:
                raise ValueError(f"virtual-dataset source {source.file_name!r} refused: sources must sit beside it")
            else:
                container = self.linked_file(dset.file, source.file_name, "virtual-dataset source")
            try:
                src = self.resolve("/" + source.dset_name.lstrip("/"), container["/"], hard_only=True)
            except _Missing:
                raise ValueError(f"virtual-dataset source {source.dset_name!r} is missing") from None
            if not isinstance(src, h5py.Dataset):
                raise ValueError(f"virtual-dataset source {source.dset_name!r} is not a dataset")
            self._check_storage(src, "a virtual-dataset source", nested=True)


# -- the frame ------------------------------------------------------------------------------------


def _attr_str(obj: Any, name: str) -> str | None:
    value = obj.attrs.get(name)
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    return value if isinstance(value, str) and value else None


def default_path(payload: _Payload, f: Any) -> str:
    """NeXus's default frame: ``/entry`` (or the root's ``default``), its NXdata group (the entry's
    ``default``, else ``data``, else the first NXdata child), that group's ``signal`` dataset, else
    its ``data``, else its first ``data_*`` link (Eiger masters)."""
    import h5py

    entry_name = _attr_str(f, "default") or "entry"
    try:
        entry = payload.resolve("/" + entry_name, f["/"])
    except _Missing:
        raise ValueError(f"no /{entry_name} group: not a NeXus file (name the dataset with 'path')") from None
    if not isinstance(entry, h5py.Group):
        raise ValueError(f"/{entry_name} is not a group")
    names = [n for n in (_attr_str(entry, "default"), "data") if n]
    names += [n for n in sorted(entry.keys()) if n not in names]
    for name in names:
        try:
            group = payload.resolve(name, entry)
        except _Missing:
            continue
        if not isinstance(group, h5py.Group):
            continue
        if name not in ("data", _attr_str(entry, "default")) and _attr_str(group, "NX_class") != "NXdata":
            continue
        base = f"/{entry_name}/{name}"
        signal = _attr_str(group, "signal")
        if signal:
            return f"{base}/{signal}"
        if group.id.links.exists(b"data"):
            return f"{base}/data"
        data_links = sorted(n for n in group.keys() if n.startswith("data_"))
        if data_links:
            return f"{base}/{data_links[0]}"
    raise ValueError(f"/{entry_name} has no NXdata group with a signal dataset (name the dataset with 'path')")


def _read(payload: _Payload, f: Any, path: str | None, frame: int, max_pixels: int) -> dict[str, Any]:
    path = path or default_path(payload, f)
    dset = payload.dataset(path, f["/"], "frame dataset")
    if dset.ndim not in (2, 3):
        raise ValueError(f"dataset {path!r} has shape {dset.shape}: frames must be (H, W) or (N, H, W)")
    kind = dset.dtype.kind
    if kind not in "iuf":
        raise ValueError(f"frames of dtype {dset.dtype} are not supported (integer or float counts only)")
    n = 1 if dset.ndim == 2 else dset.shape[0]
    if not 0 <= frame < n:
        raise ValueError(f"frame {frame} out of range: {path!r} holds {n} frame(s)")
    h, w = dset.shape[-2:]
    if h < 1 or w < 1 or h * w > max_pixels:
        raise ValueError(f"frames of {h}x{w} pixels are refused (cap: {max_pixels} pixels)")
    with _vds_prefix(dset.file):  # every read, the mask's too, resolves sources inside the payload only
        raw = dset[frame] if dset.ndim == 3 else dset[()]  # one frame: a chunk-wise, lazy read
        mask, saturation = _mask(payload, f, (h, w)), _saturation(payload, f)
    pixels = raw.astype(np.float32)
    if kind in "iu":
        pixels[raw == np.iinfo(raw.dtype).max] = np.nan  # Eiger's "no value" marker
    return {"frame": pixels, "mask": mask, "saturation": saturation}


@contextmanager
def _vds_prefix(container: Any) -> Iterator[None]:
    """Point HDF5's own lookup of virtual-dataset sources at the folder just checked (the env
    variable is consulted first); restored after, as tests call this in-process."""
    folder = os.path.dirname(container.filename) if os.path.isfile(container.filename) else None
    old = {k: os.environ.get(k) for k in ("HDF5_VDS_PREFIX", "HDF5_EXT_PREFIX")}
    try:
        for k in old:
            if folder:
                os.environ[k] = folder
            else:
                os.environ.pop(k, None)
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _mask(payload: _Payload, f: Any, shape: tuple[int, int]) -> np.ndarray | None:
    try:
        payload.resolve(MASK_PATH, f["/"])
    except _Missing:
        return None
    dset = payload.dataset(MASK_PATH, f["/"], "pixel mask")
    if dset.shape != shape:
        raise ValueError(f"pixel_mask has shape {dset.shape}, frames are {shape}")
    if dset.dtype.kind not in "biu":
        raise ValueError(f"pixel_mask of dtype {dset.dtype} (integer or bool expected)")
    return np.asarray(dset[()]) != 0


def _saturation(payload: _Payload, f: Any) -> float | None:
    try:
        payload.resolve(SATURATION_PATH, f["/"])
    except _Missing:
        return None
    dset = payload.dataset(SATURATION_PATH, f["/"], "saturation value")
    if dset.size != 1 or dset.dtype.kind not in "iuf":
        raise ValueError(f"saturation_value must be one number, got {dset.dtype} of shape {dset.shape}")
    value = float(np.asarray(dset[()]).reshape(()))
    return value if np.isfinite(value) else None
