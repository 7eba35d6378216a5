"""The soft-token route: vectors spliced between embedded text, served as ``prompt_embeds``, give
the same final states in the pool as in the transformers copy the projectors are trained against."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from tpmflow.adapters import ItemError
from tpmflow.adapters.soft import SoftTokenAdapter
from tpmflow.errors import AdapterInputError, InvalidRequest


@dataclass(frozen=True)
class VectorSettings:
    part: str | None = None
    prefix: str = "vectors:"
    suffix: str = " end"


class _Rows(nn.Module):
    """[B, K, 8] -> [B, K, 16]: a linear map per row."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class VectorAdapter(SoftTokenAdapter):
    """Items are [4, 8] float arrays; the smallest soft-token adapter there is."""

    name = "vectors"
    version = "0.0.1"
    modality = "vectors"
    settings_type = VectorSettings
    encoder_dim = 16

    def prepare(self, items: Sequence[Any]) -> list[np.ndarray | ItemError]:
        out: list[np.ndarray | ItemError] = []
        for i, item in enumerate(items):
            a = np.asarray(item)
            if a.shape != (4, 8) or a.dtype.kind not in "fiu":
                out.append(ItemError(i, f"expected a (4, 8) array of numbers, got {a.dtype} {a.shape}"))
            else:
                out.append(a.astype(np.float32))
        return out

    def build_encoder(self) -> nn.Module:
        return _Rows()


@pytest.fixture(scope="module")
def local_adapter() -> VectorAdapter:
    adapter = VectorAdapter()
    adapter.use_model(adapter.new_model(hidden_size=128, seed=0))
    return adapter


def test_pool_final_states_of_spliced_soft_tokens_match_transformers(
    client: Any, tiny_model_dir: Path, local_adapter: VectorAdapter
) -> None:
    """Run locally, send soft tokens; the pool splices the text around them with the model's own
    embedding table. Mean-pooled final states agree with the transformers copy."""
    from tpmflow.adapters.training import FrozenCore

    rng = np.random.default_rng(0)
    items = [rng.normal(size=(4, 8)).astype(np.float32) for _ in range(3)]
    served = client.embed([*items, np.zeros((2, 8))], adapter=local_adapter)
    assert served.ok == [0, 1, 2] and "(4, 8)" in str(served.items[3])
    core = FrozenCore.load(tiny_model_dir)
    soft = torch.from_numpy(local_adapter.soft_tokens(np.stack(items)))
    with torch.no_grad():
        expected = core.pooled(soft, "vectors:", " end").numpy()
    np.testing.assert_allclose(served.numpy(only_ok=True), expected, atol=2e-3, rtol=1e-3)
    before, after = len(core.tokenizer.encode("vectors:")), len(core.tokenizer.encode(" end", add_special_tokens=False))
    assert served.n_tokens[0] == before + 4 + after


def test_bad_soft_tokens_get_typed_errors_and_the_pool_stays_up(client: Any, local_adapter: VectorAdapter) -> None:
    def soft(array: np.ndarray) -> dict[str, Any]:
        return {"prompt_embeds": array, "prefix": "", "suffix": ""}

    nan = np.zeros((3, 128), np.float32)
    nan[1, 5] = np.nan
    with pytest.raises(InvalidRequest, match="NaN"):
        client.embed([soft(nan)])
    with pytest.raises(InvalidRequest, match="hidden size"):
        client.embed([soft(np.zeros((3, 64), np.float32))])
    with pytest.raises(InvalidRequest, match="max_model_len"):
        client.embed([soft(np.zeros((1024, 128), np.float32))])
    out = client.embed([soft(np.ones((3, 128), np.float32)), "text"])
    assert out.numpy().shape == (2, 128)


def test_an_item_error_from_a_local_adapter_keeps_its_index(client: Any, local_adapter: VectorAdapter) -> None:
    out = client.embed([np.ones((4, 8)), "not an array", np.ones((4, 8))], adapter=local_adapter)
    assert out.ok == [0, 2]
    assert isinstance(out.items[1], AdapterInputError) and out.items[1].item == 1


def test_local_errors_name_the_caller_s_items(client: Any, local_adapter: VectorAdapter) -> None:
    """Items refused here never travel; a refusal by the pool names the item in the caller's list."""
    out = client.embed(["no", "nope"], adapter=local_adapter)
    assert out.ok == [] and [e.item for e in out.errors] == [0, 1]
    with pytest.raises(InvalidRequest, match="NaN") as caught:
        client.embed(["no", np.ones((4, 8)), np.full((4, 8), np.nan)], adapter=local_adapter)
    assert caught.value.item == 2


def test_an_adapter_that_breaks_on_one_item_loses_only_that_item() -> None:
    from tpmflow.engine.adapter_routes import _encode_isolated

    def encode(items: list[Any]) -> list[Any]:
        if any(x == "boom" for x in items):
            raise RuntimeError("unforeseen input")
        return [ItemError(0, "refused") if x == "bad" else f"ok:{x}" for x in items]

    out = _encode_isolated(encode, ["a", "boom", "bad", "b"])
    assert out[0] == "ok:a" and out[3] == "ok:b"
    assert isinstance(out[1], ItemError) and "unforeseen input" in out[1].reason
    assert isinstance(out[2], ItemError) and out[2].reason == "refused"
