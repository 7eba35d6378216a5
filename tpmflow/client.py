"""``Client`` and ``AsyncClient``: the same methods, like httpx's pair.

Inputs above the pool's inline limit go into the pool's ProxyStore store and only a signed JSON
reference crosses the wire; large outputs come back as references, resolved lazily to numpy.
Failures raise the typed errors of ``tpmflow.errors``; 503s are retried with backoff.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np

from tpmflow.adapters.base import Decoded
from tpmflow.errors import (
    ERROR_CLASSES,
    AdapterInputError,
    InvalidRequest,
    Overloaded,
    ReplicaFailed,
    TpmflowError,
    type_for_status,
)
from tpmflow.payload import PayloadStore, Reference, StoreConfig, encode_payload
from tpmflow.schema import InlineArray


def raise_for_error(resp: httpx.Response) -> None:
    """Turn an error response into the same typed exception the gateway raised."""
    if resp.status_code < 400:
        return
    try:
        err = resp.json().get("error", {})
    except ValueError:
        err = {}
    if not isinstance(err, dict):
        err = {"message": str(err)}
    name = str(err.get("type", ""))
    cls = ERROR_CLASSES.get(name) or ERROR_CLASSES.get(type_for_status(resp.status_code), TpmflowError)
    message = str(err.get("message") or resp.text[:500])
    if cls is Overloaded:
        raise Overloaded(message, retry_after=float(resp.headers.get("Retry-After", "1")))
    raise cls(message, item=err.get("item"))


class LazyArray:
    """An array that may still be in the pool's store; ``numpy()`` fetches and checks it once."""

    def __init__(self, payload: dict[str, Any], store: PayloadStore | None) -> None:
        self._payload = payload
        self._store = store
        self._value: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        # A store holds connections; a pickled array keeps its value (if fetched) and its reference.
        return {**self.__dict__, "_store": None}

    @property
    def reference(self) -> Reference | None:
        return Reference.model_validate(self._payload) if "sig" in self._payload else None

    def numpy(self) -> np.ndarray:
        if self._value is None:
            ref = self.reference
            if ref is None:
                self._value = InlineArray.model_validate(self._payload).to_numpy()
            else:
                if self._store is None:
                    raise InvalidRequest("this client has no store access to resolve references")
                value = self._store.get(ref)
                if not isinstance(value, np.ndarray):
                    raise InvalidRequest("reference does not hold an array")
                self._value = value
        return self._value

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        arr = self.numpy()
        return arr.astype(dtype) if dtype is not None else arr


@dataclass
class Generation:
    text: str
    finish_reason: str | None
    usage: dict[str, Any]
    request_id: str
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass
class Embeddings:
    """Per-input final hidden states; ``numpy()`` stacks pooled vectors into [n, hidden].

    With an adapter, an item that could not be used holds its ``AdapterInputError`` (index and
    reason) instead; ``errors`` lists them and ``ok`` the indices that worked.
    """

    items: list[LazyArray | AdapterInputError]
    n_tokens: list[int]
    usage: dict[str, Any]
    provenance: dict[str, Any]

    @property
    def errors(self) -> list[AdapterInputError]:
        return [item for item in self.items if isinstance(item, AdapterInputError)]

    @property
    def ok(self) -> list[int]:
        return [i for i, item in enumerate(self.items) if isinstance(item, LazyArray)]

    def numpy(self, only_ok: bool = False) -> np.ndarray:
        """Stack the vectors; raises the first item error unless ``only_ok`` (then rows of ``ok``)."""
        if self.errors and not only_ok:
            raise self.errors[0]
        return np.stack([self[i] for i in self.ok])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> np.ndarray:
        item = self.items[i]
        if isinstance(item, AdapterInputError):
            raise item
        return item.numpy()

    def fetch(self) -> Embeddings:
        """Read every array now (references from the pool's store), so the object pickles
        self-contained: to a Colmena thinker, across an Academy exchange."""
        for i in self.ok:
            self[i]
        return self


