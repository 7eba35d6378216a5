"""Payload routes and upkeep: signing references to what a principal put in the store, what the
store is, and evicting payloads whose lifetime is over."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from pydantic import ValidationError

from tpmflow.access import AccessDB, Principal
from tpmflow.errors import InvalidRequest, PayloadTooLarge
from tpmflow.payload import PayloadStore, Reference, Signer
from tpmflow.schema import SignRequest

log = logging.getLogger("tpmflow.gateway")


class Payloads:
    def __init__(self, store: PayloadStore, access: AccessDB, signer: Signer, sweep_every_s: float) -> None:
        self.store = store
        self.access = access
        self.signer = signer
        self.sweep_every_s = sweep_every_s

    def describe(self, principal: Principal) -> dict[str, Any]:
        """Where the principal's payloads go and the limits on them (GET /v1/tpmflow/store)."""
        c = self.store.config
        where = (
            {"path": str(c.root())}
            if c.connector == "file"
            else {"redis_host": c.redis_host, "redis_port": c.redis_port}
        )
        return {
            "principal": principal.name,
            "project": principal.project,
            "permissions": sorted(principal.permissions),
            "connector": c.connector,
            **where,
            "inline_limit_bytes": c.inline_limit_bytes,
            "max_payload_bytes": c.max_payload_bytes,
            "ttl_s": c.ttl_s,
        }

    async def sign(self, principal: Principal, body: dict[str, Any]) -> dict[str, Any]:
        """A signed reference to a payload the principal put in its store folder, once its size checks."""
        try:
            req = SignRequest.model_validate(body)
        except ValidationError as exc:
            raise InvalidRequest(f"bad sign request: {exc.errors()[0]['msg']}") from exc
        config = self.store.config
        if req.nbytes > config.max_payload_bytes:
            raise PayloadTooLarge(f"payload of {req.nbytes} bytes exceeds {config.max_payload_bytes}")
        ref = Reference(
            connector=config.connector,
            key=req.key,
            principal=principal.name,
            kind=req.kind,
            nbytes=req.nbytes,
            digest=req.digest,
            expires=time.time() + config.ttl_s,
        )
        size = await asyncio.to_thread(self.store.size, ref)
        if size is None:
            raise InvalidRequest(f"no payload {req.key!r} in {principal.name}'s store folder")
        if size != req.nbytes:
            raise InvalidRequest(f"payload {req.key!r} holds {size} bytes, not the {req.nbytes} declared")
        await asyncio.to_thread(
            self.access.register_payload, ref.key, principal.name, ref.nbytes, ref.expires, config.principal_quota_bytes
        )
        return self.signer.sign(ref).model_dump()

    async def sweep(self) -> None:
        """Evict payloads whose lifetime is over, every ``sweep_every_s``."""
        while True:
            await asyncio.sleep(self.sweep_every_s)
            try:
                await asyncio.to_thread(self.sweep_now)
            except Exception:  # noqa: BLE001 - the sweep must never take the gateway down
                log.exception("payload sweep failed")

    def sweep_now(self, now: float | None = None) -> int:
        expired = self.access.pop_expired_payloads(now)
        for key, principal in expired:
            ref = Reference(
                connector=self.store.config.connector,
                key=key,
                principal=principal,
                kind="bytes",
                nbytes=0,
                digest="",
                expires=0,
            )
            try:
                self.store.evict(ref)
            except Exception:  # noqa: BLE001 - already gone is fine
                log.debug("evicting %s failed", key)
        return len(expired)
