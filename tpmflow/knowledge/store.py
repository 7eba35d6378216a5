"""Collections of items and their vectors: who may read and write them, adding, searching,
deleting and sharing. The pool's database holds everything; each collection's vector index is a
file under ``root`` (``tpmflow.knowledge.index``).

Access: a collection belongs to a project. Its principals read and write it; it may be shared
read-only with other projects or made public; to anyone else it does not exist (the same
``CollectionNotFound`` as a name never created, so a private collection's existence and size do
not leak). Every vector of a collection comes from one embedder; another is refused.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import bindparam, func, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tpmflow.access.db import add_columns
from tpmflow.access.principals import Principal
from tpmflow.errors import CollectionNotFound, Forbidden, InvalidRequest
from tpmflow.knowledge.index import Generation, VectorIndex
from tpmflow.knowledge.tables import ADDED_COLUMNS, NAME_PER_PROJECT, CollectionRow, KnowledgeItemRow

log = logging.getLogger("tpmflow.knowledge")

MAX_K = 1000  # neighbours one query may ask for
MAX_BATCH = 10_000  # items one add may carry
OVERSAMPLE = 8  # a filtered search asks the index for this many times k before filtering
REBUILD_BATCH = 20_000
VISIBILITIES = ("private", "shared", "public")


class Embedder(BaseModel):
    """Where a collection's vectors come from: the model version, the adapter (the version the
    pool served, its config and the trained part that config names) and the pooling. Two vectors
    are comparable only when their embedders are equal."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="the model version's content hash")
    adapter: str | None = None
    adapter_version: str | None = Field(
        None, description="name@version of the adapter the pool served, pinned by the first add"
    )
    config: dict[str, Any] | None = Field(None, description="the adapter's config, sent with every embed")
    part: str | None = Field(None, description="the adapter's trained part (projector), as its config names it")
    pooling: str = "mean"
    dim: int = Field(gt=0)
    served_by: Literal["model", "text-embedder"] = Field(
        "model", description="model: the pool's model embeds (its hooks); text-embedder: the pool's text embedder"
    )

    def stored(self) -> str:
        """The JSON the database keeps (and compare-and-set matches): a model-embedded one is written
        without ``served_by``, exactly as before the field existed, so older rows still match."""
        return self.model_dump_json(exclude={"served_by"} if self.served_by == "model" else None)


@dataclass
class Hit:
    id: int
    score: float  # cosine similarity
    item: Any
    metadata: dict[str, Any]


@dataclass
class CollectionInfo:
    name: str
    project: str
    visibility: str
    shared_with: list[str]
    embedder: Embedder
    items: int
    fields: list[str]
    created_by: str
    index_bytes: int = 0
    stored_bytes: int = 0


@dataclass
class StorageBill:
    """Storage one collection held over a billing period, charged to its creator's project."""

    collection: str
    project: str
    principal: str
    stored_bytes: int
    mb_days: float
    since: float
    until: float


@dataclass
class ReembedState:
    """A collection's move to a new embedder: the target (None: none under way), its live items,
    how many still lack a new vector, and the next of them to embed."""

    target: Embedder | None
    items: int
    remaining: int
    todo: list[tuple[int, Any]]


@dataclass
class _Open:
    """A collection's index in memory, guarded by its own lock (opened, or rebuilt, under it: one
    collection's rebuild never stalls another's searches)."""

    index: VectorIndex | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    dirty: int = 0  # changes since the file was saved


