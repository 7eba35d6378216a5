"""tpmflow: a very large model as a shared service for AI-steered science campaigns.

The names users reach for, importable from here: ``tpmflow.Client``, ``tpmflow.Pool``,
``tpmflow.Capture``… ``import tpmflow`` itself stays light (it must be cheap inside vLLM's
workers and on a client-only install): the errors load with it, everything else on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from tpmflow.errors import (
    AdapterInputError,
    Forbidden,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    PayloadTooLarge,
    QuotaExceeded,
    ReplicaFailed,
    StoreCorrupted,
    TpmflowError,
    Unauthorized,
    VersionNotFound,
)

__version__ = "0.1.0"

# Name -> module that defines it, imported on first access (the pool pulls in the gateway side).
_LAZY: dict[str, str] = {
    "Client": "tpmflow.client",
    "AsyncClient": "tpmflow.client",
    "Generation": "tpmflow.client",
    "Embeddings": "tpmflow.client",
    "Predictions": "tpmflow.client",
    "Trace": "tpmflow.client",
    "Pool": "tpmflow.pool",
    "Capture": "tpmflow.schema",
    "Add": "tpmflow.schema",
    "Replace": "tpmflow.schema",
    "Zero": "tpmflow.schema",
    "LogitLens": "tpmflow.schema",
    "Reference": "tpmflow.payload",
}

if TYPE_CHECKING:
    from tpmflow.client import AsyncClient, Client, Embeddings, Generation, Predictions, Trace
    from tpmflow.payload import Reference
    from tpmflow.pool import Pool
    from tpmflow.schema import Add, Capture, LogitLens, Replace, Zero

__all__ = [
    "AdapterInputError",
    "Add",
    "AsyncClient",
    "Capture",
    "Client",
    "Embeddings",
    "Forbidden",
    "Generation",
    "InvalidRequest",
    "LogitLens",
    "ModelNotFound",
    "Overloaded",
    "PayloadTooLarge",
    "Pool",
    "Predictions",
    "QuotaExceeded",
    "Reference",
    "Replace",
    "ReplicaFailed",
    "StoreCorrupted",
    "TpmflowError",
    "Trace",
    "Unauthorized",
    "VersionNotFound",
    "Zero",
    "__version__",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'tpmflow' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this hook
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
