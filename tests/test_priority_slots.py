"""The gateway's admission slots (tpmflow.gateway.admission): waiters served by priority, then arrival;
cancelled waiters (timeouts, clients gone) never leak or swallow a slot. Fast: no engine."""

from __future__ import annotations

import asyncio

import pytest

from tpmflow.gateway.admission import PrioritySlots


def test_a_released_slot_goes_to_the_most_urgent_waiter_then_the_earliest() -> None:
    async def main() -> list[str]:
        slots, order = PrioritySlots(1), []
        await slots.acquire()

        async def wait(name: str, priority: int) -> None:
            await slots.acquire(priority)
            order.append(name)
            slots.release()

        tasks = []
        for name, priority in [("batch-a", 10), ("batch-b", 10), ("interactive", 0), ("probe", 5)]:
            tasks.append(asyncio.create_task(wait(name, priority)))
            await asyncio.sleep(0)  # it is queued before the next arrives
        assert slots.locked()
        slots.release()
        await asyncio.gather(*tasks)
        assert not slots.locked()
        return order

    assert asyncio.run(main()) == ["interactive", "probe", "batch-a", "batch-b"]


def test_cancelled_waiters_neither_leak_nor_swallow_slots() -> None:
    async def main() -> None:
        slots = PrioritySlots(2)
        await slots.acquire()
        await slots.acquire()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(slots.acquire(0), timeout=0.01)  # gave up: stays only as a dead entry
        waiter = asyncio.create_task(slots.acquire(5))
        await asyncio.sleep(0)
        slots.release()  # skips the dead entry, hands the slot to the live waiter
        await asyncio.wait_for(waiter, timeout=1)
        # granted and cancelled in the same instant: the slot is passed on, not lost
        late = asyncio.create_task(slots.acquire(1))
        await asyncio.sleep(0)
        slots.release()
        late.cancel()
        with pytest.raises(asyncio.CancelledError):
            await late
        slots.release()  # the waiter's slot
        assert not slots.locked()
        await asyncio.wait_for(slots.acquire(), timeout=1)
        await asyncio.wait_for(slots.acquire(), timeout=1)
        assert slots.locked()

    asyncio.run(main())
