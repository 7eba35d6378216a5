"""Parse hostile inputs (HDF5, PLY, PCD…) in separate processes with time and memory caps.

A parser that hangs, explodes in memory or crashes takes down one short-lived child, never the
replica's event loop or engine: the item gets an ``ItemError`` with the reason and the batch goes on.

Items run in fresh interpreters (``python -m tpmflow.adapters.sandbox``), not forks of the replica
(whose threads and engine state must not be copied) and not multiprocessing ``spawn`` children
(which re-import the parent's ``__main__`` — all of vLLM — every time). A child parses a few items
in turn (``per_child``), so the interpreter's start-up (~0.3 s with numpy and h5py) is paid once per
chunk; when a child fails as a whole (over a cap, or killed), each of its items is parsed again
alone, so the culprit gets the error and the others their results. What comes back
is never unpickled: the child writes an ``.npz`` (arrays, plus JSON for scalars and ``None``) that
the parent loads with ``allow_pickle=False``, so a parser subverted by a crafted file cannot run
code in the replica through its answer.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import resource
import subprocess
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from tpmflow.adapters.base import ItemError

_MEMORY_EXIT = 4  # the child ran out of memory under its cap
MAX_ANSWER_BYTES = 1 << 30  # what one child may send back (parsed arrays, before any subsampling)


@dataclass(frozen=True)
class Caps:
    """Limits for one item's parse."""

    seconds: float = 30.0
    memory_bytes: int = 2 << 30


def _encode_results(results: list[tuple[bool, Any]]) -> bytes:
    """Per item ``(True, value)`` or ``(False, reason)`` as one ``.npz``: arrays as arrays; scalars,
    ``None`` and reasons as JSON. A value is an array, a JSON-able scalar, or a dict of those."""
    arrays: dict[str, np.ndarray] = {}
    plain: list[dict[str, Any]] = []
    for i, (ok, value) in enumerate(results):
        if not ok:
            plain.append({"error": str(value)})
        elif isinstance(value, np.ndarray):
            arrays[f"{i}"] = value
            plain.append({"array": True})
        elif isinstance(value, dict):
            fields: dict[str, Any] = {}
            for k, v in value.items():
                if isinstance(v, np.ndarray):
                    arrays[f"{i}:{k}"] = v
                else:
                    fields[str(k)] = v
            plain.append({"dict": fields})
        else:
            plain.append({"value": value})
    buf = io.BytesIO()
    np.savez(buf, __json__=np.array(json.dumps(plain)), **arrays)
    return buf.getvalue()


def _decode_results(data: bytes, indices: Sequence[int]) -> list[Any]:
    import zipfile

    with zipfile.ZipFile(io.BytesIO(data)) as archive:  # np.savez stores members uncompressed
        if any(m.compress_type != zipfile.ZIP_STORED or m.file_size > len(data) for m in archive.infolist()):
            raise ValueError("compressed or oversized members")
    out: list[Any] = []
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        plain = json.loads(str(npz["__json__"]))
        if len(plain) != len(indices):
            raise ValueError(f"{len(plain)} answers for {len(indices)} items")
        for j, (index, entry) in enumerate(zip(indices, plain, strict=True)):
            if "error" in entry:
                out.append(ItemError(index, str(entry["error"])[:500]))
            elif entry.get("array"):
                out.append(npz[f"{j}"])
            elif "dict" in entry:
                fields = dict(entry["dict"])
                fields.update({k.split(":", 1)[1]: npz[k] for k in npz.files if k.startswith(f"{j}:")})
                out.append(fields)
            else:
                out.append(entry["value"])
    return out


