"""The knowledge routes' request bodies (``/v1/tpmflow/knowledge/...``): strict, like every wire
model of tpmflow (an unknown field is refused with its name)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from tpmflow.knowledge.store import MAX_K
from tpmflow.schema import MAX_BATCH, Spec

Name = Field(min_length=1, max_length=128)


class CreateCollection(Spec):
    """A collection whose vectors come from the pool's embed route: through ``adapter`` (its domain
    items) or as text, pooled by ``pooling``, on the model version the pool serves now (or the one
    the request pins with X-Tpmflow-Version)."""

    name: str = Name
    adapter: str | None = Field(None, max_length=64)
    config: dict[str, Any] | None = Field(None, description="the adapter's config (e.g. {'part': 'name@version'})")
    pooling: Literal["mean", "last"] = "mean"
    visibility: Literal["private", "shared", "public"] = "private"
    via: Literal["auto", "model", "text-embedder"] = Field(
        "auto",
        description="what embeds: the pool's model, or its text embedder (text only); "
        "auto: the text embedder for text when the pool has one, else the model",
    )


class Named(Spec):
    name: str = Name


class AddItems(Spec):
    name: str = Name
    items: list[Any] = Field(min_length=1, max_length=MAX_BATCH)
    metadata: list[dict[str, Any]] | None = None


class SearchItems(Spec):
    name: str = Name
    queries: list[Any] = Field(min_length=1, max_length=MAX_BATCH)
    k: int = Field(10, ge=1, le=MAX_K, description=f"neighbours per query, 1 to {MAX_K}")
    filter: dict[str, Any] | None = None


class Reembed(Spec):
    """One step of moving a collection to the model version ``version`` (a content hash or a unique
    prefix of one the pool serves); ``cancel`` stops a move and drops its new vectors."""

    name: str = Name
    version: str = Field("", max_length=80)
    batch: int = Field(256, ge=1, le=MAX_BATCH, description="items per step: one embed request to a replica")
    cancel: bool = False

    @model_validator(mode="after")
    def _a_version_unless_cancelling(self) -> Reembed:
        if not self.cancel and not self.version:
            raise ValueError("give the version to re-embed for (a content hash or a prefix of one)")
        return self


ItemId = Annotated[int, Field(ge=1, le=2**63 - 1)]


class ItemIds(Spec):
    name: str = Name
    ids: list[ItemId] = Field(min_length=1, max_length=10_000)


ProjectName = Annotated[str, Field(min_length=1, max_length=64)]


class Share(Spec):
    name: str = Name
    projects: list[ProjectName] | None = Field(None, max_length=100)
    revoke: list[ProjectName] | None = Field(None, max_length=100)
    public: bool | None = None


MAX_RETRIEVE_K = 16  # items brought into one prompt
MAX_RETRIEVE_PROMPTS = 32  # prompts of one request that may retrieve (provenance travels in a header)


class Retrieve(Spec):
    """``retrieve=`` on ``generate`` and the adapters' generate route: the ``k`` items of
    ``collection`` nearest each prompt (or nearest ``query``: one item for every prompt, or one per
    prompt) go into the prompt as its context, the way the adapter (or plain text) writes them."""

    collection: str = Name
    k: int = Field(4, ge=1, le=MAX_RETRIEVE_K, description=f"items per prompt, 1 to {MAX_RETRIEVE_K}")
    filter: dict[str, Any] | None = None
    query: list[Any] | None = Field(
        None, min_length=1, max_length=MAX_RETRIEVE_PROMPTS, description="what to search with (default: the prompts)"
    )
