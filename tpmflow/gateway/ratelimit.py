"""Rate limits per principal and per service class: in-memory token buckets in each gateway.

Each limit is a bucket holding at most its per-minute allowance, refilled continuously at that rate
(so a burst of a whole minute's allowance is allowed, then a steady pace). A request needs one unit
in every request bucket that applies (its principal's, its class's); a request bucket and a token
bucket admit while they are not exhausted (a request needs >= 1 left, tokens > 0 left), and after
the answer the gateway debits the real prompt + output tokens from the token buckets (which may go
negative: a long answer is paid for by waiting longer).

The buckets live in one gateway process's memory: several gateways in front of one pool each
enforce the full limit on the share of traffic they see, and nothing is atomic across them. The N
worker processes of one gateway (``gateway.workers``) each hold 1/N of every limit, so together they
never admit more than the limit (a client whose requests all land on one worker meets 1/N of it). These limits smooth
the pace; allocations (atomic in the shared database) remain the hard cap on what is spent.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from tpmflow.access import Principal
from tpmflow.config import PoolConfig
from tpmflow.errors import QuotaExceeded


@dataclass
class Bucket:
    """A token bucket: capacity ``per_minute`` (at least one request's worth, so a worker's share of a
    small limit still admits), refilled at ``per_minute / 60`` per second."""

    per_minute: float
    level: float
    updated: float

    def refill(self, now: float) -> float:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.per_minute / 60.0)
        self.updated = max(self.updated, now)
        return self.level

    def wait_s(self, need: float = 1.0) -> float:
        """Seconds until the bucket holds ``need`` (0 if it does)."""
        return max(0.0, need - self.level) * 60.0 / self.per_minute

    @property
    def capacity(self) -> float:
        return max(1.0, self.per_minute)


@dataclass(frozen=True)
class _Limit:
    """One limit that applies to a request: which bucket, and how to name it in a refusal."""

    key: tuple[str, str, str]  # (kind: "requests" | "tokens", scope: "principal" | "class", name)
    per_minute: float

    def describe(self) -> str:
        kind, scope, name = self.key
        return f"{scope} {name!r} reached its limit of {self.per_minute:g} {kind} per minute"


class RateLimiter:
    """The buckets of one gateway, keyed by (kind, principal or class, name); limits are read from
    ``cfg`` at every check, so a bucket follows a changed limit. ``clock`` is injectable for tests."""

    def __init__(self, cfg: PoolConfig, clock: Callable[[], float] = time.monotonic, *, share: float = 1.0) -> None:
        self.cfg = cfg
        self.clock = clock
        self.share = share  # this process's share of every limit (1/N with N gateway workers)
        self.buckets: dict[tuple[str, str, str], Bucket] = {}

    def _limits(self, principal: Principal, kind: str) -> list[_Limit]:
        out = []
        per_principal = getattr(self.cfg.gateway, f"principal_{kind}_per_minute")
        if per_principal is not None:
            out.append(_Limit((kind, "principal", principal.name), per_principal * self.share))
        cls = self.cfg.service_classes.get(principal.service_class)
        per_class = getattr(cls, f"{kind}_per_minute") if cls is not None else None
        if per_class is not None:
            out.append(_Limit((kind, "class", principal.service_class), per_class * self.share))
        return out

    def _bucket(self, limit: _Limit, now: float) -> Bucket:
        bucket = self.buckets.get(limit.key)
        if bucket is None:
            bucket = self.buckets[limit.key] = Bucket(limit.per_minute, max(1.0, limit.per_minute), now)
        elif bucket.per_minute != limit.per_minute:  # the limit changed: keep the level, within it
            bucket.refill(now)
            bucket.per_minute = limit.per_minute
            bucket.level = min(bucket.level, bucket.capacity)
        bucket.refill(now)
        return bucket

    def admit(self, principal: Principal) -> None:
        """Take one request from every request bucket that applies, or take nothing and raise
        ``QuotaExceeded`` with ``retry_after``: when every refusing bucket will have refilled enough."""
        now = self.clock()
        requests = [(limit, self._bucket(limit, now)) for limit in self._limits(principal, "requests")]
        tokens = [(limit, self._bucket(limit, now)) for limit in self._limits(principal, "tokens")]
        refused = [(lim, b) for lim, b in requests if b.level < 1.0] + [(lim, b) for lim, b in tokens if b.level <= 0.0]
        if refused:
            wait = max(b.wait_s(1.0) for _, b in refused)
            reasons = "; ".join(lim.describe() for lim, _ in refused)
            raise QuotaExceeded(f"rate limited: {reasons}; retry in {wait:.1f} s", retry_after=wait)
        for _, bucket in requests:
            bucket.level -= 1.0

    def debit_tokens(self, principal: Principal, tokens: int) -> None:
        """Charge a request's real prompt + output tokens once they are known (may go negative)."""
        if tokens <= 0:
            return
        now = self.clock()
        for limit in self._limits(principal, "tokens"):
            self._bucket(limit, now).level -= tokens
