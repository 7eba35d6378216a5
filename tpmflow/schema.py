"""Wire models shared by client, gateway and replica (validated at every edge)."""

from __future__ import annotations

import base64
import math
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tpmflow.engine.sites import SITE_NAMES
from tpmflow.errors import InvalidRequest
from tpmflow.payload import ALLOWED_DTYPES, Reference

MAX_BATCH = 256
MAX_ELEMENTS = 1 << 31  # elements of one array: far past any real payload, far below an overflow
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]  # what a 64-bit engine seed holds
Index = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]  # layers, positions: negative counts from the end
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]


class Spec(BaseModel):
    """A request-side wire model: unknown fields are refused with their name, never ignored
    (``Capture(layer=3)`` would otherwise capture every layer)."""

    model_config = ConfigDict(extra="forbid")


class InlineArray(Spec):
    """A small array inline: dtype, shape and little-endian bytes in base64."""

    dtype: str = Field(max_length=16)
    shape: list[Annotated[int, Field(ge=0, le=MAX_ELEMENTS)]] = Field(max_length=8)
    b64: str

    @classmethod
    def from_numpy(cls, array: np.ndarray) -> InlineArray:
        array = np.ascontiguousarray(array)
        little = array.astype(array.dtype.newbyteorder("<"), copy=False)
        return cls(dtype=array.dtype.name, shape=list(array.shape), b64=base64.b64encode(little.tobytes()).decode())

    def to_numpy(self) -> np.ndarray:
        if self.dtype not in ALLOWED_DTYPES:
            raise InvalidRequest(f"dtype {self.dtype!r} is not allowed; use one of {sorted(ALLOWED_DTYPES)}")
        if any(d < 0 for d in self.shape):
            raise InvalidRequest("array shape has a negative dimension")
        elements = math.prod(self.shape)  # Python ints: numpy's int64 product wraps around
        if elements > MAX_ELEMENTS:
            raise InvalidRequest(f"array shape {self.shape} has {elements} elements, more than {MAX_ELEMENTS}")
        try:
            raw = base64.b64decode(self.b64, validate=True)
        except ValueError:
            raise InvalidRequest("array bytes are not valid base64") from None
        dtype = np.dtype(self.dtype).newbyteorder("<")
        expected = elements * dtype.itemsize
        if len(raw) != expected:
            raise InvalidRequest(f"array bytes ({len(raw)}) do not match shape {self.shape} of {self.dtype}")
        return np.frombuffer(raw, dtype=dtype).reshape(self.shape).astype(dtype.newbyteorder("="))


ArrayPayload = InlineArray | Reference


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    payload_bytes_in: int = 0
    payload_bytes_out: int = 0
    activation_bytes: int = 0


class Provenance(BaseModel):
    """What a rerun needs to reproduce a result."""

    request_id: str
    model: str
    content_hash: str
    replica_id: str
    engine: str
    sampling: dict[str, object] = Field(default_factory=dict)
    started: float
    finished: float


class SoftPrompt(Spec):
    """Soft tokens [K, hidden] made by an adapter run on the client, spliced between embedded text."""

    prompt_embeds: ArrayPayload
    prefix: str = Field("", max_length=10_000)
    suffix: str = Field("", max_length=10_000)


class EmbedRequest(Spec):
    """Final hidden states of each input (after the final norm), pooled or per token. An input is
    text, token ids, or soft tokens from an adapter the client ran itself."""

    model: str | None = None
    input: list[str | list[TokenId] | SoftPrompt] = Field(min_length=1, max_length=MAX_BATCH)
    pooling: Literal["mean", "last", "none"] = "mean"

    @field_validator("input")
    @classmethod
    def _non_empty_items(cls, items: list[str | list[TokenId] | SoftPrompt]) -> list[str | list[TokenId] | SoftPrompt]:
        for i, item in enumerate(items):
            if not isinstance(item, SoftPrompt) and len(item) == 0:
                raise ValueError(f"input item {i} is empty")
        return items


class EmbedItem(BaseModel):
    index: int
    n_tokens: int
    embedding: ArrayPayload


class EmbedResponse(BaseModel):
    data: list[EmbedItem]
    usage: Usage
    provenance: Provenance


