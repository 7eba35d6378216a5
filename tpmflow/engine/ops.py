"""Engine operations the routes share: one request to its final output, prompts as vLLM takes
them (token ids or ``prompt_embeds``), final hidden states through the worker hook, the core's
input embeddings, and soft tokens spliced with their text.

Everything is validated (shape, dtype, NaN/inf, length) before it reaches vLLM, so bad input gets
a typed error and never kills the engine.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import numpy as np

from tpmflow.engine.context import CURRENT_LORA, ReplicaContext
from tpmflow.engine.hooks import capture_array
from tpmflow.errors import InvalidRequest, TpmflowError

Prompt = list[int] | np.ndarray  # token ids or prompt embeddings [n, hidden]


async def run_request(engine: Any, prompt: Any, params: Any, request_id: str, priority: int) -> Any:
    """One engine request to its final output (on the request's LoRA adapter, if it has one)."""
    final = None
    try:
        async for out in engine.generate(
            prompt, params, request_id, priority=priority, lora_request=CURRENT_LORA.get()
        ):
            final = out
    except (ValueError, TypeError) as exc:  # vLLM's own input validation
        raise InvalidRequest(str(exc)) from exc
    if final is None:
        raise InvalidRequest("the engine returned no output")
    return final


def check_embeds(array: np.ndarray, hidden: int, max_len: int) -> np.ndarray:
    """Prompt embeddings checked for rank, hidden size, length, dtype and finiteness, as float32."""
    if array.ndim != 2:
        raise InvalidRequest(f"prompt_embeds must have rank 2 [n_tokens, hidden], got shape {list(array.shape)}")
    if array.shape[1] != hidden:
        raise InvalidRequest(f"prompt_embeds hidden size {array.shape[1]} != model hidden size {hidden}")
    if array.shape[0] == 0:
        raise InvalidRequest("prompt_embeds has zero tokens")
    if array.shape[0] >= max_len:
        raise InvalidRequest(f"prompt_embeds has {array.shape[0]} tokens; max_model_len is {max_len}")
    if array.dtype.name not in ("float16", "float32", "float64"):
        raise InvalidRequest(f"prompt_embeds must be floating point, got {array.dtype}")
    if not np.isfinite(array).all():
        raise InvalidRequest("prompt_embeds contains NaN or inf")
    return array.astype(np.float32)


def prompt_tokens(ctx: ReplicaContext, tokenizer: Any, i: int, item: str | list[int]) -> list[int]:
    """Token ids of one input, checked against the vocabulary and the context length."""
    ids = tokenizer.encode(item) if isinstance(item, str) else list(item)
    if not ids:
        raise InvalidRequest(f"input item {i} has no tokens", item=i)
    if any(t < 0 or t >= ctx.vocab_size for t in ids):
        raise InvalidRequest(f"input item {i} has token ids outside [0, {ctx.vocab_size})", item=i)
    if len(ids) >= ctx.max_model_len:
        raise InvalidRequest(f"input item {i} has {len(ids)} tokens; max_model_len is {ctx.max_model_len}", item=i)
    return ids


def engine_prompt(prompt: Prompt, salt: str | None) -> dict[str, Any]:
    """vLLM's prompt for token ids or (soft-token) prompt embeddings [n, hidden]."""
    import torch

    out: dict[str, Any] = (
        {"prompt_embeds": torch.from_numpy(prompt)} if isinstance(prompt, np.ndarray) else {"prompt_token_ids": prompt}
    )
    if salt:
        out["cache_salt"] = salt
    return out


async def final_hidden_states(
    ctx: ReplicaContext, prompts: list[Prompt], request_id: str, priority: int, salt: str | None
) -> list[np.ndarray]:
    """Per-position final hidden states [n, hidden] of each prompt (token ids or prompt embeddings),
    through the worker hook."""
    from vllm import SamplingParams

    if ctx.embed_error:
        raise InvalidRequest(ctx.embed_error)

    keys = [f"{request_id}:{i}:{uuid.uuid4().hex[:8]}" for i in range(len(prompts))]

    async def one(i: int) -> None:
        # max_tokens=1: the prefill computes every prompt position's final state; the one sampled
        # token is discarded. Reading the prefix cache is skipped: a cached prefix is never
        # recomputed, so the hook would never see it.
        params = SamplingParams(
            max_tokens=1, temperature=0.0, skip_reading_prefix_cache=True, extra_args={"tpmflow": {"embed": keys[i]}}
        )
        await run_request(ctx.engine, engine_prompt(prompts[i], salt), params, f"{request_id}-embed-{i}", priority)

    try:
        # A TaskGroup cancels (and so aborts in vLLM) the other items when one fails.
        async with asyncio.TaskGroup() as group:
            for i in range(len(prompts)):
                group.create_task(one(i))
    except* TpmflowError as errors:
        raise errors.exceptions[0] from None
    finally:
        # Always collect, so no capture of this request lingers in the worker.
        results = await ctx.engine.collective_rpc("tpmflow_take", args=(keys,))
    # With pipeline parallelism only the last stage runs the final norm: merge what each worker saw.
    captured: dict[str, Any] = {}
    for worker_result in results:
        captured.update({k: v for k, v in worker_result.items() if v is not None})
    hidden: list[np.ndarray] = []
    for i, key in enumerate(keys):
        cap = captured.get(key)
        if cap is None or not cap["complete"]:
            raise RuntimeError(
                f"final-norm hook did not see every prompt position of item {i} "
                "(is the model compiled or graph-captured? tpmflow needs --enforce-eager)"
            )
        hidden.append(capture_array(cap))
    return hidden


async def token_embeddings(ctx: ReplicaContext, ids: list[int]) -> dict[int, np.ndarray]:
    """The core's input embedding of each distinct id, from the worker holding the table (one RPC)."""
    unique = sorted(set(ids))
    if not unique:
        return {}
    if any(t < 0 or t >= ctx.vocab_size for t in unique):
        raise InvalidRequest(f"token ids outside [0, {ctx.vocab_size})")
    results = await ctx.engine.collective_rpc("tpmflow_embed_tokens", args=(unique,))
    rows = next((capture_array(r) for r in results if r is not None), None)
    if rows is None:
        raise RuntimeError("no worker holds the input embedding table")
    return dict(zip(unique, rows, strict=True))


async def splice_soft_tokens(
    ctx: ReplicaContext, soft: dict[int, tuple[np.ndarray, str, str]], reserve: int = 0
) -> tuple[dict[int, np.ndarray], dict[int, str]]:
    """Soft tokens with their text around them (``text_around``) as prompt embeddings, per item;
    items that fail validation (shape, NaN/inf, length + ``reserve`` positions) get a reason instead."""
    from tpmflow.adapters.soft import text_around

    tokenizer = ctx.engine.get_tokenizer()
    around = {i: text_around(tokenizer, prefix, suffix) for i, (_, prefix, suffix) in soft.items()}
    table = await token_embeddings(ctx, [t for before, after in around.values() for t in before + after])
    prompts: dict[int, np.ndarray] = {}
    errors: dict[int, str] = {}
    for i, (embeds, _, _) in soft.items():
        before, after = around[i]
        try:
            core = check_embeds(np.asarray(embeds), ctx.hidden_size, ctx.max_model_len)
            rows = [table[t][None, :] for t in before] + [core] + [table[t][None, :] for t in after]
            spliced = np.ascontiguousarray(np.concatenate(rows), dtype=np.float32)
            if spliced.shape[0] + max(reserve, 1) > ctx.max_model_len:  # at least the one sampled token
                raise InvalidRequest(
                    f"{spliced.shape[0]} prompt positions + {reserve} exceed max_model_len {ctx.max_model_len}"
                )
            prompts[i] = spliced
        except InvalidRequest as exc:
            errors[i] = exc.message
    return prompts, errors


def pool_states(hidden: np.ndarray, pooling: str) -> np.ndarray:
    """One prompt's final states pooled: mean, last position, or none (every position)."""
    vec = hidden.mean(axis=0) if pooling == "mean" else hidden[-1] if pooling == "last" else hidden
    return np.ascontiguousarray(vec, dtype=np.float32)
