"""Every decision of ``Client`` and ``AsyncClient`` that needs no I/O, written once (httpx's pattern).

A call is written here as a *flow*: a generator that yields the I/O it needs — ``Send`` an HTTP
request, ``Sleep`` before a retry, run something ``Blocking`` (a store write, a local adapter) — and
gets the outcome sent back, or the I/O's exception thrown in. Paths, headers, bodies, which arrays go
inline and which by reference, how an answer becomes a ``Generation`` / ``Embeddings`` /
``Predictions`` / ``Trace``, which errors are retried and after how long: all here. ``Client`` runs a
flow with blocking I/O and ``AsyncClient`` with ``await``, so the two cannot drift apart.
"""

from __future__ import annotations

import inspect
import json
import uuid
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import httpx
import numpy as np

from tpmflow.adapters.base import Decoded
from tpmflow.client.results import Embeddings, Generation, LazyArray, Predictions, Trace
from tpmflow.errors import (
    ERROR_CLASSES,
    AdapterInputError,
    InvalidRequest,
    Overloaded,
    QuotaExceeded,
    ReplicaFailed,
    TpmflowError,
    type_for_status,
)
from tpmflow.payload import PayloadStore, Reference, StoreConfig, encode_payload
from tpmflow.protocol import PROVENANCE_HEADERS, Headers, Routes
from tpmflow.schema import InlineArray

T = TypeVar("T")

# Raw array bytes one request carries inline at most (base64 adds a third; the gateway's body limit
# is 8 MiB): past it, the rest of a request's arrays go by reference.
INLINE_BUDGET_BYTES = 4 << 20
# A gateway that does not accept a connection within this is taken as gone (the next is tried).
CONNECT_TIMEOUT_S = 10.0
# Transport failures after which a request goes to the pool's next gateway: it never got there
# (refused, unroutable), or its gateway dropped the connection unanswered (killed mid-request).
# Every tpmflow route only computes: a dropped request sent again, with the same request id, costs
# compute but is charged once (the dead gateway never settled its reservation; README, "Running across nodes").
NEVER_ARRIVED: tuple[type[Exception], ...] = (httpx.ConnectError, httpx.ConnectTimeout)
DROPPED: tuple[type[Exception], ...] = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
# Idle connections are dropped before the gateway's server drops them (uvicorn: after 5 s), so a
# request never goes out on a connection the server is closing.
KEEPALIVE_S = 2.0


class Decodings(list[list[Decoded] | AdapterInputError]):
    """Per item of an adapter's generate: its decoded outputs, or its ``AdapterInputError``.
    ``retrieved``: with ``retrieve=``, what went into each item's context (collection, embedder, ids
    and scores per item); None otherwise."""

    def __init__(self, items: Any = (), retrieved: dict[str, Any] | None = None) -> None:
        super().__init__(items)
        self.retrieved = retrieved


# -- errors ----------------------------------------------------------------------------------------


def error_from_response(resp: httpx.Response) -> TpmflowError | None:
    """The typed exception an answer stands for, or ``None`` for a success.

    The class is the one the error body's ``type`` names (else the one its HTTP status maps to), so
    the client raises what the gateway raised; ``item`` and the retry delay (the body's
    ``retry_after``, else the ``Retry-After`` header) are kept for every class that carries them.
    """
    if resp.status_code < 400:
        return None
    try:
        body = resp.json()
    except ValueError:
        body = None
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        err = {} if err is None else {"message": str(err)}
    cls = ERROR_CLASSES.get(str(err.get("type", ""))) or ERROR_CLASSES.get(
        type_for_status(resp.status_code), TpmflowError
    )
    kwargs: dict[str, Any] = {"item": err.get("item")}
    retry_after = _seconds(err.get("retry_after"))
    if retry_after is None:
        retry_after = _seconds(resp.headers.get(Headers.RETRY_AFTER))
    if retry_after is not None and _takes_retry_after(cls):
        kwargs["retry_after"] = retry_after
    return cls(str(err.get("message") or resp.text[:500]), **kwargs)


def raise_for_error(resp: httpx.Response) -> None:
    """Raise the typed exception of an error answer (the same class the gateway raised)."""
    error = error_from_response(resp)
    if error is not None:
        raise error


