"""The knowledge store's core (issue 17, first part): collections in the pool's database with a
usearch index beside them. Exact NumPy search is the ground truth; the database is the truth for
durability (a SIGKILL mid-ingestion loses no acknowledged item, a corrupt or missing index file is
rebuilt); another project cannot read, search or learn the size of a private collection; bad input
is a typed error and adds nothing. Runs on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tpmflow.access.principals import Principal
from tpmflow.errors import CollectionNotFound, Forbidden, InvalidRequest
from tpmflow.knowledge import Embedder, KnowledgeStore, recall_at_k

DIM = 64
EMBEDDER = Embedder(model="blake3:" + "a" * 64, adapter="smiles", pooling="mean", dim=DIM)


def _who(project: str, name: str = "", admin: bool = False) -> Principal:
    perms = frozenset({"generate", "embed"} | ({"admin"} if admin else set()))
    return Principal(name or f"{project}-user", project, perms, "interactive", "salt")


def _name() -> str:
    return "c-" + uuid.uuid4().hex[:10]


@pytest.fixture()
def store(access: Any, tmp_path: Path) -> KnowledgeStore:
    return KnowledgeStore(access.engine, tmp_path / "indexes")


def _exact(vectors: np.ndarray, queries: np.ndarray, k: int) -> list[list[int]]:
    v = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    return [list(np.argsort(-row)[:k]) for row in q @ v.T]


def test_add_search_get_delete_and_filters(store: KnowledgeStore) -> None:
    chem = _who("chem")
    name = _name()
    store.create(chem, name, EMBEDDER)
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(200, DIM)).astype(np.float32)
    items = [f"C{'C' * i}O" for i in range(200)]
    meta = [{"tpsa": float(i), "batch": i % 4} for i in range(200)]
    ids = store.add(chem, name, items, vectors, EMBEDDER, meta)
    assert len(ids) == 200 and len(set(ids)) == 200
    (hits,) = store.search(chem, name, vectors[7], k=5)
    assert hits[0].id == ids[7] and hits[0].item == items[7] and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[0].metadata == {"tpsa": 7.0, "batch": 3}
    truth = _exact(vectors, vectors[:20], 10)
    found = [[ids.index(h.id) for h in row] for row in store.search(chem, name, vectors[:20], k=10)]
    assert recall_at_k(found, truth) == 1.0  # a collection this small is searched exactly (EXACT_UP_TO)
    (filtered,) = store.search(chem, name, vectors[7], k=5, filter={"batch": 2})
    assert len(filtered) == 5 and all(h.metadata["batch"] == 2 for h in filtered)
    # A filter few items match still finds them all (exact over the matches).
    store.add(chem, name, ["rare"], rng.normal(size=(1, DIM)), EMBEDDER, [{"batch": 99}])
    (rare,) = store.search(chem, name, vectors[7], k=3, filter={"batch": 99})
    assert [h.item for h in rare] == ["rare"]
    # Deletes are visible to the next query; get returns None for them.
    assert store.delete(chem, name, [ids[7]]) == 1
    (after,) = store.search(chem, name, vectors[7], k=5)
    assert ids[7] not in [h.id for h in after]
    assert store.get(chem, name, [ids[7], ids[8]])[0] is None
    assert store.get(chem, name, [ids[8]])[0].item == items[8]  # type: ignore[union-attr]
    info = store.show(chem, name)
    assert info.items == 200 and info.fields == ["batch", "tpsa"] and info.stored_bytes > 200 * DIM * 4


def test_other_projects_cannot_read_search_or_size_a_private_collection(store: KnowledgeStore) -> None:
    chem, bio = _who("chem"), _who("bio")
    name = _name()
    store.create(chem, name, EMBEDDER)
    store.add(chem, name, ["CCO"], np.ones((1, DIM)), EMBEDDER)
    missing = _name()
    for call in (
        lambda n: store.show(bio, n),
        lambda n: store.search(bio, n, np.ones(DIM), k=1),
        lambda n: store.get(bio, n, [1]),
        lambda n: store.add(bio, n, ["x"], np.ones((1, DIM)), EMBEDDER),
    ):
        with pytest.raises(CollectionNotFound) as private:
            call(name)
        with pytest.raises(CollectionNotFound) as absent:
            call(missing)
        assert str(private.value).replace(name, "X") == str(absent.value).replace(missing, "X"), "no leak"
    assert name not in [c.name for c in store.list(bio)]
    # Shared read-only: bio reads and searches, cannot write; public: anyone reads.
    store.share(chem, name, projects=["bio"])
    assert store.search(bio, name, np.ones(DIM), k=1)[0][0].item == "CCO"
    with pytest.raises(Forbidden, match="read only"):
        store.add(bio, name, ["x"], np.ones((1, DIM)), EMBEDDER)
    with pytest.raises(Forbidden):
        store.share(bio, name, public=True)
    store.share(chem, name, public=True)
    assert store.show(_who("physics"), name).visibility == "public"
    assert store.show(_who("ops", admin=True), name).items == 1
    # Taken back: public -> shared with bio only -> private; nobody but chem (and admins) reads it.
    assert store.share(chem, name, public=False).visibility == "shared"
    with pytest.raises(CollectionNotFound):
        store.show(_who("physics"), name)
    assert store.share(chem, name, revoke=["bio"]).visibility == "private"
    with pytest.raises(CollectionNotFound):
        store.search(bio, name, np.ones(DIM), k=1)
    with pytest.raises(InvalidRequest, match="not a project name"):
        store.share(chem, name, projects=["a,b"])
    assert not _readable_by_empty_project(store, name)


def _readable_by_empty_project(store: KnowledgeStore, name: str) -> bool:
    try:
        store.show(_who(""), name)
        return True
    except CollectionNotFound:
        return False


def test_bad_input_is_a_typed_error_and_adds_nothing(store: KnowledgeStore) -> None:
    chem = _who("chem")
    name = _name()
    store.create(chem, name, EMBEDDER)
    good = np.ones((3, DIM), dtype=np.float32)
    nan = good.copy()
    nan[1, 5] = np.nan
    cases: list[tuple[Any, str]] = [
        (lambda: store.add(chem, name, ["a", "b"], np.ones((2, DIM + 1)), EMBEDDER), r"must be \[n, 64\]"),
        (lambda: store.add(chem, name, ["a", "b", "c"], nan, EMBEDDER), "vector 1 has NaN"),
        (lambda: store.add(chem, name, ["a", "b"], good, EMBEDDER), "2 items but 3 vectors"),
        (lambda: store.add(chem, name, ["a", "b", "c"], good, EMBEDDER, [{}, {}]), "3 items but 2 metadata"),
        (lambda: store.add(chem, name, ["a", "b", object()], good, EMBEDDER), "item 2 is not JSON"),
        (
            lambda: store.add(chem, name, ["a"], good[:1], EMBEDDER.model_copy(update={"model": "blake3:" + "b" * 64})),
            "re-embed the collection",
        ),
        (lambda: store.search(chem, name, good[0], k=0), "k must be between 1 and 1000"),
        (lambda: store.search(chem, name, good[0], k=10**6), "k must be between 1 and 1000"),
        (lambda: store.search(chem, name, good[0], k=1, filter={"nope": 1}), "no metadata field 'nope'"),
        (lambda: store.search(chem, name, np.ones((20, DIM)), k=1000), "over 10000 results"),
        (lambda: store.create(chem, name, EMBEDDER), "has a collection named"),
        (lambda: store.create(chem, "bad name!", EMBEDDER), "collection name"),
    ]
    for call, message in cases:
        with pytest.raises(InvalidRequest, match=message):
            call()
    with pytest.raises(CollectionNotFound):
        store.search(chem, _name(), good[0], k=1)
    assert store.show(chem, name).items == 0, "nothing half-added"


def test_a_corrupt_or_missing_index_file_is_rebuilt_from_the_database(access: Any, tmp_path: Path) -> None:
    chem = _who("chem")
    name = _name()
    first = KnowledgeStore(access.engine, tmp_path / "ix")
    first.create(chem, name, EMBEDDER)
    vectors = np.random.default_rng(1).normal(size=(50, DIM)).astype(np.float32)
    ids = first.add(chem, name, [str(i) for i in range(50)], vectors, EMBEDDER)
    first.flush()
    (path,) = (tmp_path / "ix").glob("*.usearch")
    path.write_bytes(path.read_bytes()[:100] + b"\0" * 100)  # corrupt
    second = KnowledgeStore(access.engine, tmp_path / "ix")
    assert second.search(chem, name, vectors[3], k=1)[0][0].id == ids[3]
    path.unlink()  # missing
    third = KnowledgeStore(access.engine, tmp_path / "ix")
    assert third.search(chem, name, vectors[4], k=1)[0][0].id == ids[4]
    assert path.exists(), "rebuilt and saved"


INGEST = textwrap.dedent(
    """
    import sys, numpy as np
    from sqlalchemy import create_engine
    from pathlib import Path
    from tpmflow.access.principals import Principal
    from tpmflow.knowledge import Embedder, KnowledgeStore
    url, root, name, dim = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    store = KnowledgeStore(create_engine(url), Path(root), save_every=150)
    who = Principal("chem-user", "chem", frozenset({"embed"}), "interactive", "s")
    emb = Embedder(model="blake3:" + "a" * 64, adapter="smiles", pooling="mean", dim=dim)
    rng = np.random.default_rng(2)
    for batch in range(10_000):
        ids = store.add(who, name, [f"b{batch}-{i}" for i in range(10)], rng.normal(size=(10, dim)), emb)
        print(" ".join(map(str, ids)), flush=True)  # acknowledged
    """
)


def test_an_acknowledged_add_survives_sigkill_mid_ingestion(access: Any, tmp_path: Path) -> None:
    chem = _who("chem")
    name = _name()
    KnowledgeStore(access.engine, tmp_path / "ix").create(chem, name, EMBEDDER)
    proc = subprocess.Popen(
        [sys.executable, "-c", INGEST, access.url, str(tmp_path / "ix"), name, str(DIM)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    acknowledged: list[int] = []
    deadline = time.monotonic() + 60
    while len(acknowledged) < 400:  # past two index saves, mid-way through a third
        assert time.monotonic() < deadline and proc.poll() is None
        acknowledged += [int(i) for i in proc.stdout.readline().split()]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    reopened = KnowledgeStore(access.engine, tmp_path / "ix")
    got = reopened.get(chem, name, acknowledged)
    assert all(hit is not None for hit in got), "every acknowledged item is there"
    info = reopened.show(chem, name)
    assert info.items >= len(acknowledged) and info.items % 10 == 0, "whole batches only: nothing half-written"
    some = acknowledged[-1]
    (vector,) = [v for i, v in _all_vectors(reopened, name) if i == some]
    assert reopened.search(chem, name, vector, k=1)[0][0].id == some, "the rebuilt index finds the last one"


def _all_vectors(store: KnowledgeStore, name: str) -> list[tuple[int, np.ndarray]]:
    row = store._collection(_who("chem"), name)
    return [(int(i), v) for ids, vs in store._vectors(row.id, row.dim) for i, v in zip(ids, vs, strict=True)]


@pytest.mark.parametrize("access", ["sqlite"], indirect=True)
def test_recall_at_10_on_100k_vectors_of_the_demo_models_size(access: Any, tmp_path: Path) -> None:
    """Recall@10 >= 0.95 against exact search on 100,000 vectors of the demo model's hidden size."""
    dim = _demo_hidden_size()
    embedder = EMBEDDER.model_copy(update={"dim": dim})
    chem = _who("chem")
    name = _name()
    store = KnowledgeStore(access.engine, tmp_path / "ix")
    store.create(chem, name, embedder)
    rng = np.random.default_rng(3)
    # Clustered, like embeddings of related molecules (uniform noise is the easy case for HNSW).
    centres = rng.normal(size=(500, dim)).astype(np.float32)
    vectors = (centres[rng.integers(0, 500, 100_000)] + 0.5 * rng.normal(size=(100_000, dim))).astype(np.float32)
    ids: list[int] = []
    for start in range(0, len(vectors), 10_000):
        chunk = vectors[start : start + 10_000]
        ids += store.add(chem, name, [None] * len(chunk), chunk, embedder)
    queries = vectors[rng.choice(len(vectors), 100, replace=False)] + 0.1 * rng.normal(size=(100, dim))
    truth = _exact(vectors, queries, 10)
    position = {i: n for n, i in enumerate(ids)}
    found = [[position[h.id] for h in row] for row in store.search(chem, name, queries, k=10)]
    assert recall_at_k(found, truth) >= 0.95


