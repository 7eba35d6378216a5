"""Parse hostile inputs (HDF5, PLY, PCD…) in separate processes with time and memory caps.

A parser that hangs, explodes in memory or crashes takes down one short-lived worker, never the
replica's event loop or engine: the item gets an ``ItemError`` with the reason and the batch goes on.
Each item runs in a fresh process (``spawn``), so one item's state cannot leak into the next.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tpmflow.adapters.base import ItemError


@dataclass(frozen=True)
class Caps:
    """Limits for one item's parse."""

    seconds: float = 30.0
    memory_bytes: int = 2 << 30


def _child(fn: Callable[[Any], Any], item: Any, memory_bytes: int, out: Any) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    try:
        out.put(("ok", fn(item)))
    except MemoryError:
        out.put(("error", f"over the memory cap of {memory_bytes >> 20} MiB"))
    except Exception as exc:  # noqa: BLE001 - any failure of a hostile input is that item's error
        out.put(("error", f"{type(exc).__name__}: {exc}"[:500]))


def run_capped(fn: Callable[[Any], Any], items: Sequence[Any], caps: Caps | None = None, workers: int = 2) -> list[Any]:
    """``fn(item)`` for each item in a capped child process; results in order, ``ItemError`` for failures.

    ``fn`` must be importable (a module-level function): it is sent to a spawned process.
    """
    caps = caps or Caps()
    ctx = mp.get_context("spawn")
    results: list[Any] = [None] * len(items)
    pending = list(range(len(items)))
    running: dict[int, tuple[Any, Any]] = {}
    started: dict[int, float] = {}
    while pending or running:
        while pending and len(running) < workers:
            i = pending.pop(0)
            out = ctx.Queue(maxsize=1)
            proc = ctx.Process(target=_child, args=(fn, items[i], caps.memory_bytes, out), daemon=True)
            proc.start()
            running[i], started[i] = (proc, out), time.monotonic()
        for i, (proc, out) in list(running.items()):
            try:
                status, value = out.get_nowait()
            except queue.Empty:
                if time.monotonic() - started[i] > caps.seconds:
                    proc.kill()
                    results[i] = ItemError(i, f"over the time cap of {caps.seconds:g} s")
                elif proc.exitcode is not None and out.empty():
                    results[i] = ItemError(i, f"the parser died (exit code {proc.exitcode})")
                else:
                    continue
            else:
                results[i] = value if status == "ok" else ItemError(i, value)
            proc.join(timeout=5)
            del running[i]
        time.sleep(0.01)
    return results
