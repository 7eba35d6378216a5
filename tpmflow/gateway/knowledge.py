"""The knowledge routes of the gateway (``/v1/tpmflow/knowledge/...``): collections in the pool's
database, their vectors made by the pool itself.

Adding and searching embed through a replica like any embed request (admitted, metered on the
ledger under ``knowledge/add`` and ``knowledge/search``, charged to the caller), pinned to the
model version the collection was made with, so every vector of a collection comes from one
model. An adapter's per-item errors come back per item; the rest is added.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from tpmflow.config import TEXT_EMBEDDER_GROUP
from tpmflow.errors import ERROR_CLASSES, InvalidRequest, ReplicaFailed, TpmflowError, VersionNotFound
from tpmflow.gateway.call import Call
from tpmflow.knowledge import CollectionInfo, Embedder, Hit
from tpmflow.knowledge.store import check_search
from tpmflow.knowledge.wire import AddItems, CreateCollection, ItemIds, Named, Reembed, SearchItems, Share
from tpmflow.pool.registry import matches
from tpmflow.protocol import Headers, Routes
from tpmflow.schema import InlineArray, Reference

if TYPE_CHECKING:
    from tpmflow.gateway.app import Gateway, Route


def parse(model: type[Any], body: dict[str, Any]) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise InvalidRequest(
            f"bad {model.__name__} request: {exc.errors()[0]['msg']} at {exc.errors()[0]['loc']}"
        ) from None


async def _spec(gw: Gateway, request: Request, call: Call, model: type[Any]) -> Any:
    _, body = await gw.intake.body(request, call)
    return parse(model, body)


def _info(info: CollectionInfo) -> dict[str, Any]:
    return {
        "name": info.name,
        "project": info.project,
        "visibility": info.visibility,
        "shared_with": info.shared_with,
        "embedder": info.embedder.model_dump(),
        "items": info.items,
        "fields": info.fields,
        "created_by": info.created_by,
        "stored_bytes": info.stored_bytes,
        "index_bytes": info.index_bytes,
    }


def _hit(hit: Hit | None) -> dict[str, Any] | None:
    return None if hit is None else {"id": hit.id, "score": hit.score, "item": hit.item, "metadata": hit.metadata}


def _metered(handler: Any) -> Any:
    """A route that embeds through the pool: every request leaves a ledger row, a refusal too."""

    async def run(gw: Gateway, request: Request, route: Route) -> Response:
        call = await gw.intake.call(request, route.endpoint, route.permission)
        try:
            return await handler(gw, request, route, call)
        except TpmflowError as exc:
            if not getattr(call, "forwarded", False):  # admission and forwarding write their own rows
                gw.billing.refused(call, exc.status_code, type(exc).__name__)
            raise

    run.__name__ = handler.__name__
    return run


@_metered
async def create(gw: Gateway, request: Request, route: Route, call: Call) -> Response:
    """A collection embedded through ``adapter`` (or as text) by the model version the pool serves
    (or the request pins): its content hash and hidden size become the collection's embedder."""
    spec = await _spec(gw, request, call, CreateCollection)
    if spec.config is not None and not spec.adapter:
        raise InvalidRequest("config is the adapter's: give adapter= too")
    via = spec.via
    if via == "auto":
        pinned = call.version and not any(
            r.info.task == "embed" and matches(r.info.content_hash, call.version) for r in gw.registry.live()
        )
        text = gw.cfg.text_embedder is not None and not spec.adapter and not pinned
        via = "text-embedder" if text else "model"
    if via == "text-embedder" and spec.adapter:
        raise InvalidRequest("the text embedder embeds text: an adapter's items are embedded by the model")
    if via == "text-embedder" and gw.cfg.text_embedder is None:
        raise InvalidRequest("this pool has no text embedder (PoolConfig.text_embedder): use via='model'")
    if via == "text-embedder" and spec.pooling != "mean":
        raise InvalidRequest("the text embedder pools as it was trained to: pooling is the model's choice")
    task = "embed" if via == "text-embedder" else "generate"
    live = [
        r
        for r in gw.registry.live()
        if r.info.task == task and (not call.version or matches(r.info.content_hash, call.version))
    ]
    if not live:
        what = "text embedder" if task == "embed" else "replica"
        raise ReplicaFailed(f"no live {what} to take the collection's embedder from; retry when one is up")
    replica = live[0].info
    if task == "embed":
        embedder = Embedder(
            model=replica.content_hash, pooling="model", dim=replica.hidden_size, served_by="text-embedder"
        )
        info = await asyncio.to_thread(gw.knowledge.create, call.principal, spec.name, embedder, spec.visibility)
        return JSONResponse(_info(info))
    part = (spec.config or {}).get("part")
    if part is not None and (not isinstance(part, str) or "@" not in part):
        raise InvalidRequest("config.part names the trained part with its version, 'name@version'")
    embedder = Embedder(
        model=replica.content_hash,
        adapter=spec.adapter,
        config=spec.config,
        part=part if isinstance(part, str) else None,
        pooling=spec.pooling,
        dim=replica.hidden_size,
    )
    info = await asyncio.to_thread(gw.knowledge.create, call.principal, spec.name, embedder, spec.visibility)
    return JSONResponse(_info(info))


