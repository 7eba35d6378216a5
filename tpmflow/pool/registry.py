"""Which replicas are alive and how busy each is; the gateway routes to the least loaded."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from tpmflow.errors import ReplicaFailed, VersionNotFound
from tpmflow.schema import ReplicaInfo


@dataclass
class ReplicaState:
    info: ReplicaInfo
    last_seen: float
    inflight: int = 0
    dead: bool = False
    served: int = 0


class ReplicaRegistry:
    """Replicas register and heartbeat; one that misses heartbeats or drops a connection leaves
    the rotation until it heartbeats again (the launcher restarts dead processes)."""

    def __init__(self, heartbeat_timeout_s: float) -> None:
        self.timeout = heartbeat_timeout_s
        self.replicas: dict[str, ReplicaState] = {}

    def heartbeat(self, info: ReplicaInfo) -> None:
        now = time.monotonic()
        state = self.replicas.get(info.replica_id)
        if state is None or state.info.url != info.url:
            inflight = state.inflight if state and state.info.url == info.url else 0
            self.replicas[info.replica_id] = ReplicaState(info=info, last_seen=now, inflight=inflight)
        else:
            state.info, state.last_seen, state.dead = info, now, False

    def mark_dead(self, replica_id: str) -> None:
        if replica_id in self.replicas:
            self.replicas[replica_id].dead = True

    def live(self) -> list[ReplicaState]:
        now = time.monotonic()
        return [r for r in self.replicas.values() if not r.dead and now - r.last_seen <= self.timeout]

    def pick(self, exclude: set[str] = frozenset(), version: str = "") -> ReplicaState | None:  # type: ignore[assignment]
        """The least-loaded live replica not in ``exclude`` (serving ``version``, when one is asked for)."""
        candidates = [r for r in self.live() if r.info.replica_id not in exclude and serves(r, version)]
        if not candidates:
            return None
        return min(candidates, key=lambda r: (r.inflight, r.served))

    async def wait_pick(self, deadline: float, exclude: set[str], version: str = "") -> ReplicaState:
        """A live replica not yet tried, waiting for one to (re)appear until ``deadline``.

        A ``version`` (content hash, or a unique prefix of one) no replica of the pool was started
        with is refused at once, not waited for."""
        if version and not any(serves(r, version) for r in self.replicas.values()):
            served = sorted({r.info.content_hash for r in self.replicas.values()})
            raise VersionNotFound(f"no replica serves version {version!r}; this pool serves {served}")
        while True:
            state = self.pick(exclude, version) or (self.pick(set(), version) if exclude else None)
            if state is not None:
                return state
            if time.monotonic() >= deadline:
                raise ReplicaFailed("no live replica could take the request before its timeout")
            await asyncio.sleep(0.1)


def serves(replica: ReplicaState, version: str) -> bool:
    """Whether ``replica`` serves ``version``: a content hash, with or without ``blake3:``, or a prefix."""
    if not version:
        return True
    have = replica.info.content_hash.removeprefix("blake3:")
    want = version.removeprefix("blake3:")
    return len(want) >= 6 and have.startswith(want)
