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


class PrioritySlots:
    """``n`` slots; ``await acquire(priority)`` waits for one, ``release()`` hands it on."""

    def __init__(self, n: int) -> None:
        self._free = n
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []  # (priority, arrival, future)
        self._arrivals = itertools.count()

    def locked(self) -> bool:
        """No slot is free now (a new request would wait)."""
        return self._free == 0

    async def acquire(self, priority: int = 0) -> None:
        if self._free > 0 and not self._pending():
            self._free -= 1
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
