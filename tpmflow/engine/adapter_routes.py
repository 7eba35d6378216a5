"""The replica's adapter routes: domain items through an installed adapter, the core model, and
then a head (predict) or the adapter's decoder (generate).

Items may carry payloads: a signed reference (file bytes or an array put in the pool's store) or
an inline array, at the top level or as a value of a dict item. They are resolved here, references
verified, before the adapter sees them. The adapter's ``encode`` (parsing, encoders, projectors;
hostile files in its sandbox) runs in a thread, never on the event loop. Whatever goes wrong with
one item becomes that item's error; the rest of the batch completes.

Handlers take ``(ctx, body, principal, request_id, priority, salt)``; ``tpmflow.engine.plugin`` mounts them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np
from pydantic import ValidationError

from tpmflow.engine.context import ReplicaContext
from tpmflow.engine.ops import (
    Prompt,
    engine_prompt,
    final_hidden_states,
    pool_states,
    prompt_tokens,
    run_request,
    splice_soft_tokens,
)
from tpmflow.errors import InvalidRequest, TpmflowError
from tpmflow.knowledge.context import adapter_context
from tpmflow.payload import Reference
from tpmflow.schema import (
    AdapterEmbedItem,
    AdapterEmbedRequest,
    AdapterEmbedResponse,
    AdapterGenerateItem,
    AdapterGenerateRequest,
    AdapterGenerateResponse,
    AdapterPredictRequest,
    AdapterPredictResponse,
    DecodedOutput,
    InlineArray,
    ItemFailure,
    Prediction,
    Usage,
)

log = logging.getLogger("tpmflow.replica")


def _resolve_value(ctx: ReplicaContext, value: Any, principal: str, depth: int = 0) -> tuple[Any, int]:
    """A payload inside an item as bytes / an array (with the bytes it brought); other values as they are."""
    if isinstance(value, dict):
        if {"connector", "key", "sig"} <= value.keys():
            ref = Reference.model_validate(value)
            ctx.signer.verify(ref, principal)
            return ctx.store.get(ref), ref.nbytes
        if {"dtype", "shape", "b64"} <= value.keys():
            array = InlineArray.model_validate(value).to_numpy()
            return array, array.nbytes
        if depth == 0:  # one level of dict items, e.g. {"data": <reference>, "path": ..., "frame": 0}
            out: dict[str, Any] = {}
            total = 0
            for k, v in value.items():
                out[k], n = _resolve_value(ctx, v, principal, depth + 1)
                total += n
            return out, total
    return value, 0


def resolve_items(ctx: ReplicaContext, items: list[Any], principal: str) -> tuple[list[Any], dict[int, str], int]:
    """Items with their payloads fetched; a payload that cannot be had is that item's error."""
    resolved: list[Any] = []
    errors: dict[int, str] = {}
    bytes_in = 0
    for i, item in enumerate(items):
        try:
            value, n = _resolve_value(ctx, item, principal)
        except TpmflowError as exc:
            value, n, errors[i] = None, 0, exc.message
        except ValidationError as exc:
            value, n, errors[i] = None, 0, f"not a valid payload reference: {exc.errors()[0]['msg']}"
        except ValueError as exc:  # bad base64, a shape that does not match its bytes
            value, n, errors[i] = None, 0, f"not a valid inline array: {exc}"
        resolved.append(value)
        bytes_in += n
    return resolved, errors, bytes_in


def _encode_isolated(encode: Any, items: list[Any]) -> list[Any]:
    """The adapter's ``encode`` on the batch; if it fails as a whole (a bug, or an input it did not
    foresee), again item by item, so only the items that break it get an error."""
    from tpmflow.adapters import ItemError

    try:
        out = list(encode(items))
        if len(out) == len(items):
            return out
    except TpmflowError:
        raise  # the adapter's own request-level refusal (e.g. no trained projector)
    except Exception:  # noqa: BLE001 - isolate the culprit below
        log.exception("adapter encode failed on a batch of %d; retrying item by item", len(items))
    results: list[Any] = []
    for i, item in enumerate(items):
        try:
            (one,) = encode([item])
            results.append(ItemError(i, one.reason) if isinstance(one, ItemError) else one)
        except TpmflowError:
            raise
        except Exception as exc:  # noqa: BLE001 - this item breaks the adapter: its error, not the batch's
            results.append(ItemError(i, f"the adapter failed on this item: {type(exc).__name__}: {exc}"[:500]))
    return results