@dataclass
class Predictions:
    """A head's outputs per item: a float (regression), a label (classification; its class
    probabilities in ``probabilities``), or the item's ``AdapterInputError``."""

    values: list[float | str | AdapterInputError]
    head: dict[str, Any]
    usage: dict[str, Any]
    provenance: dict[str, Any]
    probabilities: list[dict[str, float] | None] = field(default_factory=list)

    @property
    def ok(self) -> list[int]:
        return [i for i, v in enumerate(self.values) if not isinstance(v, AdapterInputError)]

    @property
    def errors(self) -> list[AdapterInputError]:
        return [v for v in self.values if isinstance(v, AdapterInputError)]


@dataclass
class Trace:
    """What a probe saw: the generated text, captured activations (``trace["blocks.3.hook_resid_post"]``
    is a ``[positions, hidden]`` array, fetched lazily when it came by reference; ``hook_z`` is
    ``[positions, heads, head_dim]``), the logit-lens table, usage (activation bytes included) and
    provenance."""

    text: str
    prompt_tokens: list[str]
    captures: dict[str, LazyArray]
    positions: dict[str, list[int]]
    lens: list[dict[str, Any]]
    steps: list[int]
    usage: dict[str, Any]
    provenance: dict[str, Any]

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.captures:
            raise KeyError(f"{name!r} was not captured; captured: {sorted(self.captures)}")
        return self.captures[name].numpy()

    def fetch(self) -> Trace:
        """Read every capture now (references from the pool's store), so the trace pickles
        self-contained: to a Colmena thinker, across an Academy exchange."""
        for name in self.captures:
            self[name]
        return self

    def top_tokens(self) -> list[list[str]]:
        """The logit lens's top token per layer (rows) and position (columns)."""
        return [[row[0] for row in layer["tokens"]] for layer in self.lens]


def _spec_dump(spec: Any, to_payload: Any) -> dict[str, Any]:
    """A capture / intervention / lens given as a pydantic model or a dict, arrays made payloads."""
    data = dict(spec.model_dump(exclude_none=True) if hasattr(spec, "model_dump") else spec)
    for key in ("vector", "values"):
        if isinstance(data.get(key), (np.ndarray, Reference)):
            data[key] = to_payload(data[key])
    return data


def _as_list(items: Any) -> list[Any]:
    """One item (a string, file bytes, an array, a dict, a reference) or a sequence of items."""
    single = (str, bytes, bytearray, np.ndarray, dict, Reference)
    return [items] if isinstance(items, single) else list(items)


def _predictions(data: dict[str, Any]) -> Predictions:
    rows = sorted(data["data"], key=lambda d: d["index"])
    values: list[float | str | AdapterInputError] = []
    for d in rows:
        if d.get("error"):
            values.append(AdapterInputError(d["error"]["message"], item=d["index"]))
        else:
            values.append(d["label"] if d.get("label") is not None else float(d["value"]))
    probabilities = [d.get("probabilities") for d in rows]
    return Predictions(values, data.get("head", {}), data.get("usage", {}), data.get("provenance", {}), probabilities)


# Raw array bytes one request carries inline at most (base64 adds a third; the gateway's body limit
# is 8 MiB): past it, the rest of a batch's arrays go by reference.
INLINE_BUDGET_BYTES = 4 << 20
# Idle connections are dropped before the gateway's server drops them (uvicorn: after 5 s), so a
# request never goes out on a connection the server is closing.
KEEPALIVE_S = 2.0

# Item values that travel as payloads: arrays inline or by reference, file bytes always by reference.
_PAYLOAD_TYPES = (np.ndarray, bytes, bytearray, Reference)


def _payload_leaves(items: list[Any]) -> list[Any]:
    """Values in adapter items (top level, or one level into a dict item) that must become payloads."""
    leaves: list[Any] = []
    for item in items:
        values = item.values() if isinstance(item, dict) else [item]
        leaves.extend(v for v in values if isinstance(v, _PAYLOAD_TYPES))
    return leaves


def _with_payloads(items: list[Any], wired: dict[int, dict[str, Any]]) -> list[Any]:
    """Items with each payload leaf replaced by its wire form (keyed by the leaf's ``id``)."""

    def swap(value: Any) -> Any:
        return wired[id(value)] if isinstance(value, _PAYLOAD_TYPES) else value

    return [{k: swap(v) for k, v in item.items()} if isinstance(item, dict) else swap(item) for item in items]