def _seconds(value: Any) -> float | None:
    """A delay in seconds from a JSON number or a ``Retry-After`` value (HTTP dates are not sent)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        return max(0.0, float(value))
    except (TypeError, ValueError):
        return None


def _takes_retry_after(cls: type[TpmflowError]) -> bool:
    return "retry_after" in inspect.signature(cls).parameters


# -- operations a flow asks its runner for --------------------------------------------------------


@dataclass(frozen=True)
class Send:
    """Send this request; the flow gets the ``httpx.Response`` (or the transport's exception)."""

    request: httpx.Request


@dataclass(frozen=True)
class Sleep:
    """Wait before a retry."""

    seconds: float


@dataclass(frozen=True)
class Blocking:
    """Run ``fn(*args)``, which blocks (disk, CPU); ``AsyncClient`` runs it in a thread."""

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Done(Generic[T]):
    """The flow finished with ``value``."""

    value: T


Op = Send | Sleep | Blocking
Flow = Generator[Op, Any, T]


def resume(flow: Flow[T], outcome: Any, error: BaseException | None) -> Op | Done[T]:
    """Give a flow the outcome of its last operation (or throw in that operation's exception) and
    return what it asks for next, or ``Done`` with its result. Its own exceptions propagate."""
    try:
        return flow.throw(error) if error is not None else flow.send(outcome)
    except StopIteration as stop:
        return Done(stop.value)


# -- request bodies and answers ------------------------------------------------------------------


class InlineBudget:
    """Raw array bytes one request may still carry inline (``INLINE_BUDGET_BYTES`` in all)."""

    def __init__(self, nbytes: int = INLINE_BUDGET_BYTES) -> None:
        self.left = nbytes

    def take(self, nbytes: int, limit: int) -> bool:
        """Whether an array of ``nbytes`` goes inline: under the store's per-array ``limit`` and
        within what is left; if so it is spent."""
        if nbytes > limit or nbytes > self.left:
            return False
        self.left -= nbytes
        return True


def _check_dtype(value: np.ndarray) -> None:
    # The same dtype rule inline as by reference (encode_payload's), without serialising the array.
    encode_payload(np.empty(0, dtype=value.dtype))


def _as_list(items: Any) -> list[Any]:
    """One item (a string, file bytes, an array, a dict, a reference) or a sequence of items."""
    single = (str, bytes, bytearray, np.ndarray, dict, Reference)
    return [items] if isinstance(items, single) else list(items)


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
    extra = dict(extra)
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


def _completion_body(
    prompt: str | Sequence[str], max_tokens: int, temperature: float, seed: int | None, extra: dict[str, Any]
) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature, **extra}
    if seed is not None:
        body["seed"] = seed
    return body


def _with_provenance(resp: httpx.Response) -> dict[str, Any]:
    """The JSON body, plus the gateway's provenance headers under ``_provenance``."""
    data = dict(resp.json())
    data["_provenance"] = {k: resp.headers[h] for k, h in PROVENANCE_HEADERS.items() if h in resp.headers}
    if Headers.RETRIEVED in resp.headers:  # what retrieve= put into the prompts
        data["_provenance"]["retrieved"] = json.loads(resp.headers[Headers.RETRIEVED])
    return data


def _generations(data: dict[str, Any], request_id: str, body: dict[str, Any]) -> list[Generation]:
    usage = data.get("usage") or {}
    choices = sorted(data.get("choices", []), key=lambda c: c.get("index", 0))
    sampling = {k: v for k, v in body.items() if k != "prompt"}
    provenance = {**data.get("_provenance", {}), "request_id": request_id, "sampling": sampling}
    return [Generation(c.get("text", ""), c.get("finish_reason"), usage, request_id, provenance) for c in choices]


def _decoded(data: dict[str, Any]) -> Decodings:
    out = Decodings(retrieved=data.get("_provenance", {}).get("retrieved"))
    for d in sorted(data["data"], key=lambda d: d["index"]):
        if d.get("error"):
            out.append(AdapterInputError(d["error"]["message"], item=d["index"]))
        else:
            out.append([Decoded(o["text"], o.get("value"), o.get("reason")) for o in d["outputs"]])
    return out


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


def _embeddings(data: dict[str, Any], store: PayloadStore | None) -> Embeddings:
    items = sorted(data["data"], key=lambda d: d["index"])
    return Embeddings(
        [
            AdapterInputError(d["error"]["message"], item=d["index"])
            if d.get("error")
            else LazyArray(d["embedding"], store)
            for d in items
        ],
        [d.get("n_tokens", 0) for d in items],
        data.get("usage", {}),
        data.get("provenance", {}),
    )