class KnowledgeStore:
    """Collections over one database and one folder of index files; safe to share between threads."""

    def __init__(self, engine: Engine, root: Path, save_every: int = 5000) -> None:
        self.engine = engine
        self.root = root
        self.save_every = save_every
        CollectionRow.metadata.create_all(engine, tables=[CollectionRow.__table__, KnowledgeItemRow.__table__])
        add_columns(engine, ADDED_COLUMNS)
        _names_per_project(engine)
        self._open: dict[tuple[int, int], _Open] = {}  # by (collection id, epoch)
        self._lock = threading.Lock()

    # -- collections ---------------------------------------------------------------------------

    def create(
        self, principal: Principal, name: str, embedder: Embedder, visibility: str = "private"
    ) -> CollectionInfo:
        _check_name(name)
        if visibility not in VISIBILITIES:
            raise InvalidRequest(f"visibility must be one of {', '.join(VISIBILITIES)}, not {visibility!r}")
        row = CollectionRow(
            name=name,
            project=principal.project,
            visibility=visibility,
            shared_with="",
            embedder=embedder.stored(),
            dim=embedder.dim,
            fields="[]",
            created=(now := time.time()),
            created_by=principal.name,
            billed_until=now,
            live=0,
            max_id=0,
            deleted=0,
            epoch=0,
        )
        try:
            with Session(self.engine) as s, s.begin():
                s.add(row)
        except IntegrityError:
            raise InvalidRequest(f"your project {principal.project!r} has a collection named {name!r}") from None
        return self.show(principal, name)

    def list(self, principal: Principal) -> list[CollectionInfo]:
        with Session(self.engine) as s:
            rows = s.scalars(select(CollectionRow).order_by(CollectionRow.name)).all()
        return [self._info(row) for row in rows if _readable(row, principal)]

    def show(self, principal: Principal, name: str) -> CollectionInfo:
        return self._info(self._collection(principal, name))

    def share(
        self,
        principal: Principal,
        name: str,
        projects: list[str] | None = None,
        public: bool | None = None,
        revoke: list[str] | None = None,
    ) -> CollectionInfo:
        """Share read-only with ``projects`` (besides those already), stop sharing with ``revoke``,
        and make it public (``public=True``) or not (``False``: shared, or private when shared with
        none). Only the owning project may."""
        row = self._collection(principal, name, write=True)
        for project in [*(projects or []), *(revoke or [])]:
            if (
                not project
                or len(project) > 64
                or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in project)
            ):
                raise InvalidRequest(f"not a project name: {project!r}")
        shared = (set(filter(None, row.shared_with.split(","))) | set(projects or [])) - set(revoke or [])
        if public or (public is None and row.visibility == "public"):
            visibility = "public"
        else:
            visibility = "shared" if shared else "private"
        with self.engine.begin() as conn:
            conn.execute(
                update(CollectionRow)
                .where(CollectionRow.id == row.id)
                .values(shared_with=",".join(sorted(shared)), visibility=visibility)
            )
        return self.show(principal, name)

    def drop(self, principal: Principal, name: str) -> None:
        row = self._collection(principal, name, write=True)
        with self.engine.begin() as conn:
            conn.execute(KnowledgeItemRow.__table__.delete().where(KnowledgeItemRow.collection_id == row.id))
            conn.execute(CollectionRow.__table__.delete().where(CollectionRow.id == row.id))
        self._forget_indexes(row.id)

    def _forget_indexes(self, collection_id: int, keep_epoch: int | None = None) -> None:
        """Close and delete a collection's index files (all, or all but ``keep_epoch``'s)."""
        with self._lock:
            for key in [k for k in self._open if k[0] == collection_id and k[1] != keep_epoch]:
                del self._open[key]
        for path in self.root.glob(f"collection-{collection_id}[-.]*"):  # and names from before epochs
            if keep_epoch is None or not path.stem.endswith(f"-e{keep_epoch}"):
                path.unlink(missing_ok=True)

    # -- items ---------------------------------------------------------------------------------

    def add(
        self,
        principal: Principal,
        name: str,
        items: list[Any],
        vectors: np.ndarray,
        embedder: Embedder,
        metadata: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """Add items with their vectors (made by ``embedder``); returns their ids once committed.
        All or nothing: a batch with one bad vector or record adds none."""
        row = self._collection(principal, name, write=True)
        stored = Embedder.model_validate_json(row.embedder)
        if embedder != stored:
            raise InvalidRequest(
                f"collection {name!r} holds vectors of {stored.model_dump()}; these come from "
                f"{embedder.model_dump()}: re-embed the collection for a new model (tpmflow knowledge reembed)"
            )
        metadata = metadata if metadata is not None else [{} for _ in items]
        vectors = _check_vectors(vectors, row.dim, len(items))
        if len(metadata) != len(items):
            raise InvalidRequest(f"{len(items)} items but {len(metadata)} metadata records")
        if len(items) > MAX_BATCH:
            raise InvalidRequest(f"one add takes at most {MAX_BATCH} items; this has {len(items)}")
        encoded = [
            (_json(item, "item", i), _json(meta, "metadata", i))
            for i, (item, meta) in enumerate(zip(items, metadata, strict=True))
        ]
        for i, meta in enumerate(metadata):
            if not isinstance(meta, dict):
                raise InvalidRequest(f"metadata {i} is not an object", item=i)
        now = time.time()
        with Session(self.engine) as s, s.begin():
            # The collection's row first: it locks the row (PostgreSQL) or the database (SQLite), so
            # adds to one collection commit in id order, and one dropped meanwhile adds nothing.
            # Only while its embedder is still the one these vectors came from (a re-embedding may
            # have finished since the row was read).
            locked = s.execute(
                update(CollectionRow)
                .where(CollectionRow.id == row.id, CollectionRow.embedder == row.embedder)
                .values(live=CollectionRow.live + len(items))
            ).rowcount
            if not locked:
                if s.scalar(select(CollectionRow.id).where(CollectionRow.id == row.id)) is None:
                    raise CollectionNotFound(f"no collection named {name!r} that you can read")
                raise InvalidRequest(f"collection {name!r} was re-embedded for another model meanwhile: add again")
            new = [
                KnowledgeItemRow(
                    collection_id=row.id,
                    item=item,
                    meta=meta,
                    vector=vec.tobytes(),
                    added_by=principal.name,
                    added_at=now,
                )
                for (item, meta), vec in zip(encoded, vectors, strict=True)
            ]
            s.add_all(new)
            s.flush()
            ids = [r.id for r in new]
            known = s.scalar(select(CollectionRow.fields).where(CollectionRow.id == row.id)) or "[]"
            fields = sorted(set(json.loads(known)) | {k for meta in metadata for k in meta})
            larger = func.max if self.engine.dialect.name == "sqlite" else func.greatest  # of two values
            s.execute(
                update(CollectionRow)
                .where(CollectionRow.id == row.id)
                .values(fields=json.dumps(fields), max_id=larger(max(ids), CollectionRow.max_id))
            )
        # Committed: the items are acknowledged. The index catches up now; if that fails, the
        # next operation on the collection opens (or rebuilds) it again.
        self._after_commit(row, len(ids))
        return ids

    def search(
        self,
        principal: Principal,
        name: str,
        queries: np.ndarray,
        k: int = 10,
        filter: dict[str, Any] | None = None,  # noqa: A002 - the word users know
        embedder: Embedder | None = None,
    ) -> list[list[Hit]]:
        """The ``k`` nearest items of each query row by cosine similarity, best first; with
        ``filter``, only items whose metadata has those values. ``embedder``: what made the
        queries, refused if the collection has been re-embedded by another since."""
        row = self._collection(principal, name)
        if embedder is not None and Embedder.model_validate_json(row.embedder) != embedder:
            raise InvalidRequest(f"collection {name!r} was re-embedded for another model meanwhile: search again")
        queries = _check_vectors(np.atleast_2d(np.asarray(queries, dtype=np.float32)), row.dim, None)
        check_search(row, len(queries), k, filter)
        opened = self._index(row)
        with opened.lock:
            # Items another process added or deleted since, by the counters read with the row.
            index = self._sync(row, opened, Generation(row.live, row.max_id, row.deleted))
            ids, dist = index.search(queries, k * OVERSAMPLE if filter else k)
        wanted = {int(i) for i in ids.ravel() if i >= 0}
        records = self._records(row.id, wanted)
        out: list[list[Hit]] = []
        for qi, query in enumerate(queries):
            hits = [
                Hit(int(i), 1.0 - float(d), *records[int(i)])
                for i, d in zip(ids[qi], dist[qi], strict=True)
                if i >= 0 and int(i) in records and _matches(records[int(i)][1], filter)
            ]
            if filter and len(hits) < k:
                hits = self._exact(row, query, k, filter)  # a selective filter: exact over its matches
            out.append(hits[:k])
        return out

    def get(self, principal: Principal, name: str, ids: list[int]) -> list[Hit | None]:
        row = self._collection(principal, name)
        records = self._records(row.id, set(ids))
        return [Hit(i, 1.0, *records[i]) if i in records else None for i in ids]

    def delete(self, principal: Principal, name: str, ids: list[int]) -> int:
        row = self._collection(principal, name, write=True)
        with self.engine.begin() as conn:
            # The collection's row first, as adds and re-embedding lock it (PostgreSQL: no deadlock).
            conn.execute(update(CollectionRow).where(CollectionRow.id == row.id).values(deleted=CollectionRow.deleted))
            done = conn.execute(
                update(KnowledgeItemRow)
                .where(
                    KnowledgeItemRow.collection_id == row.id,
                    KnowledgeItemRow.id.in_(ids),
                    KnowledgeItemRow.deleted.is_(False),
                )
                .values(deleted=True)
            ).rowcount
            conn.execute(
                update(CollectionRow)
                .where(CollectionRow.id == row.id)
                .values(live=CollectionRow.live - done, deleted=CollectionRow.deleted + done)
            )
        self._after_commit(row, int(done or 0))
        return int(done or 0)

    def pin_adapter(
        self, principal: Principal, name: str, embedder: Embedder, served: str, which: str = "embedder"
    ) -> Embedder:
        """Record the adapter version the pool served for an embedder that has none yet (its first
        add; ``which``: ``next_embedder`` for a re-embedding). Another process may have pinned it
        first: then its pin must agree."""
        pinned = embedder.model_copy(update={"adapter_version": served})
        column = getattr(CollectionRow, which)
        row = self._collection(principal, name)
        with self.engine.begin() as conn:
            conn.execute(
                update(CollectionRow)
                .where(CollectionRow.id == row.id, column == embedder.stored())
                .values({which: pinned.stored()})
            )
        now = getattr(self._collection(principal, name), which)
        if now is None or Embedder.model_validate_json(now) != pinned:
            raise InvalidRequest(f"collection {name!r} is embedded by another adapter version than {served}")
        return pinned

    # -- re-embedding for a new model version ----------------------------------------------------

    def reembed_start(self, principal: Principal, name: str, target: Embedder) -> ReembedState:
        """Begin (or go on with) moving the collection to ``target``. Searches keep using the
        current vectors and index until every item has its new vector (``reembed_finish``)."""
        row = self._collection(principal, name, write=True)
        unpinned = {"adapter_version": None}  # the served adapter version is pinned by the first step
        moving = Embedder.model_validate_json(row.next_embedder) if row.next_embedder is not None else None
        if moving is not None and moving.model_copy(update=unpinned) != target.model_copy(update=unpinned):
            raise InvalidRequest(
                f"collection {name!r} is being re-embedded for {moving.model[:19]}; finish that or cancel it first"
            )
        if row.next_embedder is None:
            with self.engine.begin() as conn:
                started = conn.execute(
                    update(CollectionRow)
                    .where(CollectionRow.id == row.id, CollectionRow.next_embedder.is_(None))
                    .values(next_embedder=target.stored())
                ).rowcount
                if started:  # new vectors left by a move that raced a cancel or a finish go
                    conn.execute(
                        update(KnowledgeItemRow)
                        .where(KnowledgeItemRow.collection_id == row.id, KnowledgeItemRow.next_vector.is_not(None))
                        .values(next_vector=None)
                    )
            if not started:  # another start won: go on only if it moves to the same place
                return self.reembed_start(principal, name, target)
        return self.reembed_state(principal, name)

    def reembed_state(self, principal: Principal, name: str, limit: int = 0) -> ReembedState:
        """How far the move is, and up to ``limit`` items still to embed (id, item)."""
        row = self._collection(principal, name)
        todo_where = _lacking_new_vector(row.id)
        with Session(self.engine) as s:
            remaining = int(s.scalar(select(func.count()).where(*todo_where)) or 0)
            todo = (
                s.execute(
                    select(KnowledgeItemRow.id, KnowledgeItemRow.item)
                    .where(*todo_where)
                    .order_by(KnowledgeItemRow.id)
                    .limit(limit)
                ).all()
                if limit and row.next_embedder is not None
                else []
            )
        target = Embedder.model_validate_json(row.next_embedder) if row.next_embedder else None
        return ReembedState(
            target, row.live, remaining if target else 0, [(int(i), json.loads(item)) for i, item in todo]
        )

    def reembed_store(
        self, principal: Principal, name: str, target: Embedder, ids: list[int], vectors: np.ndarray
    ) -> int:
        """Keep the new vectors of ``ids``, if the collection is still moving to ``target``."""
        row = self._collection(principal, name, write=True)
        vectors = _check_vectors(vectors, target.dim, len(ids))
        with self.engine.begin() as conn:
            # Still moving to target, checked and locked in the same transaction as the write: a
            # cancel or a finish that commits first makes this write nothing.
            moving = conn.execute(
                update(CollectionRow)
                .where(CollectionRow.id == row.id, CollectionRow.next_embedder == target.stored())
                .values(next_embedder=CollectionRow.next_embedder)
            ).rowcount
            if not moving:
                raise InvalidRequest(f"collection {name!r} is no longer being re-embedded for {target.model[:19]}")
            conn.execute(
                update(KnowledgeItemRow)
                .where(KnowledgeItemRow.collection_id == row.id, KnowledgeItemRow.id == bindparam("item_id"))
                .values(next_vector=bindparam("vec")),
                [{"item_id": i, "vec": v.tobytes()} for i, v in zip(ids, vectors, strict=True)],
            )
        return len(ids)

    def reembed_finish(self, principal: Principal, name: str) -> bool:
        """Swap in the new vectors and embedder, in one transaction, once every live item has its
        new vector (False: some have not, e.g. added meanwhile). The new index is built before this
        returns; the old one is deleted."""
        row = self._collection(principal, name, write=True)
        if row.next_embedder is None:
            return False
        target = Embedder.model_validate_json(row.next_embedder)
        with Session(self.engine) as s, s.begin():
            # The row first: adds to this collection wait for the swap, and then see the new embedder.
            locked = s.execute(
                update(CollectionRow)
                .where(CollectionRow.id == row.id, CollectionRow.next_embedder == row.next_embedder)
                .values(epoch=CollectionRow.epoch + 1)
            ).rowcount
            missing = s.scalar(select(func.count()).where(*_lacking_new_vector(row.id)))
            if not locked or missing:
                s.rollback()
                return False
            s.execute(
                update(KnowledgeItemRow)
                .where(KnowledgeItemRow.collection_id == row.id, KnowledgeItemRow.deleted.is_(False))
                .values(vector=KnowledgeItemRow.next_vector, next_vector=None)
            )
            s.execute(
                update(CollectionRow)
                .where(CollectionRow.id == row.id)
                .values(embedder=row.next_embedder, next_embedder=None, dim=target.dim)
            )
        fresh = self._collection(principal, name)
        opened = self._index(fresh)
        with opened.lock:
            self._sync(fresh, opened)  # built from the new vectors now, not by the next search
            if opened.index is not None:
                opened.index.save()
        self._forget_indexes(row.id, keep_epoch=fresh.epoch)
        return True

    def reembed_cancel(self, principal: Principal, name: str) -> bool:
        """Stop a move: the new vectors made so far are dropped; nothing else changes."""
        row = self._collection(principal, name, write=True)
        if row.next_embedder is None:
            return False
        with self.engine.begin() as conn:
            cancelled = conn.execute(
                update(CollectionRow)
                .where(CollectionRow.id == row.id, CollectionRow.next_embedder == row.next_embedder)
                .values(next_embedder=None)
            ).rowcount
            if cancelled:
                conn.execute(
                    update(KnowledgeItemRow).where(KnowledgeItemRow.collection_id == row.id).values(next_vector=None)
                )
        return bool(cancelled)

    def flush(self) -> None:
        """Save every changed index now (a clean shutdown; a crash only costs a rebuild)."""
        with self._lock:
            opened = list(self._open.items())
        for _, o in opened:
            with o.lock:
                if o.dirty and o.index is not None:
                    o.index.save()
                    o.dirty = 0

    def readable(self, principal: Principal, name: str) -> CollectionRow:
        """The collection's row, if ``principal`` may read it (else ``CollectionNotFound``)."""
        return self._collection(principal, name)

    def writable(self, principal: Principal, name: str) -> CollectionRow:
        """The collection's row, if ``principal`` may add to it (else ``CollectionNotFound``/``Forbidden``)."""
        return self._collection(principal, name, write=True)

    # -- internals -----------------------------------------------------------------------------

    def _collection(self, principal: Principal, name: str, write: bool = False) -> CollectionRow:
        # A Core row (same attributes as the ORM object): every search reads it, and an ORM session
        # costs more than the index's own search.
        project, _, bare = name.rpartition("/")  # "project/name" names another project's shared one
        query = select(CollectionRow.__table__).where(CollectionRow.name == bare)
        if project:
            query = query.where(CollectionRow.project == project)
        with self.engine.connect() as conn:
            rows = [r for r in conn.execute(query).all() if _readable(r, principal)]
        own = [r for r in rows if r.project == principal.project]
        if own or len(rows) == 1:
            row = (own or rows)[0]
        elif rows:
            projects = ", ".join(sorted(r.project for r in rows))
            raise InvalidRequest(
                f"collections named {bare!r} of several projects ({projects}) are readable: say PROJECT/{bare}"
            )
        else:
            raise CollectionNotFound(f"no collection named {name!r} that you can read")
        if write and not (row.project == principal.project or principal.can("admin")):
            raise Forbidden(f"collection {name!r} belongs to project {row.project!r}: read only for you")
        return row

    def bill_storage(self, now: float | None = None) -> list[StorageBill]:
        """What each collection stored since it was last billed, claimed for billing: several
        gateways on one database each call this, and each period is claimed by exactly one. The
        bytes held now stand for the whole period (billing hourly keeps that close)."""
        now = time.time() if now is None else now
        with Session(self.engine) as s:
            rows = s.execute(
                select(
                    CollectionRow.id,
                    CollectionRow.name,
                    CollectionRow.project,
                    CollectionRow.created_by,
                    CollectionRow.billed_until,
                    CollectionRow.created,
                )
            ).all()
        bills = []
        for cid, name, project, creator, claimed_until, created in rows:
            since = max(claimed_until, created)  # a database from before billing holds 0 here
            if since >= now:
                continue
            stored = self._stored_bytes(cid)
            with self.engine.begin() as conn:
                claimed = conn.execute(
                    update(CollectionRow)
                    .where(CollectionRow.id == cid, CollectionRow.billed_until == claimed_until)
                    .values(billed_until=now)
                ).rowcount
            if claimed and stored:  # an empty collection owes nothing: no row
                mb_days = stored / 1e6 * (now - since) / 86400.0
                bills.append(StorageBill(name, project, creator, stored, mb_days, since, now))
        return bills

    def _stored_bytes(self, collection_id: int) -> int:
        """Bytes of the live items' rows: vector, item and metadata (the index file is extra)."""
        with Session(self.engine) as s:
            stored = s.scalar(
                select(
                    func.coalesce(
                        func.sum(
                            func.length(KnowledgeItemRow.vector)
                            + func.length(KnowledgeItemRow.item)
                            + func.length(KnowledgeItemRow.meta)
                        ),
                        0,
                    )
                ).where(KnowledgeItemRow.collection_id == collection_id, KnowledgeItemRow.deleted.is_(False))
            )
        return int(stored or 0)

    def _info(self, row: CollectionRow) -> CollectionInfo:
        stored = self._stored_bytes(row.id)
        path = self._index_path(row.id, row.epoch)
        return CollectionInfo(
            name=row.name,
            project=row.project,
            visibility=row.visibility,
            shared_with=[p for p in row.shared_with.split(",") if p],
            embedder=Embedder.model_validate_json(row.embedder),
            items=row.live,
            fields=json.loads(row.fields),
            created_by=row.created_by,
            index_bytes=path.stat().st_size if path.exists() else 0,
            stored_bytes=stored,
        )

    def _generation(self, collection_id: int) -> Generation:
        """What the database holds for a collection (its counters, kept with the items)."""
        with Session(self.engine) as s:
            found = s.execute(
                select(CollectionRow.live, CollectionRow.max_id, CollectionRow.deleted).where(
                    CollectionRow.id == collection_id
                )
            ).one_or_none()
        live, max_id, deleted = found or (0, 0, 0)
        return Generation(live=int(live or 0), max_id=int(max_id or 0), deleted=int(deleted or 0))

    def _index_path(self, collection_id: int, epoch: int = 0) -> Path:
        return self.root / f"collection-{collection_id}-e{epoch}.usearch"

    def _index(self, row: CollectionRow) -> _Open:
        """The collection's entry (its index is opened by ``_sync``, under the entry's own lock);
        one per embedder the collection has had (``epoch``), so a re-embedded one opens afresh."""
        with self._lock:
            return self._open.setdefault((row.id, row.epoch), _Open())

    def _vectors(
        self, collection_id: int, dim: int, after: int = 0, upto: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Every live item's id and vector (with an id over ``after``, and at most ``upto``), in batches."""
        last = after
        while True:
            with Session(self.engine) as s:
                batch = s.execute(
                    select(KnowledgeItemRow.id, KnowledgeItemRow.vector)
                    .where(
                        KnowledgeItemRow.collection_id == collection_id,
                        KnowledgeItemRow.deleted.is_(False),
                        KnowledgeItemRow.id > last,
                        KnowledgeItemRow.id <= (upto if upto is not None else 2**62),
                    )
                    .order_by(KnowledgeItemRow.id)
                    .limit(REBUILD_BATCH)
                ).all()
            if not batch:
                return
            last = batch[-1][0]
            yield (
                np.asarray([r[0] for r in batch], dtype=np.int64),
                np.frombuffer(b"".join(r[1] for r in batch), dtype=np.float32).reshape(len(batch), dim),
            )

    def _records(self, collection_id: int, ids: set[int]) -> dict[int, tuple[Any, dict[str, Any]]]:
        wanted, rows = sorted(ids), []
        with self.engine.connect() as conn:
            for start in range(0, len(wanted), 5000):  # under every driver's parameter limit
                rows += conn.execute(
                    select(KnowledgeItemRow.id, KnowledgeItemRow.item, KnowledgeItemRow.meta).where(
                        KnowledgeItemRow.collection_id == collection_id,
                        KnowledgeItemRow.id.in_(wanted[start : start + 5000]),
                        KnowledgeItemRow.deleted.is_(False),
                    )
                ).all()
        return {r[0]: (json.loads(r[1]), json.loads(r[2])) for r in rows}

    def _exact(self, row: CollectionRow, query: np.ndarray, k: int, filter: dict[str, Any]) -> list[Hit]:  # noqa: A002
        """Exact cosine search over the items ``filter`` matches (the index alone would miss them)."""
        hits: list[Hit] = []
        q = query / max(float(np.linalg.norm(query)), 1e-12)
        for ids, vectors in self._vectors(row.id, row.dim):
            records = self._records(row.id, {int(i) for i in ids})
            keep = [j for j, i in enumerate(ids) if int(i) in records and _matches(records[int(i)][1], filter)]
            if not keep:
                continue
            v = vectors[keep]
            scores = v @ q / np.maximum(np.linalg.norm(v, axis=1), 1e-12)
            hits += [Hit(int(ids[j]), float(s), *records[int(ids[j])]) for j, s in zip(keep, scores, strict=True)]
        return sorted(hits, key=lambda h: -h.score)[:k]

    def _after_commit(self, row: CollectionRow, changed: int) -> None:
        """The index after a committed add or delete: caught up and saved now and then. A failure
        here loses nothing (the database has it all): logged, and the index is opened afresh next time."""
        opened = self._index(row)
        with opened.lock:
            try:
                self._sync(row, opened)
                opened.dirty += changed
                self._maybe_save(opened)
            except Exception:  # noqa: BLE001 - acknowledged already; never turn it into an error
                log.exception("updating the index of collection %s failed; it is reopened next time", row.name)
                opened.index = None

    def _maybe_save(self, opened: _Open) -> None:
        if opened.index is not None and opened.dirty >= self.save_every:
            opened.index.save()
            opened.dirty = 0

    def _sync(self, row: CollectionRow, opened: _Open, gen: Generation | None = None) -> VectorIndex:
        """Open the index if need be and bring it up to the database: items added since (by any
        process), deletions since. Called under ``opened.lock``; returns the index.

        Adds to one collection are serialised by its row (``add``), so ids commit in order and
        everything up to the newest id read is there to read. A count that still disagrees while
        nothing changed meanwhile means a broken file: the index is rebuilt. ``gen``: the counters
        the caller just read with the collection's row (a search saves a query; an older one than
        the index holds only costs a re-read of the deleted ids)."""
        gen = gen or self._generation(row.id)
        if opened.index is None:
            opened.index = VectorIndex.open(
                self._index_path(row.id, row.epoch),
                row.dim,
                gen,
                lambda: self._vectors(row.id, row.dim, upto=gen.max_id),
            )
        index = opened.index
        held = index.held
        if gen == held:
            return index
        if gen.max_id > held.max_id:
            for ids, vectors in self._vectors(row.id, row.dim, after=held.max_id, upto=gen.max_id):
                index.add(ids, vectors)
        deleted = held.deleted
        if gen.deleted != held.deleted:
            gone = self._deleted_ids(row.id)
            index.remove(gone)
            deleted = len(gone)
        index.held = Generation(live=len(index), max_id=max(gen.max_id, held.max_id), deleted=deleted)
        if len(index) != gen.live and self._generation(row.id) == gen:  # nothing raced: the file was wrong
            log.warning(
                "index of collection %s holds %d items, the database %d: rebuilding", row.name, len(index), gen.live
            )
            self._index_path(row.id, row.epoch).unlink(missing_ok=True)
            opened.index = VectorIndex.open(
                self._index_path(row.id, row.epoch),
                row.dim,
                gen,
                lambda: self._vectors(row.id, row.dim, upto=gen.max_id),
            )
        return opened.index

    def _deleted_ids(self, collection_id: int) -> list[int]:
        with Session(self.engine) as s:
            return list(
                s.scalars(
                    select(KnowledgeItemRow.id).where(
                        KnowledgeItemRow.collection_id == collection_id, KnowledgeItemRow.deleted.is_(True)
                    )
                ).all()
            )


def _readable(row: CollectionRow, principal: Principal) -> bool:
    return (
        row.visibility == "public"
        or row.project == principal.project
        or principal.can("admin")
        or (row.visibility == "shared" and bool(principal.project) and principal.project in row.shared_with.split(","))
    )


MAX_RESULTS = 10_000  # queries x k of one search


def check_search(row: CollectionRow, queries: int, k: int, filter: dict[str, Any] | None) -> None:  # noqa: A002
    """Refuse a search that cannot be answered, before anything is computed for it."""
    if not 1 <= k <= MAX_K:
        raise InvalidRequest(f"k must be between 1 and {MAX_K}, not {k}")
    if queries * k > MAX_RESULTS:
        raise InvalidRequest(f"{queries} queries x k={k} asks for over {MAX_RESULTS} results: split the search")
    if filter:
        fields = json.loads(row.fields)
        unknown = sorted(set(filter) - set(fields))
        if unknown:
            raise InvalidRequest(
                f"collection {row.name!r} has no metadata field {', '.join(map(repr, unknown))}; "
                f"its fields: {', '.join(fields) or 'none'}"
            )


def _lacking_new_vector(collection_id: int) -> tuple[Any, ...]:
    """Where-clauses of a collection's live items that a re-embedding has not reached yet."""
    return (
        KnowledgeItemRow.collection_id == collection_id,
        KnowledgeItemRow.deleted.is_(False),
        KnowledgeItemRow.next_vector.is_(None),
    )


def _names_per_project(engine: Engine) -> None:
    """Databases made when collection names were unique in the whole pool: that index goes, names
    become unique per project (idempotent)."""
    from sqlalchemy import inspect, text

    indexes = inspect(engine).get_indexes("knowledge_collections")
    statements = [
        stmt
        for ix in indexes
        if ix["column_names"] == ["name"] and ix.get("unique")
        for stmt in (
            f"DROP INDEX IF EXISTS {ix['name']}",
            f"CREATE INDEX IF NOT EXISTS {ix['name']} ON knowledge_collections (name)",
        )
    ]
    if not any(ix["name"] == NAME_PER_PROJECT for ix in indexes):
        statements.append(
            f"CREATE UNIQUE INDEX IF NOT EXISTS {NAME_PER_PROJECT} ON knowledge_collections (project, name)"
        )
    for stmt in statements:  # another process (a gateway's worker) may be doing the same: both fine
        try:
            with engine.begin() as conn:
                conn.execute(text(stmt))
        except Exception:  # noqa: BLE001 - a concurrent twin ran it first; IF (NOT) EXISTS makes the result the same
            log.debug("knowledge index migration %r raced another process", stmt)


def _check_name(name: str) -> None:
    if not (1 <= len(name) <= 128) or not all((c.isascii() and c.isalnum()) or c in "-_." for c in name):
        raise InvalidRequest(f"a collection name is 1-128 ASCII letters, digits, '-', '_' or '.'; not {name!r}")


def _check_vectors(vectors: Any, dim: int, n: int | None) -> np.ndarray:
    try:
        array = np.asarray(vectors, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"vectors are not numbers: {exc}") from None
    if array.ndim != 2 or array.shape[1] != dim:
        raise InvalidRequest(f"vectors must be [n, {dim}] (the collection's embedder's size); got {list(array.shape)}")
    if n is not None and array.shape[0] != n:
        raise InvalidRequest(f"{n} items but {array.shape[0]} vectors")
    bad = np.flatnonzero(~np.isfinite(array).all(axis=1))
    if len(bad):
        raise InvalidRequest(f"vector {int(bad[0])} has NaN or infinite values", item=int(bad[0]))
    norms = np.linalg.norm(array, axis=1)
    if (norms == 0).any():
        raise InvalidRequest(f"vector {int(np.flatnonzero(norms == 0)[0])} is all zeros: no direction to compare")
    return np.ascontiguousarray(array)


def _json(value: Any, what: str, index: int) -> str:
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"{what} {index} is not JSON: {exc}", item=index) from None
    return text


def _matches(meta: dict[str, Any], filter: dict[str, Any] | None) -> bool:  # noqa: A002
    return not filter or all(meta.get(k) == v for k, v in filter.items())


def recall_at_k(found: list[list[int]], truth: list[list[int]]) -> float:
    """Mean fraction of the true ``k`` nearest that were found (tests and bench)."""
    return (
        float(np.mean([len(set(f) & set(t)) / max(1, len(t)) for f, t in zip(found, truth, strict=True)]))
        if truth
        else math.nan
    )