def _local_inputs(adapter: Any, items: list[Any]) -> tuple[list[Any], list[int], dict[int, str]]:
    """Run an adapter here (one the pool lacks): texts stay text, soft tokens become ``SoftPrompt``
    inputs (arrays still to be wired). Returns the inputs, their item positions, and item errors."""
    from tpmflow.adapters.base import EncodedEmbeds, EncodedText, ItemError

    inputs: list[Any] = []
    where: list[int] = []
    errors: dict[int, str] = {}
    for i, enc in enumerate(adapter.encode(items)):
        if isinstance(enc, ItemError):
            errors[i] = enc.reason
            continue
        if isinstance(enc, EncodedText):
            inputs.append(enc.text)
        elif isinstance(enc, EncodedEmbeds):
            inputs.append({"prompt_embeds": enc.embeds, "prefix": enc.prefix, "suffix": enc.suffix})
        else:
            errors[i] = f"the adapter returned {type(enc).__name__}"
            continue
        where.append(i)
    return inputs, where, errors


def _local_error(exc: TpmflowError, where: list[int]) -> TpmflowError:
    """A request-level error about the j-th input sent names the caller's item ``where[j]``."""
    item = getattr(exc, "item", None)
    if isinstance(item, int) and 0 <= item < len(where):
        exc.item = where[item]
        exc.message = exc.message.replace(f"input item {item}", f"input item {where[item]}")
        exc.args = (exc.message,)
    return exc


def _merge_local(emb: Embeddings, n: int, where: list[int], errors: dict[int, str]) -> Embeddings:
    items: list[Any] = [AdapterInputError(errors.get(i, ""), item=i) for i in range(n)]
    tokens = [0] * n
    for j, i in enumerate(where):
        items[i], tokens[i] = emb.items[j], emb.n_tokens[j]
    return Embeddings(items, tokens, emb.usage, emb.provenance)


def _adapter_generate_body(
    items: Any,
    adapter: str,
    config: dict[str, Any] | None,
    max_tokens: int,
    temperature: float,
    seed: int | None,
    extra: dict[str, Any],
) -> dict[str, Any]:
    if items is None:
        raise InvalidRequest('give the items to generate from ("" for an unconditional sample)')
    return {
        "adapter": adapter,
        "items": _as_list(items),
        "config": config,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "seed": seed,
        "n": extra.pop("n", 1),
        **extra,
    }


def _decoded(data: dict[str, Any]) -> list[list[Decoded] | AdapterInputError]:
    out: list[list[Decoded] | AdapterInputError] = []
    for d in sorted(data["data"], key=lambda d: d["index"]):
        if d.get("error"):
            out.append(AdapterInputError(d["error"]["message"], item=d["index"]))
        else:
            out.append([Decoded(o["text"], o.get("value"), o.get("reason")) for o in d["outputs"]])
    return out


def _embed_body(
    inputs: Any, adapter: str | None, config: dict[str, Any] | None, pooling: str
) -> tuple[str, dict[str, Any]]:
    items = _as_list(inputs)
    if adapter is None:
        return "/v1/tpmflow/embed", {"input": items, "pooling": pooling}
    return "/v1/tpmflow/adapters/embed", {"adapter": adapter, "items": items, "pooling": pooling, "config": config}


def _completion_body(
    prompt: str | Sequence[str], max_tokens: int, temperature: float, seed: int | None, extra: dict[str, Any]
) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, **extra}
    if seed is not None:
        body["seed"] = seed
    return body


def _generations(data: dict[str, Any], request_id: str, body: dict[str, Any]) -> list[Generation]:
    usage = data.get("usage") or {}
    choices = sorted(data.get("choices", []), key=lambda c: c.get("index", 0))
    sampling = {k: v for k, v in body.items() if k != "prompt"}
    provenance = {**data.get("_provenance", {}), "request_id": request_id, "sampling": sampling}
    return [Generation(c.get("text", ""), c.get("finish_reason"), usage, request_id, provenance) for c in choices]


