"""The workbench's Models page (``/ui/models``): the model store's versions, which of them the pool
serves now, and what changed between two of them, read with the store's own API.

Read-only and for any signed-in principal: the store holds no secrets beyond what ``tpmflow models
log`` shows an operator. Store work (manifests, tensor rebuilds for a diff) runs on a thread.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tpmflow.errors import InvalidRequest, TpmflowError
from tpmflow.paths import model_store_dir
from tpmflow.pool.registry import matches
from tpmflow.versioning.diff import VersionDiff

if TYPE_CHECKING:
    from tpmflow.ui.pages import Workbench
    from tpmflow.versioning.manifest import Manifest

TOP_TENSORS = 20  # changed tensors listed in a diff, largest relative change first
MAX_NAME = 200  # a version name from the form longer than this is no tag, id or prefix


def short(version: str | None) -> str:
    return version[7:19] if version else "-"


@dataclass
class StoreView:
    """What the page shows, gathered on a thread."""

    root: str
    exists: bool = False
    versions: list[dict[str, Any]] = field(default_factory=list)
    diff: dict[str, Any] | None = None
    error: str = ""
    status: int = 200


def store_root(model_store: str | None) -> Path:
    """The pool's store, resolved as ``ModelStore(cfg.model_store)`` would, without creating it."""
    return Path(model_store).expanduser() if model_store else model_store_dir()


@functools.lru_cache(maxsize=16)
def _diff(root: str, a: str, b: str) -> VersionDiff:
    """Versions never change, so a diff (which rebuilds every changed tensor) is computed once."""
    from tpmflow.versioning import ModelStore

    return ModelStore(root).diff(a, b)


def _metrics(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def _row(m: Manifest, tags: list[str], served_by: list[str]) -> dict[str, Any]:
    return {
        "id": m.id,
        "short": short(m.id),
        "parent": m.parent,
        "parent_short": short(m.parent),
        "message": m.message,
        "author": m.author,
        "created": m.created[:19].replace("T", " "),
        "metrics": _metrics(m.metrics),
        "kind": "LoRA" if m.lora else "full",
        "tags": tags,
        "served_by": served_by,
    }


def _summary(d: VersionDiff) -> dict[str, Any]:
    counts = {s: 0 for s in ("changed", "unchanged", "added", "removed", "retyped")}
    for t in d.tensors:
        counts[t.status] += 1
    top = sorted(d.changed, key=lambda t: -1.0 if t.relative_l2 is None else t.relative_l2, reverse=True)
    return {
        "a": d.a,
        "b": d.b,
        "a_short": short(d.a),
        "b_short": short(d.b),
        "counts": counts,
        "total": len(d.tensors),
        "top": [t.model_dump() for t in top[:TOP_TENSORS]],
        "more": max(0, len(top) - TOP_TENSORS),
        "files": sorted(d.files.items()),
    }


def read_store(root: Path, serving: dict[str, list[str]], a: str, b: str) -> StoreView:
    """The versions (newest first) with their tags and the replicas serving them, and the diff of
    ``a`` and ``b`` when both are given; a bad name sets ``error`` and the typed error's status."""
    view = StoreView(root=str(root))
    if not (root / "versions").is_dir():
        return view
    from tpmflow.versioning import ModelStore

    view.exists = True
    try:
        store = ModelStore(root)
        by_version: dict[str, list[str]] = {}
        for name, target in store.tags.all().items():
            by_version.setdefault(target, []).append(name)
        for m in store.log():
            served_by = [r for r, names in serving.items() if any(matches(m.id, n) for n in names)]
            view.versions.append(_row(m, by_version.get(m.id, []), served_by))
        if a or b:
            if not (a and b) or len(a) > MAX_NAME or len(b) > MAX_NAME:
                raise InvalidRequest(
                    "give two versions (a tag, an id or a unique id prefix of 6+ hex digits) to compare"
                )
            view.diff = _summary(_diff(str(root), store.resolve(a), store.resolve(b)))
    except TpmflowError as exc:
        view.error, view.status = exc.message, exc.status_code
    except OSError as exc:  # e.g. a store the gateway's user may not read
        view.error, view.status = f"the model store could not be read: {exc.strerror or exc}", 500
    return view


def served_versions(bench: Workbench) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """The replicas (for their table), and replica id -> the versions it serves: its weights' content
    hash and its LoRA adapters (named by version id, or a prefix of one)."""
    replicas = sorted(bench.gw.registry.replicas.values(), key=lambda r: r.info.replica_id)
    rows = [
        {
            "id": r.info.replica_id,
            "group": r.info.group,
            "version": r.info.content_hash,
            "short": short(r.info.content_hash),
            "loras": [short(v) if v.startswith("blake3:") else v for v in r.info.lora_versions],
        }
        for r in replicas
    ]
    return rows, {r.info.replica_id: [r.info.content_hash, *r.info.lora_versions] for r in replicas}


def routes(bench: Workbench) -> list[Any]:
    # A diff rebuilds every changed tensor: one at a time per gateway, so page views cannot crowd
    # out the API's threads (a repeated diff is then served from the cache).
    diffing = asyncio.Semaphore(1)

    async def models_page(request: Request) -> Response:
        session = await bench._session(request)
        if session is None:
            return bench._to_signin(request)
        principal, csrf = session
        a = request.query_params.get("a", "").strip()
        b = request.query_params.get("b", "").strip()
        root = store_root(bench.gw.cfg.model_store)
        replicas, serving = served_versions(bench)
        if a or b:
            async with diffing:
                view = await asyncio.to_thread(read_store, root, serving, a, b)
        else:
            view = await asyncio.to_thread(read_store, root, serving, a, b)
        page = bench._page("models.html", principal, csrf, "models", view=view, replicas=replicas, a=a, b=b)
        page.status_code = view.status
        return page

    return [Route("/ui/models", models_page, methods=["GET"])]
