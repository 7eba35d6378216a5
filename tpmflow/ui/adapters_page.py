"""The Adapters page: scientific data through the installed domain adapters.

What the model computes (embeddings, a head's predictions, generated molecules, per-item errors)
the page's script asks of the gateway's own adapter routes, as any client would. The server adds
only what a browser cannot do itself:

- ``POST /ui/adapters/draw``: SMILES drawn by RDKit in the adapters' sandbox (``ui.molecules``);
- ``POST /ui/adapters/upload``: a file written to the principal's payload store and signed, as
  ``client.put`` does (quota, size cap, expiry), plus what the adapter read from it, parsed by the
  adapter's own ``prepare`` (its sandbox, its limits): the points it samples from a point cloud,
  the frame it feeds the encoder from a detector file.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tpmflow.adapters.base import ItemError
from tpmflow.errors import InvalidRequest, TpmflowError
from tpmflow.ui.molecules import MAX_MOLECULES, draw

if TYPE_CHECKING:
    from tpmflow.access import Principal
    from tpmflow.ui.pages import Workbench

UPLOAD_LIMIT_BYTES = 16 << 20  # what one upload may be (the store's own cap applies too)
PREVIEW_POINTS = 4096  # points sent back for the 3-D view
SANDBOXED_AT_ONCE = 2  # parses and drawings per gateway: capped child processes, on the API's threads


def routes(bench: Workbench) -> list[Any]:
    page = AdaptersPage(bench)
    return [
        Route("/ui/adapters", page.show, methods=["GET"]),
        Route("/ui/adapters/draw", page.draw, methods=["POST"]),
        Route("/ui/adapters/upload", page.upload, methods=["POST"]),
    ]


def _error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"type": kind, "message": message}}, status_code=status)


class AdaptersPage:
    def __init__(self, bench: Workbench) -> None:
        self.bench = bench
        self.sandboxed = asyncio.Semaphore(SANDBOXED_AT_ONCE)  # must not crowd out the API's own work

    async def _caller(self, request: Request) -> Principal:
        """Who asks, as the adapters' own routes ask it (the gateway's intake: a bearer token, or the
        session cookie with the page's CSRF header; ``embed`` held). Refusals raise typed errors."""
        return await self.bench.gw.intake.authorise(request, "embed", "ui.adapters")

    async def show(self, request: Request) -> Response:
        session = await self.bench._session(request)
        if session is None:
            return self.bench._to_signin(request)
        principal, csrf = session
        adapters, parts = await asyncio.to_thread(self._installed)
        return self.bench._page(
            "adapters.html",
            principal,
            csrf,
            "adapters",
            adapters=adapters,
            parts=json.dumps(parts),
            upload_mb=UPLOAD_LIMIT_BYTES >> 20,
            may_embed=principal.can("embed"),
        )

    def _installed(self) -> tuple[list[str], dict[str, dict[str, list[str]]]]:
        """Installed adapters, and per adapter the parts trained for it in the pool's parts folder:
        ``{"heads": [...], "projectors": [...]}`` (a file adapter's encoder needs a projector)."""
        from tpmflow.adapters import available_adapters
        from tpmflow.adapters.parts import list_parts, pool_parts_dir

        names = sorted(available_adapters())
        parts: dict[str, dict[str, list[str]]] = {name: {"heads": [], "projectors": []} for name in names}
        try:
            cards = list_parts(pool_parts_dir(self.bench.gw.cfg))
        except (OSError, ValueError):  # an unreadable card must not take the page down
            cards = []
        for card in cards:
            if card.adapter in parts:
                kind = "projectors" if card.kind == "projector" else "heads"
                parts[card.adapter][kind].append(f"{card.name}@{card.version}")
        return names, parts

    def _settings_of(self, adapter: str, part: str) -> dict[str, Any]:
        """The adapter settings a projector was trained with (its card's), so the preview reads
        the file as the encoder will: the part itself is loaded only on the replicas."""
        from tpmflow.adapters.parts import list_parts, pool_parts_dir

        for card in list_parts(pool_parts_dir(self.bench.gw.cfg)):
            if card.adapter == adapter and f"{card.name}@{card.version}" == part:
                return {k: v for k, v in card.settings.items() if k != "part"}
        raise InvalidRequest(f"no part {part!r} for adapter {adapter!r} in the pool's parts folder")

    async def draw(self, request: Request) -> Response:
        await self._caller(request)  # signed in (cookie + CSRF header, or a bearer token) with embed
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "InvalidRequest", "the body must be JSON")
        smiles = body.get("smiles") if isinstance(body, dict) else None
        if not isinstance(smiles, list) or not all(isinstance(s, str) for s in smiles):
            return _error(400, "InvalidRequest", "smiles must be a list of strings")
        if len(smiles) > MAX_MOLECULES:
            return _error(400, "InvalidRequest", f"at most {MAX_MOLECULES} molecules at a time, got {len(smiles)}")
        async with self.sandboxed:
            drawings = await asyncio.to_thread(draw, smiles)
        return JSONResponse({"drawings": drawings})

    async def upload(self, request: Request) -> Response:
        caller = await self._caller(request)
        length = request.headers.get("content-length")
        if length is None or not length.isdigit():
            return _error(411, "InvalidRequest", "an upload needs its Content-Length")
        if int(length) > UPLOAD_LIMIT_BYTES + (64 << 10):  # the file, plus the form's own bytes
            return _error(413, "PayloadTooLarge", f"uploads are capped at {UPLOAD_LIMIT_BYTES >> 20} MB")
        form = await request.form(max_files=1, max_fields=4)
        upload, adapter, part = form.get("file"), str(form.get("adapter", "")), str(form.get("part", ""))
        if upload is None or isinstance(upload, str):
            return _error(400, "InvalidRequest", "choose a file to upload")
        data = await upload.read(UPLOAD_LIMIT_BYTES + 1)
        if len(data) > UPLOAD_LIMIT_BYTES:
            return _error(413, "PayloadTooLarge", f"uploads are capped at {UPLOAD_LIMIT_BYTES >> 20} MB")
        gw = self.bench.gw
        try:
            async with self.sandboxed:  # the adapter first: a file no adapter here takes is not stored
                settings = await asyncio.to_thread(self._settings_of, adapter, part) if part else None
                preview = await asyncio.to_thread(read_as_adapter, adapter, data, settings)
            ref = await asyncio.to_thread(gw.store.put, caller.name, data)
            try:  # signing registers it against the principal's quota
                signed = await gw.payloads.sign(
                    caller, {"key": ref.key, "kind": ref.kind, "nbytes": ref.nbytes, "digest": ref.digest}
                )
            except BaseException:  # refused (quota) or cancelled: never leave an unregistered file
                await asyncio.to_thread(gw.store.evict, ref)
                raise
        except TpmflowError as exc:
            return _error(exc.status_code, type(exc).__name__, exc.message)
        return JSONResponse({"reference": signed, "name": upload.filename or "", "nbytes": len(data), "read": preview})


