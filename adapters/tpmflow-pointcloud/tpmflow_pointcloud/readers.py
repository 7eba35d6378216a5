"""Point-cloud file bytes to float32 arrays: ``.npy``, ``.xyz`` text, ``.ply`` and ``.pcd``.

Readers take bytes, never paths: a replica must not open files named by a client. The format is
sniffed from the content, since file names are not sent. Everything malformed (truncated data,
counts that disagree with the header, unknown types, too many points) raises ``ValueError`` with
the reason. ``parse_cloud_bytes`` runs inside ``tpmflow.adapters.sandbox.run_capped`` (through
``geometry.sample_file``), so hangs and memory blow-ups are the sandbox's to stop; only numpy is
imported here, to keep those processes light.

The result is ``(N, 3)`` (x, y, z) or ``(N, 6)`` (x, y, z and colour, or normals when there is no
colour); columns beyond x, y, z are carried but the encoder ignores them.
"""

from __future__ import annotations

import io
import warnings

import numpy as np

MAX_POINTS = 50_000_000  # refuse before allocating: ~1.2 GB of float32 at 6 columns
HEADER_LIMIT = 64 << 10  # PLY / PCD headers are a few hundred bytes; a huge one is hostile

_PLY_TYPES = {
    "char": "i1",
    "int8": "i1",
    "uchar": "u1",
    "uint8": "u1",
    "short": "i2",
    "int16": "i2",
    "ushort": "u2",
    "uint16": "u2",
    "int": "i4",
    "int32": "i4",
    "uint": "u4",
    "uint32": "u4",
    "float": "f4",
    "float32": "f4",
    "double": "f8",
    "float64": "f8",
}
_PLY_FORMATS = {"ascii": None, "binary_little_endian": "<", "binary_big_endian": ">"}
_COLOUR = ("red", "green", "blue")
_PLY_NORMALS = ("nx", "ny", "nz")
_PCD_NORMALS = ("normal_x", "normal_y", "normal_z")


def sniff_format(data: bytes) -> str:
    """``"npy"``, ``"ply"``, ``"pcd"`` or ``"xyz"`` (the fallback: whitespace-separated text)."""
    if data.startswith(b"\x93NUMPY"):
        return "npy"
    if data.startswith((b"ply\n", b"ply\r\n")):
        return "ply"
    first = data.lstrip()[:64]
    if first.startswith((b"VERSION", b"FIELDS")) or (first.startswith(b"#") and b".PCD" in first.split(b"\n")[0]):
        return "pcd"
    return "xyz"


def parse_cloud_bytes(data: bytes) -> np.ndarray:
    """A point-cloud file's bytes to a float32 ``(N, 3)`` or ``(N, 6)`` array, or ``ValueError``."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ValueError(f"expected file bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data.strip():
        raise ValueError("empty file: no points")
    fmt = sniff_format(data)
    reader = {"npy": read_npy, "ply": read_ply, "pcd": read_pcd, "xyz": read_xyz}[fmt]
    return reader(data)


# -- .npy -------------------------------------------------------------------------------------------


def read_npy(data: bytes) -> np.ndarray:
    """A ``.npy`` array of shape (N, 3) or (N, 6); the header is checked before anything is allocated."""
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"unsupported .npy version {version[0]}.{version[1]}")
    except Exception as exc:  # noqa: BLE001 - numpy's header parser also raises TokenError, TypeError, SyntaxError
        raise ValueError(f"bad .npy header: {type(exc).__name__}: {exc}") from None
    if dtype.kind not in "iuf":
        raise ValueError(f".npy dtype must be real numbers, got {dtype}")
    _check_shape(tuple(shape), ".npy")
    need = int(np.prod(shape)) * dtype.itemsize
    have = len(data) - stream.tell()
    if have < need:
        raise ValueError(f"truncated .npy: the header's shape {tuple(shape)} needs {need} bytes, the data has {have}")
    if have > need:
        raise ValueError(f".npy has {have - need} bytes beyond the array its header describes")
    array = np.load(io.BytesIO(data), allow_pickle=False)
    return np.ascontiguousarray(array, dtype=np.float32)


def _check_shape(shape: tuple[int, ...], what: str) -> None:
    if len(shape) != 2 or shape[1] not in (3, 6):
        raise ValueError(f"{what}: expected shape (N, 3) or (N, 6), got {shape}")
    _check_count(shape[0], what)


def _check_count(n: int, what: str) -> None:
    if n > MAX_POINTS:
        raise ValueError(f"{what}: {n} points exceeds the limit of {MAX_POINTS}")


# -- .xyz text ----------------------------------------------------------------------------------------


def read_xyz(data: bytes) -> np.ndarray:
    """Whitespace-separated text, one point per line, 3 or 6 columns; ``#`` starts a comment."""
    if data.count(b"\n") > MAX_POINTS + 1000:  # a few header/comment lines are fine
        raise ValueError(f"xyz text: more lines than the limit of {MAX_POINTS} points")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("not a known point-cloud format (npy, ply, pcd) and not xyz text either") from None
    array = _loadtxt(text, "xyz text")
    if array.shape[1] not in (3, 6):
        raise ValueError(f"xyz text: expected 3 or 6 columns per line, got {array.shape[1]}")
    return np.ascontiguousarray(array, dtype=np.float32)