async def adapter_prompts(
    ctx: ReplicaContext,
    adapter: Any,
    encode: Any,
    items: list[Any],
    principal: str,
    reserve: int = 0,
    contexts: dict[int, str] | None = None,
) -> tuple[dict[int, Prompt], dict[int, str], dict[int, str], int]:
    """Encode items with the adapter into engine prompts: token ids (text route) or prompt
    embeddings (soft tokens spliced with their text), each after its retrieved ``contexts`` text.
    Returns the prompts, each text-route item's text (generation continues it, not the context),
    per-item errors, and the payload bytes that came in."""
    contexts = contexts or {}
    from tpmflow.adapters import EncodedEmbeds, EncodedText, ItemError

    resolved, errors, bytes_in = await asyncio.to_thread(resolve_items, ctx, items, principal)
    todo = [i for i in range(len(items)) if i not in errors]
    encoded = await asyncio.to_thread(_encode_isolated, encode, [resolved[i] for i in todo]) if todo else []
    tokenizer = ctx.engine.get_tokenizer()
    prompts: dict[int, Prompt] = {}
    texts: dict[int, str] = {}
    soft: dict[int, tuple[np.ndarray, str, str]] = {}
    for i, enc in zip(todo, encoded, strict=True):
        if isinstance(enc, ItemError):
            errors[i] = enc.reason
        elif isinstance(enc, EncodedEmbeds):
            soft[i] = (enc.embeds, contexts.get(i, "") + enc.prefix, enc.suffix)
        elif isinstance(enc, EncodedText):
            text = contexts.get(i, "") + enc.text
            try:
                ids = prompt_tokens(ctx, tokenizer, i, text) if text else [int(tokenizer.bos_token_id)]
                if len(ids) + max(reserve, 1) > ctx.max_model_len:
                    raise InvalidRequest(f"{len(ids)} prompt tokens + max_tokens exceed max_model_len")
            except InvalidRequest as exc:
                errors[i] = exc.message
            else:
                prompts[i], texts[i] = ids, enc.text
        else:
            errors[i] = f"the adapter returned {type(enc).__name__}, not EncodedText or EncodedEmbeds"
    if soft:
        spliced, soft_errors = await splice_soft_tokens(ctx, soft, reserve)
        prompts.update(spliced)
        errors.update(soft_errors)
    return prompts, texts, errors, bytes_in


def _loaded(ctx: ReplicaContext, name: str, config: dict[str, Any] | None) -> Any:
    from tpmflow.adapters import check_fits

    adapter = ctx.adapter(name, config)
    check_fits(adapter, ctx.hidden_size, ctx.serving())
    return adapter


async def _pooled(
    ctx: ReplicaContext,
    body: AdapterEmbedRequest,
    principal: str,
    request_id: str,
    priority: int,
    salt: str | None,
) -> tuple[Any, dict[int, np.ndarray], dict[int, Prompt], dict[int, str], Usage]:
    """Items → adapter → core model → pooled final states (raw arrays, per item) and errors."""
    adapter = await asyncio.to_thread(_loaded, ctx, body.adapter, body.config)
    prompts, _, errors, bytes_in = await adapter_prompts(ctx, adapter, adapter.encode, body.items, principal)
    order = sorted(prompts)
    hidden = await final_hidden_states(ctx, [prompts[i] for i in order], request_id, priority, salt) if order else []
    pooled = {i: pool_states(states, body.pooling) for i, states in zip(order, hidden, strict=True)}
    usage = Usage(prompt_tokens=sum(len(p) for p in prompts.values()), payload_bytes_in=bytes_in)
    return adapter, pooled, prompts, errors, usage


def _sampling(adapter: Any, **extra: Any) -> dict[str, Any]:
    return {**extra, "adapter": f"{adapter.name}@{adapter.version}", "config": adapter.config()}


async def adapter_embed(
    ctx: ReplicaContext, body: AdapterEmbedRequest, principal: str, request_id: str, priority: int, salt: str | None
) -> AdapterEmbedResponse:
    """Domain items through an installed adapter, then the core model."""
    started = time.time()
    adapter, pooled, prompts, errors, usage = await _pooled(ctx, body, principal, request_id, priority, salt)
    data: list[AdapterEmbedItem] = []
    for i in range(len(body.items)):
        if i in errors:
            data.append(AdapterEmbedItem(index=i, error=ItemFailure(message=errors[i])))
            continue
        payload, nbytes = ctx.output_array(pooled[i], principal)
        usage.payload_bytes_out += nbytes
        data.append(AdapterEmbedItem(index=i, n_tokens=len(prompts[i]), embedding=payload))
    sampling = _sampling(adapter, pooling=body.pooling)
    return AdapterEmbedResponse(data=data, usage=usage, provenance=ctx.provenance(request_id, sampling, started))


