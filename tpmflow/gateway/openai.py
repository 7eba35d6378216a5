"""Checks on OpenAI-style bodies before they reach vLLM's own handlers."""

from __future__ import annotations

from typing import Any

from tpmflow.config import GatewayConfig
from tpmflow.errors import InvalidRequest, ModelNotFound

# vLLM would torch.load prompt_embeds (pickle) unchecked, and extra args reach the workers' hooks;
# transfer parameters steer other engines, multimodal payloads need a model that takes them, and a
# chat template is a program run on the replica.
REFUSED_FIELDS = (
    "prompt_embeds",
    "kv_transfer_params",
    "ec_transfer_params",
    "vllm_xargs",
    "mm_payload",
    "mm_processor_kwargs",
    "media_io_kwargs",
    "return_mm_kwargs",
    "chat_template",
)
# Every field vLLM 0.32's CompletionRequest / ChatCompletionRequest reads (tests/test_openai_fields.py
# checks these against the installed vLLM). vLLM accepts and ignores anything else, so a misspelt or
# unsupported field (``best_of``) would be dropped without a word: the gateway refuses it instead.
COMPLETION_FIELDS = frozenset(
    """add_special_tokens allowed_token_ids bad_words cache_salt ec_transfer_params echo frequency_penalty
    ignore_eos include_stop_str_in_output kv_transfer_params length_penalty logit_bias logprob_token_ids logprobs
    max_tokens min_p min_tokens mm_payload model n presence_penalty priority prompt prompt_embeds prompt_logprobs
    repetition_detection repetition_penalty request_id response_format return_mm_kwargs return_token_ids
    return_token_offsets return_tokens_as_token_ids routed_experts_prompt_start seed session_id skip_special_tokens
    spaces_between_special_tokens stop stop_token_ids stream stream_interval stream_options structured_outputs suffix
    temperature thinking_token_budget top_k top_p truncate_prompt_tokens truncation_side use_beam_search user
    vllm_xargs watermarking""".split()
)
CHAT_FIELDS = frozenset(
    """add_generation_prompt add_special_tokens allowed_token_ids bad_words cache_salt chat_template
    chat_template_kwargs continue_final_message documents ec_transfer_params echo frequency_penalty ignore_eos
    include_reasoning include_stop_str_in_output kv_transfer_params length_penalty logit_bias logprob_token_ids
    logprobs max_completion_tokens max_tokens media_io_kwargs messages min_p min_tokens mm_payload
    mm_processor_kwargs model n parallel_tool_calls presence_penalty priority prompt_logprobs reasoning_effort
    repetition_detection repetition_penalty request_id response_format return_mm_kwargs return_prompt_text
    return_token_ids return_token_offsets return_tokens_as_token_ids routed_experts_prompt_start seed session_id
    skip_special_tokens spaces_between_special_tokens stop stop_token_ids stream stream_interval stream_options
    structured_outputs temperature thinking_token_budget tool_choice tools top_k top_logprobs top_p
    truncate_prompt_tokens truncation_side use_beam_search user vllm_xargs watermarking""".split()
)
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
    unknown = sorted(set(body) - (CHAT_FIELDS if chat else COMPLETION_FIELDS))
    if unknown:
        route = "chat completions" if chat else "completions"
        raise InvalidRequest(f"unknown field(s) {', '.join(map(repr, unknown))} for {route}: refused, not ignored")
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
        said = False
        for i, message in enumerate(messages):
            content = message.get("content") if isinstance(message, dict) else None
            parts = content if isinstance(content, list) else []
            if any(not isinstance(part, dict) or part.get("type") != "text" for part in parts):
                raise InvalidRequest(f"message {i}: only text content parts are accepted", item=i)
            texts = [content] if isinstance(content, str) else [p.get("text") for p in parts]
            said = said or any(isinstance(t, str) and t.strip() for t in texts)
        if not said:  # the model would run on its template's tokens alone
            raise InvalidRequest("every message is empty: give the model some text")
    else:
        _check_prompt(body.get("prompt"))
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
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        # "false" is truthy here and False to vLLM: a stream the relay would find no usage in.
        raise InvalidRequest(f"stream must be true or false, got {stream!r}")
    if stream:
        # Usage in every chunk: the ledger has token counts even when a client hangs up mid-stream.
        body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
    return body


def _token_ids(value: Any) -> bool:
    return bool(value) and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**31 for t in value)


def _check_prompt(prompt: Any) -> None:
    """A prompt is a non-empty string, a list of non-empty strings, a list of token ids, or a list
    of such lists (vLLM's own forms); anything else would reach its tokenizer and fail there."""
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequest("prompt must be a non-empty string or list")
        return
    if not isinstance(prompt, list) or not prompt:
        raise InvalidRequest("prompt must be a non-empty string or list")
    if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        if not _token_ids(prompt):
            raise InvalidRequest("token ids must be integers in [0, 2^31)")
        return
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            if not p:
                raise InvalidRequest("prompt list contains an empty prompt", item=i)
        elif isinstance(p, list):
            if not _token_ids(p):
                raise InvalidRequest(f"prompt {i}: token ids must be a non-empty list of integers in [0, 2^31)", item=i)
        else:
            raise InvalidRequest(
                f"prompt {i} is a {type(p).__name__}: give strings, or lists of token ids, not a mix", item=i
            )
