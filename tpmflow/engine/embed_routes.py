"""The replica's core-model routes: embeddings of text or soft tokens, generation from prompt
embeddings, and the digest of a payload (which verifies a transfer end to end).

Each handler takes ``(ctx, body, principal, request_id, priority, salt)``; ``tpmflow.engine.plugin``
mounts them.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

from tpmflow.engine.context import ReplicaContext
from tpmflow.engine.ops import (
    Prompt,
    check_embeds,
    engine_prompt,
    final_hidden_states,
    pool_states,
    prompt_tokens,
    run_request,
    splice_soft_tokens,
)
from tpmflow.errors import InvalidRequest
from tpmflow.payload import Reference
from tpmflow.schema import (
    DigestRequest,
    DigestResponse,
    EmbedItem,
    EmbedRequest,
    EmbedResponse,
    EmbedsGenerateRequest,
    GenerateResult,
    InlineArray,
    SoftPrompt,
    Usage,
)


async def embed(
    ctx: ReplicaContext, body: EmbedRequest, principal: str, request_id: str, priority: int, salt: str | None
) -> EmbedResponse:
    """Pooled final hidden states of text, token ids or soft prompts."""
    started = time.time()
    ctx.check_model(body.model)
    tokenizer = ctx.engine.get_tokenizer()
    prompts: list[Prompt] = []
    bytes_in = 0
    for i, item in enumerate(body.input):
        if not isinstance(item, SoftPrompt):
            prompts.append(prompt_tokens(ctx, tokenizer, i, item))
            continue
        array, nbytes = await asyncio.to_thread(ctx.resolve_array, item.prompt_embeds, principal)
        bytes_in += nbytes
        spliced, errors = await splice_soft_tokens(ctx, {i: (array, item.prefix, item.suffix)})
        if errors:
            raise InvalidRequest(f"input item {i}: {errors[i]}", item=i)
        prompts.append(spliced[i])
    hidden = await final_hidden_states(ctx, prompts, request_id, priority, salt)
    items: list[EmbedItem] = []
    bytes_out = 0
    for i, states in enumerate(hidden):
        payload, nbytes = ctx.output_array(pool_states(states, body.pooling), principal)
        bytes_out += nbytes
        items.append(EmbedItem(index=i, n_tokens=len(prompts[i]), embedding=payload))
    usage = Usage(prompt_tokens=sum(len(p) for p in prompts), payload_bytes_in=bytes_in, payload_bytes_out=bytes_out)
    return EmbedResponse(
        data=items, usage=usage, provenance=ctx.provenance(request_id, {"pooling": body.pooling}, started)
    )


async def generate_embeds(
    ctx: ReplicaContext,
    body: EmbedsGenerateRequest,
    principal: str,
    request_id: str,
    priority: int,
    salt: str | None,
) -> GenerateResult:
    """Text generated from prompt embeddings [n, hidden] (inline or by reference)."""
    from vllm import SamplingParams

    started = time.time()
    ctx.check_model(body.model)
    array, bytes_in = await asyncio.to_thread(ctx.resolve_array, body.prompt_embeds, principal)
    array = check_embeds(array, ctx.hidden_size, ctx.max_model_len)
    if array.shape[0] + body.max_tokens > ctx.max_model_len:
        raise InvalidRequest(
            f"{array.shape[0]} prompt positions + max_tokens {body.max_tokens} exceed max_model_len {ctx.max_model_len}"
        )
    params = SamplingParams(max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed)
    final = await run_request(ctx.engine, engine_prompt(array, salt), params, request_id, priority)
    out = final.outputs[0]
    usage = Usage(prompt_tokens=int(array.shape[0]), completion_tokens=len(out.token_ids), payload_bytes_in=bytes_in)
    sampling = body.model_dump(exclude={"prompt_embeds", "model"})
    return GenerateResult(
        text=out.text,
        finish_reason=out.finish_reason,
        usage=usage,
        provenance=ctx.provenance(request_id, sampling, started),
    )


async def digest(
    ctx: ReplicaContext, body: DigestRequest, principal: str, request_id: str, priority: int, salt: str | None
) -> dict[str, Any]:
    """Resolve an inline array or a reference and report what arrived (verifies transfers)."""
    return await asyncio.to_thread(_digest, ctx, body.payload, principal)


def _digest(ctx: ReplicaContext, payload: InlineArray | Reference, principal: str) -> dict[str, Any]:
    from tpmflow.payload import decode_payload, digest_of, encode_payload

    if isinstance(payload, InlineArray):
        data = encode_payload(payload.to_numpy())[0]
        nbytes_in = len(payload.b64)
    else:
        ctx.signer.verify(payload, principal)
        data = ctx.store.get_bytes(payload)
        nbytes_in = len(data)
    value = decode_payload(data, "ndarray" if isinstance(payload, InlineArray) else payload.kind)
    array = value if isinstance(value, np.ndarray) else None
    out = DigestResponse(
        digest=digest_of(data),
        nbytes=len(data),
        kind="bytes" if array is None else "ndarray",
        shape=None if array is None else list(array.shape),
        dtype=None if array is None else array.dtype.name,
    )
    return {**out.model_dump(), "usage": Usage(payload_bytes_in=nbytes_in).model_dump()}
