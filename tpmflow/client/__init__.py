"""``Client`` and ``AsyncClient``: the same methods, like httpx's pair.

Inputs above the pool's inline limit go into the pool's ProxyStore store and only a signed JSON
reference crosses the wire; large outputs come back as references, resolved lazily to numpy.
Failures raise the typed errors of ``tpmflow.errors``; a full pool (503) and a rate limit (429 with
Retry-After) are retried with backoff.

Layout (httpx's pattern): ``_base`` holds every decision that needs no I/O, written once as flows;
``_sync`` and ``_async`` only run them; ``results`` holds what the calls return.
"""

from tpmflow.client._async import AsyncClient
from tpmflow.client._base import (
    INLINE_BUDGET_BYTES,
    KEEPALIVE_S,
    BaseClient,
    Decodings,
    error_from_response,
    raise_for_error,
)
from tpmflow.client._sync import Client
from tpmflow.client.results import Embeddings, Generation, LazyArray, Predictions, Trace

__all__ = [
    "INLINE_BUDGET_BYTES",
    "KEEPALIVE_S",
    "AsyncClient",
    "BaseClient",
    "Client",
    "Decodings",
    "Embeddings",
    "Generation",
    "LazyArray",
    "Predictions",
    "Trace",
    "error_from_response",
    "raise_for_error",
]