def _demo_hidden_size() -> int:
    import json

    from tpmflow.paths import models_dir

    config = models_dir() / "smiles-llama" / "config.json"
    return int(json.loads(config.read_text())["hidden_size"]) if config.exists() else 256


def test_two_processes_sharing_the_database_see_each_others_adds_and_deletes(access: Any, tmp_path: Path) -> None:
    """Gateways (or their worker processes) each hold an index in memory: every search first
    catches up with what the others committed."""
    chem = _who("chem")
    name = _name()
    a = KnowledgeStore(access.engine, tmp_path / "a")
    b = KnowledgeStore(access.engine, tmp_path / "b")
    a.create(chem, name, EMBEDDER)
    vectors = np.random.default_rng(4).normal(size=(20, DIM)).astype(np.float32)
    ids = a.add(chem, name, list(range(20)), vectors, EMBEDDER)
    assert b.search(chem, name, vectors[5], k=1)[0][0].id == ids[5]  # b opened after a's add
    more = a.add(chem, name, ["late"], vectors[:1] * -1, EMBEDDER)
    assert b.search(chem, name, -vectors[0], k=1)[0][0].id == more[0], "an add after b's index was open"
    b.delete(chem, name, [ids[5]])
    assert ids[5] not in [h.id for h in a.search(chem, name, vectors[5], k=3)[0]], "a delete made by b"


