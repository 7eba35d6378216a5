"""Which replicas are alive and how busy each is; the gateway routes to the least loaded."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from dataclasses import dataclass

from tpmflow.errors import Overloaded, ReplicaFailed, VersionNotFound
from tpmflow.schema import ReplicaInfo


@dataclass
class ReplicaState:
    info: ReplicaInfo
    last_seen: float
    inflight: int = 0
    dead: bool = False
    served: int = 0
    draining: bool = False  # being scaled down: finishes what it has, takes nothing new


class ReplicaRegistry:
    """Replicas register and heartbeat; one that misses heartbeats or drops a connection leaves
    the rotation until it heartbeats again (the launcher restarts dead processes)."""

    def __init__(self, heartbeat_timeout_s: float) -> None:
        self.timeout = heartbeat_timeout_s
        self.replicas: dict[str, ReplicaState] = {}
        self._lock = threading.Lock()
        self.wanting: Counter[str] = Counter()  # requests waiting for a replica, per group (scale from zero)

    def heartbeat(self, info: ReplicaInfo) -> None:
        now = time.monotonic()
        state = self.replicas.get(info.replica_id)
        if state is None or state.info.url != info.url:
            with self._lock:  # copy on write: other threads (the autoscaler) read the dict unlocked
                self.replicas = {**self.replicas, info.replica_id: ReplicaState(info=info, last_seen=now)}
        else:
            state.info, state.last_seen, state.dead = info, now, False

    def mark_dead(self, replica_id: str) -> None:
        if replica_id in self.replicas:
            self.replicas[replica_id].dead = True

    def drain(self, replica_id: str) -> None:
        """Take a replica out of the rotation for good; what it is running finishes."""
        if replica_id in self.replicas:
            self.replicas[replica_id].draining = True

    def remove(self, replica_id: str) -> None:
        """Forget a replica that was scaled down (a dead one stays known: it comes back)."""
        with self._lock:
            self.replicas = {k: v for k, v in self.replicas.items() if k != replica_id}

    def live(self, group: str | None = None) -> list[ReplicaState]:
        """Replicas heartbeating and not draining (of ``group``, when given)."""
        now = time.monotonic()
        return [
            r
            for r in self.replicas.values()
            if not r.dead and not r.draining and now - r.last_seen <= self.timeout and group in (None, r.info.group)
        ]

    def pick(
        self,
        exclude: set[str] = frozenset(),  # type: ignore[assignment]
        version: str = "",
        group: str | None = None,
    ) -> ReplicaState | None:
        """The least-loaded live replica not in ``exclude`` (of ``group`` and serving ``version``, when asked)."""
        candidates = [r for r in self.live(group) if r.info.replica_id not in exclude and serves(r, version)]
        if not candidates:
            return None
        return min(candidates, key=lambda r: (r.inflight, r.served))

    async def wait_pick(
        self,
        deadline: float,
        exclude: set[str],
        version: str = "",
        group: str | None = None,
        max_wait_s: float = float("inf"),
    ) -> ReplicaState:
        """A live replica (of ``group``) not yet tried, waiting for one to (re)appear until ``deadline``,
        or for at most ``max_wait_s`` (then ``Overloaded`` with a Retry-After: the replicas are
        restarting, and a client that retries later will be served).

        A ``version`` (content hash, or a unique prefix of one) that none of the group's known
        replicas serves is refused at once, not waited for."""
        known = [r for r in self.replicas.values() if group in (None, r.info.group)]
        if version and known and not any(serves(r, version) for r in known):
            served = sorted({v for r in known for v in [r.info.content_hash, *r.info.lora_versions]})
            raise VersionNotFound(f"no replica serves version {version!r}; this pool serves {served}")
        waiting = False
        given_up = time.monotonic() + max_wait_s
        try:
            while True:
                state = self.pick(exclude, version, group) or (self.pick(set(), version, group) if exclude else None)
                if state is not None:
                    return state
                now = time.monotonic()
                where = f" of replica group {group!r}" if group else ""
                if now >= given_up and given_up < deadline:
                    raise Overloaded(
                        f"no live replica{where} for {max_wait_s:g} s (restarting?); retry later", retry_after=5.0
                    )
                if now >= deadline:
                    raise ReplicaFailed(f"no live replica{where} could take the request before its timeout")
                if not waiting:
                    waiting = True
                    self.wanting[group or "default"] += 1
                await asyncio.sleep(0.1)
        finally:
            if waiting:
                self.wanting[group or "default"] -= 1


def serves(replica: ReplicaState, version: str) -> bool:
    """Whether ``replica`` serves ``version`` (a content hash, with or without ``blake3:``, or a
    prefix): as its weights or as one of its LoRA adapters."""
    return not version or matches(replica.info.content_hash, version) or lora_for(replica, version) is not None


def lora_for(replica: ReplicaState, version: str) -> str | None:
    """The LoRA adapter (named by its version id) that serves ``version`` on ``replica``; None when
    the replica's own weights do (or nothing pinned: unpinned requests get the weights)."""
    if not version or matches(replica.info.content_hash, version):
        return None
    return next((lora for lora in replica.info.lora_versions if matches(lora, version)), None)


def matches(have: str, version: str) -> bool:
    """Whether the version id ``have`` is ``version`` (a content hash, with or without
    ``blake3:``, or a prefix of at least 6 of its characters)."""
    want = version.removeprefix("blake3:")
    return len(want) >= 6 and have.removeprefix("blake3:").startswith(want)