class AdapterEmbedRequest(Spec):
    """Domain items (SMILES, …) through an installed adapter, then the core model's final states."""

    adapter: str = Field(min_length=1, max_length=64)
    items: list[Any] = Field(min_length=1, max_length=MAX_BATCH)
    pooling: Literal["mean", "last", "none"] = "mean"
    config: dict[str, Any] | None = Field(None, description="adapter settings (its config()), if not the defaults")


class ItemFailure(BaseModel):
    type: str = "AdapterInputError"
    message: str


class AdapterEmbedItem(BaseModel):
    """One item's result: an embedding, or the reason it could not be used."""

    index: int
    n_tokens: int = 0
    embedding: ArrayPayload | None = None
    error: ItemFailure | None = None


class AdapterEmbedResponse(BaseModel):
    data: list[AdapterEmbedItem]
    usage: Usage
    provenance: Provenance


class AdapterPredictRequest(Spec):
    """Domain items through an adapter, the core model, and a head (``name`` or ``name@version``)."""

    adapter: str = Field(min_length=1, max_length=64)
    items: list[Any] = Field(min_length=1, max_length=MAX_BATCH)
    head: str = Field(min_length=1, max_length=100)
    config: dict[str, Any] | None = None


class Prediction(BaseModel):
    """A regression head's ``value``, or a classifier's ``label`` and class ``probabilities``."""

    index: int
    value: float | None = None
    label: str | None = None
    probabilities: dict[str, float] | None = None
    error: ItemFailure | None = None


class AdapterPredictResponse(BaseModel):
    data: list[Prediction]
    head: dict[str, Any]
    usage: Usage
    provenance: Provenance


class ContextEntry(Spec):
    """One retrieved item that goes into a prompt's context (the gateway fills these in for
    ``retrieve=``)."""

    item: Any
    metadata: dict[str, Any] = Field(default_factory=dict)


