"""The gateway's admission slots: a semaphore whose waiters are served by service-class priority.

``asyncio.Semaphore`` wakes waiters first come, first served, so a batch flood bigger than
``max_inflight`` would queue interactive requests behind it at the gateway, before vLLM's own
priority scheduling ever sees them. Here a released slot goes to the waiter with the lowest
priority number (vLLM's convention: lower runs earlier), ties in arrival order.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from tpmflow.access import Principal
from tpmflow.config import PoolConfig
from tpmflow.errors import Overloaded, QuotaExceeded
from tpmflow.gateway.billing import Billing
from tpmflow.gateway.call import Call
from tpmflow.gateway.metrics import GatewayMetrics
from tpmflow.gateway.ratelimit import RateLimiter


class PrioritySlots:
    """``n`` slots; ``await acquire(priority)`` waits for one, ``release()`` hands it on."""

    def __init__(self, n: int) -> None:
        self._free = n
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []  # (priority, arrival, future)
        self._arrivals = itertools.count()

    def locked(self) -> bool:
        """No slot is free now (a new request would wait)."""
        return self._free == 0

    def try_acquire(self) -> bool:
        """Take a free slot at once if one is free and nobody waits for it (no task, no timer)."""
        if self._free > 0 and not self._pending():
            self._free -= 1
            return True
        return False

    async def acquire(self, priority: int = 0) -> None:
        if self.try_acquire():
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._arrivals), future))
        try:
            await future
        except asyncio.CancelledError:
            # Granted just before the cancellation (e.g. a timeout): pass the slot on. Otherwise
            # the cancelled future stays in the heap and ``release`` skips it.
            if future.done() and not future.cancelled():
                self.release()
            raise

    def release(self) -> None:
        """Give the slot to the most urgent waiter still waiting, or back to the pool."""
        while self._waiters:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)
                return
        self._free += 1

    def _pending(self) -> bool:
        """Whether anyone still waits (cancelled waiters are dropped on the way)."""
        while self._waiters and self._waiters[0][2].done():
            heapq.heappop(self._waiters)
        return bool(self._waiters)


class Admission:
    """Rate limits, then the allocation's reservation, then a bounded, priority-ordered queue for
    one of ``max_inflight`` slots; 503 ``Overloaded`` when the queue is full or the wait outlasts
    the request's timeout."""

    def __init__(
        self, cfg: PoolConfig, metrics: GatewayMetrics, rate_limits: RateLimiter, billing: Billing, workers: int = 1
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.rate_limits = rate_limits
        self.billing = billing
        # With N worker processes each holds its share, so the gateway as a whole keeps the limits.
        self.max_inflight = max(1, -(-cfg.gateway.max_inflight // workers))
        self.queue_limit = max(1, -(-cfg.gateway.queue_limit // workers))
        self.slots = PrioritySlots(self.max_inflight)  # waiters served by class priority
        self.waiting = 0

    def priority(self, principal: Principal) -> int:
        cls = self.cfg.service_classes.get(principal.service_class)
        return cls.priority if cls else 0

    def group(self, call: Call) -> str:
        """The replica group serving the caller's service class (unknown classes: ``default``), or
        the one the call names (text embedding)."""
        if call.group is not None:
            return call.group
        cls = self.cfg.service_classes.get(call.principal.service_class)
        return cls.replica_group if cls else "default"

    def rate_limit(self, call: Call) -> None:
        """Per-principal and per-class rate limits: refused with a 429 ``QuotaExceeded`` +
        Retry-After, and a ledger row whose error_type ``RateLimited`` tells it from a spent
        allocation (waiting helps; a top-up is not needed)."""
        try:
            self.rate_limits.admit(call.principal)
        except QuotaExceeded:
            self.billing.refused(call, 429, "RateLimited")
            raise

    @asynccontextmanager
    async def admitted(self, call: Call, body: dict[str, Any] | None = None) -> AsyncIterator[None]:
        """Hold a slot for the body of the ``async with``. First, a project with an allocation
        reserves the request's largest possible charge (from ``body``) or is refused with
        ``QuotaExceeded``; on the way out — answered, failed, refused by the queue — the
        reservation is settled with what the request's ledger rows charged. Before both, rate
        limits: a rate-limited request reserves nothing."""
        self.rate_limit(call)
        await self.billing.reserve(call, body)
        try:
            await self._acquire(call)
            self.metrics.inflight.inc()
            try:
                yield
            finally:
                self.metrics.inflight.dec()
                self.slots.release()
        finally:
            await self.billing.settle(call)

    async def _acquire(self, call: Call) -> None:
        if self.slots.try_acquire():  # the common case: no queue, so no wait_for task and timer
            call.queue_ms = (time.monotonic() - call.started) * 1000
            return
        if self.slots.locked() and self.waiting >= self.queue_limit:
            self.billing.refused(call, 503, "Overloaded")
            raise Overloaded(f"pool queue is full ({self.waiting} waiting)", retry_after=1.0)
        self.waiting += 1
        self.metrics.queue_depth.set(self.waiting)
        remaining = call.started + self.cfg.gateway.request_timeout_s - time.monotonic()
        try:
            await asyncio.wait_for(self.slots.acquire(self.priority(call.principal)), timeout=max(0.01, remaining))
        except TimeoutError:
            self.billing.refused(call, 503, "Overloaded")
            raise Overloaded("waited in the pool queue for the whole request timeout", retry_after=5.0) from None
        finally:
            self.waiting -= 1
            self.metrics.queue_depth.set(self.waiting)
        call.queue_ms = (time.monotonic() - call.started) * 1000