def _child_env() -> dict[str, str]:
    """What a parser needs, and nothing of the replica's secrets (pool key, API key) or its HDF5
    lookup paths: a subverted parser must find nothing worth leaking in its environment."""
    keep = ("PATH", "PYTHONPATH", "HDF5_PLUGIN_PATH", "LANG", "LC_ALL", "HOME", "TMPDIR")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update({"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    return env


def _run_chunk(fn: Callable[[Any], Any], items: Sequence[Any], indices: Sequence[int], caps: Caps) -> list[Any]:
    """One child for these items; if it fails as a whole, one child per item to find the culprit."""
    out = _run_child(fn, items, indices, caps, seconds=caps.seconds * len(items))
    if isinstance(out, list):
        return out
    if len(items) == 1:
        return [ItemError(indices[0], out)]
    results: list[Any] = []
    for item, index in zip(items, indices, strict=True):
        alone = _run_child(fn, [item], [index], caps, seconds=caps.seconds)
        results.extend(alone if isinstance(alone, list) else [ItemError(index, alone)])
    return results


def _run_child(
    fn: Callable[[Any], Any], items: Sequence[Any], indices: Sequence[int], caps: Caps, seconds: float
) -> list[Any] | str:
    """The items' results, or why the child failed as a whole."""
    job = pickle.dumps((sys.path, fn.__module__, fn.__qualname__, list(items)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tpmflow.adapters.sandbox"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: never left behind as the replica's orphan
        env=_child_env(),
    )
    # The cap is set before the child reads its item (no preexec_fn: the replica is multi-threaded).
    try:
        resource.prlimit(proc.pid, resource.RLIMIT_AS, (caps.memory_bytes, caps.memory_bytes))
    except ProcessLookupError:  # it is already gone; communicate() reports how
        pass
    try:
        out, err = proc.communicate(job, timeout=seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return f"over the time cap of {caps.seconds:g} s"
    if proc.returncode == 0:
        if len(out) > MAX_ANSWER_BYTES:
            return f"the parser's answer of {len(out)} bytes exceeds {MAX_ANSWER_BYTES}"
        try:
            return _decode_results(out, indices)
        except (ValueError, KeyError, OSError) as exc:
            return f"the parser's answer is malformed: {exc}"
    if proc.returncode == _MEMORY_EXIT or b"MemoryError" in err:
        return f"over the memory cap of {caps.memory_bytes >> 20} MiB"
    return f"the parser died (exit code {proc.returncode})"


def run_capped(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    caps: Caps | None = None,
    workers: int = 2,
    per_child: int = 8,
) -> list[Any]:
    """``fn(item)`` for each item in capped child processes; results in order, ``ItemError`` for failures.

    ``fn`` must be a module-level function (the child imports it by name); its result must be an
    array, a JSON-able scalar, or a dict of those. The time cap is per item (a child of n items gets
    n times it); the memory cap is per child, and the items of a child run one after another.
    """
    caps = caps or Caps()
    per_child = max(1, per_child)
    # Spread the items over the workers first, so a small batch still uses every worker.
    per_child = min(per_child, max(1, -(-len(items) // max(1, workers))))
    chunks = [list(range(i, min(i + per_child, len(items)))) for i in range(0, len(items), per_child)]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        done = pool.map(lambda idx: _run_chunk(fn, [items[i] for i in idx], idx, caps), chunks)
        return [result for chunk in done for result in chunk]


def _child() -> None:
    """In the child: read the job, run each item, write the answers. An exception is that item's
    reason; running out of memory ends the child (exit 4), and the parent retries items alone."""
    import gc
    import importlib

    path, module, qualname, items = pickle.loads(sys.stdin.buffer.read())  # from the parent: trusted
    sys.path[:] = path
    fn: Any = importlib.import_module(module)
    for part in qualname.split("."):
        fn = getattr(fn, part)
    results: list[tuple[bool, Any]] = []
    for item in items:
        try:
            results.append((True, fn(item)))
        except MemoryError:
            sys.exit(_MEMORY_EXIT)
        except Exception as exc:  # noqa: BLE001 - any failure of a hostile input is that item's error
            results.append((False, f"{type(exc).__name__}: {exc}"))
        gc.collect()
    sys.stdout.buffer.write(_encode_results(results))


if __name__ == "__main__":
    _child()
