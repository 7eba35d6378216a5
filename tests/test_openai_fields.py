"""The gateway refuses OpenAI fields vLLM would ignore: its lists must match the installed vLLM's."""

from __future__ import annotations

from tpmflow.gateway.openai import CHAT_FIELDS, COMPLETION_FIELDS, REFUSED_FIELDS


def test_the_gateways_field_lists_are_vllms() -> None:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    assert set(CompletionRequest.model_fields) == COMPLETION_FIELDS, "vLLM's completion fields moved: update the list"
    assert set(ChatCompletionRequest.model_fields) == CHAT_FIELDS, "vLLM's chat fields moved: update the list"
    assert set(REFUSED_FIELDS) <= COMPLETION_FIELDS | CHAT_FIELDS
