"""The ``Adapter`` protocol and the values it passes around.

Routes in: an item becomes prompt text (``EncodedText``) or K vectors of the core model's hidden
size (``EncodedEmbeds``, sent to vLLM as ``prompt_embeds``). Routes out: generated text is decoded
into domain objects (``Decoded``), and heads score pooled final hidden states. A bad item becomes
an ``ItemError`` naming its index (``item``) and the reason; the rest of the batch goes on, and the
caller finds an ``AdapterInputError`` with the same ``item`` in that item's place.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from tpmflow.errors import InvalidRequest


@dataclass(frozen=True)
class ItemError:
    """Why one item of a batch could not be used: ``ItemError(item, reason)``, where ``item`` is the
    item's index in the batch (the same name as ``AdapterInputError.item``, which the caller gets)."""

    item: int
    reason: str

    @property
    def index(self) -> int:
        """Deprecated alias of ``item`` (its earlier name)."""
        warnings.warn("ItemError.index is deprecated: use ItemError.item", DeprecationWarning, stacklevel=2)
        return self.item


@dataclass(frozen=True)
class EncodedText:
    """Text route: the item as a prompt."""

    text: str


@dataclass(frozen=True)
class EncodedEmbeds:
    """Soft-token route: float32 [K, hidden] vectors for ``prompt_embeds``, optionally spliced
    between embedded text (``prefix`` + soft tokens + ``suffix``; the replica embeds the text with
    the core model's own embedding table)."""

    embeds: np.ndarray
    prefix: str = ""
    suffix: str = ""


@dataclass(frozen=True)
class Decoded:
    """One generated text turned into a domain object, or rejected with a reason."""

    text: str
    value: Any | None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.reason is None


@dataclass(frozen=True)
class AdapterFit:
    """Which core models an adapter (or its trained parts) fits: by hidden size and, when trained
    against a specific model, by that model's content hash."""

    hidden_size: int | None = None
    content_hashes: tuple[str, ...] = field(default_factory=tuple)


@runtime_checkable
class Adapter(Protocol):
    """What every adapter package provides."""

    name: str
    version: str
    modality: str
    fit: AdapterFit

    def encode(self, items: Sequence[Any]) -> list[EncodedText | EncodedEmbeds | ItemError]:
        """Turn a batch of domain items into model inputs, one result per item, in order."""
        ...

    def decode(self, texts: Sequence[str]) -> list[Decoded]:
        """Turn generated texts into domain objects, each accepted or rejected with a reason."""
        ...

    def config(self) -> dict[str, Any]:
        """JSON-able settings from which ``from_config`` rebuilds the adapter in another process."""
        ...


def check_fits(adapter: Adapter, hidden_size: int, content_hash: str) -> None:
    """Raise ``InvalidRequest`` when the adapter was built for another core model."""
    fit = adapter.fit
    if fit.hidden_size is not None and fit.hidden_size != hidden_size:
        raise InvalidRequest(
            f"adapter {adapter.name}@{adapter.version} is built for hidden size {fit.hidden_size}; "
            f"this model has {hidden_size}"
        )
    if fit.content_hashes and content_hash not in fit.content_hashes:
        raise InvalidRequest(
            f"adapter {adapter.name}@{adapter.version} was trained against another model "
            f"({', '.join(h[:19] for h in fit.content_hashes)}), not {content_hash[:19]}"
        )
