"""Property-based fuzzing of every gateway route against the real pool (issue 13): bodies generated
from each route's own wire model (its JSON schema, turned into a Hypothesis strategy), mutated ones
(unknown fields, wrong types, huge numbers) and arbitrary JSON. For every answer: a documented
status, never a 5xx for client input, a typed error body, a ledger row; the pool healthy after.

Bounded: a fixed number of examples per route (``TPMFLOW_FUZZ_EXAMPLES``, default 30), generation
lengths clamped so a valid body cannot run for long. The counts land in ``runs/fuzz/routes.json``.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tpmflow.errors import ERROR_CLASSES
from tpmflow.knowledge.wire import AddItems, ItemIds, Named, Reembed, SearchItems
from tpmflow.protocol import Headers, Routes
from tpmflow.schema import (
    AdapterEmbedRequest,
    AdapterGenerateRequest,
    AdapterPredictRequest,
    DigestRequest,
    EmbedRequest,
    EmbedsGenerateRequest,
    ProbeRequest,
    SignRequest,
)

EXAMPLES = int(os.environ.get("TPMFLOW_FUZZ_EXAMPLES", "30"))
DOCUMENTED = {200, 400, 401, 403, 404, 413, 422, 429, 503}
SENT: Counter[str] = Counter()
STATUSES: dict[str, Counter[int]] = {}
ROUTE_OF: dict[str, str] = {}  # correlation id -> route

# OpenAI routes: the fields people send, with their types (vLLM's full models are far larger).
COMPLETION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "prompt": {
            "anyOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}},
                {"type": "array", "items": {"type": "integer"}},
            ]
        },
        "max_tokens": {"type": "integer", "minimum": -1, "maximum": 8},
        "temperature": {"type": "number", "minimum": -0.5, "maximum": 2},
        "top_p": {"type": "number", "minimum": 0, "maximum": 1.2},
        "n": {"type": "integer", "minimum": 0, "maximum": 3},
        "seed": {"type": "integer"},
        "stop": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "logprobs": {"type": "integer", "minimum": -1, "maximum": 5},
        "echo": {"type": "boolean"},
    },
    "required": ["prompt"],
}
CHAT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "messages": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "role": {"enum": ["user", "system", "assistant", "tool", "x"]},
                    "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}, {}]},
                },
                "required": ["role", "content"],
            },
        },
        "max_tokens": {"type": "integer", "minimum": -1, "maximum": 8},
        "temperature": {"type": "number", "minimum": -0.5, "maximum": 2},
        "n": {"type": "integer", "minimum": 0, "maximum": 3},
        "seed": {"type": "integer"},
    },
    "required": ["messages"],
}
def _wire(model: Any) -> dict[str, Any]:
    """A wire model's schema, steered towards bodies that get past the first check: no random
    ``model`` names, and installed adapters (plus one that is not) instead of random strings."""
    schema = model.model_json_schema()
    schema["properties"].pop("model", None)
    if "adapter" in schema["properties"]:
        schema["properties"]["adapter"] = {"enum": ["smiles", "smiles-fp", "pointcloud", "beamline", "nope"]}
    return schema


FUZZ_COLLECTION = "fuzz-kb"  # made by the `http` fixture; fuzzed bodies name it or one that is not there
KNOWLEDGE_ROUTES = {
    "add": AddItems,
    "search": SearchItems,
    "get": ItemIds,
    "delete": ItemIds,
    "show": Named,
    "reembed": Reembed,
}


def _collection_steered(model: Any) -> dict[str, Any]:
    schema = model.model_json_schema()
    schema["properties"]["name"] = {"enum": [FUZZ_COLLECTION, "no-such-collection"]}
    return schema


ROUTES: dict[str, dict[str, Any]] = {
    Routes.COMPLETIONS: COMPLETION_SCHEMA,
    Routes.CHAT: CHAT_SCHEMA,
    Routes.EMBED: _wire(EmbedRequest),
    Routes.GENERATE_EMBEDS: _wire(EmbedsGenerateRequest),
    Routes.ADAPTER_EMBED: _wire(AdapterEmbedRequest),
    Routes.ADAPTER_PREDICT: _wire(AdapterPredictRequest),
    Routes.ADAPTER_GENERATE: _wire(AdapterGenerateRequest),
    Routes.PROBE: _wire(ProbeRequest),
    Routes.DIGEST: _wire(DigestRequest),
    Routes.SIGN: _wire(SignRequest),
    **{f"{Routes.KNOWLEDGE}/{op}": _collection_steered(model) for op, model in KNOWLEDGE_ROUTES.items()},
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


def from_schema(schema: dict[str, Any], defs: dict[str, Any] | None = None) -> st.SearchStrategy[Any]:
    """A Hypothesis strategy for the JSON schemas pydantic writes (objects, arrays, scalars with
    bounds, enums, consts, anyOf, $ref). Optional properties are drawn or left out; bounds are used
    as given, so values at and around the limits come up. (hypothesis-jsonschema does this in
    general, but does not run on the Hypothesis this project pins.)"""
    defs = schema.get("$defs", defs or {})
    if "$ref" in schema:
        return st.deferred(lambda: from_schema(defs[schema["$ref"].split("/")[-1]], defs))
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return st.one_of([from_schema(s, defs) for s in schema[key]])
    kind = schema.get("type")
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        fields = {k: from_schema(v, defs) for k, v in props.items()}
        return st.fixed_dictionaries(
            {k: v for k, v in fields.items() if k in required},
            optional={k: v for k, v in fields.items() if k not in required},
        )
    if kind == "array":
        items = from_schema(schema.get("items", {}), defs)
        return st.lists(items, min_size=schema.get("minItems", 0), max_size=min(schema.get("maxItems", 6), 6))
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=min(schema.get("maxLength", 40), 40))
    if kind == "integer":
        lo = schema.get("minimum", schema.get("exclusiveMinimum", -(2**40)) + 1 if "exclusiveMinimum" in schema else None)
        hi = schema.get("maximum")
        return st.integers(min_value=lo, max_value=hi) | st.sampled_from([v for v in (lo, hi, 0, -1) if v is not None])
    if kind == "number":
        return st.floats(
            min_value=schema.get("minimum", schema.get("exclusiveMinimum")),
            max_value=schema.get("maximum", schema.get("exclusiveMaximum")),
            allow_nan=False,
            allow_infinity=False,
        )
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    return json_values


def _mutate(body: Any, data: st.DataObject) -> Any:
    """One mutation of a (mostly) valid body: an unknown field, a field of the wrong type, a huge number."""
    if not isinstance(body, dict) or not body:
        return body
    kind = data.draw(st.sampled_from(["extra", "retype", "huge", "none"]))
    key = data.draw(st.sampled_from(sorted(body)))
    if kind == "extra":
        return {**body, data.draw(st.text(min_size=1, max_size=12)): data.draw(json_values)}
    if kind == "retype":
        return {**body, key: data.draw(json_values)}
    if kind == "huge":
        return {**body, key: data.draw(st.sampled_from([2**70, -(2**70), 1e308, 10**30]))}
    return body


def _bounded(body: Any) -> Any:
    """Keep a valid body cheap: short generations, few prompts (the fuzz is of shapes, not of load)."""
    if isinstance(body, dict):
        for key in ("max_tokens", "n"):
            if isinstance(body.get(key), int) and not isinstance(body.get(key), bool) and body[key] > 4:
                body[key] = 4
    return body


def _check(resp: httpx.Response, route: str) -> None:
    STATUSES.setdefault(route, Counter())[resp.status_code] += 1
    assert resp.status_code in DOCUMENTED, (route, resp.status_code, resp.text[:300])
    if resp.status_code >= 400:
        body = resp.json()
        assert isinstance(body, dict) and set(body) == {"error"}, body
        assert body["error"]["type"] in ERROR_CLASSES and isinstance(body["error"]["message"], str), body


@pytest.fixture(scope="module")
def http(pool: Any) -> Any:
    with httpx.Client(base_url=pool.url, headers={"Authorization": f"Bearer {pool.token}"}, timeout=120) as c:
        made = c.post(f"{Routes.KNOWLEDGE}/create", json={"name": FUZZ_COLLECTION, "adapter": "smiles"})
        assert made.status_code in (200, 400), made.text  # 400: made by an earlier run of this module
        c.post(f"{Routes.KNOWLEDGE}/add", json={"name": FUZZ_COLLECTION, "items": ["CCO", "CCN"]})
        yield c


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_fuzz_route(route: str, http: httpx.Client) -> None:
    strategy = from_schema(ROUTES[route])

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,  # the same inputs on every CI run: a failure reproduces
    )
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        source = data.draw(st.sampled_from(["schema", "mutated", "any"]))
        if source == "any":
            body: Any = data.draw(json_values)
        else:
            body = data.draw(strategy)
            if source == "mutated":
                body = _mutate(body, data)
        rid = f"fuzz-{len(ROUTE_OF)}"
        ROUTE_OF[rid] = route
        SENT[route] += 1
        resp = http.post(
            route,
            content=json.dumps(_bounded(body)),
            headers={Headers.REQUEST_ID: rid, "Content-Type": "application/json"},
        )
        _check(resp, route)

    run()


def test_every_fuzzed_request_left_a_finished_ledger_row_and_the_pool_serves(pool: Any, http: httpx.Client) -> None:
    assert sum(SENT.values()) >= EXAMPLES * len(ROUTES) // 2, SENT
    # Signing reaches no replica, nor do the knowledge store's reads and deletes (no compute).
    unmetered = {Routes.SIGN, *(f"{Routes.KNOWLEDGE}/{op}" for op in ("get", "delete", "show"))}
    metered = {rid for rid, route in ROUTE_OF.items() if route not in unmetered}
    deadline = time.monotonic() + 30
    while True:
        pool.ledger.flush()
        rows = [r for r in pool.access.ledger_rows() if (r.correlation_id or "").startswith("fuzz-")]
        open_rows = [r for r in rows if r.status == 0]
        if not open_rows or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    missing = metered - {r.correlation_id for r in rows}
    assert not missing, [(rid, ROUTE_OF[rid]) for rid in sorted(missing)][:10]
    assert not open_rows, [(r.endpoint, r.correlation_id) for r in open_rows][:10]
    assert httpx.get(pool.url + Routes.HEALTH).json()["status"] == "ok"
    out = http.post(Routes.COMPLETIONS, json={"prompt": "still up", "max_tokens": 2})
    assert out.status_code == 200
    report = {
        "requests": dict(SENT),
        "statuses": {r: dict(c) for r, c in STATUSES.items()},
        "total": sum(SENT.values()),
    }
    Path("runs/fuzz").mkdir(parents=True, exist_ok=True)
    Path("runs/fuzz/routes.json").write_text(json.dumps(report, indent=1))
    print(f"\nroute fuzzing: {report['total']} generated requests over {len(SENT)} routes: {dict(SENT)}")