async def listing(gw: Gateway, request: Request, route: Route) -> Response:
    principal = await gw.intake.authorise(request, route.permission, route.endpoint)
    infos = await asyncio.to_thread(gw.knowledge.list, principal)
    return JSONResponse({"collections": [_info(i) for i in infos]})


async def _authorised(gw: Gateway, request: Request, route: Route, model: type[Any]) -> tuple[Any, Any]:
    """The caller and its parsed body, for the routes that only read or change the database."""
    principal = await gw.intake.authorise(request, route.permission, route.endpoint)
    _, body = await gw.intake.body(request)
    return principal, parse(model, body)


async def show(gw: Gateway, request: Request, route: Route) -> Response:
    principal, spec = await _authorised(gw, request, route, Named)
    return JSONResponse(_info(await asyncio.to_thread(gw.knowledge.show, principal, spec.name)))


@_metered
async def add(gw: Gateway, request: Request, route: Route, call: Call) -> Response:
    spec = await _spec(gw, request, call, AddItems)
    if spec.metadata is not None and len(spec.metadata) != len(spec.items):
        raise InvalidRequest(f"{len(spec.items)} items but {len(spec.metadata)} metadata records")
    row = await asyncio.to_thread(gw.knowledge.writable, call.principal, spec.name)  # before any compute
    embedder = Embedder.model_validate_json(row.embedder)
    vectors, errors, answer = await embed_items(gw, call, embedder, spec.items)
    embedder = await same_adapter(gw, call, spec.name, embedder, answer)
    ok = [i for i in range(len(spec.items)) if i not in errors]
    ids: list[int] = []
    if ok:
        metadata = [spec.metadata[i] for i in ok] if spec.metadata is not None else None
        try:
            ids = await asyncio.to_thread(
                gw.knowledge.add, call.principal, spec.name, [spec.items[i] for i in ok], vectors, embedder, metadata
            )
        except InvalidRequest as exc:  # name the item by its place in the request, not among those embedded
            if exc.item is None:
                raise
            raise InvalidRequest(
                exc.message.replace(f" {exc.item} ", f" {ok[exc.item]} ", 1), item=ok[exc.item]
            ) from None
    by_item: list[dict[str, Any]] = []
    new = iter(ids)
    for i in range(len(spec.items)):
        by_item.append({"index": i, "error": errors[i]} if i in errors else {"index": i, "id": next(new)})
    return JSONResponse(
        {"items": by_item, "embedder": embedder.model_dump(), "usage": answer.get("usage", {})},
        headers=_provenance(answer),
    )


