"""What the client's calls return: generations, embeddings, predictions, probe traces, and the
lazily fetched arrays inside them. Plain data; ``_base`` decides how an answer becomes one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tpmflow.errors import AdapterInputError, InvalidRequest
from tpmflow.payload import PayloadStore, Reference
from tpmflow.schema import InlineArray


class LazyArray:
    """An array that may still be in the pool's store; ``numpy()`` fetches and checks it once."""

    def __init__(self, payload: dict[str, Any], store: PayloadStore | None) -> None:
        self._payload = payload
        self._store = store
        self._value: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        # A store holds connections; a pickled array keeps its value (if fetched) and its reference.
        return {**self.__dict__, "_store": None}

    @property
    def reference(self) -> Reference | None:
        return Reference.model_validate(self._payload) if "sig" in self._payload else None

    def numpy(self) -> np.ndarray:
        if self._value is None:
            ref = self.reference
            if ref is None:
                self._value = InlineArray.model_validate(self._payload).to_numpy()
            else:
                if self._store is None:
                    raise InvalidRequest("this client has no store access to resolve references")
                value = self._store.get(ref)
                if not isinstance(value, np.ndarray):
                    raise InvalidRequest("reference does not hold an array")
                self._value = value
        return self._value

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self.numpy()
        return arr.astype(dtype) if dtype is not None else arr


@dataclass
class Generation:
    text: str
    finish_reason: str | None
    usage: dict[str, Any]
    request_id: str
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass
class Embeddings:
    """Per-input final hidden states; ``numpy()`` stacks pooled vectors into [n, hidden].

    With an adapter, an item that could not be used holds its ``AdapterInputError`` (index and
    reason) instead; ``errors`` lists them and ``ok`` the indices that worked.
    """

    items: list[LazyArray | AdapterInputError]
    n_tokens: list[int]
    usage: dict[str, Any]
    provenance: dict[str, Any]

    @property
    def errors(self) -> list[AdapterInputError]:
        return [item for item in self.items if isinstance(item, AdapterInputError)]

    @property
    def ok(self) -> list[int]:
        return [i for i, item in enumerate(self.items) if isinstance(item, LazyArray)]

    def numpy(self, only_ok: bool = False) -> np.ndarray:
        """Stack the vectors; raises the first item error unless ``only_ok`` (then rows of ``ok``)."""
        if self.errors and not only_ok:
            raise self.errors[0]
        return np.stack([self[i] for i in self.ok])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> np.ndarray:
        item = self.items[i]
        if isinstance(item, AdapterInputError):
            raise item
        return item.numpy()

    def fetch(self) -> Embeddings:
        """Read every array now (references from the pool's store), so the object pickles
        self-contained: to a Colmena thinker, across an Academy exchange."""
        for i in self.ok:
            self[i]
        return self


@dataclass
class Predictions:
    """A head's outputs per item: a float (regression), a label (classification; its class
    probabilities in ``probabilities``), or the item's ``AdapterInputError``."""

    values: list[float | str | AdapterInputError]
    head: dict[str, Any]
    usage: dict[str, Any]
    provenance: dict[str, Any]
    probabilities: list[dict[str, float] | None] = field(default_factory=list)

    @property
    def ok(self) -> list[int]:
        return [i for i, v in enumerate(self.values) if not isinstance(v, AdapterInputError)]

    @property
    def errors(self) -> list[AdapterInputError]:
        return [v for v in self.values if isinstance(v, AdapterInputError)]


@dataclass
class Trace:
    """What a probe saw: the generated text, captured activations (``trace["blocks.3.hook_resid_post"]``
    is a ``[positions, hidden]`` array, fetched lazily when it came by reference; ``hook_z`` is
    ``[positions, heads, head_dim]``), the logit-lens table, usage (activation bytes included) and
    provenance."""

    text: str
    prompt_tokens: list[str]
    captures: dict[str, LazyArray]
    positions: dict[str, list[int]]
    lens: list[dict[str, Any]]
    steps: list[int]
    usage: dict[str, Any]
    provenance: dict[str, Any]

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.captures:
            raise KeyError(f"{name!r} was not captured; captured: {sorted(self.captures)}")
        return self.captures[name].numpy()

    def fetch(self) -> Trace:
        """Read every capture now (references from the pool's store), so the trace pickles
        self-contained: to a Colmena thinker, across an Academy exchange."""
        for name in self.captures:
            self[name]
        return self

    def top_tokens(self) -> list[list[str]]:
        """The logit lens's top token per layer (rows) and position (columns)."""
        return [[row[0] for row in layer["tokens"]] for layer in self.lens]