def test_ids_are_never_reused_after_a_drop(store: KnowledgeStore) -> None:
    """A dropped collection's ids (and so its cached index) never come back for a new one."""
    chem = _who("chem")
    first = _name()
    store.create(chem, first, EMBEDDER)
    old_ids = store.add(chem, first, ["a", "b"], np.eye(2, DIM) + 0.1, EMBEDDER)
    store.search(chem, first, np.ones(DIM), k=1)  # its index opened and cached
    store.drop(chem, first)
    store.create(chem, first, EMBEDDER)  # the same name again
    new_ids = store.add(chem, first, ["c"], np.ones((1, DIM)), EMBEDDER)
    assert min(new_ids) > max(old_ids)
    assert [h.item for h in store.search(chem, first, np.ones(DIM), k=5)[0]] == ["c"]


def test_storage_is_billed_per_mb_day_once_per_period_and_queries_are_priced(access: Any, tmp_path: Path) -> None:
    """Two gateways on one database each bill storage: every period is claimed once. The charge is
    SU per MB-day of what the collection stores, spent from the project's allocation; when the
    allocation cannot cover it the debt stays on record (429) and nothing overspends."""
    from tpmflow.access import LedgerWriter
    from tpmflow.access.costs import Limits, max_counters
    from tpmflow.config import PoolConfig
    from tpmflow.gateway.billing import Billing
    from tpmflow.gateway.metrics import GatewayMetrics
    from tpmflow.gateway.ratelimit import RateLimiter
    from tpmflow.pool.registry import ReplicaRegistry

    project = "p-" + uuid.uuid4().hex[:8]
    owner = _who(project, name=f"{project}-owner")
    access.ensure_principal(owner.name, project)
    first = KnowledgeStore(access.engine, tmp_path / "a")
    second = KnowledgeStore(access.engine, tmp_path / "b")  # another gateway's
    name = _name()
    first.create(owner, name, EMBEDDER)
    rng = np.random.default_rng(1)
    first.add(owner, name, [f"item {i}" for i in range(500)], rng.normal(size=(500, DIM)), EMBEDDER)
    stored = first.show(owner, name).stored_bytes
    assert stored >= 500 * DIM * 4
    cfg = PoolConfig(model="m", costs={"su_per_mb_day": 2.0, "su_per_query": 0.5})
    ledger = LedgerWriter(access.engine, flush_interval_s=0.01)
    billing = Billing(cfg, access, ledger, GatewayMetrics(), RateLimiter(cfg), ReplicaRegistry(30))
    access.allocations.create(project, 1.0)
    later = time.time() + 86400.0  # a day on
    mine = [b for b in first.bill_storage(later) if b.collection == name]
    assert [b for b in second.bill_storage(later) if b.collection == name] == [], "claimed once"
    (bill,) = mine
    assert bill.stored_bytes == stored and bill.mb_days == pytest.approx(stored / 1e6 * (later - bill.since) / 86400)
    (row,) = billing.storage(mine)
    assert row.status == 200 and row.charge_su == pytest.approx(2.0 * bill.mb_days)
    (alloc,) = access.allocations.show(project)
    assert alloc["spent_su"] == pytest.approx(row.charge_su, abs=1e-6)
    # A year on, the storage costs more than is left: recorded as owed, not spent.
    (owed,) = billing.storage([b for b in first.bill_storage(later + 365 * 86400) if b.collection == name])
    assert owed.status == 429 and owed.error_type == "QuotaExceeded" and owed.charge_su > 1.0
    assert access.allocations.show(project)[0]["spent_su"] == pytest.approx(row.charge_su, abs=1e-6)
    ledger.flush()
    rows = access.ledger_rows(project=project, endpoint="knowledge/storage")
    assert sorted(r.status for r in rows) == [200, 429]
    # Queries: priced per query item, and the reservation bounds them.
    assert cfg.costs.charge("interactive", queries=3) == pytest.approx(1.5)
    bound = max_counters("knowledge/search", {"items": ["a", "b", "c"]}, 100, Limits(max_model_len=64))
    assert bound["queries"] == 3 and bound["prompt_tokens"] == 3 * 64
    ledger.close()


