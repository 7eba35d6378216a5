"""Intake: who is asking (bearer token → principal), may they (permission), under which id, and
the JSON body, read once with a size cap before a byte more is buffered."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson
from starlette.requests import Request

from tpmflow.access import AccessDB, Principal
from tpmflow.config import GatewayConfig
from tpmflow.errors import Forbidden, InvalidRequest, PayloadTooLarge, Unauthorized
from tpmflow.gateway.call import Call
from tpmflow.protocol import Headers

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,80}$")


class Intake:
    """Turns an HTTP request into a :class:`Call` and its body. ``refused`` records a request
    turned away here (a 403) so the ledger sees it."""

    def __init__(
        self, cfg: GatewayConfig, access: AccessDB, refused: Callable[[Call, int, str], None], secret: str = ""
    ) -> None:
        self.cfg = cfg
        self.access = access
        self.refused = refused
        self.secret = secret  # signs the workbench's CSRF tokens (tpmflow.ui.session)

    async def principal(self, request: Request) -> Principal:
        """The principal behind the bearer token: a cached answer on the loop, a database round
        trip only off it."""
        scheme, _, token = request.headers.get(Headers.AUTHORIZATION, "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            token = self._session_token(request)
        token = token.strip()
        return self.access.cached(token) or await asyncio.to_thread(self.access.authenticate, token)

    def _session_token(self, request: Request) -> str:
        """The workbench's session token, from its cookie, when the request carries the session's
        CSRF header (a page the workbench rendered); else no token at all."""
        from tpmflow.ui.session import CSRF_HEADER, csrf_ok, session_cookie

        token = request.cookies.get(session_cookie(request), "")
        if not token:
            raise Unauthorized("missing bearer token (Authorization: Bearer tpm_...)")
        if not csrf_ok(self.secret, token, request.headers.get(CSRF_HEADER)):
            raise Unauthorized(f"a workbench session needs its {CSRF_HEADER} header (or send a bearer token)")
        return token

    async def authorise(self, request: Request, permission: str | None, endpoint: str = "") -> Principal:
        principal = await self.principal(request)
        if permission is not None and not principal.can(permission):
            self.refused(Call(endpoint, principal, self.request_id(request)), 403, "Forbidden")
            raise Forbidden(f"principal {principal.name!r} lacks the {permission!r} permission")
        return principal

    async def call(self, request: Request, endpoint: str, permission: str | None) -> Call:
        """A request's bookkeeping, once its principal may use ``permission``; its clock starts
        before the token check, so latencies cover the whole time at the gateway."""
        started = time.monotonic()
        principal = await self.authorise(request, permission, endpoint)
        version = request.headers.get(Headers.VERSION, "")
        if len(version) > 80:
            raise InvalidRequest(f"{Headers.VERSION} is a content hash (blake3:...) or a prefix of one")
        return Call(endpoint, principal, self.request_id(request), started=started, version=version)

    @staticmethod
    def request_id(request: Request) -> str:
        rid = request.headers.get(Headers.REQUEST_ID)
        return rid if rid and _REQUEST_ID.match(rid) else uuid.uuid4().hex

    async def body(self, request: Request, call: Call | None = None) -> tuple[bytes, dict[str, Any]]:
        """The raw body (forwarded untouched where the gateway changes nothing) and its parse."""
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _too_big(limit)  # refused before a byte of it is buffered
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_big(limit)
            chunks.append(chunk)
        raw = b"".join(chunks)
        if call is not None:
            call.body_bytes = len(raw)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise InvalidRequest(f"malformed JSON body: {exc}") from exc
        if not isinstance(body, dict):
            raise InvalidRequest("the JSON body must be an object")
        return raw, body


def _too_big(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"request body exceeds {limit} bytes; send large arrays by reference (tpmflow payloads)")
