"""Service units (SU): what a request costs under the facility's prices, and the most it could cost.

The facility prices what a request uses — prompt and output tokens, MB of payload in and out, MB
of captured activations, engine-seconds — in the pool config's ``costs:`` section, with a
multiplier per service class. Every ledger row carries its ``charge_su`` from its own counters.
Before a request of a project with an allocation is admitted, the gateway reserves
:func:`max_charge` of it (the most those counters can reach, from the request's own limits), and
settles the real charge afterwards; see :mod:`tpmflow.access.allocations`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field

MB = 1_000_000  # prices are per MB = 10^6 bytes, like a facility's storage bill
MICRO = 1_000_000  # allocations hold integer micro-SU: exact sums and exact atomic comparisons
# Bytes of .npy header and JSON framing one stored output array may add to its data.
_ARRAY_OVERHEAD = 1024
# Hidden size assumed while no replica has told the gateway its own (generous on purpose).
_FALLBACK_HIDDEN = 16384
# Output-token defaults of tpmflow's own routes when the body gives no max_tokens (tpmflow.schema).
_DEFAULT_MAX_TOKENS = {"adapters/generate": 64, "generate_embeds": 16, "probe": 1}
# Routes that return arrays (possibly into the store: payload bytes out).
_ARRAY_OUTPUTS = ("embed", "adapters/embed", "knowledge/add", "knowledge/search", "knowledge/retrieve")


class CostModel(BaseModel):
    """Prices in service units. A class missing from ``class_multipliers`` pays 1x."""

    su_per_prompt_token: float = Field(0.001, ge=0)
    su_per_output_token: float = Field(0.002, ge=0)
    su_per_mb_in: float = Field(
        0.001, ge=0, description="per MB of payload the request brings (inline or by reference)"
    )
    su_per_mb_out: float = Field(0.001, ge=0, description="per MB of payload the pool writes back to the store")
    su_per_mb_activations: float = Field(0.001, ge=0, description="per MB of activations a probe captures")
    su_per_engine_second: float = Field(
        0.0,
        ge=0,
        description="per second from forwarding to answer; priced, it makes every reservation cover the request timeout",
    )
    su_per_query: float = Field(0.0005, ge=0, description="per knowledge search query (retrievals too)")
    su_per_mb_day: float = Field(0.01, ge=0, description="per MB a knowledge collection stores, per day")
    class_multipliers: dict[str, float] = Field(
        default_factory=dict, description="service class -> price multiplier (e.g. batch: 0.5)"
    )

    def multiplier(self, service_class: str) -> float:
        return float(self.class_multipliers.get(service_class, 1.0))

    def charge(
        self,
        service_class: str,
        *,
        prompt_tokens: int = 0,
        output_tokens: int = 0,
        payload_bytes_in: int = 0,
        payload_bytes_out: int = 0,
        activation_bytes: int = 0,
        engine_ms: float = 0.0,
        queries: int = 0,
        stored_mb_days: float = 0.0,
    ) -> float:
        """SUs of these counters in this service class."""
        base = (
            prompt_tokens * self.su_per_prompt_token
            + output_tokens * self.su_per_output_token
            + payload_bytes_in / MB * self.su_per_mb_in
            + payload_bytes_out / MB * self.su_per_mb_out
            + activation_bytes / MB * self.su_per_mb_activations
            + engine_ms / 1000.0 * self.su_per_engine_second
            + queries * self.su_per_query
            + stored_mb_days * self.su_per_mb_day
        )
        return base * self.multiplier(service_class)

    def charge_of(self, row: Any) -> float:
        """SUs of a ledger row (``LedgerRow`` or ``LedgerEntry``), from its own counters."""
        return self.charge(
            row.service_class,
            prompt_tokens=row.prompt_tokens,
            output_tokens=row.output_tokens,
            payload_bytes_in=row.payload_bytes_in,
            payload_bytes_out=row.payload_bytes_out,
            activation_bytes=row.activation_bytes,
            engine_ms=row.engine_ms,
            queries=row.queries or 0,
            stored_mb_days=row.stored_mb_days or 0.0,
        )


def to_micro(su: float, *, up: bool = False, down: bool = False) -> int:
    """Integer micro-SU, to the nearest; ``up`` / ``down`` round upwards / downwards (ignoring
    float noise below 10^-12 SU)."""
    value = su * MICRO
    if up:
        return math.ceil(value - 1e-6)
    if down:
        return math.floor(value + 1e-6)
    return round(value)


@dataclass(frozen=True)
class Limits:
    """The pool's hard limits that bound what one request can use."""

    max_model_len: int
    hidden_size: int = 0
    max_activation_bytes: int = 0
    request_timeout_s: float = 0.0


