"""``AsyncClient``: the shared flows run with ``await``; ``submit_*`` returns asyncio tasks."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from contextlib import closing
from typing import TYPE_CHECKING, Any, TypeVar, overload

import httpx
import numpy as np

from tpmflow.adapters.base import Adapter
from tpmflow.client._base import (
    CONNECT_TIMEOUT_S,
    KEEPALIVE_S,
    BaseClient,
    Blocking,
    Decodings,
    Done,
    Flow,
    Op,
    Send,
    Sleep,
    resume,
)
from tpmflow.client.results import Embeddings, Generation, Predictions, Trace
from tpmflow.payload import Reference

if TYPE_CHECKING:
    from tpmflow.client.knowledge import AsyncCollection

T = TypeVar("T")


class AsyncClient(BaseClient):
    """Asynchronous client with the same methods, arguments, results and retries as ``Client``;
    blocking work (store writes, a local adapter) runs in threads, so the event loop never waits."""

    _http: httpx.AsyncClient

    def __init__(
        self,
        url: str | Sequence[str],
        token: str | None = None,
        timeout: float = 150.0,
        retries: int = 4,
        backoff_s: float = 0.25,
        version: str | None = None,
    ) -> None:
        super().__init__(url, token, timeout, retries, backoff_s, version)
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT_S)),
            limits=httpx.Limits(max_connections=512, keepalive_expiry=KEEPALIVE_S),
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _run(self, flow: Flow[T]) -> T:
        """Run a flow, awaiting the I/O it asks for."""
        with closing(flow):
            step = resume(flow, None, None)
            while not isinstance(step, Done):
                try:
                    outcome, error = await self._perform(step), None
                except Exception as exc:  # noqa: BLE001 - the flow decides: retry, map to a typed error, or raise
                    outcome, error = None, exc
                step = resume(flow, outcome, error)
            return step.value

    async def _perform(self, op: Op) -> Any:
        if isinstance(op, Send):
            return await self._http.send(op.request)
        if isinstance(op, Sleep):
            return await asyncio.sleep(op.seconds)
        assert isinstance(op, Blocking)
        return await asyncio.to_thread(op.fn, *op.args)

    # -- API (see Client for each method's description) --------------------------------------------

    async def health(self) -> dict[str, Any]:
        return await self._run(self._health())

    async def models(self) -> list[str]:
        return await self._run(self._models())

    def knowledge(self, name: str) -> AsyncCollection:
        """A handle on the knowledge collection ``name`` (``tpmflow.client.knowledge``)."""
        from tpmflow.client.knowledge import AsyncCollection

        return AsyncCollection(self, name)

    async def collections(self) -> list[dict[str, Any]]:
        return await self._run(self._collections())

    async def usage(self, by: str = "principal") -> list[dict[str, Any]]:
        return await self._run(self._usage(by))

    @overload
    async def generate(
        self,
        prompt: str,
        *,
        max_tokens: int = ...,
        temperature: float = ...,
        seed: int | None = ...,
        adapter: None = None,
        request_id: str | None = ...,
        **extra: Any,
    ) -> Generation: ...
    @overload
    async def generate(
        self,
        prompt: Sequence[str],
        *,
        max_tokens: int = ...,
        temperature: float = ...,
        seed: int | None = ...,
        adapter: None = None,
        request_id: str | None = ...,
        **extra: Any,
    ) -> list[Generation]: ...
    @overload
    async def generate(
        self,
        prompt: None = None,
        *,
        max_tokens: int = ...,
        temperature: float = ...,
        seed: int | None = ...,
        prompt_embeds: np.ndarray | Reference,
        adapter: None = None,
        request_id: str | None = ...,
        **extra: Any,
    ) -> Generation: ...
    @overload
    async def generate(
        self,
        prompt: Any,
        *,
        max_tokens: int = ...,
        temperature: float = ...,
        seed: int | None = ...,
        adapter: str,
        adapter_config: dict[str, Any] | None = ...,
        request_id: str | None = ...,
        **extra: Any,
    ) -> Decodings: ...
    async def generate(
        self,
        prompt: Any = None,
        *,
        max_tokens: int = 16,
        temperature: float = 1.0,
        seed: int | None = None,
        prompt_embeds: np.ndarray | Reference | None = None,
        adapter: str | None = None,
        adapter_config: dict[str, Any] | None = None,
        request_id: str | None = None,
        **extra: Any,
    ) -> Generation | list[Generation] | Decodings:
        return await self._run(
            self._generate(
                prompt, max_tokens, temperature, seed, prompt_embeds, adapter, adapter_config, request_id, extra
            )
        )

    async def embed(
        self,
        inputs: Any,
        *,
        adapter: str | Adapter | None = None,
        adapter_config: dict[str, Any] | None = None,
        pooling: str = "mean",
        request_id: str | None = None,
    ) -> Embeddings:
        return await self._run(self._embed(inputs, adapter, adapter_config, pooling, request_id))

    async def predict(
        self,
        items: Any,
        *,
        adapter: str,
        head: str,
        adapter_config: dict[str, Any] | None = None,
        request_id: str | None = None,
    ) -> Predictions:
        return await self._run(self._predict(items, adapter, head, adapter_config, request_id))

    async def put(self, value: np.ndarray | bytes) -> Reference:
        return await self._run(self._put(value))

    async def probe(
        self,
        prompt: str | list[int],
        *,
        capture: Sequence[Any] = (),
        interventions: Sequence[Any] = (),
        lens: Any = None,
        max_tokens: int = 1,
        temperature: float = 0.0,
        seed: int | None = None,
        request_id: str | None = None,
    ) -> Trace:
        return await self._run(
            self._probe(prompt, capture, interventions, lens, max_tokens, temperature, seed, request_id)
        )

    async def digest(self, value: Reference | np.ndarray) -> dict[str, Any]:
        return await self._run(self._digest(value))

    # -- tasks (the asyncio counterpart of Client's futures) ----------------------------------------

    def submit_generate(self, *args: Any, **kwargs: Any) -> asyncio.Task[Any]:
        """Schedule ``generate`` on the running loop and return its task at once."""
        return asyncio.get_running_loop().create_task(self.generate(*args, **kwargs))

    def submit_embed(self, *args: Any, **kwargs: Any) -> asyncio.Task[Any]:
        """Schedule ``embed`` on the running loop and return its task at once."""
        return asyncio.get_running_loop().create_task(self.embed(*args, **kwargs))