class AdapterGenerateRequest(Spec):
    """Prompts as domain items (e.g. SMILES prefixes); completions decoded by the adapter. With
    ``context`` (one list per item) the adapter writes those entries before each item's prompt."""

    adapter: str = Field(min_length=1, max_length=64)
    items: list[Any] = Field(min_length=1, max_length=MAX_BATCH)
    n: int = Field(1, ge=1, le=64)
    max_tokens: int = Field(64, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    seed: Seed | None = None
    config: dict[str, Any] | None = None
    context: list[list[ContextEntry]] | None = None

    @model_validator(mode="after")
    def _one_context_per_item(self) -> AdapterGenerateRequest:
        if self.context is not None and len(self.context) != len(self.items):
            raise ValueError(f"{len(self.items)} items but {len(self.context)} contexts")
        return self


class DecodedOutput(BaseModel):
    text: str
    value: Any | None = None
    reason: str | None = None


class AdapterGenerateItem(BaseModel):
    index: int
    outputs: list[DecodedOutput] = Field(default_factory=list)
    error: ItemFailure | None = None


class AdapterGenerateResponse(BaseModel):
    data: list[AdapterGenerateItem]
    usage: Usage
    provenance: Provenance


class EmbedsGenerateRequest(Spec):
    """Generate from ``prompt_embeds`` (float [n_tokens, hidden]) instead of text."""

    model: str | None = None
    prompt_embeds: ArrayPayload
    max_tokens: int = Field(16, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: Seed | None = None


class GenerateResult(BaseModel):
    text: str
    finish_reason: str | None
    usage: Usage
    provenance: Provenance


class DigestRequest(Spec):
    """Deliver an array or bytes reference to a replica, which reports what arrived."""

    payload: ArrayPayload


class DigestResponse(BaseModel):
    digest: str
    nbytes: int
    kind: str
    shape: list[int] | None = None
    dtype: str | None = None


class SignRequest(Spec):
    """Ask the gateway to sign a payload the caller wrote into the store."""

    key: str
    kind: Literal["ndarray", "bytes"]
    nbytes: int = Field(ge=0)
    digest: str


class ReplicaInfo(BaseModel):
    replica_id: str
    url: str
    model: str
    content_hash: str
    engine: str
    hidden_size: int
    max_model_len: int
    lora_versions: list[str] = Field(default_factory=list, description="versions served as vLLM LoRA adapters")
    group: str = Field("default", description="the replica group (service classes name the group that serves them)")
    running: int = 0
    waiting: int = 0
    probes: str | None = Field(None, description="probe status: the layout and its start self-check, or why off")
    tensor_parallel: int = Field(1, description="ranks each layer is split over")
    pipeline_parallel: int = Field(1, description="pipeline stages (tensor_parallel x pipeline_parallel ranks in all)")
    task: Literal["generate", "embed"] = Field(
        "generate", description="generate: the pool's model (every tpmflow route); embed: a text embedder's /v1/embeddings"
    )


# -- intermediary access (probe) ------------------------------------------------------------------

# The sites come from the one table in tpmflow.engine.sites (which imports nothing heavy).
ProbeSite = Literal[SITE_NAMES]  # type: ignore[valid-type]  # built from the table, so mypy cannot see the values


def _inline_if_numpy(value: Any) -> Any:
    """Let ``Add(vector=np.array(...))`` be written directly (big arrays: pass ``client.put(...)``)."""
    return InlineArray.from_numpy(value) if isinstance(value, np.ndarray) else value


class Capture(Spec):
    """Record activations at ``site`` of ``layers`` (all layers when omitted), at ``positions``
    (all prompt positions when omitted; with ``generated`` also each generated step)."""

    site: str
    layers: list[Index] | None = Field(None, max_length=1024)
    positions: list[Index] | None = Field(None, max_length=65536)
    generated: bool = False


class Add(Spec):
    """A steering vector: ``scale * vector`` added to the stream at ``site`` of ``layer``."""

    op: Literal["add"] = "add"
    site: str
    layer: Index | None = None
    vector: ArrayPayload
    scale: float = Field(1.0, allow_inf_nan=False)
    positions: list[Index] | None = Field(None, max_length=65536)

    @field_validator("vector", mode="before")
    @classmethod
    def _from_numpy(cls, value: Any) -> Any:
        return _inline_if_numpy(value)


class Replace(Spec):
    """Activation patching: the stream at ``site`` of ``layer`` becomes ``values`` ([hidden], or one
    row per position)."""

    op: Literal["replace"] = "replace"
    site: str
    layer: Index | None = None
    values: ArrayPayload
    positions: list[Index] | None = Field(None, max_length=65536)

    @field_validator("values", mode="before")
    @classmethod
    def _from_numpy(cls, value: Any) -> Any:
        return _inline_if_numpy(value)


class Zero(Spec):
    """Ablation: zero the activations at ``site`` of ``layer``."""

    op: Literal["zero"] = "zero"
    site: str
    layer: Index | None = None
    positions: list[Index] | None = Field(None, max_length=65536)


class LogitLens(Spec):
    """Final norm and unembedding of the residual stream after each of ``layers`` (all when omitted)."""

    layers: list[Index] | None = Field(None, max_length=1024)
    top_k: int = Field(5, ge=1, le=100)
    positions: list[Index] | None = Field(None, max_length=65536, description="prompt positions (all when omitted)")


class ProbeRequest(Spec):
    model: str | None = None
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[TokenId], Field(min_length=1)]
    captures: list[Capture] = Field(default_factory=list, max_length=256)
    interventions: list[Annotated[Add | Replace | Zero, Field(discriminator="op")]] = Field(
        default_factory=list, max_length=256
    )
    lens: LogitLens | None = None
    max_tokens: int = Field(1, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=10.0)
    seed: Seed | None = None


class CapturedArray(BaseModel):
    site: str
    layer: int
    positions: list[int]
    array: ArrayPayload


class LensLayer(BaseModel):
    layer: int
    positions: list[int]
    tokens: list[list[str]]
    token_ids: list[list[int]]
    probs: list[list[float]]


class ProbeResponse(BaseModel):
    text: str
    prompt_tokens: list[str]
    captures: list[CapturedArray]
    lens: list[LensLayer]
    steps: list[int] = Field(
        default_factory=list, description="engine steps this request shared (for isolation checks)"
    )
    usage: Usage
    provenance: Provenance