def max_counters(endpoint: str, body: dict[str, Any] | None, body_bytes: int, limits: Limits) -> dict[str, Any]:
    """The most each ledger counter of this request can reach.

    Every bound rests on a limit the pool enforces: a prompt never exceeds ``max_model_len`` tokens
    (replicas refuse it), output is ``n x max_tokens`` per prompt, payload in is at most the body
    itself plus the signed sizes of the references it carries, a capture at most the pool's
    ``max_activation_bytes``, and the engine time of a non-streamed request at most the request
    timeout. (A stream may outlive it while tokens keep coming: the settlement then charges no
    more than was reserved.)
    """
    body = body or {}
    ctx = max(1, limits.max_model_len)
    prompts = _prompt_count(endpoint, body)
    n = max(_int(body.get("n"), 1), _int(body.get("best_of"), 1), 1)
    if endpoint in ("completions", "chat"):
        per_seq = _int(body.get("max_tokens") or body.get("max_completion_tokens"), ctx)
    elif endpoint in _DEFAULT_MAX_TOKENS:
        per_seq = _int(body.get("max_tokens"), _DEFAULT_MAX_TOKENS[endpoint])
        n = n if endpoint == "adapters/generate" else 1
    else:
        per_seq, n = 0, 1
    out_bytes = 0
    if endpoint in _ARRAY_OUTPUTS:
        hidden = limits.hidden_size or _FALLBACK_HIDDEN
        rows = ctx if body.get("pooling") == "none" else 1
        out_bytes = prompts * (rows * hidden * 4 + _ARRAY_OVERHEAD)
    return {
        "prompt_tokens": prompts * ctx,
        "output_tokens": prompts * n * min(max(per_seq, 0), ctx),
        "payload_bytes_in": max(0, body_bytes) + _referenced_bytes(body),
        "payload_bytes_out": out_bytes,
        "activation_bytes": limits.max_activation_bytes if body.get("captures") else 0,
        "engine_ms": limits.request_timeout_s * 1000.0,
        "queries": prompts if endpoint in ("knowledge/search", "knowledge/retrieve") else 0,
    }


def max_charge(
    costs: CostModel,
    service_class: str,
    endpoint: str,
    body: dict[str, Any] | None,
    body_bytes: int,
    limits: Limits,
) -> float:
    """The most this request can cost: what the gateway reserves before admitting it."""
    return costs.charge(service_class, **max_counters(endpoint, body, body_bytes, limits))


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else default


def _prompt_count(endpoint: str, body: dict[str, Any]) -> int:
    """How many prompts (sequences to prefill) the request carries."""
    if endpoint == "completions":
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and not all(isinstance(t, int) for t in prompt):
            return len(prompt)  # a batch of strings or token-id lists (a flat id list is one prompt)
        return 1
    if endpoint in ("embed",):
        items = body.get("input")
        return len(items) if isinstance(items, list) else 1
    if endpoint.startswith(("adapters/", "knowledge/")):  # knowledge: the embed body it sends a replica
        items = body.get("items", body.get("input"))
        return len(items) if isinstance(items, list) else 1
    if endpoint in ("chat", "generate_embeds", "probe"):
        return 1
    return 0  # digest, models: no prefill


def _referenced_bytes(value: Any, depth: int = 0) -> int:
    """Signed sizes of the payload references anywhere in the body (a replica checks each size)."""
    if depth > 32:
        return 0
    if isinstance(value, dict):
        nbytes = value.get("nbytes")
        if "sig" in value and "key" in value and isinstance(nbytes, int) and nbytes > 0:
            return nbytes
        return sum(_referenced_bytes(v, depth + 1) for v in value.values())
    if isinstance(value, list):
        return sum(_referenced_bytes(v, depth + 1) for v in value)
    return 0
