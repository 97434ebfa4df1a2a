"""The dispatcher's queue and send slots: order, wake-ups, fairness, and cancellation that
loses neither an item nor a slot."""

from __future__ import annotations

import asyncio

from campaignd.asyncutil import Slots, WorkQueue


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def _take_one(queue: WorkQueue[int]) -> int:
    while not queue.items:
        await queue.wait_for_item()
    return queue.items.popleft()


async def test_work_queue_is_fifo_and_wakes_an_idle_worker() -> None:
    queue: WorkQueue[int] = WorkQueue()
    taker = asyncio.create_task(_take_one(queue))
    await _settle()
    assert not taker.done()
    queue.put(1)
    queue.put(2)
    assert await asyncio.wait_for(taker, 5) == 1
    assert list(queue.items) == [2]


async def test_work_queue_wakes_one_worker_per_item() -> None:
    queue: WorkQueue[int] = WorkQueue()
    takers = [asyncio.create_task(_take_one(queue)) for _ in range(3)]
    await _settle()
    queue.put(1)
    queue.put(2)
    await _settle()
    assert sorted(t.result() for t in takers if t.done()) == [1, 2]
    assert sum(not t.done() for t in takers) == 1
    queue.put(3)
    assert sorted(await asyncio.wait_for(asyncio.gather(*takers), 5)) == [1, 2, 3]


async def test_work_queue_worker_woken_then_cancelled_passes_the_item_on() -> None:
    queue: WorkQueue[int] = WorkQueue()
    first = asyncio.create_task(_take_one(queue))
    second = asyncio.create_task(_take_one(queue))
    await _settle()
    queue.put(1)  # wakes the first idle worker...
    first.cancel()  # ...which is cancelled before it runs
    assert await asyncio.wait_for(second, 5) == 1
    assert first.cancelled()


async def test_slots_take_and_give_back_without_waiting_when_free() -> None:
    slots = Slots(2)
    assert slots.try_take()
    assert slots.try_take()
    assert not slots.try_take()
    slots.give_back()
    assert slots.try_take()


async def test_slots_waiters_are_served_first_come_first_served() -> None:
    slots = Slots(1)
    assert slots.try_take()
    order: list[int] = []

    async def take(n: int) -> None:
        await slots.take()
        order.append(n)

    waiters = [asyncio.create_task(take(n)) for n in range(3)]
    await _settle()
    # A newcomer does not overtake the tasks already waiting, even with a slot in hand-off.
    slots.give_back()
    assert not slots.try_take()
    await _settle()
    assert order == [0]
    slots.give_back()
    slots.give_back()
    await asyncio.wait_for(asyncio.gather(*waiters), 5)
    assert order == [0, 1, 2]
    slots.give_back()
    assert slots.try_take()
    assert not slots.try_take()


async def test_slots_cancelled_waiter_neither_keeps_a_slot_nor_blocks_the_next() -> None:
    slots = Slots(1)
    assert slots.try_take()
    cancelled = asyncio.create_task(slots.take())
    handed_over = asyncio.create_task(slots.take())
    after = asyncio.create_task(slots.take())
    await _settle()
    cancelled.cancel()
    await _settle()
    # The slot handed to a waiter cancelled before it runs goes on to the next one.
    slots.give_back()
    handed_over.cancel()
    await asyncio.wait_for(after, 5)
    assert cancelled.cancelled() and handed_over.cancelled()
    slots.give_back()
    assert slots.try_take()
    assert not slots.try_take()
