"""A minimal external adapter: found by tpmflow through its entry point, no change to tpmflow.

Install it next to tpmflow (``pip install -e examples/external_adapter``), restart the pool, and
``client.embed(["hello"], adapter="uppercase")`` works.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tpmflow.adapters import AdapterFit, Decoded, EncodedText, ItemError


class UppercaseAdapter:
    name = "uppercase"
    version = "0.1.0"
    modality = "text"
    fit = AdapterFit()  # a text route fits any core model

    def __init__(self, max_chars: int = 200) -> None:
        self.max_chars = max_chars

    def config(self) -> dict[str, Any]:
        return {"max_chars": self.max_chars}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> UppercaseAdapter:
        return cls(**config)

    def encode(self, items: Sequence[Any]) -> list[EncodedText | ItemError]:
        out: list[EncodedText | ItemError] = []
        for i, item in enumerate(items):
            if not isinstance(item, str) or not item.strip():
                out.append(ItemError(i, "expected a non-empty string"))
            elif len(item) > self.max_chars:
                out.append(ItemError(i, f"longer than {self.max_chars} characters"))
            else:
                out.append(EncodedText(item.upper()))
        return out

    def decode(self, texts: Sequence[str]) -> list[Decoded]:
        return [Decoded(t, t.strip()) if t.strip() else Decoded(t, None, "empty output") for t in texts]
