"""Parse hostile inputs (HDF5, PLY, PCD…) in separate processes with time and memory caps.

A parser that hangs, explodes in memory or crashes takes down one short-lived child, never the
replica's event loop or engine: the item gets an ``ItemError`` with the reason and the batch goes on.

Items run in fresh interpreters (``python -m tpmflow.adapters.sandbox``), not forks of the replica
(whose threads and engine state must not be copied) and not multiprocessing ``spawn`` children
(which re-import the parent's ``__main__`` — all of vLLM — every time). A child parses a few items
in turn (``per_child``), so the interpreter's start-up (~0.3 s with numpy and h5py) is paid once per
chunk. The child answers item by item, and each item has its own time cap counted from the previous
answer: when a child fails (over a cap, or killed, e.g. by a segfault in libhdf5), the item it was
on gets the error (after one retry alone if it shared the child, as the memory cap is per child),
the answers before it are kept and the items after it go on in a fresh child. So a hostile file
costs its own time cap once, never the whole chunk's (a hang used to hold every item of its chunk
for n caps, and then cost each of them a parse alone). What comes back is never unpickled: each
answer is an ``.npz`` (arrays, plus JSON for scalars and ``None``) that the parent loads with
``allow_pickle=False``, so a parser subverted by a crafted file cannot run code in the replica
through its answer.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import queue
import resource
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from tpmflow.adapters.base import ItemError
from tpmflow.npy import NPY_LOCK

_MEMORY_EXIT = 4  # the child ran out of memory under its cap
MAX_ANSWER_BYTES = 1 << 30  # what one item's answer may be (parsed arrays, before any subsampling)
_LENGTH = struct.Struct("<Q")  # each answer on the child's stdout: its length, then its .npz bytes
_STDERR_KEPT = 64 << 10  # the tail of a child's stderr kept to tell a MemoryError


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
    # Under NPY_LOCK: each member's header is parsed on access (see tpmflow.npy for why).
    with NPY_LOCK, np.load(io.BytesIO(data), allow_pickle=False) as npz:
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
    """The items' results in order, in as few children as their failures allow."""
    results: list[Any] = []
    while len(results) < len(items):
        at = len(results)
        answers, failure = _run_child(fn, items[at:], indices[at:], caps)
        results.extend(answers)
        if failure is None:
            continue
        at = len(results)  # the item the child was on when it failed
        if answers and not failure.startswith("over the time cap"):
            # It shared its child with items before it, which may have left memory behind: retry it alone.
            alone, again = _run_child(fn, items[at : at + 1], indices[at : at + 1], caps)
            if again is None:
                results.extend(alone)
                continue
            failure = again
        results.append(ItemError(indices[at], failure))
    return results


def _run_child(
    fn: Callable[[Any], Any], items: Sequence[Any], indices: Sequence[int], caps: Caps
) -> tuple[list[Any], str | None]:
    """One child parses the items in turn: the answers that came back, in order, and why it stopped
    early (``None`` when every item answered). Each item has ``caps.seconds`` from the previous
    answer (the first from the child's start)."""
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
    except ProcessLookupError:  # it is already gone; its exit status says how
        pass
    frames: queue.Queue[bytes | str | None] = queue.Queue()
    err = bytearray()
    pipes = [
        threading.Thread(target=_feed, args=(proc.stdin, job), daemon=True),
        threading.Thread(target=_read_answers, args=(proc.stdout, frames), daemon=True),
        threading.Thread(target=_drain, args=(proc.stderr, err), daemon=True),
    ]
    for t in pipes:
        t.start()
    answers: list[Any] = []
    try:
        while len(answers) < len(items):
            try:
                frame = frames.get(timeout=caps.seconds)
            except queue.Empty:
                return answers, f"over the time cap of {caps.seconds:g} s"
            if isinstance(frame, str):
                return answers, frame
            if frame is None:  # the child ended before answering every item
                code = proc.wait()
                pipes[2].join(timeout=5)
                if code == _MEMORY_EXIT or b"MemoryError" in err:
                    return answers, f"over the memory cap of {caps.memory_bytes >> 20} MiB"
                return answers, f"the parser died (exit code {code})"
            try:
                answers.extend(_decode_results(frame, [indices[len(answers)]]))
            except (ValueError, KeyError, OSError) as exc:
                return answers, f"the parser's answer is malformed: {exc}"
        return answers, None
    finally:
        _kill(proc)
        for t in pipes:
            t.join(timeout=5)


def _feed(pipe: Any, job: bytes) -> None:
    try:
        with pipe:
            pipe.write(job)
    except (BrokenPipeError, OSError):  # the child died before reading it all; its exit status says how
        pass


def _read_answers(pipe: Any, frames: queue.Queue[bytes | str | None]) -> None:
    """Length-prefixed answers off the child's stdout, then ``None`` at its end (a reason on a bad length)."""
    with pipe:
        while len(head := pipe.read(_LENGTH.size)) == _LENGTH.size:
            (length,) = _LENGTH.unpack(head)
            if length > MAX_ANSWER_BYTES:
                frames.put(f"the parser's answer of {length} bytes exceeds {MAX_ANSWER_BYTES}")
                return
            body = pipe.read(length)
            if len(body) != length:
                break
            frames.put(body)
        frames.put(None)


def _drain(pipe: Any, err: bytearray) -> None:
    """Keep the tail of the child's stderr (a full pipe would block it)."""
    with pipe:
        while chunk := pipe.read(1 << 16):
            err.extend(chunk)
            del err[:-_STDERR_KEPT]


def _kill(proc: subprocess.Popen[bytes]) -> None:
    """The child and anything it started (its own session), if still there."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def run_capped(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    caps: Caps | None = None,
    workers: int = 2,
    per_child: int = 8,
) -> list[Any]:
    """``fn(item)`` for each item in capped child processes; results in order, ``ItemError`` for failures.

    ``fn`` must be a module-level function (the child imports it by name); its result must be an
    array, a JSON-able scalar, or a dict of those. The time cap is per item, counted from the previous
    item's answer (the first item's includes the child's start-up); the memory cap is per child, and
    the items of a child run one after another.
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
    """In the child: read the job, run each item, write its answer at once. An exception is that item's
    reason; running out of memory ends the child (exit 4), and the parent retries the item alone."""
    import gc
    import importlib

    # Answers go to a private copy of stdout; fd 1 becomes stderr, so what a parser or its C library
    # prints cannot corrupt the answers' framing.
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    path, module, qualname, items = pickle.loads(sys.stdin.buffer.read())  # from the parent: trusted
    sys.path[:] = path
    fn: Any = importlib.import_module(module)
    for part in qualname.split("."):
        fn = getattr(fn, part)
    for item in items:
        try:
            result: tuple[bool, Any] = (True, fn(item))
        except MemoryError:
            sys.exit(_MEMORY_EXIT)
        except Exception as exc:  # noqa: BLE001 - any failure of a hostile input is that item's error
            result = (False, f"{type(exc).__name__}: {exc}")
        try:
            answer = _encode_results([result])
        except MemoryError:
            sys.exit(_MEMORY_EXIT)
        answers.write(_LENGTH.pack(len(answer)) + answer)
        answers.flush()
        del result, answer
        gc.collect()


if __name__ == "__main__":
    _child()