@_metered
async def search(gw: Gateway, request: Request, route: Route, call: Call) -> Response:
    spec = await _spec(gw, request, call, SearchItems)
    hits, embedder, answer = await search_items(gw, call, spec.name, spec.queries, spec.k, spec.filter)
    return JSONResponse(
        {
            "results": [[_hit(h) for h in row_hits] for row_hits in hits],
            "embedder": embedder.model_dump(),
            "collection": spec.name,
            "usage": answer.get("usage", {}),
        },
        headers=_provenance(answer),
    )


@_metered
async def reembed(gw: Gateway, request: Request, route: Route, call: Call) -> Response:
    """One step of moving a collection to another model version (or the same one, after the pool's
    adapter changed): up to ``batch`` items embedded by it; the step that embeds the last ones swaps
    the new vectors in. The client repeats it until
    ``complete`` (``tpmflow knowledge reembed`` draws the progress); searches use the old vectors
    and index until then. A step is metered like an add (``knowledge/reembed``)."""
    spec = await _spec(gw, request, call, Reembed)
    if spec.cancel:
        cancelled = await asyncio.to_thread(gw.knowledge.reembed_cancel, call.principal, spec.name)
        gw.billing.record(call, 200)  # no replica was asked: a row of its own, nothing charged
        return JSONResponse({"cancelled": cancelled, "complete": False})
    row = await asyncio.to_thread(gw.knowledge.writable, call.principal, spec.name)
    current = Embedder.model_validate_json(row.embedder)
    live = [r.info for r in gw.registry.live() if matches(r.info.content_hash, spec.version)]
    if not live:
        raise VersionNotFound(f"no live replica serves version {spec.version!r}; the pool serves what /health lists")
    if len({r.content_hash for r in live}) > 1:
        raise InvalidRequest(f"{spec.version!r} is a prefix of several versions the pool serves: give more of it")
    served_by = "text-embedder" if live[0].task == "embed" else "model"
    if served_by == "text-embedder" and current.adapter:
        raise InvalidRequest(
            f"{spec.version!r} is the text embedder: it cannot embed adapter {current.adapter!r}'s items"
        )
    target = current.model_copy(
        update={
            "model": live[0].content_hash,
            "dim": live[0].hidden_size,
            "adapter_version": None,
            "served_by": served_by,
            # the embedding model pools as it was trained to; the model's hooks pool as asked
            "pooling": "model" if served_by == "text-embedder" else current.pooling.replace("model", "mean"),
        }
    )
    # The version it has already is re-embedded too: the pool's adapter may have changed since.
    await asyncio.to_thread(gw.knowledge.reembed_start, call.principal, spec.name, target)
    state = await asyncio.to_thread(gw.knowledge.reembed_state, call.principal, spec.name, spec.batch)
    target = state.target or target  # as stored: with the adapter version a first step pinned
    usage: dict[str, Any] = {}
    if state.todo:
        vectors, errors, answer = await embed_items(gw, call, target, [item for _, item in state.todo])
        target = await same_adapter(gw, call, spec.name, target, answer, "next_embedder")
        usage = answer.get("usage", {})
        if errors:
            bad = sorted(errors)
            raise InvalidRequest(
                f"{len(bad)} items cannot be embedded by {target.model[:19]} (ids "
                f"{', '.join(str(state.todo[i][0]) for i in bad[:10])}): {errors[bad[0]]['message']}; "
                "delete them, or cancel the re-embedding"
            )
        ids = [i for i, _ in state.todo]
        await asyncio.to_thread(gw.knowledge.reembed_store, call.principal, spec.name, target, ids, vectors)
    remaining = state.remaining - len(state.todo)
    complete = remaining <= 0 and await asyncio.to_thread(gw.knowledge.reembed_finish, call.principal, spec.name)
    if remaining <= 0 and not complete:  # items added meanwhile: the next step embeds them
        remaining = (await asyncio.to_thread(gw.knowledge.reembed_state, call.principal, spec.name)).remaining
    if not state.todo:
        gw.billing.record(call, 200)  # a step that only swapped: no replica was asked, nothing charged
    return JSONResponse(
        {
            "complete": complete,
            "embedded": len(state.todo),
            "remaining": max(0, remaining),
            "items": state.items,
            "embedder": target.model_dump(),
            "usage": usage,
        }
    )


