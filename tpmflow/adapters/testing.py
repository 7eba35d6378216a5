"""The conformance kit every adapter package runs in its own tests:

    from tpmflow.adapters.testing import check_adapter
    def test_conformance():
        check_adapter(MyAdapter(), good=[...], bad=[...], hidden_size=4096)

It checks what tpmflow relies on: the protocol's attributes, one result per item in order, errors
exactly at the bad items with a reason, results that do not depend on the rest of the batch,
deterministic encoding, outputs shaped for the core model, a JSON config that rebuilds the same
adapter, and decoding that answers every text. Failures are ``AssertionError`` with a message.

Soft-token adapters (``tpmflow.adapters.soft.SoftTokenAdapter``) are checked before and after
training with the same call: ``check_adapter(MyAdapter(), ...)`` before (no part yet: an untrained
projector stands in), ``check_adapter(MyAdapter(MySettings(part="name@version")), ...)`` after.
``check_part_folder`` checks a saved part's files.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tpmflow.adapters.base import Adapter, Decoded, EncodedEmbeds, EncodedText, ItemError

# The core width an untrained projector maps to when a soft-token adapter is checked before training
# and no hidden size is given: any width tests the shapes; the served one comes with the part.
UNTRAINED_HIDDEN_SIZE = 64


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, EncodedEmbeds) and isinstance(b, EncodedEmbeds):
        return a.embeds.shape == b.embeds.shape and bool(np.array_equal(a.embeds, b.embeds))
    return bool(a == b)


def _interleaved(good: Sequence[Any], bad: Sequence[Any]) -> tuple[list[Any], list[int], list[int]]:
    """Bad items interleaved with good ones, and where each kind landed."""
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
    return mixed, where_good, where_bad


def _without_raising(step: Any, items: list[Any], name: str) -> Any:
    try:
        return step(items)
    except Exception as exc:  # noqa: BLE001  (any exception is the finding)
        raise AssertionError(
            f"{name} raised {type(exc).__name__}: {exc} on a batch with bad items; return ItemError(i, reason) for "
            "each bad item instead, so the rest of the batch completes"
        ) from exc


def check_adapter(adapter: Any, good: Sequence[Any], bad: Sequence[Any], hidden_size: int | None = None) -> None:
    """Run every conformance check on ``adapter`` with known-good and known-bad items.

    ``hidden_size``: the core model's; soft tokens must have that width. A soft-token adapter with
    no trained part first gets the checks that need no projector (``prepare`` gives one fixed-shape
    float32 array per good item and an ``ItemError`` at each bad one; the encoder maps them to
    ``[B, K, encoder_dim]``), then every check below through an untrained, seeded projector to
    ``hidden_size`` (default ``UNTRAINED_HIDDEN_SIZE``), on a copy: ``adapter`` itself is not
    changed, and the pool still refuses to serve it without a part. With a part it is checked as the
    pool serves it, and the part must fit ``hidden_size``.
    """
    assert isinstance(adapter, Adapter), "the adapter lacks part of the Adapter protocol"
    for attr in ("name", "version", "modality"):
        assert isinstance(getattr(adapter, attr), str) and getattr(adapter, attr), f"{attr} must be a non-empty str"
    assert good and bad, "give at least one good and one bad item"
    if _is_soft(adapter):
        adapter = _check_soft(adapter, good, bad, hidden_size)
        hidden_size = hidden_size or adapter.fit.hidden_size or UNTRAINED_HIDDEN_SIZE

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

    mixed, where_good, where_bad = _interleaved(good, bad)
    out = _without_raising(adapter.encode, mixed, "encode")
    assert len(out) == len(mixed), "encode must return one result per item, bad ones included"
    for j in where_bad:
        assert isinstance(out[j], ItemError), f"bad item at {j} ({mixed[j]!r:.60}) was not refused"
        assert out[j].item == j, f"the error for item {j} names item {out[j].item}"
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


def _is_soft(adapter: Any) -> bool:
    from tpmflow.adapters.soft import SoftTokenAdapter

    return isinstance(adapter, SoftTokenAdapter)


def _check_soft(adapter: Any, good: Sequence[Any], bad: Sequence[Any], hidden_size: int | None) -> Any:
    """The checks that need no projector; returns the adapter to run the common checks on: itself
    when it has a trained part, else a copy with an untrained projector."""
    import torch

    settings = adapter.settings_type
    assert dataclasses.is_dataclass(settings), "settings_type must be a dataclass (config() is its asdict)"
    assert "part" in {f.name for f in dataclasses.fields(settings)}, "settings_type needs a `part` field"
    assert isinstance(adapter.encoder_dim, int) and adapter.encoder_dim > 0, "encoder_dim must be a positive int"

    prepared = adapter.prepare(list(good))
    assert len(prepared) == len(good), "prepare must return one result per item"
    for i, x in enumerate(prepared):
        assert not isinstance(x, ItemError), f"good item {i} was refused by prepare: {getattr(x, 'reason', '')}"
        assert isinstance(x, np.ndarray) and x.dtype == np.float32, f"prepare: item {i} is not a float32 array"
        assert np.isfinite(x).all(), f"prepare: item {i} has NaN or inf"
        assert x.shape == prepared[0].shape, f"prepare: item {i} has shape {x.shape}, item 0 {prepared[0].shape}"
    mixed, _, where_bad = _interleaved(good, bad)
    prepared_mixed = _without_raising(adapter.prepare, mixed, "prepare")
    assert len(prepared_mixed) == len(mixed), "prepare must return one result per item, bad ones included"
    for j in where_bad:
        e = prepared_mixed[j]
        assert isinstance(e, ItemError) and e.item == j and e.reason, f"prepare: bad item at {j} was not refused"

    encoder = adapter.build_encoder().eval()
    with torch.no_grad():
        features = encoder(torch.from_numpy(np.stack(prepared)))  # type: ignore[arg-type]
    shape = tuple(features.shape)
    assert len(shape) == 3 and shape[0] == len(good) and shape[1] > 0 and shape[2] == adapter.encoder_dim, (
        f"the encoder must map [B, *input_shape] to [B, K, encoder_dim={adapter.encoder_dim}], got {shape}"
    )

    if adapter.model is not None:  # trained (a part) or given one with use_model
        fit = adapter.fit.hidden_size
        assert hidden_size is None or fit in (None, hidden_size), (
            f"the part is for hidden size {fit}, not the core model's {hidden_size}"
        )
        return adapter
    untrained = type(adapter).from_config(adapter.config())
    untrained.use_model(untrained.new_model(hidden_size or UNTRAINED_HIDDEN_SIZE, seed=0))
    return untrained


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