def read_as_adapter(name: str, data: bytes, config: dict[str, Any] | None = None) -> dict[str, Any]:
    """What adapter ``name`` reads from a file, through its own ``prepare`` (sandboxed parsers):
    ``{"points": [[x, y, z], ...]}`` for point clouds (its sampled patches' points),
    ``{"frame": {"size": S, "pixels": [...]}}`` for detector frames (the image its encoder sees,
    0-255), or ``{"error": reason}`` — the adapter's own words, as the API would give them."""
    from tpmflow.adapters import load_adapter

    try:
        adapter = load_adapter(name, config)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"bad settings for adapter {name!r}: {exc}") from exc
    prepare = getattr(adapter, "prepare", None)
    if prepare is None:
        raise InvalidRequest(f"adapter {name!r} takes text items; type them instead of uploading a file")
    (prepared,) = prepare([data])
    if isinstance(prepared, ItemError):
        return {"error": prepared.reason}
    arr = np.asarray(prepared, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[-1] == 3:  # point patches [G, k + 1, 3]
        points = np.unique(arr.reshape(-1, 3), axis=0)  # patches overlap: each point once
        if len(points) > PREVIEW_POINTS:  # a uniform sample, not the lowest x first
            points = points[np.random.default_rng(0).choice(len(points), PREVIEW_POINTS, replace=False)]
        return {"points": np.round(points, 4).tolist()}
    if arr.ndim == 2:  # frame patches [(S/p)^2, p*p], row-major (patchify's layout)
        g, p = int(round(arr.shape[0] ** 0.5)), int(round(arr.shape[1] ** 0.5))
        if g * g == arr.shape[0] and p * p == arr.shape[1]:
            image = arr.reshape(g, g, p, p).transpose(0, 2, 1, 3).reshape(g * p, g * p)
            lo, hi = float(image.min()), float(image.max())
            scaled = np.zeros_like(image) if hi <= lo else (image - lo) / (hi - lo) * 255
            return {"frame": {"size": g * p, "pixels": scaled.astype(np.uint8).ravel().tolist()}}
    return {"shape": list(arr.shape)}