def test_reembedding_keeps_the_old_vectors_until_every_item_has_its_new_one(store: KnowledgeStore) -> None:
    """A move to a new embedder (another model version, another hidden size): searches use the old
    vectors and index until the swap; items added meanwhile are embedded too before it; the swap is
    refused while any lacks its vector; an add of old-model vectors after it is refused; cancel
    drops the new vectors."""
    chem = _who("chem")
    name = _name()
    store.create(chem, name, EMBEDDER)
    rng = np.random.default_rng(3)
    old = rng.normal(size=(30, DIM)).astype(np.float32)
    ids = store.add(chem, name, [f"m{i}" for i in range(30)], old, EMBEDDER)
    target = Embedder(model="blake3:" + "b" * 64, adapter="smiles", pooling="mean", dim=DIM * 2)
    new = rng.normal(size=(31, DIM * 2)).astype(np.float32)
    state = store.reembed_start(chem, name, target)
    assert state.target == target and state.remaining == 30
    with pytest.raises(InvalidRequest, match="being re-embedded for blake3:bbbb.*finish that or cancel"):
        store.reembed_start(chem, name, target.model_copy(update={"model": "blake3:" + "c" * 64}))
    todo = store.reembed_state(chem, name, limit=20).todo
    assert [i for i, _ in todo] == ids[:20] and todo[0][1] == "m0"
    store.reembed_store(chem, name, target, ids[:20], new[:20])
    assert store.search(chem, name, old[25], k=1)[0][0].id == ids[25], "old vectors until the swap"
    late = store.add(chem, name, ["late"], old[:1] * 0.5 + 0.1, EMBEDDER)  # added mid-move, by the old model
    store.reembed_store(chem, name, target, ids[20:], new[20:30])
    assert not store.reembed_finish(chem, name), "the late item has no new vector yet"
    assert store.reembed_state(chem, name).remaining == 1
    store.reembed_store(chem, name, target, late, new[30:])
    assert store.reembed_finish(chem, name)
    info = store.show(chem, name)
    assert info.embedder == target and info.items == 31
    for i in (0, 25, 30):  # the new index: each new vector finds its own item
        (hit,) = store.search(chem, name, new[i], k=1)[0]
        assert hit.id == [*ids, *late][i] and hit.score == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(InvalidRequest, match="holds vectors of"):
        store.add(chem, name, ["stale"], old[:1], EMBEDDER)
    with pytest.raises(InvalidRequest, match="re-embedded for another model meanwhile"):
        store.search(chem, name, new[0], k=1, embedder=EMBEDDER)
    assert sorted(p.name for p in store.root.glob("*.usearch")) == [
        f"collection-{store.readable(chem, name).id}-e1.usearch"
    ]
    # Cancel: the new vectors made so far are dropped, the collection is as it was.
    store.reembed_start(chem, name, EMBEDDER.model_copy(update={"dim": DIM * 2}))
    store.reembed_store(chem, name, EMBEDDER.model_copy(update={"dim": DIM * 2}), ids[:2], new[:2])
    assert store.reembed_cancel(chem, name) and not store.reembed_cancel(chem, name)
    assert store.reembed_state(chem, name).target is None and store.show(chem, name).embedder == target
    with pytest.raises(InvalidRequest, match="no longer being re-embedded"):
        store.reembed_store(chem, name, target, ids[:1], new[:1])
    store.share(chem, name, projects=["bio"])
    with pytest.raises(Forbidden):  # read-only for another project
        store.reembed_start(_who("bio"), name, EMBEDDER)