def _with_provenance(resp: httpx.Response) -> dict[str, Any]:
    """The JSON body, plus the gateway's provenance headers under ``_provenance``."""
    data = dict(resp.json())
    fields = {
        "model": "X-Tpmflow-Model",
        "content_hash": "X-Tpmflow-Content-Hash",
        "replica_id": "X-Tpmflow-Replica",
        "engine": "X-Tpmflow-Engine",
    }
    data["_provenance"] = {k: resp.headers[h] for k, h in fields.items() if h in resp.headers}
    return data


class _Base:
    def __init__(
        self, url: str, token: str | None, timeout: float, retries: int, backoff_s: float, version: str | None = None
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        # Pinned: only replicas serving this model version (content hash or prefix) answer.
        self.version = version
        self.timeout = timeout
        self.retries = retries
        self.backoff_s = backoff_s
        self._store: PayloadStore | None = None
        self._store_info: dict[str, Any] | None = None

    def _headers(self, request_id: str) -> dict[str, str]:
        headers = {"X-Request-Id": request_id}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if self.version:
            headers["X-Tpmflow-Version"] = self.version
        return headers

    def _delay(self, attempt: int, exc: Overloaded) -> float:
        return max(exc.retry_after, self.backoff_s * (2**attempt)) if exc.retry_after else self.backoff_s * 2**attempt

    def _make_store(self, info: dict[str, Any]) -> PayloadStore:
        self._store_info = info
        cfg = StoreConfig(
            connector=info["connector"],
            path=info.get("path"),
            redis_host=info.get("redis_host", "127.0.0.1"),
            redis_port=info.get("redis_port", 6379),
            inline_limit_bytes=info["inline_limit_bytes"],
            max_payload_bytes=info["max_payload_bytes"],
        )
        return PayloadStore(cfg)

    def _trace(self, data: dict[str, Any]) -> Trace:
        names = [f"blocks.{c['layer']}.{c['site']}" for c in data["captures"]]
        return Trace(
            text=data["text"],
            prompt_tokens=data["prompt_tokens"],
            captures={n: LazyArray(c["array"], self._store) for n, c in zip(names, data["captures"], strict=True)},
            positions={n: c["positions"] for n, c in zip(names, data["captures"], strict=True)},
            lens=data["lens"],
            steps=data.get("steps", []),
            usage=data.get("usage", {}),
            provenance=data.get("provenance", {}),
        )

    def _embeddings(self, data: dict[str, Any]) -> Embeddings:
        items = sorted(data["data"], key=lambda d: d["index"])
        return Embeddings(
            [
                AdapterInputError(d["error"]["message"], item=d["index"])
                if d.get("error")
                else LazyArray(d["embedding"], self._store)
                for d in items
            ],
            [d.get("n_tokens", 0) for d in items],
            data.get("usage", {}),
            data.get("provenance", {}),
        )


class Client(_Base):
    """Synchronous client. ``submit_*`` variants return ``concurrent.futures.Future`` so a thinker
    agent never blocks its others."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 150.0,
        retries: int = 4,
        backoff_s: float = 0.25,
        max_workers: int = 16,
        version: str | None = None,
    ) -> None:
        super().__init__(url, token, timeout, retries, backoff_s, version)
        self._http = httpx.Client(timeout=timeout, limits=httpx.Limits(keepalive_expiry=KEEPALIVE_S))
        self._pool: ThreadPoolExecutor | None = None
        self._max_workers = max_workers

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._http.close()

    def _request(
        self,
        method: str,
        path: str,
        json: Any = None,
        params: dict[str, Any] | None = None,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        rid = request_id or uuid.uuid4().hex
        for attempt in range(self.retries + 1):
            try:
                resp = self._http.request(method, self.url + path, json=json, params=params, headers=self._headers(rid))
            except httpx.TimeoutException as exc:
                raise ReplicaFailed(f"no answer from {self.url} within {self.timeout} s") from exc
            except httpx.TransportError as exc:
                raise ReplicaFailed(f"cannot reach the pool at {self.url}: {exc}") from exc
            try:
                raise_for_error(resp)
            except Overloaded as exc:
                if attempt == self.retries:
                    raise
                time.sleep(self._delay(attempt, exc))
                continue
            return _with_provenance(resp)
        raise AssertionError("unreachable")

    def _ensure_store(self) -> PayloadStore:
        if self._store is None:
            self._store = self._make_store(self._request("GET", "/v1/tpmflow/store"))
        return self._store

    # -- API -----------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        resp = self._http.get(self.url + "/health")
        return dict(resp.json())

    def models(self) -> list[str]:
        return [m["id"] for m in self._request("GET", "/v1/models")["data"]]

    def usage(self, by: str = "principal") -> list[dict[str, Any]]:
        return list(self._request("GET", "/v1/tpmflow/usage", params={"by": by})["usage"])

    def generate(
        self,
        prompt: str | Sequence[str] | None = None,
        *,
        max_tokens: int = 16,
        temperature: float = 1.0,
        seed: int | None = None,
        prompt_embeds: np.ndarray | Reference | None = None,
        adapter: str | None = None,
        adapter_config: dict[str, Any] | None = None,
        request_id: str | None = None,
        **extra: Any,
    ) -> Any:
        """Text in, text out (one prompt → one ``Generation``; a list → a list). With
        ``prompt_embeds`` ([n_tokens, hidden] floats) the model starts from vectors instead of text.

        With ``adapter=`` the prompts are domain items (e.g. SMILES prefixes, "" for none) and the
        answer is, per item, a list of ``Decoded`` (value, or the reason it was rejected) — or the
        item's ``AdapterInputError``. ``n`` asks for several completions per item."""
        rid = request_id or uuid.uuid4().hex
        if adapter is not None:
            body = _adapter_generate_body(prompt, adapter, adapter_config, max_tokens, temperature, seed, extra)
            body["items"] = self._wire_items(body["items"])
            return _decoded(self._request("POST", "/v1/tpmflow/adapters/generate", json=body, request_id=rid))
        if prompt_embeds is not None:
            body = {
                "prompt_embeds": self._array_payload(prompt_embeds),
                "max_tokens": max_tokens,
                "temperature": temperature,
                "seed": seed,
                **extra,
            }
            data = self._request("POST", "/v1/tpmflow/generate_embeds", json=body, request_id=rid)
            return Generation(data["text"], data.get("finish_reason"), data["usage"], rid, data.get("provenance", {}))
        if prompt is None:
            raise InvalidRequest("give a prompt or prompt_embeds")
        data = self._request(
            "POST",
            "/v1/completions",
            json=(body := _completion_body(prompt, max_tokens, temperature, seed, extra)),
            request_id=rid,
        )
        gens = _generations(data, rid, body)
        return gens[0] if isinstance(prompt, str) else gens

    def embed(
        self,
        inputs: Any,
        *,
        adapter: str | None = None,
        adapter_config: dict[str, Any] | None = None,
        pooling: str = "mean",
        request_id: str | None = None,
    ) -> Embeddings:
        """Final hidden states (after the final norm) of each input: pooled ``mean``/``last`` or per
        token ``none``. With ``adapter=`` the inputs are domain items (e.g. SMILES, point-cloud file
        bytes) that the pool's adapter turns into model inputs; bad items come back as per-item
        errors. ``adapter`` may also be an adapter object: it then runs here, for adapters the pool
        does not have installed, and only its text or soft tokens travel."""
        self._ensure_store()
        if adapter is not None and not isinstance(adapter, str):
            items = _as_list(inputs)
            local, where, errors = _local_inputs(adapter, items)
            if not where:  # every item was refused here: nothing to send
                return _merge_local(Embeddings([], [], {}, {}), len(items), where, errors)
            body = {"input": self._wire_items(local), "pooling": pooling}
            try:
                data = self._request("POST", "/v1/tpmflow/embed", json=body, request_id=request_id)
            except TpmflowError as exc:
                raise _local_error(exc, where) from None
            return _merge_local(self._embeddings(data), len(items), where, errors)
        path, body = _embed_body(inputs, adapter, adapter_config, pooling)
        key = "items" if "items" in body else "input"  # soft-token inputs carry arrays too
        body[key] = self._wire_items(body[key])
        return self._embeddings(self._request("POST", path, json=body, request_id=request_id))

    def predict(
        self,
        items: Any,
        *,
        adapter: str,
        head: str,
        adapter_config: dict[str, Any] | None = None,
        request_id: str | None = None,
    ) -> Predictions:
        """Domain items → adapter → core model → head (``name`` or ``name@version``): one value or one
        ``AdapterInputError`` per item."""
        body = {"adapter": adapter, "items": self._wire_items(_as_list(items)), "head": head, "config": adapter_config}
        return _predictions(self._request("POST", "/v1/tpmflow/adapters/predict", json=body, request_id=request_id))

    def put(self, value: np.ndarray | bytes) -> Reference:
        """Write a payload into the pool's store and have the gateway sign a reference to it."""
        store = self._ensure_store()
        assert self._store_info is not None
        ref = store.put(self._store_info["principal"], value)
        signed = self._request(
            "POST",
            "/v1/tpmflow/payloads/sign",
            json={"key": ref.key, "kind": ref.kind, "nbytes": ref.nbytes, "digest": ref.digest},
        )
        return Reference.model_validate(signed)

    def probe(
        self,
        prompt: str | list[int],
        *,
        capture: Sequence[Any] = (),
        interventions: Sequence[Any] = (),
        lens: Any = None,
        max_tokens: int = 1,
        temperature: float = 0.0,
        seed: int | None = None,
        request_id: str | None = None,
    ) -> Trace:
        """Intermediary access: run ``prompt`` while capturing activations (``Capture``), editing them
        (``Add`` steering vectors, ``Replace`` patches, ``Zero`` ablations) and reading the logit lens
        (``LogitLens``), all inside the pool's vLLM engine. Needs the ``probe`` permission."""
        self._ensure_store()
        body = {
            "prompt": prompt,
            "captures": [_spec_dump(c, self._array_payload) for c in capture],
            "interventions": [_spec_dump(e, self._array_payload) for e in interventions],
            "lens": None if lens is None else _spec_dump(lens, self._array_payload),
            "max_tokens": max_tokens,
            "temperature": temperature,
            "seed": seed,
        }
        return self._trace(self._request("POST", "/v1/tpmflow/probe", json=body, request_id=request_id))

    def digest(self, value: Reference | np.ndarray) -> dict[str, Any]:
        """Deliver an array (inline) or a reference to a replica; it reports the blake3 digest of what
        arrived, proving the transfer."""
        payload = value.model_dump() if isinstance(value, Reference) else InlineArray.from_numpy(value).model_dump()
        return self._request("POST", "/v1/tpmflow/digest", json={"payload": payload})

    def _wire_items(self, items: list[Any]) -> list[Any]:
        """Arrays inline (by reference when big, or once the request's inline budget is spent), bytes
        by reference, references as they are."""
        budget = [INLINE_BUDGET_BYTES]
        wired = {
            id(v): self.put(bytes(v)).model_dump()
            if isinstance(v, (bytes, bytearray))
            else self._array_payload(v, budget)
            for v in _payload_leaves(items)
        }
        return _with_payloads(items, wired)

    def _array_payload(self, value: np.ndarray | Reference, budget: list[int] | None = None) -> dict[str, Any]:
        if isinstance(value, Reference):
            return value.model_dump()
        limit = self._ensure_store().config.inline_limit_bytes
        if budget is not None:
            budget[0] -= value.nbytes
            limit = limit if budget[0] >= 0 else -1
        if value.nbytes > limit:
            return self.put(value).model_dump()
        encode_payload(value)  # same dtype rules as by reference
        return InlineArray.from_numpy(value).model_dump()

    # -- futures ---------------------------------------------------------------------------------

    def _submit(self, fn: Any, *args: Any, **kwargs: Any) -> Future[Any]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._max_workers, thread_name_prefix="tpmflow-client")
        return self._pool.submit(fn, *args, **kwargs)

    def submit_generate(self, *args: Any, **kwargs: Any) -> Future[Any]:
        return self._submit(self.generate, *args, **kwargs)

    def submit_embed(self, *args: Any, **kwargs: Any) -> Future[Any]:
        return self._submit(self.embed, *args, **kwargs)