async def adapter_predict(
    ctx: ReplicaContext, body: AdapterPredictRequest, principal: str, request_id: str, priority: int, salt: str | None
) -> AdapterPredictResponse:
    """Adapter → core model (mean-pooled final states) → head; per item a value (regression) or a
    label with class probabilities (classification), or the item's error."""
    from tpmflow.adapters.heads import SoftmaxHead, load_head

    started = time.time()
    head, card = await asyncio.to_thread(load_head, body.adapter, body.head)
    if card.base_content_hash != ctx.serving() or card.hidden_size != ctx.hidden_size:
        raise InvalidRequest(
            f"head {card.name}@{card.version} was trained on {card.base_model} ({card.base_content_hash[:19]}), "
            f"not on this pool's model ({ctx.serving()[:19]})"
        )
    # A head fitted through a projector names it in its card: that projector is the default, and
    # no other may feed it (its features would mean something else).
    trained_with = card.settings.get("part")
    config = body.config if body.config is not None else (card.settings or None)
    asked = (config or {}).get("part")
    if trained_with and asked and asked != trained_with:
        from tpmflow.adapters.parts import resolved_spec

        if await asyncio.to_thread(resolved_spec, body.adapter, str(asked)) != trained_with:
            raise InvalidRequest(f"head {card.name}@{card.version} was fitted on projector {trained_with}, not {asked}")
    embed_body = AdapterEmbedRequest(adapter=body.adapter, items=body.items, pooling="mean", config=config)
    adapter, pooled, _, errors, usage = await _pooled(ctx, embed_body, principal, request_id, priority, salt)
    order = sorted(pooled)
    x = np.stack([pooled[i] for i in order]) if order else np.zeros((0, ctx.hidden_size), np.float32)
    data: list[Prediction] = []
    if isinstance(head, SoftmaxHead):
        probs = dict(zip(order, head.probabilities(x), strict=True))
        for i in range(len(body.items)):
            if i in errors:
                data.append(Prediction(index=i, error=ItemFailure(message=errors[i])))
            else:
                p = probs[i]
                data.append(
                    Prediction(
                        index=i,
                        label=head.classes[int(p.argmax())],
                        probabilities={c: float(v) for c, v in zip(head.classes, p, strict=True)},
                    )
                )
    else:
        values = dict(zip(order, head.predict(x), strict=True))
        for i in range(len(body.items)):
            if i in errors:
                data.append(Prediction(index=i, error=ItemFailure(message=errors[i])))
            else:
                data.append(Prediction(index=i, value=float(values[i])))
    head_info = {
        "name": card.name,
        "version": card.version,
        "kind": card.kind,
        "target": card.target,
        "metrics": card.metrics,
    }
    sampling = _sampling(adapter, pooling="mean", head=f"{card.name}@{card.version}")
    return AdapterPredictResponse(
        data=data, head=head_info, usage=usage, provenance=ctx.provenance(request_id, sampling, started)
    )


def _contexts(adapter: Any, context: list[list[Any]]) -> dict[int, str]:
    """Each item's retrieved entries as the adapter writes them before its prompt."""
    out: dict[int, str] = {}
    for i, entries in enumerate(context):
        try:
            out[i] = adapter_context(adapter, [(e.item, e.metadata) for e in entries])
        except Exception as exc:  # noqa: BLE001 - an adapter's bug is the request's error, not the replica's
            raise InvalidRequest(f"adapter {adapter.name} could not write item {i}'s retrieved context: {exc}") from None
    return out


async def adapter_generate(
    ctx: ReplicaContext, body: AdapterGenerateRequest, principal: str, request_id: str, priority: int, salt: str | None
) -> AdapterGenerateResponse:
    """Prompts from domain items (text prefixes or soft tokens), n completions each, decoded by the
    adapter into domain objects (value or reason)."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    started = time.time()
    adapter = await asyncio.to_thread(_loaded, ctx, body.adapter, body.config)
    encode = getattr(adapter, "encode_prefix", adapter.encode)
    contexts = await asyncio.to_thread(_contexts, adapter, body.context) if body.context is not None else {}
    prompts, texts, errors, bytes_in = await adapter_prompts(
        ctx, adapter, encode, body.items, principal, reserve=body.max_tokens, contexts=contexts
    )
    usage = Usage(payload_bytes_in=bytes_in)
    results: dict[int, AdapterGenerateItem] = {
        i: AdapterGenerateItem(index=i, error=ItemFailure(message=reason)) for i, reason in errors.items()
    }

    async def one(i: int, prompt: Prompt) -> None:
        seed = None if body.seed is None else body.seed + i
        # FINAL_ONLY: one output carrying all n completions (cumulative streaming can end on a
        # partial view of a parent request's children).
        params = SamplingParams(
            n=body.n,
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            seed=seed,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        final = await run_request(ctx.engine, engine_prompt(prompt, salt), params, f"{request_id}-gen-{i}", priority)
        continued = texts.get(i, "")  # a text prompt is continued (a SMILES prefix); soft tokens are not text
        decoded = await asyncio.to_thread(adapter.decode, [continued + out.text for out in final.outputs])
        usage.prompt_tokens += len(prompt)
        usage.completion_tokens += sum(len(out.token_ids) for out in final.outputs)
        outputs = [DecodedOutput(text=d.text, value=d.value, reason=d.reason) for d in decoded]
        results[i] = AdapterGenerateItem(index=i, outputs=outputs)

    async with asyncio.TaskGroup() as group:
        for i, prompt in prompts.items():
            group.create_task(one(i, prompt))
    sampling = _sampling(adapter, **body.model_dump(exclude={"items", "adapter", "config", "context"}))
    return AdapterGenerateResponse(
        data=[results[i] for i in range(len(body.items))],
        usage=usage,
        provenance=ctx.provenance(request_id, sampling, started),
    )
