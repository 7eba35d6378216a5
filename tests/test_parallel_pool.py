"""Pools whose one replica is split over two ranks (one core each): tensor parallel (TP=2) and
pipeline parallel (PP=2), through the gateway as a campaign uses them. Every test runs on both
shapes: health names the shape, generation, streaming, chat, embed, soft tokens, a head's
predictions, a LoRA version pinned by id, and probe give the unsplit model's answers (transformers
on the same weights); a big capture is written to the store once and metered once; provenance and
the ledger name the shape; a rank's worker killed takes the replica down and back up without a hang.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tpmflow.schema import Capture, LogitLens

pytestmark = pytest.mark.engine
PROMPT = "CC(=O)OC1=CC=CC=C1C(=O)O"
SHAPES = {"tp2": (2, 1), "pp2": (1, 2)}


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(float(np.linalg.norm(b)), 1e-12))


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The split model committed to a model store, and a rank-8 LoRA of its projections on top."""
    from safetensors.numpy import load_file
    from test_versioned_pool import _lora_folder

    from tpmflow.models.tiny_families import build_tiny_family
    from tpmflow.versioning import ModelStore

    root = tmp_path_factory.mktemp("split-versions")
    model = build_tiny_family("llama-split")
    store = ModelStore(root / "models")
    base = store.commit(model, "the split test model", "tests", tag="base")
    factors = _lora_folder(root / "lora", load_file(str(model / "model.safetensors")))
    lora = store.commit(None, "rank-8 LoRA", "tests", lora=factors, parent=base, tag="lora")
    return {"store": store, "base": base, "lora": lora}


