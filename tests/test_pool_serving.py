"""Query-only and embedding modes through a real pool (gateway + 2 vLLM CPU replicas)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tpmflow.client import AsyncClient, Client
from tpmflow.gateway.openai import validate_openai
from tpmflow.models.card import read_card

LONG_PROMPT = "In a steering campaign the thinker asks the shared model many questions. " * 6


def _transformers_hidden(model_dir: Path, text: str) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with torch.no_grad():
        out = model(tok(text, return_tensors="pt").input_ids, output_hidden_states=True)
    return out.hidden_states[-1][0].numpy()  # after the final norm


def _prefix_hits(pool: Any) -> float:
    """Prefix-cache hits summed over the replicas (their /metrics needs the pool secret)."""
    hits = 0.0
    for replica in pool.gateway.registry.live():
        text = httpx.get(replica.info.url + "/metrics", headers={"Authorization": f"Bearer {pool.secret}"}).text
        hits += sum(
            float(line.split()[-1]) for line in text.splitlines() if line.startswith("vllm:prefix_cache_hits_total")
        )
    return hits


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_health_models_and_provenance(client: Client, tiny_model_dir: Path) -> None:
    health = client.health()
    assert health["status"] == "ok" and len(health["replicas"]) == 2
    assert client.models() == ["tiny-llama"]
    emb = client.embed("provenance")
    assert emb.provenance["content_hash"] == read_card(tiny_model_dir).content_hash
    assert emb.provenance["engine"].startswith("vllm ")


def test_generate_through_client(client: Client) -> None:
    out = client.generate("The pool", max_tokens=8, temperature=0.0)
    assert out.usage["completion_tokens"] == 8 and out.finish_reason == "length"
    assert out.provenance["content_hash"].startswith("blake3:") and out.provenance["replica_id"].startswith("replica-")
    assert out.provenance["sampling"]["max_tokens"] == 8
    outs = client.generate(["a", "bb", "ccc"], max_tokens=3, temperature=0.0)
    # One usage for the whole batch: <s>a + <s>bb + <s>ccc = 2 + 3 + 4 prompt tokens.
    assert [o.usage["prompt_tokens"] for o in outs] == [9, 9, 9]
    assert len(outs) == 3


def test_embed_matches_transformers_and_ignores_the_prefix_cache(
    pool: Any, client: Client, tiny_model_dir: Path
) -> None:
    # Warm both replicas' prefix caches with the prompt (requests alternate between idle replicas).
    for _ in range(4):
        client.generate(LONG_PROMPT, max_tokens=1, temperature=0.0)
    assert _prefix_hits(pool) > 0, "the prefix was never cached, so this test would not exercise the cached path"
    text = LONG_PROMPT + "and the tail differs."
    cached = client.embed(text, pooling="none")[0]
    again = client.embed(text, pooling="none")[0]
    reference = _transformers_hidden(tiny_model_dir, text)
    assert cached.shape == reference.shape
    assert _rel_err(cached, reference) <= 1e-4
    assert _rel_err(again, reference) <= 1e-4
    pooled = client.embed([text], pooling="mean").numpy()[0]
    assert _rel_err(pooled, reference.mean(axis=0)) <= 1e-4
    last = client.embed([text], pooling="last").numpy()[0]
    assert _rel_err(last, reference[-1]) <= 1e-4


def test_large_per_token_output_comes_back_by_reference(client: Client, tiny_model_dir: Path) -> None:
    text = "x" * 700  # 701 positions x 128 floats = 359 KB > the fixture's 256 KiB inline limit
    emb = client.embed(text, pooling="none")
    assert emb.items[0].reference is not None
    assert emb.usage["payload_bytes_out"] == emb.items[0].reference.nbytes
    assert _rel_err(emb[0], _transformers_hidden(tiny_model_dir, text)) <= 1e-4


def test_seeded_sampling_is_deterministic(client: Client) -> None:
    a = client.generate("Seeds:", max_tokens=24, temperature=1.0, seed=123)
    b = client.generate("Seeds:", max_tokens=24, temperature=1.0, seed=123)
    c = client.generate("Seeds:", max_tokens=24, temperature=1.0, seed=124)
    assert a.text == b.text
    assert a.text != c.text


def test_prompt_embeds_inline_and_by_reference_match_text(client: Client, tiny_model_dir: Path) -> None:
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    table = load_file(str(tiny_model_dir / "model.safetensors"))["model.embed_tokens.weight"]
    ids = AutoTokenizer.from_pretrained(str(tiny_model_dir))("Embeds in")["input_ids"]
    from_text = client.generate("Embeds in", max_tokens=8, temperature=0.0)
    inline = client.generate(prompt_embeds=table[ids], max_tokens=8, temperature=0.0)
    by_ref = client.generate(prompt_embeds=client.put(table[ids].copy()), max_tokens=8, temperature=0.0)
    assert inline.text == from_text.text == by_ref.text
    assert by_ref.usage["payload_bytes_in"] > 0


def test_async_client_and_futures(pool: Any) -> None:
    async def run() -> tuple[Any, Any]:
        async with AsyncClient(pool.url, token=pool.token) as ac:
            gen = await ac.generate("async", max_tokens=4, temperature=0.0)
            emb = await ac.embed(["a", "b"])
            tasks = [ac.submit_generate(f"t{i}", max_tokens=2) for i in range(3)] + [ac.submit_embed("t")]
            assert len(await asyncio.gather(*tasks)) == 4
            return gen, emb

    gen, emb = asyncio.run(run())
    assert gen.usage["completion_tokens"] == 4 and emb.numpy().shape == (2, 128)
    with pool.client() as c:
        futures = [c.submit_generate(f"f{i}", max_tokens=2) for i in range(6)] + [c.submit_embed("fut")]
        results = [f.result(timeout=60) for f in futures]
    assert all(r is not None for r in results)


def test_openai_package_completions_chat_and_stream(pool: Any) -> None:
    from openai import OpenAI

    oa = OpenAI(base_url=pool.url + "/v1", api_key=pool.token)
    comp = oa.completions.create(model="tiny-llama", prompt="OpenAI", max_tokens=5, temperature=0)
    assert comp.usage.completion_tokens == 5
    chat = oa.chat.completions.create(
        model="tiny-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0
    )
    assert chat.choices[0].message.content is not None
    chunks = list(oa.completions.create(model="tiny-llama", prompt="stream", max_tokens=6, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices)
    usage = [c.usage for c in chunks if c.usage]
    assert usage and usage[-1].completion_tokens == 6  # the gateway forces usage on streams
    # The relay completes a stream's row after its last chunk went out, so it may land just after.
    deadline = time.monotonic() + 60
    while True:
        pool.ledger.flush()
        streamed = [r for r in pool.access.ledger_rows(endpoint="completions") if r.output_tokens == 6]
        if streamed or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert streamed, "the streamed request's tokens reached the ledger"


def test_gateway_injects_salt_and_strips_client_values(pool: Any) -> None:
    body = {"model": "tiny-llama", "prompt": "salt", "max_tokens": 2, "cache_salt": "stolen", "priority": -100}
    validated = validate_openai(dict(body), False, pool.gateway.model_name, pool.cfg.gateway)
    assert "cache_salt" not in validated and "priority" not in validated
    resp = httpx.post(pool.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {pool.token}"})
    assert resp.status_code == 200, resp.text


def test_prefix_cache_is_not_shared_across_principals(pool: Any) -> None:
    """A's cached prefix gives A hits, but B (another salt) gets none from it, on either replica."""
    prompt = "A private prefix that only principal A has sent so far, long enough to fill blocks. " * 4
    a = Client(pool.url, token=pool.add_principal("salt-a", permissions={"generate"}))
    b = Client(pool.url, token=pool.add_principal("salt-b", permissions={"generate"}))
    with a, b:
        for _ in range(4):  # both replicas now hold A's prefix
            a.generate(prompt, max_tokens=1, temperature=0.0)
        before = _prefix_hits(pool)
        a.generate(prompt, max_tokens=1, temperature=0.0)
        assert _prefix_hits(pool) > before, "control: A hits its own cached prefix"
        before = _prefix_hits(pool)
        b.generate(prompt, max_tokens=1, temperature=0.0)
        assert _prefix_hits(pool) == before, "B must not hit A's cache entries"