def test_names_are_unique_per_project_and_say_nothing_about_other_projects(store: KnowledgeStore) -> None:
    """Two projects may each have a collection of the same name; creating one never reveals that
    another project's private collection exists; a shared one of another project is named
    PROJECT/NAME when the bare name is ambiguous."""
    name = _name()
    chem, bio, third = _who("chem"), _who("bio"), _who("third")
    store.create(chem, name, EMBEDDER)
    store.create(bio, name, EMBEDDER)  # no "exists": chem's private collection is not bio's business
    with pytest.raises(InvalidRequest, match="your project 'chem' has a collection named"):
        store.create(chem, name, EMBEDDER)
    rng = np.random.default_rng(5)
    store.add(chem, name, ["chem item"], rng.normal(size=(1, DIM)), EMBEDDER)
    assert store.show(bio, name).items == 0 and store.show(chem, name).items == 1, "each sees its own"
    with pytest.raises(CollectionNotFound):
        store.show(third, name)
    store.share(chem, name, projects=["third"])
    assert store.show(third, name).project == "chem"
    store.share(bio, name, projects=["third"])
    with pytest.raises(InvalidRequest, match="several projects \\(bio, chem\\).*say PROJECT/"):
        store.show(third, name)
    assert store.show(third, f"bio/{name}").project == "bio"
    assert store.show(third, f"chem/{name}").items == 1, "a shared one, named with its project"
    with pytest.raises(CollectionNotFound):
        store.show(bio, f"chem/{name}")  # shared with third, not with bio: as if it did not exist
    with pytest.raises(CollectionNotFound):
        store.show(third, f"nobody/{name}")