@pytest.fixture(scope="module", params=list(SHAPES))
def split_pool(
    request: pytest.FixtureRequest, versions: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    from tpmflow.config import GatewayConfig, PoolConfig
    from tpmflow.payload import StoreConfig
    from tpmflow.pool import Pool

    tp, pp = SHAPES[request.param]
    root = tmp_path_factory.mktemp(f"split-pool-{request.param}")
    cfg = PoolConfig(
        model="split",
        served_model_name="split",
        replicas=1,
        replica_versions=["base"],
        lora_versions=["lora"],  # served as a vLLM adapter on the split base
        model_store=str(versions["store"].root),
        engine={"tensor_parallel_size": tp, "pipeline_parallel_size": pp, "max_model_len": 256},
        gateway=GatewayConfig(request_timeout_s=60, heartbeat_timeout_s=30),
        store=StoreConfig(path=str(root / "store"), inline_limit_bytes=4 << 10),
        database_url=f"sqlite:///{root / 'access.db'}",
        parts_path=str(root / "parts"),
        max_activation_bytes=1 << 22,
    )
    with Pool(cfg) as running:
        running.shape = (tp, pp)
        yield running


@pytest.fixture(scope="module")
def hf() -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tpmflow.models.tiny_families import build_tiny_family

    path = str(build_tiny_family("llama-split"))
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def _store_files(pool: Any) -> list[str]:
    """The store's objects (the file connector writes each with a ``.ready`` marker beside it)."""
    return sorted(str(p) for p in Path(pool.cfg.store.path).rglob("*") if p.is_file() and p.suffix != ".ready")


def test_health_names_the_shape_and_probes_passed_their_self_check(split_pool: Any) -> None:
    with split_pool.client() as client:
        (replica,) = client.health()["replicas"]
    assert (replica["tensor_parallel"], replica["pipeline_parallel"]) == split_pool.shape, replica
    assert not str(replica["probes"]).startswith("disabled"), replica["probes"]


def test_generation_streaming_and_embed_are_the_unsplit_models(split_pool: Any, hf: tuple[Any, Any]) -> None:
    model, tok = hf
    ids = tok(PROMPT)["input_ids"]
    seq = list(ids)
    with torch.no_grad():
        for _ in range(8):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    expected = tok.decode(seq[len(ids) :], skip_special_tokens=True)
    with split_pool.client() as client:
        gen = client.generate(PROMPT, max_tokens=8, temperature=0.0, ignore_eos=True)
        assert gen.text == expected
        tp, pp = split_pool.shape
        assert f"TP={tp} PP={pp}" in gen.provenance["engine"], gen.provenance
        split_pool.ledger.flush()
        rows = split_pool.access.ledger_rows(correlation_id=gen.request_id)
        assert [r.replica_shape for r in rows] == [f"TP={tp} PP={pp}"], "the ledger names the shape that served it"
        emb = client.embed([PROMPT], pooling="mean")
    from openai import OpenAI

    oa = OpenAI(base_url=split_pool.url + "/v1", api_key=split_pool.token)
    chunks = oa.completions.create(
        model="split", prompt=PROMPT, max_tokens=8, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    chat = oa.chat.completions.create(
        model="split", messages=[{"role": "user", "content": PROMPT}], max_tokens=4, temperature=0
    )
    assert chat.usage.completion_tokens >= 1
    with torch.no_grad():
        final = model.model(torch.tensor([ids])).last_hidden_state[0].numpy()
    assert _rel(np.asarray(emb[0]), final.mean(axis=0)) < 1e-4


def test_a_probe_gathers_every_head_and_writes_each_capture_once(split_pool: Any, hf: tuple[Any, Any]) -> None:
    model, tok = hf
    ids = tok(PROMPT)["input_ids"]
    seen: dict[str, np.ndarray] = {}
    hook = model.model.layers[1].self_attn.o_proj.register_forward_pre_hook(
        lambda m, a: seen.__setitem__("z", a[0][0].detach().numpy().copy())
    )
    try:
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_hidden_states=True)
    finally:
        hook.remove()
    before = _store_files(split_pool)
    with split_pool.client() as client:
        trace = client.probe(
            PROMPT,
            capture=[Capture(site="blocks.0.hook_resid_post"), Capture(site="blocks.1.hook_z")],
            lens=LogitLens(layers=[0, 1], top_k=3),
        )
    refs = [name for name, lazy in trace.captures.items() if lazy.reference is not None]
    assert sorted(refs) == ["blocks.0.hook_resid_post", "blocks.1.hook_z"], "both are over the 4 KB inline limit"
    written = sorted(set(_store_files(split_pool)) - set(before))
    assert len(written) == len(refs), f"each capture written once, not once per rank: {written}"
    assert trace.usage["activation_bytes"] == sum(trace[n].nbytes for n in trace.captures), "metered once"
    assert _rel(trace["blocks.0.hook_resid_post"], out.hidden_states[1][0].numpy()) < 1e-4
    z = trace["blocks.1.hook_z"]
    assert z.shape == (len(ids), 2, 64), "both ranks' heads, in order"
    assert _rel(z.reshape(len(ids), -1), seen["z"]) < 1e-4
    # The lens at both layers (under PP=2 layer 0's stream is unembedded by the other stage).
    with torch.no_grad():
        lens0 = model.lm_head(model.model.norm(out.hidden_states[1]))[0]
    expected = {0: lens0, 1: out.logits[0]}
    assert [entry["layer"] for entry in trace.lens] == [0, 1]
    for entry in trace.lens:
        probs = torch.softmax(expected[entry["layer"]], dim=-1).numpy()
        for r, pos in enumerate(entry["positions"]):
            assert entry["token_ids"][r] == np.argsort(-probs[pos])[:3].tolist(), (entry["layer"], pos)


def _hf_pooled(model_dir: Path, text: str) -> np.ndarray:
    from test_versioned_pool import _transformers_pooled

    return _transformers_pooled(model_dir, text)


def test_a_lora_version_pinned_by_id_is_the_merged_weights(split_pool: Any) -> None:
    """The LoRA's factors are split over the ranks as its base layers are (vLLM's LoRA layers);
    the served states equal transformers on the store's merged weights."""
    import httpx
    from test_versioned_pool import _transformers_greedy

    from tpmflow.versioning import materialise

    lora = next(v for r in split_pool.gateway.registry.live() for v in r.info.lora_versions)
    with split_pool.client(version=lora) as client:
        served = client.embed([PROMPT])
    assert served.provenance["content_hash"] == lora
    merged = materialise(lora, split_pool.cfg.model_store)
    reference = _hf_pooled(merged, PROMPT)
    assert _rel(served.numpy()[0], reference) < 1e-4
    base = _hf_pooled(materialise("base", split_pool.cfg.model_store), PROMPT)
    assert _rel(reference, base) > 1e-2, "the adapter changes the outputs"
    body = {"model": "split", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "return_token_ids": True}
    headers = {"Authorization": f"Bearer {split_pool.token}", "X-Tpmflow-Version": lora}
    resp = httpx.post(f"{split_pool.url}/v1/completions", json=body, headers=headers, timeout=60)
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["token_ids"] == _transformers_greedy(merged, PROMPT, 8)


def test_a_heads_predictions_are_the_head_on_the_unsplit_models_states(split_pool: Any) -> None:
    """The adapters' text route (SMILES → prompt) and a ridge head on the pooled final states."""
    from tpmflow.adapters import load_adapter
    from tpmflow.adapters.heads import RidgeHead
    from tpmflow.adapters.parts import PartCard, save_part
    from tpmflow.versioning import materialise

    molecules = ["CCO", "c1ccccc1O", "not a molecule"]
    with split_pool.client() as client:
        prov = client.embed(["a"]).provenance
        hidden = split_pool.gateway.registry.live()[0].info.hidden_size
        rng = np.random.default_rng(5)
        head = RidgeHead(
            np.zeros(hidden, np.float32), np.ones(hidden, np.float32), rng.normal(size=hidden).astype(np.float32), 0.5
        )
        card = PartCard(
            adapter="smiles", name="probe-free", version="0.0.1", kind="ridge-regression", modality="smiles",
            base_model=prov["model"], base_content_hash=prov["content_hash"], hidden_size=hidden,
        )  # fmt: skip
        save_part(head.tensors(), card, root=Path(split_pool.cfg.parts_path))
        out = client.predict(molecules, adapter="smiles", head="probe-free@0.0.1")
    assert out.ok == [0, 1], out.errors
    texts = [e.text for e in load_adapter("smiles").encode(molecules[:2])]
    model_dir = materialise("base", split_pool.cfg.model_store)
    expected = head.predict(np.stack([_hf_pooled(model_dir, t) for t in texts]))
    np.testing.assert_allclose(out.values[:2], expected, rtol=1e-4, atol=1e-4)


def test_a_killed_rank_takes_the_replica_down_and_the_launcher_brings_it_back(split_pool: Any) -> None:
    import psutil

    if split_pool.shape != (2, 1):  # a restart costs a minute of the suite: the TP pool's rank shows it
        pytest.skip("a killed rank is checked on the TP=2 pool (the same launcher path restarts a PP replica)")

    server = psutil.Process(split_pool.launcher.replicas["replica-0"].pid)
    workers = [p for p in server.children(recursive=True) if "Worker" in " ".join(p.cmdline()) or "Worker" in p.name()]
    assert len(workers) >= 2, [(p.name(), p.cmdline()) for p in server.children(recursive=True)]
    os.kill(workers[-1].pid, signal.SIGKILL)
    deadline = time.monotonic() + 240
    answered = None
    with split_pool.client() as client:
        while time.monotonic() < deadline:  # every request answers (or fails with a typed error) promptly
            t0 = time.monotonic()
            try:
                answered = client.generate(PROMPT, max_tokens=2, temperature=0.0)
                if split_pool.launcher.replicas["replica-0"].pid != server.pid:
                    break  # a new replica process served it
            except Exception as exc:  # noqa: BLE001 - a clear error while the replica restarts
                assert type(exc).__module__.startswith("tpmflow"), exc
            assert time.monotonic() - t0 < 90, "a request hung on a replica with a dead rank"
            time.sleep(2)
    assert answered is not None and split_pool.launcher.replicas["replica-0"].pid != server.pid


def test_soft_tokens_spliced_between_text_are_the_unsplit_models(split_pool: Any, hf: tuple[Any, Any]) -> None:
    """The adapters' route: soft tokens with text around them, served as prompt embeddings (the text's
    input embeddings come from the vocabulary-split embedding, every rank taking part)."""
    from tpmflow.adapters.soft import text_around

    model, tok = hf
    soft = np.random.default_rng(2).normal(size=(3, model.config.hidden_size)).astype(np.float32)
    before, after = text_around(tok, "CCO", " N")
    with torch.no_grad():
        table = model.model.embed_tokens
        embeds = torch.cat([table(torch.tensor(before)), torch.from_numpy(soft), table(torch.tensor(after))])
        final = model.model(inputs_embeds=embeds[None]).last_hidden_state[0].numpy()
    with split_pool.client() as client:
        served = client.embed([{"prompt_embeds": soft, "prefix": "CCO", "suffix": " N"}], pooling="mean")
    assert served.n_tokens[0] == len(before) + 3 + len(after)
    assert _rel(np.asarray(served[0]), final.mean(axis=0)) < 1e-4
