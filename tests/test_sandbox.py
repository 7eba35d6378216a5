"""Hostile-input parsing runs in capped child processes: one bad item never takes the batch down."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tpmflow.adapters import ItemError
from tpmflow.adapters.sandbox import Caps, run_capped

sys.path.insert(0, str(Path(__file__).parent))
import sandbox_parsers as p  # noqa: E402


def test_caps_turn_failures_into_item_errors_and_the_rest_completes() -> None:
    started = time.monotonic()
    out = run_capped(p.fine, [1, 2, 3], Caps(seconds=20, memory_bytes=1 << 30))
    assert out == [2, 4, 6]
    funcs = [p.fine, p.hog_memory, p.hang, p.crash, p.raise_value_error]
    results = [run_capped(fn, [5], Caps(seconds=3, memory_bytes=1 << 30))[0] for fn in funcs]
    assert results[0] == 10
    reasons = [r.reason for r in results[1:] if isinstance(r, ItemError)]
    assert len(reasons) == 4
    assert "memory cap" in reasons[0]
    assert "time cap" in reasons[1]
    assert "died" in reasons[2]
    assert "corrupted header" in reasons[3]
    assert time.monotonic() - started < 60