def _loadtxt(text: str, what: str, skiprows: int = 0, max_rows: int | None = None) -> np.ndarray:
    """Numbers in whitespace-separated rows, ``(rows, columns)`` float64; ragged rows are an error."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "input contained no data": reported below as empty
            array = np.loadtxt(
                io.StringIO(text), dtype=np.float64, ndmin=2, comments="#", skiprows=skiprows, max_rows=max_rows
            )
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from None
    if array.size == 0:
        raise ValueError(f"{what}: no points")
    return array


# -- .ply -----------------------------------------------------------------------------------------


def _split_header(data: bytes, end_marker: bytes, what: str) -> tuple[list[str], int]:
    """Header lines and the offset where the body starts (after the end marker's line)."""
    at = data.find(end_marker, 0, HEADER_LIMIT)
    if at < 0:
        line = end_marker.decode().strip()
        raise ValueError(f"{what}: no {line} line in the first {HEADER_LIMIT >> 10} KiB")
    newline = data.find(b"\n", at + len(end_marker))
    body = len(data) if newline < 0 else newline + 1
    try:
        header = data[:body].decode("ascii")
    except UnicodeDecodeError:
        raise ValueError(f"{what}: the header is not ASCII text") from None
    return header.splitlines(), body


def read_ply(data: bytes) -> np.ndarray:
    """ASCII or binary PLY; the ``vertex`` element's x, y, z and colour (or normals) if present."""
    lines, body = _split_header(data, b"end_header", "PLY")
    fmt: str | None = None
    elements: list[tuple[str, int, list[tuple[str, str | None]]]] = []  # name, count, (prop, dtype|None=list)
    for line in lines[1:]:
        parts = line.split()
        if not parts or parts[0] in ("comment", "obj_info", "end_header"):
            continue
        if parts[0] == "format" and len(parts) == 3:
            if parts[1] not in _PLY_FORMATS:
                raise ValueError(f"PLY: unknown format {parts[1]!r}")
            fmt = parts[1]
        elif parts[0] == "element" and len(parts) == 3:
            count = _int(parts[2], f"PLY: element {parts[1]!r} count")
            elements.append((parts[1], count, []))
        elif parts[0] == "property" and elements:
            if len(parts) == 5 and parts[1] == "list":
                elements[-1][2].append((parts[4], None))
            elif len(parts) == 3 and parts[1] in _PLY_TYPES:
                elements[-1][2].append((parts[2], _PLY_TYPES[parts[1]]))
            else:
                raise ValueError(f"PLY: bad property line {line!r}")
        else:
            raise ValueError(f"PLY: unexpected header line {line!r}")
    if fmt is None:
        raise ValueError("PLY: no format line")
    names = [e[0] for e in elements]
    if "vertex" not in names:
        raise ValueError("PLY: no vertex element")
    at = names.index("vertex")
    _, count, props = elements[at]
    _check_count(count, "PLY")
    if any(t is None for _, t in props):
        raise ValueError("PLY: list-valued vertex properties are not supported")
    if count == 0:
        raise ValueError("PLY: the vertex element has no points")
    prop_names = [p for p, _ in props]
    if len(set(prop_names)) != len(prop_names):
        raise ValueError("PLY: repeated vertex property names")
    _require_xyz(prop_names)
    extra = _COLOUR if _has(prop_names, _COLOUR) else _PLY_NORMALS if _has(prop_names, _PLY_NORMALS) else ()

    if fmt == "ascii":
        try:
            text = data[body:].decode("ascii")
        except UnicodeDecodeError:
            raise ValueError("PLY: the ascii body is not ASCII text") from None
        skip = sum(c for _, c, _ in elements[:at])
        available = text.count("\n") + 1
        if skip > available:  # also keeps a huge count (up to 2**64 and more) out of numpy's C long
            raise ValueError(
                f"truncated PLY: the elements before the vertices take {skip} lines, the data has {available}"
            )
        last = at == len(elements) - 1  # then one row more than stated is the header lying
        rows = _loadtxt(text, "PLY", skiprows=skip, max_rows=count + 1 if last else count)
        if rows.shape[0] < count:
            raise ValueError(f"truncated PLY: the header says {count} vertices, the data has {rows.shape[0]}")
        if rows.shape[0] > count:
            raise ValueError(f"PLY: the data holds more than the {count} vertices its header states")
        if rows.shape[1] != len(props):
            raise ValueError(f"PLY: vertex rows have {rows.shape[1]} values, the header lists {len(props)} properties")
        columns = [rows[:, prop_names.index(p)] for p in ("x", "y", "z", *extra)]
        return np.ascontiguousarray(np.stack(columns, axis=1), dtype=np.float32)

    order = _PLY_FORMATS[fmt]
    offset = body
    for name, n, element_props in elements[:at]:
        if any(t is None for _, t in element_props):
            raise ValueError(f"PLY: cannot skip list-valued element {name!r} placed before the vertices")
        offset += n * np.dtype([(p, f"{order}{t}") for p, t in element_props]).itemsize
    record = np.dtype([(p, f"{order}{t}") for p, t in props])
    need = count * record.itemsize
    have = len(data) - offset
    if have < need:
        raise ValueError(f"truncated PLY: the header says {count} vertices ({need} bytes), the data has {max(have, 0)}")
    if at == len(elements) - 1 and have - need >= record.itemsize:
        raise ValueError(f"PLY: the data holds more than the {count} vertices its header states")
    vertices = np.frombuffer(data, dtype=record, count=count, offset=offset)
    return _stack_fields(vertices, ("x", "y", "z", *extra))


def _require_xyz(names: list[str]) -> None:
    missing = [c for c in ("x", "y", "z") if c not in names]
    if missing:
        raise ValueError(f"no {'/'.join(missing)} coordinate field (fields: {' '.join(names)})")


def _has(names: list[str], wanted: tuple[str, ...]) -> bool:
    return all(c in names for c in wanted)


def _stack_fields(records: np.ndarray, fields: tuple[str, ...]) -> np.ndarray:
    out = np.empty((len(records), len(fields)), dtype=np.float32)
    for j, name in enumerate(fields):
        out[:, j] = records[name]
    return out


def _int(text: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{what} is not an integer: {text!r}") from None
    if value < 0:
        raise ValueError(f"{what} is negative: {value}")
    return value


# -- .pcd -----------------------------------------------------------------------------------------


def read_pcd(data: bytes) -> np.ndarray:
    """PCL's PCD (v0.5-0.7), ``DATA ascii`` or ``binary``; x, y, z plus ``rgb`` or normals if present.

    ``binary_compressed`` (LZF) is refused: decompressing needs a codec numpy does not have.
    """
    lines, body = _split_header(data, b"\nDATA", "PCD")
    header: dict[str, list[str]] = {}
    for line in lines:
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        key = parts[0].upper()
        if key in header:
            raise ValueError(f"PCD: repeated header line {key}")
        header[key] = parts[1:]
    for key in ("FIELDS", "SIZE", "TYPE", "DATA"):
        if key not in header:
            raise ValueError(f"PCD: no {key} line in the header")
    fields = header["FIELDS"]
    sizes = [_int(s, "PCD: SIZE") for s in header["SIZE"]]
    types = [t.upper() for t in header["TYPE"]]
    counts = [_int(c, "PCD: COUNT") for c in header.get("COUNT", ["1"] * len(fields))]
    if not len(fields) == len(sizes) == len(types) == len(counts):
        raise ValueError(
            f"PCD: FIELDS/SIZE/TYPE/COUNT disagree ({len(fields)}/{len(sizes)}/{len(types)}/{len(counts)} entries)"
        )
    width = _int(_one(header, "WIDTH", "0"), "PCD: WIDTH")
    height = _int(_one(header, "HEIGHT", "1"), "PCD: HEIGHT")
    points = _int(_one(header, "POINTS", ""), "PCD: POINTS") if "POINTS" in header else width * height
    if "WIDTH" in header and width * height != points:
        raise ValueError(f"PCD: WIDTH x HEIGHT = {width * height} but POINTS = {points}")
    _check_count(points, "PCD")
    if points == 0:
        raise ValueError("PCD: POINTS is 0, no points")
    mode = header["DATA"][0].lower() if header["DATA"] else ""

    columns: list[tuple[str, str, tuple[int, ...]]] = []
    for i, (name, size, kind, count) in enumerate(zip(fields, sizes, types, counts, strict=True)):
        if kind not in ("F", "I", "U") or (kind == "F" and size not in (4, 8)) or size not in (1, 2, 4, 8):
            raise ValueError(f"PCD: field {name!r} has an unsupported TYPE/SIZE {kind}{size}")
        code = {"F": "f", "I": "i", "U": "u"}[kind]
        unique = name if name != "_" else f"_pad{i}"  # PCL pads with fields all named "_"
        columns.append((unique, f"<{code}{size}", (count,) if count != 1 else ()))
    names = [c[0] for c in columns]
    if len(set(names)) != len(names):
        raise ValueError("PCD: repeated field names")
    _require_xyz(names)
    colour = next((c for c in ("rgb", "rgba") if c in names), None)  # one packed field, unpacked below
    extra = _PCD_NORMALS if not colour and _has(names, _PCD_NORMALS) else ()
    for name in ("x", "y", "z", *extra, *([colour] if colour else [])):
        if counts[names.index(name)] != 1:
            raise ValueError(f"PCD: field {name!r} must have COUNT 1")
    record = np.dtype([(n, t, s) for n, t, s in columns])

    if mode == "ascii":
        try:
            text = data[body:].decode("ascii")
        except UnicodeDecodeError:
            raise ValueError("PCD: the ascii data is not ASCII text") from None
        rows = _loadtxt(text, "PCD")
        if rows.shape[0] != points:
            raise ValueError(f"PCD: the header says POINTS {points}, the data has {rows.shape[0]} rows")
        if rows.shape[1] != sum(counts):
            raise ValueError(f"PCD: rows have {rows.shape[1]} values, FIELDS/COUNT describe {sum(counts)}")
        starts = np.cumsum([0, *counts])
        cloud = np.stack([rows[:, starts[names.index(n)]] for n in ("x", "y", "z", *extra)], axis=1)
        cloud = cloud.astype(np.float32)
        if colour:
            packed = rows[:, starts[names.index(colour)]]
            as_bits = (
                packed.astype(np.float32).view(np.uint32)
                if types[names.index(colour)] == "F"
                else packed.astype(np.uint32)
            )
            cloud = np.concatenate([cloud, _unpack_rgb(as_bits)], axis=1)
        return np.ascontiguousarray(cloud)
    if mode == "binary":
        need = points * record.itemsize
        have = len(data) - body
        if have < need:
            raise ValueError(f"truncated PCD: the header says POINTS {points} ({need} bytes), the data has {have}")
        if have - need >= record.itemsize:
            raise ValueError(f"PCD: the data holds more than the POINTS {points} its header states")
        records = np.frombuffer(data, dtype=record, count=points, offset=body)
        cloud = _stack_fields(records, ("x", "y", "z", *extra))
        if colour:
            bits = records[colour]
            bits = (
                bits.view(np.uint32) if bits.dtype.kind == "f" and bits.dtype.itemsize == 4 else bits.astype(np.uint32)
            )
            cloud = np.concatenate([cloud, _unpack_rgb(bits)], axis=1)
        return cloud
    if mode == "binary_compressed":
        raise ValueError("PCD: DATA binary_compressed (LZF) is not supported; save the cloud as binary or ascii")
    raise ValueError(f"PCD: unknown DATA mode {mode!r}")


def _one(header: dict[str, list[str]], key: str, default: str) -> str:
    """The single value of a header line (``default`` when the line is absent); a bare ``POINTS``
    line or one with several values is malformed, not an index error."""
    values = header.get(key, [default])
    if len(values) != 1:
        raise ValueError(f"PCD: {key} takes one value, the header gives {len(values)}")
    return values[0]


def _unpack_rgb(bits: np.ndarray) -> np.ndarray:
    """PCL packs 8-bit r, g, b into one 32-bit value (often stored as a float)."""
    bits = bits.astype(np.uint32, copy=False)
    return np.stack([(bits >> 16) & 255, (bits >> 8) & 255, bits & 255], axis=1).astype(np.float32)
