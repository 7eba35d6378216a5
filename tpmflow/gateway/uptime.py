"""Uptime of the pool and of each replica, from the registry's own view of liveness, for /metrics.

The registry knows only who is live now, so this keeps the history the gauges need: when each
replica (re)joined the rotation, and how long the pool has had none. Liveness can end without an
event (a heartbeat timing out), so a watcher checks once a second: an outage is counted to within
that second. Start-up before the first replica joins is not an outage.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable

from tpmflow.gateway.metrics import GatewayMetrics, multiprocess
from tpmflow.pool.registry import ReplicaRegistry
from tpmflow.schema import ReplicaInfo


class Uptime:
    """Join times of live replicas and the pool's seconds without any, exported as gauges."""

    def __init__(
        self, registry: ReplicaRegistry, metrics: GatewayMetrics, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self.clock = clock
        self.started = clock()
        self.joined: dict[str, float] = {}  # live replicas only: when each (re)joined
        self._checked: float | None = None  # last check, once a replica has ever been live
        self._live = False  # whether the pool had a live replica at that check
        self._exported: set[str] = set()  # replicas with an uptime gauge
        metrics.pool_uptime.set_function(lambda: self.clock() - self.started)
        # Worker processes add their counters up: only one of them counts outages (the one that
        # holds the lock; the others see the same registry and would count the same seconds again).
        self.counts_outages = _outage_counter()

    def heartbeat(self, info: ReplicaInfo) -> None:
        """Pass a heartbeat to the registry, noting when it brings a replica (back) into the
        rotation: one new, marked dead, timed out, or restarted at a new address."""
        now = self.clock()
        live = self.check(now)
        before = self.registry.replicas.get(info.replica_id)
        rejoined = info.replica_id not in live or before is None or before.info.url != info.url
        self.registry.heartbeat(info)
        if rejoined:
            self.joined[info.replica_id] = now
        self.check(now)  # the pool is live from this moment

    def check(self, now: float | None = None) -> set[str]:
        """Count the time since the last check as unavailable if the pool had no live replica then;
        forget the join times of replicas that left. Returns the live replicas' ids."""
        now = self.clock() if now is None else now
        live = {r.info.replica_id for r in self.registry.live()}
        for replica_id in self.joined.keys() - live:
            del self.joined[replica_id]
        for replica_id in live:
            self.joined.setdefault(replica_id, now)  # one registered by other means than heartbeat()
        if self._checked is not None and not self._live and now > self._checked:
            if self.counts_outages:
                self.metrics.pool_unavailable.inc(now - self._checked)
        serving = any(r.info.task == "generate" for r in self.registry.live())  # the embedder alone serves nothing
        if serving or self._checked is not None:
            self._checked, self._live = now, serving
        return live

    def export(self) -> None:
        """Bring the per-replica gauges up to date (on each scrape); a replica the registry forgot
        (scaled down) loses its gauge."""
        now = self.clock()
        self.check(now)
        if multiprocess():  # a gauge's function is not seen across processes: store its value
            self.metrics.pool_uptime.set(now - self.started)
        known = set(self.registry.replicas)
        for replica_id in self._exported - known:
            self.metrics.replica_uptime.remove(replica_id)
        for replica_id in known:
            joined = self.joined.get(replica_id)
            self.metrics.replica_uptime.labels(replica_id).set(0.0 if joined is None else now - joined)
        self._exported = known

    async def watch(self, interval_s: float = 1.0) -> None:
        """Check every ``interval_s`` until cancelled, so outages between scrapes are counted."""
        while True:
            await asyncio.sleep(interval_s)
            self.check()


_LOCKS: list[int] = []  # held open for the process's life


def _outage_counter() -> bool:
    """Whether this process counts the pool's outages: always alone, one worker among several."""
    if not multiprocess():
        return True
    import fcntl

    fd = os.open(os.path.join(os.environ["PROMETHEUS_MULTIPROC_DIR"], "outages.lock"), os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    _LOCKS.append(fd)
    return True