def _trace(data: dict[str, Any], store: PayloadStore | None) -> Trace:
    names = [f"blocks.{c['layer']}.{c['site']}" for c in data["captures"]]
    return Trace(
        text=data["text"],
        prompt_tokens=data["prompt_tokens"],
        captures={n: LazyArray(c["array"], store) for n, c in zip(names, data["captures"], strict=True)},
        positions={n: c["positions"] for n, c in zip(names, data["captures"], strict=True)},
        lens=data["lens"],
        steps=data.get("steps", []),
        usage=data.get("usage", {}),
        provenance=data.get("provenance", {}),
    )


# -- the shared base -------------------------------------------------------------------------------


class BaseClient:
    """State and flows shared by ``Client`` and ``AsyncClient``; subclasses add ``_http`` and a runner."""

    _http: httpx.Client | httpx.AsyncClient

    def __init__(
        self,
        url: str | Sequence[str],
        token: str | None,
        timeout: float,
        retries: int,
        backoff_s: float,
        version: str | None = None,
    ) -> None:
        # Several gateways of one pool: requests go to the first that answers (``self.url``).
        self.urls = list(dict.fromkeys(u.rstrip("/") for u in ([url] if isinstance(url, str) else url)))
        if not self.urls:
            raise ValueError("a client needs at least one gateway URL")
        self.url = self.urls[0]
        self.token = token
        # Pinned: only replicas serving this model version (content hash or prefix) answer.
        self.version = version
        self.timeout = timeout
        self.retries = retries
        self.backoff_s = backoff_s
        self._store: PayloadStore | None = None
        self._store_info: dict[str, Any] | None = None

    # -- requests and retries ----------------------------------------------------------------------

    def _headers(self, request_id: str) -> dict[str, str]:
        headers = {Headers.REQUEST_ID: request_id}
        if self.token:
            headers[Headers.AUTHORIZATION] = f"Bearer {self.token}"
        if self.version:
            headers[Headers.VERSION] = self.version
        return headers

    def _retry_delay(self, attempt: int, error: TpmflowError) -> float | None:
        """Seconds to wait before retrying after failed attempt ``attempt`` (from 0), or ``None`` to
        raise ``error`` now. A full admission queue (503 ``Overloaded``) and a rate limit (429
        ``QuotaExceeded`` with Retry-After: its bucket refills) are worth waiting for, ``retries``
        times; a spent allocation (429 without Retry-After) and every other error are not."""
        retry_after: float | None = getattr(error, "retry_after", None)
        waitable = isinstance(error, Overloaded) or (isinstance(error, QuotaExceeded) and retry_after is not None)
        if not waitable or attempt >= self.retries:
            return None
        return max(retry_after or 0.0, self.backoff_s * 2**attempt)

    def _transport(self, request: httpx.Request) -> Flow[httpx.Response]:
        """One HTTP exchange; a pool that cannot be reached or does not answer is ``ReplicaFailed``."""
        gateway = f"{request.url.scheme}://{request.url.netloc.decode()}"
        try:
            response: httpx.Response = yield Send(request)
        except httpx.TimeoutException as exc:
            raise ReplicaFailed(f"no answer from {gateway} within {self.timeout} s") from exc
        except httpx.TransportError as exc:
            raise ReplicaFailed(f"cannot reach the pool at {gateway}: {exc}") from exc
        return response

    def _exchange(
        self, method: str, path: str, request_id: str, json: Any = None, params: dict[str, Any] | None = None
    ) -> Flow[httpx.Response]:
        """One answer, from the first of the pool's gateways that gives one, starting at the one that
        answered last (``self.url``). A request goes on to the next gateway when it never reached its
        own (refused, unroutable) or its gateway dropped it unanswered (killed). Nothing is sent to
        the same gateway again, nor after a read timeout (the request may still be running there)."""
        start = self.urls.index(self.url) if self.url in self.urls else 0
        for k in range(len(self.urls)):
            url = self.urls[(start + k) % len(self.urls)]
            request = self._http.build_request(
                method, url + path, json=json, params=params, headers=self._headers(request_id)
            )
            try:
                response = yield from self._transport(request)
            except ReplicaFailed as exc:
                if k + 1 == len(self.urls) or not isinstance(exc.__cause__, NEVER_ARRIVED + DROPPED):
                    raise
                continue
            self.url = url  # later calls start here (a racing write stores a gateway that answered too)
            return response
        raise AssertionError("unreachable: the loop returns or raises")

    def _call(
        self,
        method: str,
        path: str,
        json: Any = None,
        params: dict[str, Any] | None = None,
        request_id: str | None = None,
    ) -> Flow[dict[str, Any]]:
        """A JSON call with retries; every attempt carries the same request id (the ledger's key).
        With several gateways, one that cannot be reached is failed over (``_exchange``)."""
        rid = request_id or uuid.uuid4().hex
        attempt = 0
        while True:
            resp = yield from self._exchange(method, path, rid, json=json, params=params)
            error = error_from_response(resp)
            if error is None:
                return _with_provenance(resp)
            delay = self._retry_delay(attempt, error)
            if delay is None:
                raise error
            yield Sleep(delay)
            attempt += 1

    # -- the pool's store ----------------------------------------------------------------------------

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

    def _ensure_store(self) -> Flow[PayloadStore]:
        if self._store is None:
            self._store = self._make_store((yield from self._call("GET", Routes.STORE)))
        return self._store

    def _put(self, value: np.ndarray | bytes) -> Flow[Reference]:
        store = yield from self._ensure_store()
        assert self._store_info is not None
        ref: Reference = yield Blocking(store.put, (self._store_info["principal"], value))
        body = {"key": ref.key, "kind": ref.kind, "nbytes": ref.nbytes, "digest": ref.digest}
        return Reference.model_validate((yield from self._call("POST", Routes.SIGN, json=body)))

    def _array(self, value: np.ndarray | InlineArray | Reference, budget: InlineBudget) -> Flow[dict[str, Any]]:
        """An array's wire form: inline while under the store's inline limit and the request's
        budget, else written to the store and sent as a signed reference."""
        if isinstance(value, Reference):
            return value.model_dump()
        store = yield from self._ensure_store()
        inline = None
        if isinstance(value, InlineArray):  # a spec model (Add, Replace) made it inline when built
            inline, value = value, value.to_numpy()
        _check_dtype(value)
        if budget.take(value.nbytes, store.config.inline_limit_bytes):
            return (inline or InlineArray.from_numpy(value)).model_dump()
        return (yield from self._put(value)).model_dump()

    def _wire_items(self, items: list[Any], budget: InlineBudget) -> Flow[list[Any]]:
        """Arrays inline or by reference (``_array``), file bytes by reference, references as they are."""
        wired: dict[int, dict[str, Any]] = {}
        for v in _payload_leaves(items):
            if id(v) in wired:  # the same object twice travels once
                continue
            if isinstance(v, (bytes, bytearray)):
                wired[id(v)] = (yield from self._put(bytes(v))).model_dump()
            else:
                wired[id(v)] = yield from self._array(v, budget)
        return _with_payloads(items, wired)

    def _spec(self, spec: Any, budget: InlineBudget) -> Flow[dict[str, Any]]:
        """A capture / intervention / lens (a pydantic model or a dict) as JSON, its arrays wired."""
        is_model = hasattr(spec, "model_dump")
        data = dict(spec.model_dump(exclude_none=True) if is_model else spec)
        for key in ("vector", "values"):
            value = getattr(spec, key, None) if is_model else data.get(key)
            if isinstance(value, (np.ndarray, InlineArray, Reference)):
                data[key] = yield from self._array(value, budget)
        return data

    # -- the calls (public methods of Client and AsyncClient run these) -------------------------------

    def _health(self) -> Flow[dict[str, Any]]:
        resp = yield from self._exchange("GET", Routes.HEALTH, uuid.uuid4().hex)
        return dict(resp.json())

    def _models(self) -> Flow[list[str]]:
        return [m["id"] for m in (yield from self._call("GET", Routes.MODELS))["data"]]

    def _knowledge(self, operation: str, body: dict[str, Any]) -> Flow[dict[str, Any]]:
        """One knowledge-store operation (``tpmflow.client.knowledge``)."""
        return (yield from self._call("POST", f"{Routes.KNOWLEDGE}/{operation}", json=body))

    def _collections(self) -> Flow[list[dict[str, Any]]]:
        return list((yield from self._call("GET", Routes.KNOWLEDGE))["collections"])

    def _usage(self, by: str) -> Flow[list[dict[str, Any]]]:
        return list((yield from self._call("GET", Routes.USAGE, params={"by": by}))["usage"])

    def _generate(
        self,
        prompt: Any,
        max_tokens: int,
        temperature: float,
        seed: int | None,
        prompt_embeds: np.ndarray | Reference | None,
        adapter: str | None,
        adapter_config: dict[str, Any] | None,
        request_id: str | None,
        extra: dict[str, Any],
    ) -> Flow[Any]:
        rid = request_id or uuid.uuid4().hex
        if adapter is not None:
            body = _adapter_generate_body(prompt, adapter, adapter_config, max_tokens, temperature, seed, extra)
            body["items"] = yield from self._wire_items(body["items"], InlineBudget())
            return _decoded((yield from self._call("POST", Routes.ADAPTER_GENERATE, json=body, request_id=rid)))
        if prompt_embeds is not None:
            body = {
                "prompt_embeds": (yield from self._array(prompt_embeds, InlineBudget())),
                "max_tokens": max_tokens,
                "temperature": temperature,
                "seed": seed,
                **extra,
            }
            data = yield from self._call("POST", Routes.GENERATE_EMBEDS, json=body, request_id=rid)
            return Generation(data["text"], data.get("finish_reason"), data["usage"], rid, data.get("provenance", {}))
        if prompt is None:
            raise InvalidRequest("give a prompt or prompt_embeds")
        body = _completion_body(prompt, max_tokens, temperature, seed, extra)
        gens = _generations((yield from self._call("POST", Routes.COMPLETIONS, json=body, request_id=rid)), rid, body)
        return gens[0] if isinstance(prompt, str) else gens

    def _embed(
        self, inputs: Any, adapter: Any, adapter_config: dict[str, Any] | None, pooling: str, request_id: str | None
    ) -> Flow[Embeddings]:
        yield from self._ensure_store()  # per-token states may come back as references
        budget = InlineBudget()
        if adapter is not None and not isinstance(adapter, str):  # an adapter object: it runs here
            items = _as_list(inputs)
            local, where, errors = yield Blocking(_local_inputs, (adapter, items))
            if not where:  # every item was refused here: nothing to send
                return _merge_local(Embeddings([], [], {}, {}), len(items), where, errors)
            body: dict[str, Any] = {"input": (yield from self._wire_items(local, budget)), "pooling": pooling}
            try:
                data = yield from self._call("POST", Routes.EMBED, json=body, request_id=request_id)
            except TpmflowError as exc:
                raise _local_error(exc, where) from None
            return _merge_local(_embeddings(data, self._store), len(items), where, errors)
        items = yield from self._wire_items(_as_list(inputs), budget)  # soft-token inputs carry arrays too
        if adapter is None:
            path, body = Routes.EMBED, {"input": items, "pooling": pooling}
        else:
            path = Routes.ADAPTER_EMBED
            body = {"adapter": adapter, "items": items, "pooling": pooling, "config": adapter_config}
        return _embeddings((yield from self._call("POST", path, json=body, request_id=request_id)), self._store)

    def _predict(
        self, items: Any, adapter: str, head: str, adapter_config: dict[str, Any] | None, request_id: str | None
    ) -> Flow[Predictions]:
        wired = yield from self._wire_items(_as_list(items), InlineBudget())
        body = {"adapter": adapter, "items": wired, "head": head, "config": adapter_config}
        return _predictions((yield from self._call("POST", Routes.ADAPTER_PREDICT, json=body, request_id=request_id)))

    def _probe(
        self,
        prompt: str | list[int],
        capture: Sequence[Any],
        interventions: Sequence[Any],
        lens: Any,
        max_tokens: int,
        temperature: float,
        seed: int | None,
        request_id: str | None,
    ) -> Flow[Trace]:
        yield from self._ensure_store()  # big captures come back as references
        budget = InlineBudget()  # steering vectors and patches share the request's inline budget
        captures: list[dict[str, Any]] = []
        for spec in capture:
            captures.append((yield from self._spec(spec, budget)))
        edits: list[dict[str, Any]] = []
        for spec in interventions:
            edits.append((yield from self._spec(spec, budget)))
        body = {
            "prompt": prompt,
            "captures": captures,
            "interventions": edits,
            "lens": None if lens is None else (yield from self._spec(lens, budget)),
            "max_tokens": max_tokens,
            "temperature": temperature,
            "seed": seed,
        }
        return _trace((yield from self._call("POST", Routes.PROBE, json=body, request_id=request_id)), self._store)

    def _digest(self, value: Reference | np.ndarray) -> Flow[dict[str, Any]]:
        # Always inline or the reference as given: the point is to prove what arrives.
        payload = value.model_dump() if isinstance(value, Reference) else InlineArray.from_numpy(value).model_dump()
        return (yield from self._call("POST", Routes.DIGEST, json={"payload": payload}))
