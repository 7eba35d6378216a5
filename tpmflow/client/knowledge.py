"""Knowledge collections seen from a client: ``client.knowledge("name")`` is a handle (no request
until an operation); items are embedded by the pool, with the model the collection was made with.

    mols = client.knowledge("mols")
    mols.create(adapter="smiles")
    mols.add(["CCO", "c1ccccc1"], metadata=[{"tpsa": 20.2}, {"tpsa": 0.0}])
    hits = mols.search(["CCN"], k=5, filter={"tpsa": 20.2})[0]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tpmflow.errors import AdapterInputError

if TYPE_CHECKING:
    from tpmflow.client._async import AsyncClient
    from tpmflow.client._sync import Client


@dataclass
class KnowledgeHit:
    id: int
    score: float  # cosine similarity, 1 = the same direction
    item: Any
    metadata: dict[str, Any]


@dataclass
class Added:
    """What an add stored: an id per item (None where the adapter refused the item) and why."""

    ids: list[int | None]
    errors: list[AdapterInputError]
    embedder: dict[str, Any]
    usage: dict[str, Any]


def _hits(rows: list[list[dict[str, Any] | None]]) -> list[list[KnowledgeHit]]:
    return [[KnowledgeHit(**h) for h in row if h is not None] for row in rows]


def _added(data: dict[str, Any]) -> Added:
    ids = [entry.get("id") for entry in data["items"]]
    errors = [
        AdapterInputError(entry["error"]["message"], item=entry["index"]) for entry in data["items"] if "error" in entry
    ]
    return Added(ids, errors, data["embedder"], data.get("usage", {}))


def _body(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, **{k: v for k, v in fields.items() if v is not None}}


class Collection:
    """One collection through a :class:`~tpmflow.Client`."""

    def __init__(self, client: Client, name: str) -> None:
        self.client, self.name = client, name

    def _op(self, operation: str, **fields: Any) -> dict[str, Any]:
        return self.client._run(self.client._knowledge(operation, _body(self.name, **fields)))

    def create(
        self,
        adapter: str | None = None,
        pooling: str = "mean",
        visibility: str = "private",
        config: dict[str, Any] | None = None,
        via: str | None = None,
    ) -> dict[str, Any]:
        """Make the collection; its vectors will come from ``adapter`` (None: text; ``config``: the
        adapter's, e.g. its trained part) on the model version the pool serves now. Text is embedded
        by the pool's text embedder when it has one (``via="model"``: by the model's hooks;
        ``via="text-embedder"``: refused without one)."""
        return self._op("create", adapter=adapter, pooling=pooling, visibility=visibility, config=config, via=via)

    def info(self) -> dict[str, Any]:
        return self._op("show")

    def add(self, items: list[Any], metadata: list[dict[str, Any]] | None = None) -> Added:
        return _added(self._op("add", items=items, metadata=metadata))

    def search(
        self,
        queries: list[Any],
        k: int = 10,
        filter: dict[str, Any] | None = None,  # noqa: A002
    ) -> list[list[KnowledgeHit]]:
        return _hits(self._op("search", queries=queries, k=k, filter=filter)["results"])

    def get(self, ids: list[int]) -> list[KnowledgeHit | None]:
        return [None if h is None else KnowledgeHit(**h) for h in self._op("get", ids=ids)["items"]]

    def delete(self, ids: list[int]) -> int:
        return int(self._op("delete", ids=ids)["deleted"])

    def share(
        self, projects: list[str] | None = None, public: bool | None = None, revoke: list[str] | None = None
    ) -> dict[str, Any]:
        """Share read-only with ``projects``, stop sharing with ``revoke``, make it public or not."""
        return self._op("share", projects=projects, public=public, revoke=revoke)

    def drop(self) -> None:
        self._op("drop")

    def reembed(
        self, version: str, batch: int = 256, progress: Callable[[dict[str, Any]], None] | None = None
    ) -> dict[str, Any]:
        """Move the collection to the model version ``version`` (a content hash or a prefix): steps
        of ``batch`` items until every vector is the new model's; searches use the old vectors
        until the last step swaps them. ``progress`` sees each step's answer. Resumable: a step
        that failed is simply sent again."""
        while True:
            step = self._op("reembed", version=version, batch=batch)
            if progress is not None:
                progress(step)
            if step["complete"]:
                return step

    def cancel_reembed(self) -> bool:
        """Stop a re-embedding under way; its new vectors are dropped."""
        return bool(self._op("reembed", cancel=True)["cancelled"])

    def writer(self, batch: int = 64, flush_s: float = 2.0) -> Writer:
        """A background writer: ``put`` returns at once; batches of ``batch`` items (or whatever
        arrived within ``flush_s``) are added by a thread (``Writer``)."""
        return Writer(self, batch, flush_s)


class Writer:
    """Adds items in the background, in batches: ``put`` never waits for the pool, so a thinker
    can record every result as it arrives. ``close`` (or leaving the ``with`` block) sends what is
    left and waits; ``added`` and ``errors`` then hold every batch's outcome, and an exception a
    batch raised is raised there.

        with client.knowledge("runs").writer(batch=64) as out:
            for result in results:
                out.put(result.smiles, {"score": result.value})
    """

    def __init__(self, collection: Collection, batch: int = 64, flush_s: float = 2.0) -> None:
        import queue
        import threading

        if batch < 1:
            raise ValueError("batch must be at least 1")
        self.collection, self.batch, self.flush_s = collection, batch, flush_s
        self.added: list[int] = []
        self.errors: list[AdapterInputError] = []
        self.failure: BaseException | None = None
        self._sent = 0  # items handed to the pool so far
        self._queue: queue.Queue[tuple[Any, dict[str, Any]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=f"tpmflow-writer-{collection.name}", daemon=True)
        self._thread.start()

    def put(self, item: Any, metadata: dict[str, Any] | None = None) -> None:
        if self.failure is not None:
            raise self.failure
        self._queue.put((item, metadata or {}))

    def _run(self) -> None:
        import queue
        import time

        pending: list[tuple[Any, dict[str, Any]]] = []
        deadline = time.monotonic() + self.flush_s
        done = False
        while not done:
            try:
                entry = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                if entry is None:
                    done = True
                else:
                    pending.append(entry)
            except queue.Empty:
                pass
            if pending and (done or len(pending) >= self.batch or time.monotonic() >= deadline):
                self._send(pending)
                pending = []
            if time.monotonic() >= deadline:
                deadline = time.monotonic() + self.flush_s

    def _send(self, entries: list[tuple[Any, dict[str, Any]]]) -> None:
        for start in range(0, len(entries), self.batch):
            chunk = entries[start : start + self.batch]
            try:
                result = self.collection.add([e[0] for e in chunk], [e[1] for e in chunk])
            except BaseException as exc:  # noqa: BLE001 - kept, and raised by put/close in the caller's thread
                self.failure = exc
                return
            self.added += [i for i in result.ids if i is not None]
            # Each error names its item's place among everything put, not within its batch.
            self.errors += [AdapterInputError(e.message, item=self._sent + (e.item or 0)) for e in result.errors]
            self._sent += len(chunk)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        if self.failure is not None:
            raise self.failure

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncCollection:
    """One collection through an :class:`~tpmflow.AsyncClient` (the same operations, awaited)."""

    def __init__(self, client: AsyncClient, name: str) -> None:
        self.client, self.name = client, name

    async def _op(self, operation: str, **fields: Any) -> dict[str, Any]:
        return await self.client._run(self.client._knowledge(operation, _body(self.name, **fields)))

    async def create(
        self,
        adapter: str | None = None,
        pooling: str = "mean",
        visibility: str = "private",
        config: dict[str, Any] | None = None,
        via: str | None = None,
    ) -> dict[str, Any]:
        return await self._op(
            "create", adapter=adapter, pooling=pooling, visibility=visibility, config=config, via=via
        )

    async def info(self) -> dict[str, Any]:
        return await self._op("show")

    async def add(self, items: list[Any], metadata: list[dict[str, Any]] | None = None) -> Added:
        return _added(await self._op("add", items=items, metadata=metadata))

    async def search(
        self,
        queries: list[Any],
        k: int = 10,
        filter: dict[str, Any] | None = None,  # noqa: A002
    ) -> list[list[KnowledgeHit]]:
        return _hits((await self._op("search", queries=queries, k=k, filter=filter))["results"])

    async def get(self, ids: list[int]) -> list[KnowledgeHit | None]:
        return [None if h is None else KnowledgeHit(**h) for h in (await self._op("get", ids=ids))["items"]]

    async def delete(self, ids: list[int]) -> int:
        return int((await self._op("delete", ids=ids))["deleted"])

    async def share(
        self, projects: list[str] | None = None, public: bool | None = None, revoke: list[str] | None = None
    ) -> dict[str, Any]:
        return await self._op("share", projects=projects, public=public, revoke=revoke)

    async def drop(self) -> None:
        await self._op("drop")

    async def reembed(
        self, version: str, batch: int = 256, progress: Callable[[dict[str, Any]], None] | None = None
    ) -> dict[str, Any]:
        while True:
            step = await self._op("reembed", version=version, batch=batch)
            if progress is not None:
                progress(step)
            if step["complete"]:
                return step

    async def cancel_reembed(self) -> bool:
        return bool((await self._op("reembed", cancel=True))["cancelled"])
