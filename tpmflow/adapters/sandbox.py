"""Parse hostile inputs (HDF5, PLY, PCD…) in separate processes with time and memory caps.

A parser that hangs, explodes in memory or crashes takes down one short-lived child, never the
replica's event loop or engine: the item gets an ``ItemError`` with the reason and the batch goes on.

Each item runs in a fresh interpreter (``python -m tpmflow.adapters.sandbox``), not a fork of the
replica (whose threads and engine state must not be copied) and not a multiprocessing ``spawn``
child (which re-imports the parent's ``__main__`` — all of vLLM — for every item). What comes back
is never unpickled: the child writes an ``.npz`` (arrays, plus JSON for scalars and ``None``) that
the parent loads with ``allow_pickle=False``, so a parser subverted by a crafted file cannot run
code in the replica through its answer.
"""

from __future__ import annotations

import io
import json
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

_ERROR_EXIT = 3  # the parser raised: stderr holds "Type: message"


@dataclass(frozen=True)
class Caps:
    """Limits for one item's parse."""

    seconds: float = 30.0
    memory_bytes: int = 2 << 30


def _encode_result(value: Any) -> bytes:
    """An array, a JSON-able scalar, or a dict of those (``None`` included) as ``.npz`` bytes."""
    arrays: dict[str, np.ndarray] = {}
    plain: dict[str, Any] = {}
    if isinstance(value, np.ndarray):
        arrays["v"] = value
    elif isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, np.ndarray):
                arrays[f"d:{k}"] = v
            else:
                plain[str(k)] = v
        plain = {"dict": plain}
    else:
        plain = {"value": value}
    buf = io.BytesIO()
    np.savez(buf, __json__=np.array(json.dumps(plain)), **arrays)
    return buf.getvalue()


def _decode_result(data: bytes) -> Any:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        plain = json.loads(str(npz["__json__"]))
        if "v" in npz.files:
            return npz["v"]
        if "dict" in plain:
            out = dict(plain["dict"])
            out.update({k[2:]: npz[k] for k in npz.files if k.startswith("d:")})
            return out
        return plain["value"]


def _run_one(fn: Callable[[Any], Any], item: Any, index: int, caps: Caps) -> Any:
    job = pickle.dumps((sys.path, fn.__module__, fn.__qualname__, item))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tpmflow.adapters.sandbox"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,  # its own process group: never left behind as the replica's orphan
    )
    # The cap is set before the child reads its item (no preexec_fn: the replica is multi-threaded).
    try:
        resource.prlimit(proc.pid, resource.RLIMIT_AS, (caps.memory_bytes, caps.memory_bytes))
    except ProcessLookupError:  # it is already gone; communicate() reports how
        pass
    try:
        out, err = proc.communicate(job, timeout=caps.seconds)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return ItemError(index, f"over the time cap of {caps.seconds:g} s")
    if proc.returncode == 0:
        try:
            return _decode_result(out)
        except (ValueError, KeyError, OSError) as exc:
            return ItemError(index, f"the parser's answer is malformed: {exc}")
    message = err.decode(errors="replace").strip().splitlines()
    if proc.returncode == _ERROR_EXIT and message:
        return ItemError(index, message[-1][:500])
    if any("MemoryError" in line for line in message):
        return ItemError(index, f"over the memory cap of {caps.memory_bytes >> 20} MiB")
    return ItemError(index, f"the parser died (exit code {proc.returncode})")


def run_capped(fn: Callable[[Any], Any], items: Sequence[Any], caps: Caps | None = None, workers: int = 2) -> list[Any]:
    """``fn(item)`` for each item in a capped child process; results in order, ``ItemError`` for failures.

    ``fn`` must be a module-level function (the child imports it by name); its result must be an
    array, a JSON-able scalar, or a dict of those.
    """
    caps = caps or Caps()
    if not items:
        return []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(lambda pair: _run_one(fn, pair[1], pair[0], caps), enumerate(items)))


def _child() -> None:
    """In the child: read the job, run it, write the answer (or ``Type: message`` and exit 3)."""
    import importlib

    path, module, qualname, item = pickle.loads(sys.stdin.buffer.read())  # from the parent: trusted
    sys.path[:] = path
    fn: Any = importlib.import_module(module)
    for part in qualname.split("."):
        fn = getattr(fn, part)
    try:
        data = _encode_result(fn(item))
    except MemoryError:
        sys.stderr.write("MemoryError: over the memory cap\n")
        sys.exit(4)
    except Exception as exc:  # noqa: BLE001 - any failure of a hostile input is that item's error
        sys.stderr.write(f"{type(exc).__name__}: {exc}\n")
        sys.exit(_ERROR_EXIT)
    sys.stdout.buffer.write(data)


if __name__ == "__main__":
    _child()
