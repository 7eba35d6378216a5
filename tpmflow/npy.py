"""Reading ``.npy``/``.npz`` bytes from many threads of one process.

NumPy parses each array's header with ``ast.literal_eval``. CPython 3.11's AST builder keeps its
recursion depth in interpreter-wide state, so two threads parsing at once can fail with
``SystemError: AST constructor recursion depth mismatch`` (CPython gh-106905 and its kin; CI saw
it when the sandbox decoded two children's answers together). Every ``.npy`` header tpmflow reads
goes through :data:`NPY_LOCK`, which costs nothing measurable: a header is ~100 bytes.
"""

from __future__ import annotations

import io
import threading

import numpy as np

NPY_LOCK = threading.Lock()  # held while NumPy parses headers (np.load, and an .npz's members)


def load_npy(data: bytes) -> np.ndarray:
    """One ``.npy`` array from its bytes; pickled object arrays are refused (``ValueError``)."""
    with NPY_LOCK:
        return np.load(io.BytesIO(data), allow_pickle=False)
