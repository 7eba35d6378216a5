"""One replica registry for several gateway processes: each heartbeat, failure, drain and removal
a process sees is written to the pool's database (``replicas`` table), and every process pulls the
table a few times a second into its own :class:`ReplicaRegistry`.

A heartbeat reaches one worker of a gateway (the kernel hands each connection to one of them), so
without this the others would never learn of the replica. Routing stays in memory: only changes
of liveness cross processes, at most ``sync_s`` late; a replica another worker saw fail is retried
at most once more here before the next pull, and that attempt fails over like any other.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import queue
import threading
import time

from sqlalchemy import delete, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from tpmflow.access.tables import Base, ReplicaRow
from tpmflow.pool.registry import ReplicaRegistry, ReplicaState
from tpmflow.schema import ReplicaInfo

log = logging.getLogger("tpmflow.gateway")


def pool_id(secret: str) -> str:
    """The pool's name in the shared table: its gateways share the secret, and nothing else does."""
    return hashlib.sha256(b"tpmflow-pool:" + secret.encode()).hexdigest()[:32]


class SharedReplicaRegistry(ReplicaRegistry):
    """A :class:`ReplicaRegistry` whose changes are published to, and pulled from, the database."""

    def __init__(self, heartbeat_timeout_s: float, engine: Engine, secret: str, sync_s: float = 0.25) -> None:
        super().__init__(heartbeat_timeout_s)
        self.engine = engine
        self.pool = pool_id(secret)
        self.sync_s = sync_s
        Base.metadata.create_all(engine, tables=[ReplicaRow.__table__])
        self._writes: queue.Queue[tuple[str, str, float, str]] = queue.Queue()
        self._writer = threading.Thread(target=self._write_forever, name="tpmflow-registry", daemon=True)
        self._writer.start()

    # -- local changes, published ----------------------------------------------------------------

    def heartbeat(self, info: ReplicaInfo) -> None:
        super().heartbeat(info)
        self._writes.put(("beat", info.replica_id, time.time(), info.model_dump_json()))

    def mark_dead(self, replica_id: str) -> None:
        super().mark_dead(replica_id)
        self._writes.put(("dead", replica_id, time.time(), ""))

    def drain(self, replica_id: str) -> None:
        super().drain(replica_id)
        self._writes.put(("drain", replica_id, time.time(), ""))

    def remove(self, replica_id: str) -> None:
        super().remove(replica_id)
        self._writes.put(("remove", replica_id, time.time(), ""))

    def flush(self, timeout_s: float = 5.0) -> None:
        """Wait until every change made so far is in the database (tests, shutdown)."""
        deadline = time.monotonic() + timeout_s
        while self._writes.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)

    def _write_forever(self) -> None:
        while True:
            op, replica_id, at, info = self._writes.get()
            try:
                self._write(op, replica_id, at, info)
            except Exception:  # noqa: BLE001 - the next heartbeat writes again; never stop the writer
                log.exception("publishing %s of %s to the shared registry failed", op, replica_id)
            finally:
                self._writes.task_done()

    def _write(self, op: str, replica_id: str, at: float, info: str) -> None:
        key = (ReplicaRow.pool == self.pool) & (ReplicaRow.replica_id == replica_id)
        with self.engine.begin() as conn:
            if op == "beat":
                done = conn.execute(update(ReplicaRow).where(key).values(info=info, seen_at=at, draining=False))
                if done.rowcount == 0:
                    try:
                        with conn.begin_nested():
                            conn.execute(
                                ReplicaRow.__table__.insert().values(
                                    pool=self.pool, replica_id=replica_id, info=info, seen_at=at, draining=False
                                )
                            )
                    except IntegrityError:  # another process inserted it first: update theirs
                        conn.execute(update(ReplicaRow).where(key).values(info=info, seen_at=at))
            elif op == "dead":
                conn.execute(update(ReplicaRow).where(key).values(dead_at=at))
            elif op == "drain":
                conn.execute(update(ReplicaRow).where(key).values(draining=True))
            elif op == "remove":
                conn.execute(delete(ReplicaRow).where(key))

    # -- others' changes, pulled -----------------------------------------------------------------

    def pull(self) -> None:
        """Bring this process's view up to date with the table."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(ReplicaRow.__table__).where(ReplicaRow.pool == self.pool)).all()
        with self._lock:  # merged into the current dict: a heartbeat meanwhile is not lost
            self._merge(rows)

    def _merge(self, rows: list) -> None:  # type: ignore[type-arg]
        wall, mono = time.time(), time.monotonic()
        replicas = dict(self.replicas)
        changed = False
        for row in rows:
            seen = mono - (wall - row.seen_at)  # the heartbeat's time on this process's clock
            dead_at = None if row.dead_at is None else mono - (wall - row.dead_at)
            state = replicas.get(row.replica_id)
            info = ReplicaInfo.model_validate_json(row.info)
            if state is None or state.info.url != info.url:
                if state is not None and state.last_seen >= seen:
                    continue  # ours is newer (a heartbeat not yet written)
                replicas[row.replica_id] = ReplicaState(info=info, last_seen=seen, draining=row.draining)
                replicas[row.replica_id].dead = dead_at is not None and dead_at >= seen
                changed = True
                continue
            if seen > state.last_seen:  # a heartbeat another process received
                state.info, state.last_seen, state.dead = info, seen, False
            if dead_at is not None and dead_at >= state.last_seen:  # a failure another process saw
                state.dead = True
            state.draining = state.draining or row.draining
        known = {row.replica_id for row in rows}
        for replica_id in [r for r in replicas if r not in known and self._written(r)]:
            del replicas[replica_id]  # scaled down by another process
            changed = True
        if changed:
            self.replicas = replicas

    def _written(self, replica_id: str) -> bool:
        """Whether a replica missing from the table was there (removed) rather than not written yet."""
        state = self.replicas.get(replica_id)
        return state is not None and time.monotonic() - state.last_seen > max(1.0, 4 * self.sync_s)

    async def sync_forever(self) -> None:
        """Pull every ``sync_s`` until cancelled."""
        while True:
            try:
                await asyncio.to_thread(self.pull)
            except Exception:  # noqa: BLE001 - a database hiccup must not stop routing
                log.exception("pulling the shared registry failed")
            await asyncio.sleep(self.sync_s)
