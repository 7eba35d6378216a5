"""Retrieval in requests (``retrieve=`` on completions and the adapters' generate route): the
gateway searches the caller's collection for each prompt and puts what it found into the prompt.

The search embeds through a replica on the collection's own model version, as a metered request of
its own (ledger endpoint ``knowledge/retrieve``, same request id), so the generation that follows
is admitted and charged as usual. Completions get a ``Context:`` block before each prompt; the
adapters' route sends the entries to the replica, where the adapter writes them
(``tpmflow.knowledge.context``). What was retrieved (collection, embedder, ids and scores per
prompt) comes back in the ``X-Tpmflow-Retrieved`` header.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tpmflow.errors import Forbidden, InvalidRequest
from tpmflow.gateway.call import Call
from tpmflow.gateway.knowledge import parse, search_items
from tpmflow.knowledge import Embedder, Hit
from tpmflow.knowledge.context import text_context
from tpmflow.knowledge.wire import MAX_RETRIEVE_PROMPTS, Retrieve
from tpmflow.protocol import Headers

if TYPE_CHECKING:
    from tpmflow.gateway.app import Gateway

HEADER = Headers.RETRIEVED
ENDPOINT = "knowledge/retrieve"


@dataclass
class Retrieved:
    """The hits for each prompt, and where they came from."""

    collection: str
    embedder: Embedder
    hits: list[list[Hit]]

    def entries(self, i: int) -> list[tuple[Any, dict[str, Any]]]:
        return [(h.item, h.metadata) for h in self.hits[i]]

    def header(self) -> str:
        """Provenance, compact: ids and scores per prompt (``client.knowledge(name).get`` reads items)."""
        embedder = self.embedder.model_dump(exclude={"config"})  # unbounded; the collection's info has it
        return json.dumps(  # ASCII only: header values travel as latin-1
            {
                "collection": self.collection,
                "embedder": embedder,
                "ids": [[h.id for h in hits] for hits in self.hits],
                "scores": [[round(h.score, 6) for h in hits] for hits in self.hits],
            },
            separators=(",", ":"),
            ensure_ascii=True,
        )


def take_spec(body: dict[str, Any]) -> Retrieve | None:
    """``retrieve`` popped from a request body and checked (None when the request has none)."""
    if "retrieve" not in body:
        return None
    raw = body.pop("retrieve")
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise InvalidRequest('retrieve is {"collection": NAME, "k": K, "filter"?: {...}, "query"?: [...]}')
    return parse(Retrieve, raw)


async def retrieve(gw: Gateway, call: Call, spec: Retrieve, prompts: list[Any]) -> Retrieved:
    """The ``spec.k`` items nearest each prompt (or ``spec.query``), searched as the caller."""
    if not call.principal.can("embed"):
        raise Forbidden("retrieve= searches a knowledge collection, which needs the embed permission")
    if len(prompts) > MAX_RETRIEVE_PROMPTS:
        raise InvalidRequest(f"retrieve takes at most {MAX_RETRIEVE_PROMPTS} prompts per request, got {len(prompts)}")
    queries = spec.query if spec.query is not None else prompts
    if len(queries) not in (1, len(prompts)):
        raise InvalidRequest(f"retrieve.query has {len(queries)} items: give 1 (for every prompt) or {len(prompts)}")
    search = Call(ENDPOINT, call.principal, call.request_id)  # its own ledger row, the request's id
    what = "retrieve.query item" if spec.query is not None else "prompt"
    found, embedder, _ = await search_items(gw, search, spec.collection, queries, spec.k, spec.filter, what)
    hits = [[h for h in row_hits if h is not None] for row_hits in found]
    if len(hits) == 1 and len(prompts) > 1:
        hits = hits * len(prompts)
    return Retrieved(spec.collection, embedder, hits)


async def into_completion(gw: Gateway, call: Call, spec: Retrieve, body: dict[str, Any]) -> Retrieved:
    """A completions body's text prompt(s), each with its ``Context:`` block before it."""
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise InvalidRequest("retrieve needs text prompts (a string or a list of strings), not token ids")
    found = await retrieve(gw, call, spec, prompts)
    written = [text_context(found.entries(i)) + p for i, p in enumerate(prompts)]
    body["prompt"] = written[0] if isinstance(prompt, str) else written
    return found


async def into_adapter_generate(gw: Gateway, call: Call, spec: Retrieve, body: dict[str, Any]) -> Retrieved:
    """An adapter generate body with each item's retrieved entries as its ``context`` (the replica's
    adapter writes them)."""
    items = body.get("items")
    if not isinstance(items, list) or not items:
        raise InvalidRequest("items must be a non-empty list")
    found = await retrieve(gw, call, spec, items)
    body["context"] = [[{"item": h.item, "metadata": h.metadata} for h in hits] for hits in found.hits]
    return found
