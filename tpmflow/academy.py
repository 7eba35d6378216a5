"""Academy integration: the pool as actions of an Academy agent.

:class:`TPMAgent` opens one :class:`~tpmflow.client.AsyncClient` when the agent starts and closes it
when the agent shuts down. Its actions (``generate``, ``embed``, ``predict``, ``models``) await that
client, so the agent's event loop stays free: many calls from many handles run at once and the pool
batches them, while the agent still answers pings, shutdowns and other actions.

```python
from academy.exchange import LocalExchangeFactory
from academy.manager import Manager

async with await Manager.from_exchange_factory(LocalExchangeFactory()) as manager:
    tpm = await manager.launch(TPMAgent, kwargs={"url": pool.url, "token": pool.token})
    out = await tpm.generate("c1ccccc1", max_tokens=32, seed=7)      # a tpmflow Generation
```

Results are the client's own types (``Generation``, ``Embeddings``, ``Predictions``, ``Decoded``),
made self-contained: arrays the pool returned by reference are fetched inside the agent, so a
result pickles across any Academy exchange. A failed call raises the same typed
``tpmflow.errors`` exception at the caller (``InvalidRequest``, ``AdapterInputError`` …); the agent
stays up.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from academy.agent import Agent, action

from tpmflow.adapters.base import Decoded
from tpmflow.client import AsyncClient, Embeddings, Generation, Predictions, Trace
from tpmflow.errors import AdapterInputError
from tpmflow.payload import Reference

#: What ``TPMAgent.generate`` returns: one ``Generation`` per prompt (a list for a list of prompts),
#: or, with an adapter, per item a list of ``Decoded`` or that item's ``AdapterInputError``.
GenerateResult = Generation | list[Generation] | list[list[Decoded] | AdapterInputError]


class TPMAgent(Agent):
    """An Academy agent that serves a tpmflow pool's calls as actions.

    Args:
        url: The pool's gateway URL; defaults to ``$TPMFLOW_URL``.
        token: A principal's token; defaults to ``$TPMFLOW_TOKEN``.
        client_kwargs: Passed to ``AsyncClient`` (``timeout``, ``retries``, ``backoff_s``).

    Raises:
        ValueError: If neither the arguments nor the environment name the pool.
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        *,
        client_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.url = url or os.environ.get("TPMFLOW_URL")
        self.token = token or os.environ.get("TPMFLOW_TOKEN")
        if not self.url or not self.token:
            raise ValueError("TPMAgent needs the pool: pass url= and token=, or set TPMFLOW_URL and TPMFLOW_TOKEN")
        self.client_kwargs = dict(client_kwargs or {})
        # Opened in agent_on_startup, not here: the agent may be pickled to the worker that runs it.
        self._client: AsyncClient | None = None

    async def agent_on_startup(self) -> None:
        """Open the pool client in the agent's own event loop."""
        assert self.url is not None
        self._client = AsyncClient(self.url, token=self.token, **self.client_kwargs)

    async def agent_on_shutdown(self) -> None:
        """Close the pool client."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @property
    def client(self) -> AsyncClient:
        """The open pool client (for actions of subclasses)."""
        if self._client is None:
            raise RuntimeError("the agent has not started: its pool client is opened in agent_on_startup")
        return self._client

    @action
    async def generate(
        self,
        prompt: str | list[str] | None = None,
        *,
        max_tokens: int = 16,
        temperature: float = 1.0,
        seed: int | None = None,
        prompt_embeds: np.ndarray | Reference | None = None,
        adapter: str | None = None,
        adapter_config: dict[str, Any] | None = None,
        **extra: Any,
    ) -> GenerateResult:
        """Text in, text out; or domain prompts in, decoded domain objects out (``adapter=``).

        Same arguments as ``AsyncClient.generate``; ``extra`` goes to the request body (``n``,
        ``stop``, ``top_p`` …).
        """
        return await self.client.generate(
            prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            seed=seed,
            prompt_embeds=prompt_embeds,
            adapter=adapter,
            adapter_config=adapter_config,
            **extra,
        )

    @action
    async def embed(
        self,
        inputs: Any,
        *,
        adapter: str | None = None,
        adapter_config: dict[str, Any] | None = None,
        pooling: str = "mean",
    ) -> Embeddings:
        """Final hidden states of each input (``pooling``: ``mean``, ``last`` or ``none``).

        With ``adapter=`` the inputs are domain items; a bad item holds its ``AdapterInputError``
        and the rest still complete. Arrays are fetched here, so ``numpy()`` needs no store.
        """
        emb = await self.client.embed(inputs, adapter=adapter, adapter_config=adapter_config, pooling=pooling)
        # Fetching a reference reads the pool's store: a blocking read, so off the event loop.
        return await self.agent_run_sync(emb.fetch)

    @action
    async def predict(
        self,
        items: Any,
        *,
        adapter: str,
        head: str,
        adapter_config: dict[str, Any] | None = None,
    ) -> Predictions:
        """Domain items → adapter → core model → served head (``name`` or ``name@version``).

        One value (float or label) or one ``AdapterInputError`` per item.
        """
        return await self.client.predict(items, adapter=adapter, head=head, adapter_config=adapter_config)

    @action
    async def probe(
        self,
        prompt: str | list[int],
        *,
        capture: list[Any] | None = None,
        interventions: list[Any] | None = None,
        lens: Any = None,
        max_tokens: int = 1,
        temperature: float = 0.0,
        seed: int | None = None,
    ) -> Trace:
        """Intermediary access: read (``capture``) and write (``interventions``) activations during
        the forward pass, optionally with a logit ``lens`` (specs as for ``Client.probe``; the
        caller needs the ``probe`` permission). Captures are fetched here, so the trace needs no store."""
        trace = await self.client.probe(
            prompt,
            capture=capture or (),
            interventions=interventions or (),
            lens=lens,
            max_tokens=max_tokens,
            temperature=temperature,
            seed=seed,
        )
        return await self.agent_run_sync(trace.fetch)

    @action
    async def models(self) -> list[str]:
        """The model names the pool serves."""
        return await self.client.models()