def test_storage_bills_start_at_creation_and_empty_collections_owe_nothing(store: KnowledgeStore) -> None:
    """A database from before storage billing holds billed_until 0: the first bill still starts at
    the collection's creation, not in 1970; a collection with nothing in it writes no bill."""
    from sqlalchemy import update

    from tpmflow.knowledge.tables import CollectionRow

    chem = _who("chem")
    full, empty = _name(), _name()
    store.create(chem, full, EMBEDDER)
    store.create(chem, empty, EMBEDDER)
    store.add(chem, full, ["x"], np.ones((1, DIM)), EMBEDDER)
    with store.engine.begin() as conn:
        conn.execute(update(CollectionRow).where(CollectionRow.name.in_([full, empty])).values(billed_until=0.0))
    later = time.time() + 3600.0
    bills = {b.collection: b for b in store.bill_storage(later) if b.collection in (full, empty)}
    assert set(bills) == {full}, "nothing stored, nothing billed"
    assert bills[full].since > 1e9 and bills[full].mb_days < bills[full].stored_bytes / 1e6 * 0.05


def test_names_are_ascii_and_csv_sources_keep_what_json_holds(store: KnowledgeStore, tmp_path: Path) -> None:
    from tpmflow.knowledge.sources import csv_rows, number

    with pytest.raises(InvalidRequest, match="ASCII"):
        store.create(_who("chem"), "分子", EMBEDDER)
    assert (number("2"), number("2.5"), number("nan"), number(None), number("CCO")) == (2, 2.5, "nan", None, "CCO")
    short = tmp_path / "short.csv"
    short.write_text("item,a,b\nCCO,1\n")
    assert list(csv_rows(short)) == [("CCO", {"source": str(short), "a": 1, "b": None})]


