"""Safe serialisation, signed references, and the file and Redis connectors."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import numpy as np
import pytest

from tpmflow.errors import Forbidden, InvalidRequest, PayloadTooLarge
from tpmflow.payload import PayloadStore, Signer, StoreConfig, decode_payload, encode_payload
from tpmflow.schema import InlineArray


def test_arrays_round_trip_without_pickle() -> None:
    arr = np.arange(12, dtype=np.float16).reshape(3, 4)
    data, kind = encode_payload(arr)
    assert kind == "ndarray"
    np.testing.assert_array_equal(decode_payload(data, kind), arr)
    assert decode_payload(b"raw", "bytes") == b"raw"


def test_pickled_object_arrays_are_refused() -> None:
    buf = io.BytesIO()
    np.save(buf, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InvalidRequest):
        decode_payload(buf.getvalue(), "ndarray")
    with pytest.raises(InvalidRequest):
        encode_payload(np.array([object()], dtype=object))
    with pytest.raises(InvalidRequest):
        decode_payload(b"not an npy file", "ndarray")


def test_inline_array_validation() -> None:
    arr = np.random.default_rng(0).random((2, 3)).astype(np.float32)
    np.testing.assert_array_equal(InlineArray.from_numpy(arr).to_numpy(), arr)
    good = InlineArray.from_numpy(arr)
    with pytest.raises(InvalidRequest):
        good.model_copy(update={"shape": [3, 3]}).to_numpy()
    with pytest.raises(InvalidRequest):
        good.model_copy(update={"dtype": "object"}).to_numpy()
    with pytest.raises(InvalidRequest):
        good.model_copy(update={"shape": [-2, -3]}).to_numpy()


def _store(tmp_path: Path, **kw: object) -> PayloadStore:
    return PayloadStore(StoreConfig(path=str(tmp_path), **kw))  # type: ignore[arg-type]


def test_signing_binds_principal_content_and_lifetime(tmp_path: Path) -> None:
    store, signer = _store(tmp_path), Signer("pool-secret")
    ref = signer.sign(store.put("alice", np.ones(4, np.float32)))
    signer.verify(ref, "alice")
    with pytest.raises(Forbidden, match="another principal"):
        signer.verify(ref, "bob")
    with pytest.raises(Forbidden, match="forged"):
        signer.verify(ref.model_copy(update={"digest": "blake3:" + "0" * 64}), "alice")
    with pytest.raises(Forbidden, match="forged"):
        Signer("another-pool").verify(ref, "alice")
    with pytest.raises(InvalidRequest, match="expired"):
        signer.verify(ref, "alice", now=time.time() + 10**6)
    assert (tmp_path / "alice" / ref.key).is_file()  # per-principal folders


def test_tampered_payload_is_detected(tmp_path: Path) -> None:
    store = _store(tmp_path)
    ref = store.put("alice", b"original bytes")
    (tmp_path / "alice" / ref.key).write_bytes(b"tampered bytes")
    with pytest.raises(InvalidRequest, match="does not match"):
        store.get(ref)


def test_size_limit(tmp_path: Path) -> None:
    with pytest.raises(PayloadTooLarge):
        _store(tmp_path, max_payload_bytes=10).put("alice", b"x" * 11)


def test_bad_principal_names_never_become_paths(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest):
        _store(tmp_path).put("../escape", b"x")


def test_redis_connector_round_trip() -> None:
    """Redis is how multi-host campaigns share payloads. CI has it; elsewhere skip loudly."""
    import redis

    try:
        redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=2).ping()
    except redis.exceptions.ConnectionError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"Redis not reachable at 127.0.0.1:6379: {exc}")
        pytest.skip(f"LOUD SKIP: Redis not reachable at 127.0.0.1:6379: {exc}")
    store = PayloadStore(StoreConfig(connector="redis"))
    signer = Signer("s")
    arr = np.random.default_rng(1).random((64, 32)).astype(np.float32)
    ref = signer.sign(store.put("alice", arr))
    signer.verify(ref, "alice")
    np.testing.assert_array_equal(store.get(ref), arr)
    store.evict(ref)
    with pytest.raises(InvalidRequest, match="missing"):
        store.get(ref)
