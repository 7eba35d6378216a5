"""Scale replica groups between their minimum and maximum by queue depth, draining before stopping.

A group's queue is what its replicas have not answered yet (the gateway's in-flight count per
replica: running or waiting in the engine) plus requests waiting for any replica of the group. One
replica is added when the queue per replica (starting ones included) stays above the group's
target for ``scale_up_after_s``, or at once when requests wait for a group scaled to zero. One is
removed when the others would hold the queue under half the target for ``scale_down_after_s``: it
leaves the rotation first, finishes what it is running, and only then stops, so scaling down
fails no request.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from tpmflow.config import PoolConfig, ReplicaGroup
from tpmflow.pool.registry import ReplicaRegistry

log = logging.getLogger("tpmflow.autoscale")


class ScalingLauncher(Protocol):
    def group_ids(self, group: str) -> list[str]: ...

    def add(self, group: str) -> str | None: ...

    def remove(self, replica_id: str, grace_s: float = 10.0) -> None: ...


@dataclass
class GroupLoad:
    """What one decision looks at."""

    replicas: int  # started by the launcher and not draining (registered or still starting)
    queue: int  # requests at the group's replicas not yet answered, plus requests waiting for one
    waiting_for_none: bool  # requests wait and the group has no replica at all


@dataclass
class _Pressure:
    high_since: float | None = None
    low_since: float | None = None


@dataclass
class Decider:
    """The scaling rule on its own (clock injected), so it is tested without processes."""

    group: ReplicaGroup
    state: _Pressure = field(default_factory=_Pressure)

    def decide(self, load: GroupLoad, now: float) -> int:
        """+1, -1 or 0 replicas."""
        g, s = self.group, self.state
        assert g.min_replicas is not None and g.max_replicas is not None
        if load.waiting_for_none and load.replicas < g.max_replicas:
            s.high_since = s.low_since = None
            return +1
        per = load.queue / max(1, load.replicas)
        if per > g.target_queue_per_replica and load.replicas < g.max_replicas:
            s.low_since = None
            s.high_since = now if s.high_since is None else s.high_since
            if now - s.high_since >= g.scale_up_after_s:
                s.high_since = None
                return +1
            return 0
        s.high_since = None
        fewer = load.replicas - 1
        if fewer >= g.min_replicas and load.queue <= 0.5 * g.target_queue_per_replica * fewer:
            s.low_since = now if s.low_since is None else s.low_since
            if now - s.low_since >= g.scale_down_after_s:
                s.low_since = None
                return -1
            return 0
        s.low_since = None
        return 0


class Autoscaler:
    """A thread that applies each scaling group's ``Decider`` once per ``interval_s``."""

    def __init__(
        self,
        cfg: PoolConfig,
        registry: ReplicaRegistry,
        launcher: ScalingLauncher,
        interval_s: float = 1.0,
        drain_timeout_s: float | None = None,
        on_change: Callable[[str, int], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.registry = registry
        self.launcher = launcher
        self.interval_s = interval_s
        # A drained replica stops once idle, or after the longest a request may take anyway.
        self.drain_timeout_s = drain_timeout_s if drain_timeout_s is not None else cfg.gateway.request_timeout_s + 5
        self.on_change = on_change
        self.clock = clock
        self.deciders = {name: Decider(g) for name, g in cfg.groups().items() if g.scales}
        self.draining: set[str] = set()
        self.events: list[tuple[float, str, str]] = []  # (time, "up"/"down", replica id): what happened
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._drains: list[threading.Thread] = []

    def start(self) -> None:
        if self.deciders:
            self._thread = threading.Thread(target=self._run, name="tpmflow-autoscale", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        for drain in self._drains:
            drain.join(timeout=self.drain_timeout_s)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            for group in self.deciders:
                try:
                    self.tick(group)
                except Exception:  # noqa: BLE001 - a scaling hiccup must not stop scaling for good
                    log.exception("autoscaling group %s failed", group)

    def load(self, group: str) -> GroupLoad:
        started = [r for r in self.launcher.group_ids(group) if r not in self.draining]
        known = self.registry.replicas
        queue = sum(known[r].inflight for r in started if r in known) + self.registry.wanting[group]
        return GroupLoad(len(started), queue, waiting_for_none=not started and self.registry.wanting[group] > 0)

    def tick(self, group: str) -> int:
        """One decision for ``group``, applied; returns it."""
        change = self.deciders[group].decide(self.load(group), self.clock())
        if change > 0:
            self.scale_up(group)
        elif change < 0:
            self.scale_down(group)
        return change

    def scale_up(self, group: str) -> str | None:
        replica_id = self.launcher.add(group)
        if replica_id is not None:
            log.info("group %s: added %s", group, replica_id)
            self._changed(group, "up", replica_id)
        return replica_id

    def scale_down(self, group: str, wait: bool = False) -> str | None:
        """Drain the least busy replica of ``group`` and stop it once idle (in the background
        unless ``wait``); None when the group is at its minimum."""
        g = self.cfg.groups()[group]
        started = [r for r in self.launcher.group_ids(group) if r not in self.draining]
        if len(started) <= (g.min_replicas or 0):
            return None
        known = self.registry.replicas
        victim = min(started, key=lambda r: (known[r].inflight if r in known else 0, r in known))
        self.draining.add(victim)
        self.registry.drain(victim)
        log.info("group %s: draining %s", group, victim)
        self._changed(group, "down", victim)
        drain = threading.Thread(target=self._finish_drain, args=(victim,), name=f"tpmflow-drain-{victim}", daemon=True)
        self._drains.append(drain)
        drain.start()
        if wait:
            drain.join()
        return victim

    def _finish_drain(self, replica_id: str) -> None:
        deadline = self.clock() + self.drain_timeout_s
        state = self.registry.replicas.get(replica_id)
        while state is not None and state.inflight > 0 and self.clock() < deadline:
            time.sleep(0.1)
        self.launcher.remove(replica_id)
        self.registry.remove(replica_id)
        self.draining.discard(replica_id)
        log.info("%s drained and stopped", replica_id)

    def _changed(self, group: str, what: str, replica_id: str) -> None:
        self.events.append((self.clock(), what, replica_id))
        if self.on_change is not None:
            self.on_change(group, len([r for r in self.launcher.group_ids(group) if r not in self.draining]))