async def get(gw: Gateway, request: Request, route: Route) -> Response:
    principal, spec = await _authorised(gw, request, route, ItemIds)
    found = await asyncio.to_thread(gw.knowledge.get, principal, spec.name, spec.ids)
    return JSONResponse({"items": [_hit(h) for h in found]})


async def delete(gw: Gateway, request: Request, route: Route) -> Response:
    principal, spec = await _authorised(gw, request, route, ItemIds)
    return JSONResponse({"deleted": await asyncio.to_thread(gw.knowledge.delete, principal, spec.name, spec.ids)})


async def share(gw: Gateway, request: Request, route: Route) -> Response:
    principal, spec = await _authorised(gw, request, route, Share)
    info = await asyncio.to_thread(gw.knowledge.share, principal, spec.name, spec.projects, spec.public, spec.revoke)
    return JSONResponse(_info(info))


async def drop(gw: Gateway, request: Request, route: Route) -> Response:
    principal, spec = await _authorised(gw, request, route, Named)
    await asyncio.to_thread(gw.knowledge.drop, principal, spec.name)
    return JSONResponse({"dropped": spec.name})


# -- embedding through the pool --------------------------------------------------------------------


async def embed_items(
    gw: Gateway, call: Call, embedder: Embedder, items: list[Any]
) -> tuple[np.ndarray, dict[int, dict[str, str]], dict[str, Any]]:
    """``items`` embedded as the collection's embedder does, on its model version: the vectors of
    the items that worked (in order), each failed item's error, and the replica's answer."""
    if embedder.adapter:
        path = Routes.ADAPTER_EMBED
        body = {"adapter": embedder.adapter, "items": items, "pooling": embedder.pooling, "config": embedder.config}
    else:
        bad = [i for i, item in enumerate(items) if not isinstance(item, str) or not item]
        if bad:
            raise InvalidRequest(f"item {bad[0]} is not text: this collection embeds text (it names no adapter)")
        path, body = Routes.EMBED, {"input": items, "pooling": embedder.pooling}
    if embedder.served_by == "text-embedder":
        if gw.cfg.text_embedder is None:
            raise InvalidRequest(
                f"this collection is embedded by a text embedder ({embedder.model[:19]}) and this pool has none: "
                "configure text_embedder, or re-embed the collection for the pool's model (tpmflow knowledge reembed)"
            )
        # vLLM's own route on the embedding model's replica; text past its max_model_len is cut
        # there (as sentence-transformers does), not refused.
        path, body = Routes.OPENAI_EMBEDDINGS, {"input": items, "truncate_prompt_tokens": -1}
        call.group = TEXT_EMBEDDER_GROUP
    call.version = embedder.model  # only replicas serving the collection's model version may embed
    call.forwarded = True  # type: ignore[attr-defined]  # from here every outcome has its ledger row
    async with gw.admission.admitted(call, body):
        response = await gw.forwarder.forward(call, "POST", path, orjson.dumps(body), body)
    answer = orjson.loads(bytes(response.body))
    if "provenance" not in answer:  # vLLM's own answer (the text embedder): the forwarder's headers say it
        answer["provenance"] = {
            "content_hash": response.headers.get(Headers.CONTENT_HASH, ""),
            "replica_id": response.headers.get(Headers.REPLICA, ""),
        }
    if response.status_code != 200:  # the attempt's ledger row is written; raise the replica's own error
        error = answer.get("error", {})
        raise ERROR_CLASSES.get(str(error.get("type")), InvalidRequest)(f"embedding failed: {error.get('message')}")
    vectors: list[np.ndarray] = []
    errors: dict[int, dict[str, str]] = {}
    for entry in answer["data"]:
        if isinstance(entry.get("embedding"), list):  # vLLM's /v1/embeddings: floats, no per-item errors
            vectors.append(np.asarray(entry["embedding"], dtype=np.float32))
            continue
        if entry.get("error"):
            errors[entry["index"]] = {
                "type": entry["error"].get("type", "AdapterInputError"),
                "message": entry["error"]["message"],
            }
            continue
        vectors.append(await asyncio.to_thread(_array, gw, entry["embedding"]))
    if not vectors:  # every item refused: nothing to add or search with
        return np.zeros((0, embedder.dim), np.float32), errors, answer
    return np.stack(vectors).astype(np.float32), errors, answer