def test_replicas_answer_the_gateway_only(pool: Any) -> None:
    replica = pool.gateway.registry.live()[0].info.url
    for method, path in (
        ("POST", "/invocations"),
        ("GET", "/metrics"),
        ("POST", "/v1/completions"),
        ("POST", "/tokenize"),
        ("POST", "/v1/tpmflow/embed"),
    ):
        resp = httpx.request(method, replica + path, json={"prompt": "x", "model": "tiny-llama"})
        assert resp.status_code == 401, (path, resp.status_code)
    assert httpx.get(replica + "/health").status_code == 200


def test_metrics_exposes_prometheus_series(pool: Any, client: Client) -> None:
    client.generate("metrics", max_tokens=2)
    text = httpx.get(pool.url + "/metrics").text
    samples = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    for name in (
        "tpmflow_requests_total",
        "tpmflow_request_latency_seconds_bucket",
        "tpmflow_queue_depth",
        "tpmflow_tokens_total",
        "tpmflow_replica_inflight",
        "tpmflow_replicas_live",
        "tpmflow_replica_running",
    ):
        assert name in samples, f"{name} has no sample"
    assert 'tpmflow_requests_total{endpoint="completions",service_class="interactive",status="200"}' in text


def test_usage_endpoint_reports_this_principal(client: Client) -> None:
    rows = client.usage()
    assert rows and rows[0]["requests"] > 0 and rows[0]["prompt_tokens"] > 0
    assert json.dumps(rows)
    from tpmflow.errors import InvalidRequest

    with pytest.raises(InvalidRequest):
        client.usage(by="nonsense")


