"""Reading ``.npy``/``.npz`` bytes from many threads of one process.

NumPy parses each array's header with ``ast.literal_eval``. CPython 3.11's AST builder keeps its
recursion depth in interpreter-wide state, so two threads parsing at once can fail with
``SystemError: AST constructor recursion depth mismatch`` (CPython gh-106905 and its kin; CI saw
it when the sandbox decoded two children's answers together). Every ``.npy`` tpmflow reads goes
through :data:`NPY_LOCK`. It is held for the whole read, a copy at memory speed (~20 ms for a
96 MB payload): concurrent decodes of large arrays in one process take turns. The lock excludes
only tpmflow's own readers; another library parsing Python at that moment could still collide.
"""

from __future__ import annotations

import io
import threading

import numpy as np

NPY_LOCK = threading.Lock()  # held while NumPy reads .npy bytes (np.load, and an .npz's members)


def load_npy(data: bytes) -> np.ndarray:
    """One ``.npy`` array from its bytes; pickled object arrays are refused (``ValueError``)."""
    with NPY_LOCK:
        return np.load(io.BytesIO(data), allow_pickle=False)
