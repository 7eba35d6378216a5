"""``Client``: the shared flows run with blocking I/O; ``submit_*`` returns futures."""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
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
    from tpmflow.client.knowledge import Collection

T = TypeVar("T")


class Client(BaseClient):
    """Synchronous client. ``submit_*`` variants return ``concurrent.futures.Future`` so a thinker
    agent never blocks its others.

    Failures raise the typed errors of ``tpmflow.errors``. A full pool (503 ``Overloaded``) and a rate
    limit (429 ``QuotaExceeded`` with ``retry_after``) are retried up to ``retries`` times, waiting
    the server's ``Retry-After`` or an exponential backoff from ``backoff_s``, whichever is longer;
    a spent allocation (``QuotaExceeded`` without ``retry_after``) is raised at once.

    ``url`` may list several gateways of one pool: a request that cannot reach its gateway goes to
    the next, with the same request id (a GET also when its gateway dropped it unanswered).
    """

    _http: httpx.Client

    def __init__(
        self,
        url: str | Sequence[str],
        token: str | None = None,
        timeout: float = 150.0,
        retries: int = 4,
        backoff_s: float = 0.25,
        max_workers: int = 16,
        version: str | None = None,
    ) -> None:
        super().__init__(url, token, timeout, retries, backoff_s, version)
        self._http = httpx.Client(
            timeout=httpx.Timeout(timeout, connect=min(timeout, CONNECT_TIMEOUT_S)),
            limits=httpx.Limits(keepalive_expiry=KEEPALIVE_S),
        )
        self._pool: ThreadPoolExecutor | None = None
        self._max_workers = max_workers

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._http.close()

    def _run(self, flow: Flow[T]) -> T:
        """Run a flow, doing the I/O it asks for here and now."""
        with closing(flow):
            step = resume(flow, None, None)
            while not isinstance(step, Done):
                try:
                    outcome, error = self._perform(step), None
                except Exception as exc:  # noqa: BLE001 - the flow decides: retry, map to a typed error, or raise
                    outcome, error = None, exc
                step = resume(flow, outcome, error)
            return step.value

    def _perform(self, op: Op) -> Any:
        if isinstance(op, Send):
            return self._http.send(op.request)
        if isinstance(op, Sleep):
            return time.sleep(op.seconds)
        assert isinstance(op, Blocking)
        return op.fn(*op.args)

    # -- API -----------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """The gateway's ``/health`` (no token needed): status and per-replica load."""
        return self._run(self._health())

    def models(self) -> list[str]:
        """Ids of the models the pool serves."""
        return self._run(self._models())

    def knowledge(self, name: str) -> Collection:
        """A handle on the knowledge collection ``name`` (``tpmflow.client.knowledge``)."""
        from tpmflow.client.knowledge import Collection

        return Collection(self, name)

    def collections(self) -> list[dict[str, Any]]:
        """The knowledge collections this principal may read."""
        return self._run(self._collections())

    def usage(self, by: str = "principal") -> list[dict[str, Any]]:
        """Ledger totals for this principal (``by`` principal, project, endpoint…)."""
        return self._run(self._usage(by))

    @overload
    def generate(
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
    def generate(
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
    def generate(
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
    def generate(
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
    def generate(
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
        """Text in, text out (one prompt → one ``Generation``; a list → a list). With
        ``prompt_embeds`` ([n_tokens, hidden] floats) the model starts from vectors instead of text.

        With ``adapter=`` the prompts are domain items (e.g. SMILES prefixes, "" for none) and the
        answer is, per item, a list of ``Decoded`` (value, or the reason it was rejected) — or the
        item's ``AdapterInputError``. ``n`` asks for several completions per item.

        ``retrieve={"collection": name, "k": 4}`` brings the k items of a knowledge collection
        nearest each prompt (or nearest ``"query": [...]``) into it: a ``Context:`` block before a
        text prompt, or the adapter's own (SMILES: the molecules and their properties before the
        prefix). What was retrieved is in ``provenance["retrieved"]`` (``Decodings.retrieved`` with
        an adapter): collection, embedder, and ids and scores per prompt."""
        return self._run(
            self._generate(
                prompt, max_tokens, temperature, seed, prompt_embeds, adapter, adapter_config, request_id, extra
            )
        )

    def embed(
        self,
        inputs: Any,
        *,
        adapter: str | Adapter | None = None,
        adapter_config: dict[str, Any] | None = None,
        pooling: str = "mean",
        request_id: str | None = None,
    ) -> Embeddings:
        """Final hidden states (after the final norm) of each input: pooled ``mean``/``last`` or per
        token ``none``. With ``adapter=`` the inputs are domain items (e.g. SMILES, point-cloud file
        bytes) that the pool's adapter turns into model inputs; bad items come back as per-item
        errors. ``adapter`` may also be an adapter object: it then runs here, for adapters the pool
        does not have installed, and only its text or soft tokens travel."""
        return self._run(self._embed(inputs, adapter, adapter_config, pooling, request_id))

    def predict(
        self,
        items: Any,
        *,
        adapter: str,
        head: str,
        adapter_config: dict[str, Any] | None = None,
        request_id: str | None = None,
    ) -> Predictions:
        """Domain items → adapter → core model → head (``name`` or ``name@version``): one value or one
        ``AdapterInputError`` per item."""
        return self._run(self._predict(items, adapter, head, adapter_config, request_id))

    def put(self, value: np.ndarray | bytes) -> Reference:
        """Write a payload into the pool's store and have the gateway sign a reference to it."""
        return self._run(self._put(value))

    def probe(
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
        """Intermediary access: run ``prompt`` while capturing activations (``Capture``), editing them
        (``Add`` steering vectors, ``Replace`` patches, ``Zero`` ablations) and reading the logit lens
        (``LogitLens``), all inside the pool's vLLM engine. Needs the ``probe`` permission. Vectors
        and patches travel inline up to the request's inline budget, by reference beyond."""
        return self._run(self._probe(prompt, capture, interventions, lens, max_tokens, temperature, seed, request_id))

    def digest(self, value: Reference | np.ndarray) -> dict[str, Any]:
        """Deliver an array (inline) or a reference to a replica; it reports the blake3 digest of what
        arrived, proving the transfer."""
        return self._run(self._digest(value))

    # -- futures ---------------------------------------------------------------------------------

    def _submit(self, fn: Any, *args: Any, **kwargs: Any) -> Future[Any]:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._max_workers, thread_name_prefix="tpmflow-client")
        return self._pool.submit(fn, *args, **kwargs)

    def submit_generate(self, *args: Any, **kwargs: Any) -> Future[Any]:
        """``generate`` in the client's threads; returns its future at once."""
        return self._submit(self.generate, *args, **kwargs)

    def submit_embed(self, *args: Any, **kwargs: Any) -> Future[Any]:
        """``embed`` in the client's threads; returns its future at once."""
        return self._submit(self.embed, *args, **kwargs)
