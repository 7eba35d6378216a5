"""How retrieved items enter a prompt: the context block written before it.

Plain text (completions, adapters that do not say otherwise) gets a ``Context:`` block, one item per
line with its scalar metadata; an adapter may write its own (``retrieval_context``: the SMILES
adapter puts one molecule per line, with its properties, before the prefix the model continues).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

MAX_ITEM_CHARS = 2000  # one retrieved item's text in a prompt; longer ones are cut, marked with "…"


def scalar_properties(metadata: dict[str, Any]) -> str:
    """``key=value`` for each number, string or bool of the metadata (sorted; nested values left out:
    a prompt is not a JSON dump)."""
    parts = []
    for key in sorted(metadata):
        value = metadata[key]
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            continue
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


def item_text(item: Any) -> str:
    text = item if isinstance(item, str) else json.dumps(item, sort_keys=True)
    return text if len(text) <= MAX_ITEM_CHARS else text[: MAX_ITEM_CHARS - 1] + "…"


def text_context(entries: Sequence[tuple[Any, dict[str, Any]]]) -> str:
    """A ``Context:`` block of the retrieved ``(item, metadata)`` pairs, ending in a blank line."""
    if not entries:
        return ""
    lines = []
    for item, metadata in entries:
        props = scalar_properties(metadata)
        lines.append(f"- {item_text(item)}" + (f" ({props})" if props else ""))
    return "Context:\n" + "\n".join(lines) + "\n\n"


def adapter_context(adapter: Any, entries: Sequence[tuple[Any, dict[str, Any]]]) -> str:
    """The adapter's own context block when it writes one, else the plain-text one."""
    if not entries:
        return ""
    write = getattr(adapter, "retrieval_context", None)
    return str(write(list(entries))) if callable(write) else text_context(entries)