def test_digest_of_inline_array_matches_local(client: Client) -> None:
    from tpmflow.payload import digest_of, encode_payload

    arr = np.arange(1000, dtype=np.float32).reshape(10, 100)
    answer = client.digest(arr)
    assert answer["digest"] == digest_of(encode_payload(arr)[0]) and answer["shape"] == [10, 100]


def test_expired_payloads_are_evicted(pool: Any, client: Client) -> None:
    import time

    ref = client.put(np.ones(16, dtype=np.float32))
    out = client.embed("x" * 700, pooling="none").items[0].reference  # written by the replica
    assert ref is not None and out is not None
    store = pool.gateway.store
    assert store.exists(ref) and store.exists(out)
    assert pool.gateway.sweep_payloads_now(now=time.time() + 10**6) >= 2
    assert not store.exists(ref) and not store.exists(out)


def test_health_reports_engine_load(pool: Any, client: Client) -> None:
    """Heartbeats carry vLLM's own running/waiting gauges: seen > 0 while long generations run.

    Heartbeats come once a second, so the load must outlast several of them even on a fast
    machine: 16 generations of 1000 tokens each, spread over both replicas.
    """
    import time

    futures = [
        client.submit_generate(f"busy {i} ", max_tokens=1000, temperature=0.0, ignore_eos=True) for i in range(16)
    ]
    seen = 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(f.done() for f in futures):
        seen = max(seen, sum(r["running"] + r["waiting"] for r in client.health()["replicas"]))
        if seen:
            break
        time.sleep(0.2)
    for future in futures:
        future.result(timeout=180)
    assert seen > 0, "no replica reported load while one was generating"