def test_markdown_sections_follow_the_outline_and_leave_code_alone(tmp_path: Path) -> None:
    from tpmflow.knowledge.sources import markdown_sections

    doc = tmp_path / "guide.md"
    doc.write_text(
        "Before any heading.\n"
        "## Install\n"
        "pip install it.\n"
        "#### Only the client\n"  # a level skipped: still under Install
        "A bare install.\n"
        "#### Several processes\n"  # a sibling of the one before, not its child
        "Workers share one port.\n"
        "```bash\n# a shell comment, not a heading\n```\n"
        "~~~\n# nor this\n```\n# nor this, inside a tilde fence\n~~~\n"
        "   ## Indented heading ##\n"
        + " ".join(["word"] * 45)
        + "\n\n"
        + " ".join(["more"] * 10)
        + "\n# Top\n\n\n"  # an empty section: no item
        "## Next\ntext\n"
    )
    got = list(markdown_sections(doc, max_words=40))
    headings = [meta["heading"] for _, meta in got]
    assert headings == [
        "",
        "Install",
        "Install > Only the client",
        "Install > Several processes",
        "Indented heading",  # a level-2 heading: Install's sibling
        "Indented heading",
        "Top > Next",
    ], headings
    assert got[0][0] == "Before any heading." and got[0][1] == {"source": "guide.md", "heading": "", "line": 1}
    processes = got[3][0]
    assert "# a shell comment, not a heading" in processes and "# nor this, inside a tilde fence" in processes
    assert [len(item.split("\n", 1)[1].split()) for item, _ in got[4:6]] == [40, 15], "long sections in parts"
    assert got[6] == ("Top > Next\ntext", {"source": "guide.md", "heading": "Top > Next", "line": 23})
    with pytest.raises(ValueError, match="at least 1"):
        list(markdown_sections(doc, max_words=0))


def test_a_model_embedded_collection_keeps_the_embedder_json_it_had_before_served_by(
    store: KnowledgeStore, access: Any
) -> None:
    """Rows written before Embedder.served_by existed must still match compare-and-set writes
    (pinning the adapter version, re-embedding steps): a model's embedder is stored without it."""
    import json

    import sqlalchemy as sa

    chem, name = _who("chem"), _name()
    store.create(chem, name, EMBEDDER)
    with access.engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT embedder FROM knowledge_collections WHERE name = :n"), {"n": name}).scalar()
    assert "served_by" not in json.loads(stored) and stored == EMBEDDER.model_dump_json(exclude={"served_by"})
    pinned = store.pin_adapter(chem, name, EMBEDDER, "smiles@0.1.0")
    assert pinned.adapter_version == "smiles@0.1.0"
    text = Embedder(model="blake3:" + "e" * 64, pooling="model", dim=384, served_by="text-embedder")
    assert json.loads(text.stored())["served_by"] == "text-embedder"
