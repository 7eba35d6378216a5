"""The conformance kit every adapter package runs in its own tests:

    from tpmflow.adapters.testing import check_adapter
    def test_conformance():
        check_adapter(MyAdapter(), good=[...], bad=[...], hidden_size=4096)

It checks what tpmflow relies on: the protocol's attributes, one result per item in order, errors
exactly at the bad items with a reason, results that do not depend on the rest of the batch,
deterministic encoding, outputs shaped for the core model, a JSON config that rebuilds the same
adapter, and decoding that answers every text. Failures are ``AssertionError`` with a message.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tpmflow.adapters.base import Adapter, Decoded, EncodedEmbeds, EncodedText, ItemError


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, EncodedEmbeds) and isinstance(b, EncodedEmbeds):
        return a.embeds.shape == b.embeds.shape and bool(np.array_equal(a.embeds, b.embeds))
    return bool(a == b)


def check_adapter(adapter: Any, good: Sequence[Any], bad: Sequence[Any], hidden_size: int | None = None) -> None:
    """Run every conformance check on ``adapter`` with known-good and known-bad items."""
    assert isinstance(adapter, Adapter), "the adapter lacks part of the Adapter protocol"
    for attr in ("name", "version", "modality"):
        assert isinstance(getattr(adapter, attr), str) and getattr(adapter, attr), f"{attr} must be a non-empty str"
    assert good and bad, "give at least one good and one bad item"

    alone = adapter.encode(list(good))
    assert len(alone) == len(good), "encode must return one result per item"
    for i, out in enumerate(alone):
        assert not isinstance(out, ItemError), f"good item {i} was refused: {getattr(out, 'reason', '')}"
        assert isinstance(out, (EncodedText, EncodedEmbeds)), f"item {i}: unknown result type {type(out).__name__}"
        if isinstance(out, EncodedEmbeds):
            e = out.embeds
            assert e.ndim == 2 and e.shape[0] > 0, f"item {i}: embeds must be [K, hidden], got {e.shape}"
            assert e.dtype == np.float32 and np.isfinite(e).all(), f"item {i}: embeds must be finite float32"
            if hidden_size is not None:
                assert e.shape[1] == hidden_size, f"item {i}: hidden size {e.shape[1]} != core model's {hidden_size}"

    # Mixed batch: bad items interleaved with good ones.
    mixed: list[Any] = []
    where_good: list[int] = []
    where_bad: list[int] = []
    for i in range(max(len(good), len(bad))):
        if i < len(bad):
            where_bad.append(len(mixed))
            mixed.append(bad[i])
        if i < len(good):
            where_good.append(len(mixed))
            mixed.append(good[i])
    out = adapter.encode(mixed)
    assert len(out) == len(mixed), "encode must return one result per item, bad ones included"
    for j in where_bad:
        assert isinstance(out[j], ItemError), f"bad item at {j} ({mixed[j]!r:.60}) was not refused"
        assert out[j].index == j, f"the error for item {j} names index {out[j].index}"
        assert out[j].reason, f"the error for item {j} gives no reason"
    for k, j in enumerate(where_good):
        assert _same(out[j], alone[k]), f"good item {k} encodes differently inside a mixed batch"

    again = adapter.encode(list(good))
    assert all(_same(a, b) for a, b in zip(alone, again, strict=True)), "encode is not deterministic"

    config = adapter.config()
    json.dumps(config)  # must be JSON: it travels to the replica
    rebuilt = type(adapter).from_config(config) if hasattr(type(adapter), "from_config") else None
    assert rebuilt is not None, "the adapter needs a from_config classmethod"
    assert rebuilt.config() == config, "from_config(config()) does not rebuild the same settings"

    texts = [str(g) for g in good] + ["", "\x00garbage"]
    decoded = adapter.decode(texts)
    assert len(decoded) == len(texts) and all(isinstance(d, Decoded) for d in decoded), (
        "decode must answer every text with a Decoded"
    )
    assert all((d.value is None) == (d.reason is not None) for d in decoded), "each Decoded is a value or a reason"


def check_part_folder(path: Path) -> None:
    """A saved part (projector or head): a valid card and weights whose shapes agree with it."""
    from safetensors.numpy import load_file

    from tpmflow.adapters.parts import PartCard

    card = PartCard.model_validate(json.loads((path / "card.json").read_text()))
    tensors = load_file(str(path / "weights.safetensors"))
    if card.kind == "ridge-regression":
        assert tensors["weight"].shape == (card.hidden_size,), "head weight does not match the card's hidden size"
    elif card.kind == "softmax-classifier":
        assert tensors["weight"].shape == (card.hidden_size, len(card.classes)), "weight is not [hidden, classes]"
    else:
        last = [k for k in tensors if k.startswith("projector.") and k.endswith(".weight")]
        assert last and tensors[sorted(last)[-1]].shape[0] == card.hidden_size, "projector does not end at hidden"
    assert card.base_content_hash.startswith("blake3:"), "the card must name the core model's content hash"
    assert card.metrics, "the card must carry held-out metrics"