async def search_items(
    gw: Gateway,
    call: Call,
    name: str,
    queries: list[Any],
    k: int,
    filter: dict[str, Any] | None,  # noqa: A002
    what: str = "query",
) -> tuple[list[list[Hit]], Embedder, dict[str, Any]]:
    """The ``k`` nearest items of each query, searched as ``call``'s principal: the collection is
    checked before anything is embedded; the queries are embedded on its model version (priced per
    query); a query that cannot be embedded (``what``, named in the error) refuses the search."""
    row = await asyncio.to_thread(gw.knowledge.readable, call.principal, name)  # before any compute
    check_search(row, len(queries), k, filter)
    embedder = Embedder.model_validate_json(row.embedder)
    call.queries = len(queries)
    vectors, errors, answer = await embed_items(gw, call, embedder, queries)
    embedder = await same_adapter(gw, call, name, embedder, answer, write=False)
    if errors:
        first = min(errors)
        raise InvalidRequest(f"{what} {first} could not be embedded: {errors[first]['message']}")
    hits = await asyncio.to_thread(gw.knowledge.search, call.principal, name, vectors, k, filter, embedder)
    return hits, embedder, answer


async def same_adapter(
    gw: Gateway,
    call: Call,
    name: str,
    embedder: Embedder,
    answer: dict[str, Any],
    which: str = "embedder",
    write: bool = True,
) -> Embedder:
    """The embedder, with the adapter version the replica served: pinned by a collection's first
    add (``write``; a read never pins another project's collection); afterwards a different one
    (the pool's adapter package changed) is refused, since its vectors would not be comparable."""
    if not embedder.adapter:
        return embedder
    served = str(((answer.get("provenance") or {}).get("sampling") or {}).get("adapter") or "")
    if embedder.adapter_version is None:
        if not write:
            return embedder  # nothing added yet, so nothing to compare with
        return await asyncio.to_thread(gw.knowledge.pin_adapter, call.principal, name, embedder, served, which)
    if served != embedder.adapter_version:
        raise InvalidRequest(
            f"collection {name!r} was embedded by adapter {embedder.adapter_version}; the pool now serves "
            f"{served}: re-embed the collection (tpmflow knowledge reembed) or use a pool with that adapter"
        )
    return embedder


def _array(gw: Gateway, payload: dict[str, Any]) -> np.ndarray:
    """An embedding as the replica answered it: inline, or a reference it wrote to the store."""
    if "key" in payload:
        value = gw.store.get(Reference.model_validate(payload))
        assert isinstance(value, np.ndarray)
        return value.reshape(-1)
    return InlineArray.model_validate(payload).to_numpy().reshape(-1)


def _provenance(answer: dict[str, Any]) -> dict[str, str]:
    prov = answer.get("provenance") or {}
    return {Headers.CONTENT_HASH: str(prov.get("content_hash", "")), Headers.REPLICA: str(prov.get("replica_id", ""))}
