"""A pool serving model-store versions: two replicas pinned to versions A and B, side by side."""

from __future__ import annotations

import json
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


def _transformers_greedy(model_dir: Path, text: str, n: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    ids = tok(text, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return [int(t) for t in out[0, ids.shape[1] :]]


def _lora_folder(path: Path, base: dict[str, np.ndarray], rank: int = 8, alpha: float = 16.0) -> Path:
    """A PEFT LoRA of every attention and MLP projection (what vLLM can serve as an adapter)."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(7)
    path.mkdir()
    tensors = {}
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for name, w in base.items():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in targets:
            a = rng.standard_normal((rank, w.shape[1])) * 0.05
            b = rng.standard_normal((w.shape[0], rank)) * 0.05
            tensors[f"base_model.model.{module}.lora_A.weight"] = a.astype(np.float32)
            tensors[f"base_model.model.{module}.lora_B.weight"] = b.astype(np.float32)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(targets)}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def versions(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Version A is the tiny model; B changes its final norm (a fine-tune in miniature); "lora" is a
    rank-8 LoRA of A's projections, committed as factors and served as a vLLM adapter on A."""
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
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    lora = store.commit(None, "rank-8 LoRA", "tests", lora=_lora_folder(root / "lora", base), parent=a, tag="lora")
    from tpmflow.paths import checkouts_dir

    # an earlier run's reference checkout, so the test can see that the pool makes none of its own
    shutil.rmtree(checkouts_dir() / lora.removeprefix("blake3:"), ignore_errors=True)
    return {"store": store, "root": root, "a": a, "b": b, "lora": lora}


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
        lora_versions=["lora"],  # served as an adapter by the replica running its parent, A
        model_store=str(versions["store"].root),
        gateway=GatewayConfig(request_timeout_s=60, heartbeat_timeout_s=30),
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


def test_a_lora_version_is_served_as_a_vllm_adapter_on_its_parent(ab_pool: Any, versions: dict[str, Any]) -> None:
    import httpx

    from tpmflow.paths import checkouts_dir

    a, lora = versions["a"], versions["lora"]
    # No merged checkout of the LoRA version was made: the replica loads A and the factors only.
    assert not (checkouts_dir() / lora.removeprefix("blake3:")).exists()
    served = {r.info.replica_id: (r.info.content_hash, r.info.lora_versions) for r in ab_pool.gateway.registry.live()}
    assert served["replica-0"] == (a, [lora]) and served["replica-1"] == (versions["b"], [])
    text = "versioned weights"
    with ab_pool.client(version=lora[:20]) as client:  # a prefix of the id pins too
        embs = [client.embed([text]) for _ in range(3)]
    assert {e.provenance["content_hash"] for e in embs} == {lora}
    got = embs[0].numpy()[0]
    merged = materialise(lora, versions["store"].root)  # the reference: the store's merged weights
    reference = _transformers_pooled(merged, text)
    assert float(np.abs(got - reference).max() / np.abs(reference).max()) <= 1e-4
    base = _transformers_pooled(materialise(a, versions["store"].root), text)
    assert float(np.abs(got - base).max() / np.abs(base).max()) > 1e-2, "the adapter changes the outputs"
    # vLLM's own OpenAI route on the adapter: greedy tokens of the merged weights, version in the headers.
    body = {"model": ab_pool.cfg.model_name(), "prompt": text, "max_tokens": 8, "temperature": 0}
    headers = {"Authorization": f"Bearer {ab_pool.token}", "X-Tpmflow-Version": lora}
    resp = httpx.post(f"{ab_pool.url}/v1/completions", json={**body, "return_token_ids": True}, headers=headers)
    assert resp.status_code == 200, resp.text
    assert resp.headers["X-Tpmflow-Content-Hash"] == lora
    assert resp.json()["choices"][0]["token_ids"] == _transformers_greedy(merged, text, 8)
    ab_pool.ledger.flush()
    assert ab_pool.access.ledger_rows(request_id=resp.headers["X-Tpmflow-Request-Id"])[0].content_hash == lora


def test_a_version_the_pool_does_not_serve_is_a_typed_404(ab_pool: Any) -> None:
    with ab_pool.client(version="blake3:" + "0" * 64) as client, pytest.raises(VersionNotFound, match="no replica"):
        client.generate("x", max_tokens=1)
    with ab_pool.client() as client:
        assert client.generate("still up", max_tokens=1).usage["completion_tokens"] == 1


def test_a_pool_config_checks_its_versions(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from tpmflow.config import PoolConfig
    from tpmflow.versioning.checkout import replica_model_dir

    with pytest.raises(ValidationError, match="2 versions for 3 replicas"):
        PoolConfig(model="m", replicas=3, replica_versions=["a", "b"])
    with pytest.raises(VersionNotFound):
        replica_model_dir(PoolConfig(model="m", version="no-such-tag", model_store=str(tmp_path / "empty")))


def test_a_checkout_that_no_longer_holds_its_version_is_checked_out_again(versions: dict[str, Any]) -> None:
    import json

    folder = materialise("a", versions["store"].root)
    card = json.loads((folder / "tpmflow-card.json").read_text())
    (folder / "tpmflow-card.json").write_text(json.dumps({**card, "content_hash": "blake3:" + "f" * 64}))
    again = materialise("a", versions["store"].root)
    assert again == folder and json.loads((again / "tpmflow-card.json").read_text())["content_hash"] == versions["a"]


def test_a_collection_is_reembedded_for_another_version(ab_pool: Any, versions: dict[str, Any]) -> None:
    """A collection made on version A moves to B in steps: until the last step its embedder (and
    every search) is A's; an item added meanwhile is moved too; afterwards the stored vectors are B's
    own embeddings and searches work on them. The CLI moves it back with a progress bar."""
    from sqlalchemy import select
    from typer.testing import CliRunner

    from tpmflow.cli import app
    from tpmflow.errors import InvalidRequest
    from tpmflow.knowledge.tables import CollectionRow, KnowledgeItemRow

    texts = [f"CC{'C' * i}O" for i in range(7)]
    name = "moving-" + versions["a"][7:15]
    with ab_pool.client(version=versions["a"]) as on_a:
        on_a.knowledge(name).create()
        on_a.knowledge(name).add(texts)
        assert on_a.knowledge(name).info()["embedder"]["model"] == versions["a"]
    with ab_pool.client() as client:
        docs = client.knowledge(name)
        steps: list[dict[str, Any]] = []
        first = client._run(client._knowledge("reembed", {"name": name, "version": versions["b"][:20], "batch": 3}))
        assert (first["complete"], first["embedded"], first["remaining"]) == (False, 3, 4)
        assert docs.info()["embedder"]["model"] == versions["a"], "A's until the move is complete"
        assert docs.search([texts[5]], k=1)[0][0].item == texts[5]
        docs.add(["late arrival"])  # by A's replica: the move embeds it too before the swap
        done = docs.reembed(versions["b"][:20], batch=3, progress=steps.append)
        assert done["complete"] and [s["embedded"] for s in steps] == [3, 2], steps
        assert docs.info()["embedder"]["model"] == versions["b"] and docs.info()["items"] == 8
        assert docs.search(["late arrival"], k=1)[0][0].item == "late arrival"
        with pytest.raises(VersionNotFound, match="no live replica serves version"):
            docs.reembed("blake3:" + "0" * 20)
        with pytest.raises(InvalidRequest, match="give the version"):
            client._run(client._knowledge("reembed", {"name": name}))
    with ab_pool.client(version=versions["b"]) as on_b:
        expected = on_b.embed([*texts, "late arrival"]).numpy()
    with ab_pool.access.engine.connect() as conn:
        cid = conn.execute(select(CollectionRow.id).where(CollectionRow.name == name)).scalar_one()
        stored = conn.execute(
            select(KnowledgeItemRow.vector).where(KnowledgeItemRow.collection_id == cid).order_by(KnowledgeItemRow.id)
        ).scalars()
        vectors = np.stack([np.frombuffer(v, dtype=np.float32) for v in stored])
    np.testing.assert_allclose(vectors, expected, rtol=1e-4, atol=1e-4)  # B's norm is 1.5x A's: not A's vectors
    env = {"TPMFLOW_URL": ab_pool.url, "TPMFLOW_TOKEN": ab_pool.token}
    out = CliRunner().invoke(app, ["knowledge", "reembed", name, "--version", versions["a"], "--batch", "4"], env=env)
    assert out.exit_code == 0 and f"8 items now embedded by {versions['a'][:19]}" in out.output, out.output
