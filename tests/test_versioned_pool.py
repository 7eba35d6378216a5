"""A pool serving model-store versions: two replicas pinned to versions A and B, side by side."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tpmflow.errors import VersionNotFound
from tpmflow.versioning import ModelStore, materialise


def _transformers_pooled(model_dir: Path, text: str) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.inference_mode():
        out = model(tok(text, return_tensors="pt").input_ids, output_hidden_states=True)
    return out.hidden_states[-1][0].numpy().mean(axis=0)  # after the final norm


@pytest.fixture(scope="module")
def versions(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Version A is the tiny model; B changes its final norm (a fine-tune in miniature)."""
    from safetensors.numpy import load_file, save_file

    root = tmp_path_factory.mktemp("versions")
    store = ModelStore(root / "store")
    a = store.commit(tiny_model_dir, "the tiny model as built", "tests", tag="a")
    changed = root / "b"
    shutil.copytree(tiny_model_dir, changed)
    weights = load_file(str(changed / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * np.float32(1.5)
    save_file(weights, str(changed / "model.safetensors"), metadata={"format": "pt"})
    b = store.commit(changed, "final norm x1.5", "tests", parent=a, tag="b")
    return {"store": store, "root": root, "a": a, "b": b}


@pytest.fixture(scope="module")
def ab_pool(versions: dict[str, Any]) -> Iterator[Any]:
    from tpmflow.config import GatewayConfig, PoolConfig
    from tpmflow.payload import StoreConfig
    from tpmflow.pool import Pool

    root = versions["root"]
    cfg = PoolConfig(
        model="tiny-llama",
        replicas=2,
        replica_versions=["a", versions["b"]],  # a tag and a version id
        model_store=str(versions["store"].root),
        gateway=GatewayConfig(request_timeout_s=60),
        store=StoreConfig(path=str(root / "payloads")),
        database_url=f"sqlite:///{root / 'access.db'}",
    )
    with Pool(cfg) as running:
        yield running


def test_the_version_id_is_the_content_hash_of_the_checkout(versions: dict[str, Any], tiny_model_dir: Path) -> None:
    from tpmflow.models.card import content_hash, read_card

    assert versions["a"] == read_card(tiny_model_dir).content_hash
    folder = materialise("b", versions["store"].root)
    assert content_hash(folder) == versions["b"] != versions["a"]
    assert materialise(versions["b"], versions["store"].root) == folder, "checked out once, then reused"


def test_replicas_pinned_to_a_and_b_give_those_weights_outputs(ab_pool: Any, versions: dict[str, Any]) -> None:
    text = "versioned weights"
    got = {}
    for name in ("a", "b"):
        with ab_pool.client(version=versions[name]) as client:
            for _ in range(3):  # pinned: every answer comes from the replica of that version
                emb = client.embed([text])
                assert emb.provenance["content_hash"] == versions[name]
            got[name] = emb.numpy()[0]
            reference = _transformers_pooled(materialise(versions[name], versions["store"].root), text)
            assert float(np.abs(got[name] - reference).max() / np.abs(reference).max()) <= 1e-4
    assert np.allclose(got["b"], 1.5 * got["a"], rtol=1e-3, atol=1e-5), "B's final norm is A's x1.5"
    with ab_pool.client() as client:  # unpinned: both versions answer, each naming itself
        seen = {client.generate("x", max_tokens=1).provenance["content_hash"] for _ in range(8)}
    assert seen == {versions["a"], versions["b"]}


def test_a_version_the_pool_does_not_serve_is_a_typed_404(ab_pool: Any) -> None:
    with ab_pool.client(version="blake3:" + "0" * 64) as client, pytest.raises(VersionNotFound, match="no replica"):
        client.generate("x", max_tokens=1)
    with ab_pool.client() as client:
        assert client.generate("still up", max_tokens=1).usage["completion_tokens"] == 1


def test_a_pool_config_checks_its_versions(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from tpmflow.config import PoolConfig

    with pytest.raises(ValidationError, match="2 versions for 3 replicas"):
        PoolConfig(model="m", replicas=3, replica_versions=["a", "b"])
    with pytest.raises(VersionNotFound):
        PoolConfig(model="m", version="no-such-tag", model_store=str(tmp_path / "empty")).model_dir()


def test_a_checkout_that_no_longer_holds_its_version_is_checked_out_again(versions: dict[str, Any]) -> None:
    import json

    folder = materialise("a", versions["store"].root)
    card = json.loads((folder / "tpmflow-card.json").read_text())
    (folder / "tpmflow-card.json").write_text(json.dumps({**card, "content_hash": "blake3:" + "f" * 64}))
    again = materialise("a", versions["store"].root)
    assert again == folder and json.loads((again / "tpmflow-card.json").read_text())["content_hash"] == versions["a"]
