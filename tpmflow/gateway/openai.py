"""Checks on OpenAI-style bodies before they reach vLLM's own handlers."""

from __future__ import annotations

from typing import Any

from tpmflow.config import GatewayConfig
from tpmflow.errors import InvalidRequest, ModelNotFound

# vLLM would torch.load prompt_embeds (pickle) unchecked, and extra args reach the workers' hooks.
REFUSED_FIELDS = ("prompt_embeds", "kv_transfer_params", "vllm_xargs")
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what a 64-bit engine seed holds
# Fields only the gateway may set on a forwarded OpenAI request.
GATEWAY_OWNED = ("cache_salt", "priority", "request_id")


def validate_openai(body: dict[str, Any], chat: bool, model_name: str, cfg: GatewayConfig) -> dict[str, Any]:
    """``body`` checked and normalised in place: the pool's model, no refused or gateway-owned
    fields, bounded lengths; streams report usage in every chunk."""
    model = body.get("model", model_name)
    if model != model_name:
        raise ModelNotFound(f"unknown model {model!r}; this pool serves {model_name!r}")
    body["model"] = model_name
    for key in REFUSED_FIELDS:
        if key in body:
            raise InvalidRequest(
                f"{key!r} is not accepted here; send vectors to /v1/tpmflow/generate_embeds "
                "(validated, by reference, never unpickled)"
            )
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("messages must be a non-empty list")
        for i, message in enumerate(messages):
            content = message.get("content") if isinstance(message, dict) else None
            parts = content if isinstance(content, list) else []
            if any(not isinstance(part, dict) or part.get("type") != "text" for part in parts):
                raise InvalidRequest(f"message {i}: only text content parts are accepted", item=i)
    else:
        prompt = body.get("prompt")
        if prompt is None or (isinstance(prompt, (str, list)) and len(prompt) == 0):
            raise InvalidRequest("prompt must be a non-empty string or list")
        if isinstance(prompt, list) and any(isinstance(p, (str, list)) and len(p) == 0 for p in prompt):
            raise InvalidRequest("prompt list contains an empty prompt")
    limit = cfg.max_tokens_limit
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1 or value > limit:
            raise InvalidRequest(f"{key} must be an integer in [1, {limit}], got {value!r}")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not SEED_MIN <= seed <= SEED_MAX):
        # orjson reads integers past 64 bits as floats: refuse them rather than pass on a changed seed.
        raise InvalidRequest(f"seed must be an integer in [{SEED_MIN}, {SEED_MAX}]")
    n = body.get("n", 1)
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= cfg.max_n:
        raise InvalidRequest(f"n must be an integer in [1, {cfg.max_n}], got {n!r}")
    for key in GATEWAY_OWNED:
        body.pop(key, None)
    if body.get("stream"):
        # Usage in every chunk: the ledger has token counts even when a client hangs up mid-stream.
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    return body
