"""Large payloads by reference: ProxyStore connectors, a safe serialiser, signed JSON references.

ProxyStore is the data plane. Callers write bytes straight into the pool's store through a
ProxyStore connector (a file directory by default, Redis or another connector by config); only a
small JSON ``Reference`` crosses the wire. The gateway signs a reference for one principal
(HMAC-SHA256 with the pool secret) and the replica verifies signature, owner, lifetime, size and
blake3 digest before it decodes anything.

Never unpickle what a request brings: ProxyStore's own numpy serialiser loads with
``allow_pickle=True`` and a ``Proxy`` is a pickled factory, so neither is used for what the pool
reads. Payloads here are raw bytes or ``.npy`` read with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import re
import time
from pathlib import Path
from typing import Any, Literal

import blake3
import numpy as np
from pydantic import BaseModel, Field

from tpmflow.errors import Forbidden, InvalidRequest, PayloadTooLarge
from tpmflow.npy import load_npy
from tpmflow.paths import payload_store_dir

PayloadKind = Literal["ndarray", "bytes"]
# Keys come from requests: only names a connector itself would make are accepted (no "../").
_SAFE_KEY = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_SAFE_PRINCIPAL = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# Plain numeric dtypes only (never object): detector frames come as uint16/uint32 counts.
ALLOWED_DTYPES = frozenset(
    {"float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool"}
)


class StoreConfig(BaseModel):
    """Where payloads live and how big they may be."""

    connector: Literal["file", "redis"] = "file"
    path: str | None = Field(None, description="file connector: root directory (default $TPMFLOW_HOME/store)")
    redis_host: str = "127.0.0.1"
    redis_port: int = 6379
    inline_limit_bytes: int = Field(1 << 20, description="client sends bigger inputs by reference")
    max_payload_bytes: int = Field(256 << 20, description="largest single payload accepted")
    principal_quota_bytes: int = Field(8 << 30, description="live bytes one principal may hold")
    ttl_s: float = Field(3600.0, description="lifetime of a signed reference")

    def root(self) -> Path:
        return Path(self.path).expanduser() if self.path else payload_store_dir()


class Reference(BaseModel):
    """A signed pointer to one payload in the pool's store. JSON only; safe to log."""

    connector: Literal["file", "redis"]
    key: str
    principal: str
    kind: PayloadKind
    nbytes: int = Field(ge=0)
    digest: str
    expires: float
    sig: str = ""

    def signing_bytes(self) -> bytes:
        body = self.model_dump(exclude={"sig"})
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


# -- safe serialisation --------------------------------------------------------------------------


def encode_payload(obj: np.ndarray | bytes) -> tuple[bytes, PayloadKind]:
    """Serialise an array as ``.npy`` (no pickle) or pass bytes through."""
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj), "bytes"
    if isinstance(obj, np.ndarray):
        if obj.dtype.name not in ALLOWED_DTYPES:
            raise InvalidRequest(f"arrays of dtype {obj.dtype} cannot be sent; use one of {sorted(ALLOWED_DTYPES)}")
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(obj), allow_pickle=False)
        return buf.getvalue(), "ndarray"
    raise InvalidRequest(f"payloads are numpy arrays or bytes, not {type(obj).__name__}")


def decode_payload(data: bytes, kind: PayloadKind) -> np.ndarray | bytes:
    """Inverse of ``encode_payload``; refuses pickled object arrays and odd dtypes."""
    if kind == "bytes":
        return data
    try:
        array = load_npy(data)
    except (ValueError, OSError, EOFError) as exc:
        raise InvalidRequest(f"payload is not a valid .npy array: {exc}") from exc
    if array.dtype.name not in ALLOWED_DTYPES:
        raise InvalidRequest(f"payload dtype {array.dtype} is not allowed")
    return array


def digest_of(data: bytes) -> str:
    return "blake3:" + blake3.blake3(data).hexdigest()


# -- signing -------------------------------------------------------------------------------------


