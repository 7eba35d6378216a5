"""One error hierarchy shared by gateway and client.

Each class carries the HTTP status the gateway answers with, so a client can raise the same class
from an error body ``{"error": {"type", "message", "item"?}}``.
"""

from __future__ import annotations


class TpmflowError(Exception):
    """Base class of every error tpmflow raises on purpose."""

    status_code: int = 500

    def __init__(self, message: str, *, item: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.item = item

    def to_body(self) -> dict[str, object]:
        """The JSON error body the gateway sends."""
        error: dict[str, object] = {"type": type(self).__name__, "message": self.message}
        if self.item is not None:
            error["item"] = self.item
        return {"error": error}


class InvalidRequest(TpmflowError):
    """The request is malformed or out of bounds (HTTP 400)."""

    status_code = 400


class PayloadTooLarge(InvalidRequest):
    """The inline body or payload exceeds the configured limit; send it by reference (HTTP 413)."""

    status_code = 413


class AdapterInputError(InvalidRequest):
    """One item of a batch could not be encoded; ``item`` names its index. The rest still completes."""


class Unauthorized(TpmflowError):
    """Missing, unknown or revoked token (HTTP 401)."""

    status_code = 401


class Forbidden(TpmflowError):
    """The principal lacks the permission this endpoint needs (HTTP 403)."""

    status_code = 403


class QuotaExceeded(TpmflowError):
    """The principal's or project's quota is spent, or a rate limit is reached (HTTP 429).

    ``retry_after`` (seconds) is set when waiting helps — a rate limit's bucket refills — and the
    gateway then sends it as ``Retry-After``; a spent allocation leaves it ``None``.
    """

    status_code = 429

    def __init__(self, message: str, *, retry_after: float | None = None, item: int | None = None) -> None:
        super().__init__(message, item=item)
        self.retry_after = retry_after


class Overloaded(TpmflowError):
    """The admission queue is full; retry after ``retry_after`` seconds (HTTP 503)."""

    status_code = 503

    def __init__(self, message: str, *, retry_after: float = 1.0, item: int | None = None) -> None:
        super().__init__(message, item=item)
        self.retry_after = retry_after


class ReplicaFailed(TpmflowError):
    """No replica could complete the request within its timeout (HTTP 502)."""

    status_code = 502


class StoreUnavailable(TpmflowError):
    """The pool's payload store (ProxyStore: Redis, a shared folder) refused a write or read; the
    replica and the rest of its batch are fine, so retry once the store is back (HTTP 503)."""

    status_code = 503


class ModelNotFound(TpmflowError):
    """A named local model is not in the cache (build it first)."""

    status_code = 404


class VersionNotFound(ModelNotFound):
    """No version, tag or unique id prefix of the model store matches the name given."""


class CollectionNotFound(ModelNotFound):
    """No knowledge collection of that name that the principal may read (one it may not read is
    reported the same way, so a private collection's existence does not leak) (HTTP 404)."""


class StoreCorrupted(TpmflowError):
    """A blob or reconstructed tensor of the model store fails its blake3 check, or is missing.

    Kept out of ``ERROR_CLASSES``: it is a server-side fault that never crosses the wire as such
    (a plain HTTP 500 must keep mapping to ``ReplicaFailed``).
    """


ERROR_CLASSES: dict[str, type[TpmflowError]] = {
    cls.__name__: cls
    for cls in (
        TpmflowError,
        InvalidRequest,
        PayloadTooLarge,
        AdapterInputError,
        Unauthorized,
        Forbidden,
        QuotaExceeded,
        Overloaded,
        ReplicaFailed,
        StoreUnavailable,
        ModelNotFound,
        VersionNotFound,
        CollectionNotFound,
    )
}


def type_for_status(status: int) -> str:
    """The error class name an HTTP status maps to, for bodies that name no tpmflow class (vLLM's own)."""
    by_status = {cls.status_code: name for name, cls in reversed(list(ERROR_CLASSES.items())) if name != "TpmflowError"}
    by_status.update({400: "InvalidRequest", 502: "ReplicaFailed", 504: "ReplicaFailed"})
    return by_status.get(status, "ReplicaFailed" if status >= 500 else "InvalidRequest")
