"""Hostile-input parsing runs in capped child processes: one bad item never takes the batch down."""

from __future__ import annotations

import sys
from pathlib import Path

from tpmflow.adapters import ItemError
from tpmflow.adapters.sandbox import Caps, run_capped

sys.path.insert(0, str(Path(__file__).parent))
import sandbox_parsers as p  # noqa: E402


def test_caps_turn_failures_into_item_errors_and_the_rest_completes() -> None:
    out = run_capped(p.fine, [1, 2, 3], Caps(seconds=20, memory_bytes=1 << 30))
    assert out == [2, 4, 6]
    funcs = [p.fine, p.hog_memory, p.hang, p.crash, p.raise_value_error]
    # 3 s only for the one that must run out of time: a loaded machine's child may take seconds to
    # start (its interpreter, numpy), which must not pass for a time cap in the others.
    results = [run_capped(fn, [5], Caps(seconds=3 if fn is p.hang else 20, memory_bytes=1 << 30))[0] for fn in funcs]
    assert results[0] == 10
    reasons = [r.reason for r in results[1:] if isinstance(r, ItemError)]
    assert len(reasons) == 4
    assert "memory cap" in reasons[0]
    assert "time cap" in reasons[1]  # the 60 s sleep was cut at its cap
    assert "died" in reasons[2]
    assert "corrupted header" in reasons[3]


def test_a_child_killed_by_one_item_loses_none_of_the_others() -> None:
    items = [1, 2, -1, 0, 5, 6, 7, 8, 9]
    out = run_capped(p.crash_on_negative, items, Caps(seconds=20, memory_bytes=1 << 30), workers=2, per_child=4)
    assert [o for o in out if not isinstance(o, ItemError)] == [2, 4, 10, 12, 14, 16, 18]
    errors = {o.item: o.reason for o in out if isinstance(o, ItemError)}
    assert set(errors) == {2, 3}
    assert "died" in errors[2] and "zero is refused" in errors[3]


def test_answers_are_never_unpickled() -> None:
    """Arrays, dicts with None and scalars come back through .npz and JSON; an answer carrying a
    pickled object (what a subverted parser would send) is refused, not loaded."""
    import io

    import numpy as np
    import pytest

    from tpmflow.adapters.sandbox import _decode_results

    out = run_capped(p.mixed_answer, [1, 2], Caps(seconds=20, memory_bytes=1 << 30))
    assert out[0]["mask"] is None and out[0]["n"] == 1 and np.array_equal(out[0]["frame"], np.ones((2, 2)))
    assert out[1]["n"] == 2
    evil = io.BytesIO()
    np.savez(evil, __json__=np.array('[{"array": true}]'), **{"0": np.array([object()], dtype=object)})
    with pytest.raises(ValueError, match="pickle"):
        _decode_results(evil.getvalue(), [0])