class Signer:
    """HMAC-SHA256 over a reference's canonical JSON, with the pool secret."""

    def __init__(self, secret: str) -> None:
        self._key = hashlib.sha256(b"tpmflow-ref:" + secret.encode()).digest()

    def sign(self, ref: Reference) -> Reference:
        mac = hmac.new(self._key, ref.signing_bytes(), hashlib.sha256).hexdigest()
        return ref.model_copy(update={"sig": mac})

    def verify(self, ref: Reference, principal: str, now: float | None = None) -> None:
        """Raise unless ``ref`` was signed here, belongs to ``principal`` and is still alive."""
        expected = hmac.new(self._key, ref.signing_bytes(), hashlib.sha256).hexdigest()
        if not ref.sig or not hmac.compare_digest(expected, ref.sig):
            raise Forbidden("payload reference is unsigned or forged")
        if ref.principal != principal:
            raise Forbidden("payload reference belongs to another principal")
        if (now or time.time()) > ref.expires:
            raise InvalidRequest("payload reference has expired")


# -- the store -----------------------------------------------------------------------------------


class PayloadStore:
    """ProxyStore connectors, one folder per principal for the file connector."""

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self._connectors: dict[str, Any] = {}

    def _connector(self, principal: str) -> Any:
        if not _SAFE_PRINCIPAL.match(principal):
            raise InvalidRequest(f"bad principal name {principal!r}")
        conn = self._connectors.get(principal)
        if conn is None:
            if self.config.connector == "file":
                from proxystore.connectors.file import FileConnector

                conn = FileConnector(str(self.config.root() / principal), clear=False)
            else:
                from proxystore.connectors.redis import RedisConnector

                conn = RedisConnector(self.config.redis_host, self.config.redis_port, clear=False)
            self._connectors[principal] = conn
        return conn

    def _key(self, ref: Reference) -> Any:
        if not _SAFE_KEY.match(ref.key):
            raise InvalidRequest("malformed payload key")
        if ref.connector != self.config.connector:
            raise InvalidRequest(f"reference is for a {ref.connector} store; this pool uses {self.config.connector}")
        if ref.connector == "file":
            from proxystore.connectors.file import FileKey

            return FileKey(filename=ref.key)
        from proxystore.connectors.redis import RedisKey

        return RedisKey(redis_key=ref.key)

    def put(self, principal: str, obj: np.ndarray | bytes) -> Reference:
        """Write a payload; returns an unsigned reference (the gateway or a replica signs it)."""
        data, kind = encode_payload(obj)
        if len(data) > self.config.max_payload_bytes:
            raise PayloadTooLarge(f"payload of {len(data)} bytes exceeds the limit of {self.config.max_payload_bytes}")
        key = self._connector(principal).put(data)
        name = key.filename if self.config.connector == "file" else key.redis_key
        return Reference(
            connector=self.config.connector,
            key=name,
            principal=principal,
            kind=kind,
            nbytes=len(data),
            digest=digest_of(data),
            expires=time.time() + self.config.ttl_s,
        )

    def size(self, ref: Reference) -> int | None:
        """Bytes stored under the reference's key, or ``None`` when nothing is there."""
        key = self._key(ref)
        conn = self._connector(ref.principal)
        if not conn.exists(key):
            return None
        if self.config.connector == "file":
            import os

            return os.path.getsize(os.path.join(conn.store_dir, key.filename))
        return int(conn._redis_client.strlen(key.redis_key))

    def exists(self, ref: Reference) -> bool:
        return bool(self._connector(ref.principal).exists(self._key(ref)))

    def get_bytes(self, ref: Reference) -> bytes:
        """Fetch and integrity-check a payload's bytes (size and blake3 digest)."""
        if ref.nbytes > self.config.max_payload_bytes:
            raise PayloadTooLarge(f"payload of {ref.nbytes} bytes exceeds the limit of {self.config.max_payload_bytes}")
        try:
            data = self._connector(ref.principal).get(self._key(ref))
        except OSError:  # half-deleted (marker without data) counts as missing
            data = None
        if data is None:
            raise InvalidRequest(f"payload {ref.key} is missing from the store (expired or evicted)")
        data = bytes(data)
        if len(data) != ref.nbytes or digest_of(data) != ref.digest:
            raise InvalidRequest(f"payload {ref.key} does not match its reference (size or digest)")
        return data

    def get(self, ref: Reference) -> np.ndarray | bytes:
        return decode_payload(self.get_bytes(ref), ref.kind)

    def evict(self, ref: Reference) -> None:
        self._connector(ref.principal).evict(self._key(ref))
