"""Issue 13's hostile-user findings, each through the real gateway and replicas (the session pool):
a typed 4xx with a message written for the user, a ledger row, the connection and the pool fine."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import pytest

from tpmflow.protocol import Headers, Routes

INTERNAL_WORDS = ("Traceback", "reshape", "C long", "TextEncodeInput", "stack trace", "Internal Server Error")


def _ok_embeds(hidden: int) -> dict[str, Any]:
    raw = base64.b64encode(b"\0" * 4 * 2 * hidden).decode()
    return {"dtype": "float32", "shape": [2, hidden], "b64": raw}


def _assert_typed(resp: httpx.Response, status: int, kind: str, mentions: str = "") -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and body["error"]["type"] == kind, body
    message = body["error"]["message"]
    assert not any(word in message for word in INTERNAL_WORDS), message
    assert mentions in message, message
    return body["error"]


@pytest.fixture()
def http(pool: Any) -> Any:
    with httpx.Client(base_url=pool.url, headers={"Authorization": f"Bearer {pool.token}"}, timeout=60) as c:
        yield c


def test_json_nested_past_any_parser_is_a_400_and_the_connection_survives(pool: Any, http: httpx.Client) -> None:
    deep = b"[" * 10_000 + b"]" * 10_000
    for path in (Routes.COMPLETIONS, Routes.CHAT, Routes.EMBED, Routes.GENERATE_EMBEDS, Routes.PROBE):
        resp = http.post(path, content=b'{"prompt": ' + deep + b"}", headers={"Content-Type": "application/json"})
        _assert_typed(resp, 400, "InvalidRequest", "malformed JSON")
        # The same keep-alive connection serves the next request (it was closed after the 500 before).
        assert http.get(Routes.MODELS).status_code == 200


def test_huge_seeds_are_a_400_on_every_route(pool: Any, http: httpx.Client) -> None:
    hidden = pool.gateway.registry.live()[0].info.hidden_size
    for path, body in (
        (Routes.COMPLETIONS, {"prompt": "x", "max_tokens": 1}),
        (Routes.GENERATE_EMBEDS, {"prompt_embeds": _ok_embeds(hidden), "max_tokens": 1}),
        (Routes.PROBE, {"prompt": "x"}),
    ):
        resp = http.post(
            path, content=f'{{"seed": {2**70}, ' + httpx.Request("POST", "/", json=body).content.decode()[1:]
        )
        _assert_typed(resp, 400, "InvalidRequest", "seed")


def test_unknown_fields_are_refused_by_name(pool: Any, http: httpx.Client) -> None:
    hidden = pool.gateway.registry.live()[0].info.hidden_size
    _assert_typed(http.post(Routes.COMPLETIONS, json={"prompt": "x", "best_of": 2}), 400, "InvalidRequest", "best_of")
    for field in ("n", "logprobs"):
        body = {"prompt_embeds": _ok_embeds(hidden), "max_tokens": 1, field: 2}
        _assert_typed(http.post(Routes.GENERATE_EMBEDS, json=body), 400, "InvalidRequest", field)
    probe = {"prompt": "x", "captures": [{"site": "hook_resid_post", "layer": 1}]}  # the field is `layers`
    _assert_typed(http.post(Routes.PROBE, json=probe), 400, "InvalidRequest", "layer")


def test_empty_prompts_are_refused_everywhere(pool: Any, http: httpx.Client) -> None:
    _assert_typed(http.post(Routes.CHAT, json={"messages": [{"role": "user", "content": ""}]}), 400, "InvalidRequest")
    _assert_typed(http.post(Routes.PROBE, json={"prompt": ""}), 400, "InvalidRequest", "prompt")
    _assert_typed(http.post(Routes.PROBE, json={"prompt": []}), 400, "InvalidRequest", "prompt")


def test_overflowing_shapes_and_mixed_prompts_get_messages_for_people(pool: Any, http: httpx.Client) -> None:
    huge = {"dtype": "float32", "shape": [4294967296, 4294967296], "b64": ""}
    _assert_typed(http.post(Routes.GENERATE_EMBEDS, json={"prompt_embeds": huge}), 400, "InvalidRequest", "shape")
    _assert_typed(http.post(Routes.COMPLETIONS, json={"prompt": ["a", 3]}), 400, "InvalidRequest", "not a mix")
    _assert_typed(http.post(Routes.COMPLETIONS, json={"prompt": [2**40]}), 400, "InvalidRequest", "token ids")


def test_a_refused_request_has_a_ledger_row(pool: Any, http: httpx.Client) -> None:
    resp = http.post(Routes.PROBE, json={"prompt": "x", "bogus": 1}, headers={Headers.REQUEST_ID: "hardening-row"})
    _assert_typed(resp, 400, "InvalidRequest", "bogus")
    pool.ledger.flush()
    rows = pool.access.ledger_rows(correlation_id="hardening-row")
    assert [(r.status, r.error_type) for r in rows] == [(400, "InvalidRequest")]


def test_streams_read_to_the_end_by_the_openai_package_are_answered(pool: Any) -> None:
    from openai import OpenAI

    api = OpenAI(base_url=pool.url + "/v1", api_key=pool.token, max_retries=0)
    for i in range(12):
        stream = api.chat.completions.create(
            model=pool.cfg.model_name(),
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            stream=True,
            extra_headers={Headers.REQUEST_ID: f"openai-stream-{i}"},
        )
        assert [chunk for chunk in stream]  # read to [DONE]; the package closes at once
    api.close()
    pool.ledger.flush()
    import time

    deadline = time.monotonic() + 60
    while True:
        rows = [
            r for r in pool.access.ledger_rows(endpoint="chat") if (r.correlation_id or "").startswith("openai-stream-")
        ]
        if len(rows) == 12 and all(r.status != 0 for r in rows) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
        pool.ledger.flush()
    assert sorted(r.status for r in rows) == [200] * 12, [(r.status, r.error_type) for r in rows]