class AsyncClient(_Base):
    """Asynchronous client with the same methods as ``Client``."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        timeout: float = 150.0,
        retries: int = 4,
        backoff_s: float = 0.25,
        version: str | None = None,
    ) -> None:
        super().__init__(url, token, timeout, retries, backoff_s, version)
        self._http = httpx.AsyncClient(
            timeout=timeout, limits=httpx.Limits(max_connections=512, keepalive_expiry=KEEPALIVE_S)
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(
        self,
        method: str,
        path: str,
        json: Any = None,
        params: dict[str, Any] | None = None,
        request_id: str | None = None,
    ) -> dict[str, Any]:
        rid = request_id or uuid.uuid4().hex
        for attempt in range(self.retries + 1):
            try:
                resp = await self._http.request(
                    method, self.url + path, json=json, params=params, headers=self._headers(rid)
                )
            except httpx.TimeoutException as exc:
                raise ReplicaFailed(f"no answer from {self.url} within {self.timeout} s") from exc
            except httpx.TransportError as exc:
                raise ReplicaFailed(f"cannot reach the pool at {self.url}: {exc}") from exc
            try:
                raise_for_error(resp)
            except Overloaded as exc:
                if attempt == self.retries:
                    raise
                await asyncio.sleep(self._delay(attempt, exc))
                continue
            return _with_provenance(resp)
        raise AssertionError("unreachable")

    async def _ensure_store(self) -> PayloadStore:
        if self._store is None:
            self._store = self._make_store(await self._request("GET", "/v1/tpmflow/store"))
        return self._store

    async def health(self) -> dict[str, Any]:
        return dict((await self._http.get(self.url + "/health")).json())

    async def models(self) -> list[str]:
        return [m["id"] for m in (await self._request("GET", "/v1/models"))["data"]]

    async def usage(self, by: str = "principal") -> list[dict[str, Any]]:
        return list((await self._request("GET", "/v1/tpmflow/usage", params={"by": by}))["usage"])

    async def generate(
        self,
        prompt: str | Sequence[str] | None = None,
        *,
        max_tokens: int = 16,
        temperature: float = 1.0,
        seed: int | None = None,
        prompt_embeds: np.ndarray | Reference | None = None,
        adapter: str | None = None,
        adapter_config: dict[str, Any] | None = None,
        request_id: str | None = None,
        **extra: Any,
    ) -> Any:
        rid = request_id or uuid.uuid4().hex
        if adapter is not None:
            body = _adapter_generate_body(prompt, adapter, adapter_config, max_tokens, temperature, seed, extra)
            body["items"] = await self._wire_items(body["items"])
            return _decoded(await self._request("POST", "/v1/tpmflow/adapters/generate", json=body, request_id=rid))
        if prompt_embeds is not None:
            body = {
                "prompt_embeds": await self._array_payload(prompt_embeds),
                "max_tokens": max_tokens,
                "temperature": temperature,
                "seed": seed,
                **extra,
            }
            data = await self._request("POST", "/v1/tpmflow/generate_embeds", json=body, request_id=rid)
            return Generation(data["text"], data.get("finish_reason"), data["usage"], rid, data.get("provenance", {}))
        if prompt is None:
            raise InvalidRequest("give a prompt or prompt_embeds")
        data = await self._request(
            "POST",
            "/v1/completions",
            json=(body := _completion_body(prompt, max_tokens, temperature, seed, extra)),
            request_id=rid,
        )
        gens = _generations(data, rid, body)
        return gens[0] if isinstance(prompt, str) else gens

    async def embed(
        self,
        inputs: Any,
        *,
        adapter: str | None = None,
        adapter_config: dict[str, Any] | None = None,
        pooling: str = "mean",
        request_id: str | None = None,
    ) -> Embeddings:
        await self._ensure_store()
        if adapter is not None and not isinstance(adapter, str):
            items = _as_list(inputs)
            local, where, errors = await asyncio.to_thread(_local_inputs, adapter, items)
            if not where:
                return _merge_local(Embeddings([], [], {}, {}), len(items), where, errors)
            body = {"input": await self._wire_items(local), "pooling": pooling}
            try:
                data = await self._request("POST", "/v1/tpmflow/embed", json=body, request_id=request_id)
            except TpmflowError as exc:
                raise _local_error(exc, where) from None
            return _merge_local(self._embeddings(data), len(items), where, errors)
        path, body = _embed_body(inputs, adapter, adapter_config, pooling)
        key = "items" if "items" in body else "input"
        body[key] = await self._wire_items(body[key])
        return self._embeddings(await self._request("POST", path, json=body, request_id=request_id))

    async def predict(
        self,
        items: Any,
        *,
        adapter: str,
        head: str,
        adapter_config: dict[str, Any] | None = None,
        request_id: str | None = None,
    ) -> Predictions:
        items = await self._wire_items(_as_list(items))
        body = {"adapter": adapter, "items": items, "head": head, "config": adapter_config}
        data = await self._request("POST", "/v1/tpmflow/adapters/predict", json=body, request_id=request_id)
        return _predictions(data)

    async def put(self, value: np.ndarray | bytes) -> Reference:
        store = await self._ensure_store()
        assert self._store_info is not None
        ref = await asyncio.to_thread(store.put, self._store_info["principal"], value)
        signed = await self._request(
            "POST",
            "/v1/tpmflow/payloads/sign",
            json={"key": ref.key, "kind": ref.kind, "nbytes": ref.nbytes, "digest": ref.digest},
        )
        return Reference.model_validate(signed)

    async def probe(
        self,
        prompt: str | list[int],
        *,
        capture: Sequence[Any] = (),
        interventions: Sequence[Any] = (),
        lens: Any = None,
        max_tokens: int = 1,
        temperature: float = 0.0,
        seed: int | None = None,
        request_id: str | None = None,
    ) -> Trace:
        """See ``Client.probe``."""
        await self._ensure_store()
        payloads: dict[int, dict[str, Any]] = {}
        for spec in interventions:
            for key in ("vector", "values"):
                value = getattr(spec, key, None) if not isinstance(spec, dict) else spec.get(key)
                if isinstance(value, (np.ndarray, Reference)):
                    payloads[id(value)] = await self._array_payload(value)
        body = {
            "prompt": prompt,
            "captures": [_spec_dump(c, None) for c in capture],
            "interventions": [_spec_dump(e, lambda v: payloads[id(v)]) for e in interventions],
            "lens": None if lens is None else _spec_dump(lens, None),
            "max_tokens": max_tokens,
            "temperature": temperature,
            "seed": seed,
        }
        return self._trace(await self._request("POST", "/v1/tpmflow/probe", json=body, request_id=request_id))

    async def digest(self, value: Reference | np.ndarray) -> dict[str, Any]:
        payload = value.model_dump() if isinstance(value, Reference) else InlineArray.from_numpy(value).model_dump()
        return await self._request("POST", "/v1/tpmflow/digest", json={"payload": payload})

    # -- tasks (the asyncio counterpart of Client's futures) ----------------------------------------

    def submit_generate(self, *args: Any, **kwargs: Any) -> asyncio.Task[Any]:
        """Schedule ``generate`` on the running loop and return its task at once."""
        return asyncio.get_running_loop().create_task(self.generate(*args, **kwargs))

    def submit_embed(self, *args: Any, **kwargs: Any) -> asyncio.Task[Any]:
        return asyncio.get_running_loop().create_task(self.embed(*args, **kwargs))

    async def _wire_items(self, items: list[Any]) -> list[Any]:
        budget = [INLINE_BUDGET_BYTES]
        wired: dict[int, dict[str, Any]] = {}
        for v in _payload_leaves(items):
            wired[id(v)] = (
                (await self.put(bytes(v))).model_dump()
                if isinstance(v, (bytes, bytearray))
                else await self._array_payload(v, budget)
            )
        return _with_payloads(items, wired)

    async def _array_payload(self, value: np.ndarray | Reference, budget: list[int] | None = None) -> dict[str, Any]:
        if isinstance(value, Reference):
            return value.model_dump()
        limit = (await self._ensure_store()).config.inline_limit_bytes
        if budget is not None:
            budget[0] -= value.nbytes
            limit = limit if budget[0] >= 0 else -1
        if value.nbytes > limit:
            return (await self.put(value)).model_dump()
        encode_payload(value)
        return InlineArray.from_numpy(value).model_dump()
