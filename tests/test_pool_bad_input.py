"""Bad input gets its documented error class and HTTP status; after each, the pool still serves."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from tpmflow.client import Client
from tpmflow.errors import Forbidden, InvalidRequest, ModelNotFound, PayloadTooLarge, Unauthorized


@pytest.fixture()
def still_serving(client: Client):
    yield
    out = client.generate("still up?", max_tokens=2, temperature=0.0)
    assert out.usage["completion_tokens"] == 2


def _post(pool: Any, path: str, token: str | None, headers: dict[str, str] | None = None, **kw: Any) -> httpx.Response:
    headers = dict(headers or {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.post(pool.url + path, headers=headers, timeout=60, **kw)


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": []},
        {"prompt": ""},
        {"prompt": ["ok", ""]},
        {"prompt": "x", "max_tokens": 0},
        {"prompt": "x", "max_tokens": -5},
        {"prompt": "x", "max_tokens": 10**9},
        {"prompt": "x", "max_tokens": "ten"},
        {"prompt": "x", "n": 10**6},
        {"prompt": "x", "n": 0},
    ],
)
def test_bad_completion_bodies_are_400(pool: Any, body: dict[str, Any], still_serving: None) -> None:
    resp = _post(pool, "/v1/completions", pool.token, json={"model": "tiny-llama", **body})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["type"] == "InvalidRequest"


def test_prompt_longer_than_max_model_len(client: Client, still_serving: None) -> None:
    with pytest.raises(InvalidRequest):
        client.generate("y" * 3000, max_tokens=2)
    with pytest.raises(InvalidRequest) as info:
        client.embed(["fine", "z" * 3000])
    assert info.value.item == 1


def test_empty_embed_batch_and_empty_item(client: Client, still_serving: None) -> None:
    with pytest.raises(InvalidRequest):
        client.embed([])
    with pytest.raises(InvalidRequest):
        client.embed(["ok", ""])


def test_malformed_json(pool: Any, still_serving: None) -> None:
    for path in ("/v1/completions", "/v1/tpmflow/embed"):
        resp = _post(pool, path, pool.token, content=b"{not json", headers={"Content-Type": "application/json"})
        assert resp.status_code == 400 and resp.json()["error"]["type"] == "InvalidRequest"
    resp = _post(pool, "/v1/completions", pool.token, json=["a", "list"])
    assert resp.status_code == 400


def test_unknown_model(client: Client, pool: Any, still_serving: None) -> None:
    resp = _post(pool, "/v1/completions", pool.token, json={"model": "gpt-17", "prompt": "x"})
    assert resp.status_code == 404 and resp.json()["error"]["type"] == "ModelNotFound"
    with pytest.raises(ModelNotFound):
        client.generate("x", model="gpt-17")


def test_tokens_missing_wrong_and_revoked(pool: Any, still_serving: None) -> None:
    assert _post(pool, "/v1/completions", None, json={"prompt": "x"}).status_code == 401
    assert _post(pool, "/v1/completions", "tpm_wrong", json={"prompt": "x"}).status_code == 401
    token = pool.add_principal("soon-revoked", permissions={"generate"})
    with Client(pool.url, token=token) as c:
        assert c.generate("ok", max_tokens=1).usage["completion_tokens"] == 1
        assert pool.access.revoke(token[:10]) == 1
        with pytest.raises(Unauthorized, match="revoked"):
            c.generate("no longer", max_tokens=1)


def test_missing_permission_is_403(pool: Any, still_serving: None) -> None:
    embed_only = pool.add_principal("embed-only", permissions={"embed"})
    generate_only = pool.add_principal("generate-only", permissions={"generate"})
    with Client(pool.url, token=embed_only) as c:
        with pytest.raises(Forbidden, match="generate"):
            c.generate("x", max_tokens=1)
        assert c.embed("allowed").numpy().shape == (1, 128)
    with Client(pool.url, token=generate_only) as c, pytest.raises(Forbidden, match="embed"):
        c.embed("x")


@pytest.mark.parametrize("case", ["hidden", "dtype", "nan", "inf", "zero", "rank"])
def test_bad_prompt_embeds(client: Client, case: str, still_serving: None) -> None:
    arrays = {
        "hidden": np.zeros((4, 64), np.float32),
        "dtype": np.zeros((4, 128), np.int32),
        "nan": np.full((4, 128), np.nan, np.float32),
        "inf": np.full((4, 128), np.inf, np.float32),
        "zero": np.zeros((0, 128), np.float32),
        "rank": np.zeros((2, 4, 128), np.float32),
    }
    with pytest.raises(InvalidRequest):
        client.generate(prompt_embeds=arrays[case], max_tokens=2)


def test_references_missing_foreign_and_forged(pool: Any, client: Client, still_serving: None) -> None:
    ref = client.put(np.arange(10, dtype=np.float32))
    assert client.digest(ref)["nbytes"] == ref.nbytes
    # Forged: any change breaks the signature.
    with pytest.raises(Forbidden, match="forged"):
        client.digest(ref.model_copy(update={"nbytes": ref.nbytes + 1}))
    with pytest.raises(Forbidden, match="forged"):
        client.digest(ref.model_copy(update={"sig": ""}))
    # Another principal's data: a valid reference, but not theirs.
    other = pool.add_principal("someone-else", permissions={"embed"})
    with Client(pool.url, token=other) as c, pytest.raises(Forbidden, match="another principal"):
        c.digest(ref)
    # Missing data: signed, then evicted from the store.
    gone = client.put(np.ones(8, dtype=np.float32))
    (Path(pool.cfg.store.root()) / gone.principal / gone.key).unlink()
    with pytest.raises(InvalidRequest, match="missing"):
        client.digest(gone)
    # Signing something that was never written is refused too.
    resp = _post(
        pool,
        "/v1/tpmflow/payloads/sign",
        pool.token,
        json={"key": "nope", "kind": "bytes", "nbytes": 3, "digest": "blake3:00"},
    )
    assert resp.status_code == 400
    # Path tricks in the key never reach the filesystem: refused as forged, and never signed.
    with pytest.raises(Forbidden):
        client.digest(ref.model_copy(update={"key": "../../etc/passwd"}))
    resp = _post(
        pool,
        "/v1/tpmflow/payloads/sign",
        pool.token,
        json={"key": "../../etc/passwd", "kind": "bytes", "nbytes": 3, "digest": "blake3:00"},
    )
    assert resp.status_code == 400 and "malformed" in resp.json()["error"]["message"]


def test_payloads_above_the_limit(pool: Any, client: Client, still_serving: None) -> None:
    with pytest.raises(PayloadTooLarge):
        client.put(np.zeros(100 << 20, dtype=np.uint8))  # the fixture allows 96 MiB
    resp = _post(
        pool,
        "/v1/tpmflow/payloads/sign",
        pool.token,
        json={"key": "k", "kind": "bytes", "nbytes": 1 << 40, "digest": "blake3:00"},
    )
    assert resp.status_code == 413
    big_inline = {"prompt": "x" * (9 << 20)}  # over the gateway's 8 MiB inline body limit
    resp = _post(pool, "/v1/completions", pool.token, json=big_inline)
    assert resp.status_code == 413 and resp.json()["error"]["type"] == "PayloadTooLarge"


def test_client_disconnects_mid_stream(pool: Any, still_serving: None) -> None:
    headers = {"Authorization": f"Bearer {pool.token}", "X-Request-Id": "disconnect-test"}
    # ~20 MB of events (64 x 1000 chunks), twice what the loopback buffers of both ends hold: the
    # relay cannot read "[DONE]" before the client has read most of it, so the hang-up comes first
    # (with 16 x 1000, ~6 MB, a fast machine can buffer the whole answer first: a complete one).
    body = {
        "model": "tiny-llama",
        "prompt": [f"long stream {i}" for i in range(64)],
        "max_tokens": 1000,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", pool.url + "/v1/completions", json=body, headers=headers, timeout=60) as resp:
        assert resp.status_code == 200
        for _ in resp.iter_raw():
            break  # first chunk, then hang up
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pool.ledger.flush()
        rows = [r for r in pool.access.ledger_rows(correlation_id="disconnect-test") if r.status != 0]
        if rows:
            break
        time.sleep(0.2)
    assert rows and rows[0].status == 499 and rows[0].error_type == "ClientDisconnected"
    # Nothing leaked: the admission slot and the replica's in-flight count are back.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(r.inflight for r in pool.gateway.registry.live()):
        time.sleep(0.1)
    assert all(r.inflight == 0 for r in pool.gateway.registry.live())
    assert pool.gateway.admission.waiting == 0 and not pool.gateway.admission.slots.locked()


@pytest.mark.parametrize("field", ["prompt_embeds", "kv_transfer_params", "vllm_xargs"])
def test_raw_vllm_side_doors_are_refused(pool: Any, field: str, still_serving: None) -> None:
    """vLLM would torch.load prompt_embeds (pickle) unchecked; extra args would reach the hooks."""
    resp = _post(pool, "/v1/completions", pool.token, json={"prompt": "x", field: "AAAA"})
    assert resp.status_code == 400 and field in resp.json()["error"]["message"]


def test_chat_accepts_text_parts_only(pool: Any, still_serving: None) -> None:
    message = {"role": "user", "content": [{"type": "prompt_embeds", "prompt_embeds": "AAAA"}]}
    resp = _post(pool, "/v1/chat/completions", pool.token, json={"messages": [message], "max_tokens": 2})
    assert resp.status_code == 400 and resp.json()["error"]["item"] == 0


def test_vllm_errors_arrive_as_tpmflow_types(pool: Any, still_serving: None) -> None:
    resp = _post(pool, "/v1/completions", pool.token, json={"prompt": "y" * 3000, "max_tokens": 2})
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "InvalidRequest"


def test_declared_size_must_match_the_stored_payload(pool: Any, client: Client, still_serving: None) -> None:
    ref = client.put(np.ones(8, dtype=np.float32))
    resp = _post(
        pool,
        "/v1/tpmflow/payloads/sign",
        pool.token,
        json={"key": ref.key, "kind": "ndarray", "nbytes": 1, "digest": ref.digest},
    )
    assert resp.status_code == 400 and "declared" in resp.json()["error"]["message"]


def test_seeded_requests_through_a_chunked_prefill_keep_the_engine_up(client: Client, still_serving: None) -> None:
    """vLLM's CPU build rewinds a seeded generator with a CUDA-only offset call when a step prefills
    only part of a prompt: the engine died (tpmflow.engine.seeded_chunks restores the state instead).
    A batch of seeded prompts larger than one step (2048 tokens) is prefilled in parts; sent again,
    its prompts come from the prefix cache in one step, and the samples are the same."""
    base = "the pool answers every request it admits " * 12
    tokens = client.generate(base, max_tokens=1, temperature=0.0).usage["prompt_tokens"]
    prompts = [f"{i} {base}" for i in range(2048 // tokens + 3)]
    chunked = client.generate(prompts, max_tokens=6, temperature=1.0, seed=11)
    assert chunked[0].usage["prompt_tokens"] > 2048, "more than one step's tokens: some prefill is chunked"
    again = client.generate(prompts, max_tokens=6, temperature=1.0, seed=11)
    same = sum(a.text == b.text for a, b in zip(chunked, again, strict=True))
    assert same >= 0.75 * len(prompts), [(a.text, b.text) for a, b in zip(chunked, again, strict=True)]
