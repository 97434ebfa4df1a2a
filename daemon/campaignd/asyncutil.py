"""Small asyncio helpers shared by the daemon's loops."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


async def wait_any(*events: asyncio.Event, seconds: float | None) -> None:
    """Return when any event is set or after ``seconds``, whichever comes first.

    One place to wait for "NOTIFY arrived, shutdown requested, or the poll is due",
    instead of polling with short sleeps.
    """
    if not events:
        await asyncio.sleep(seconds or 0)
        return
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def _wake_first(waiters: deque[asyncio.Future[None]]) -> bool:
    """Resolve the longest waiter still waiting, dropping cancelled ones; False if none was."""
    while waiters:
        waiter = waiters.popleft()
        if not waiter.done():
            waiter.set_result(None)
            return True
    return False


class WorkQueue(Generic[T]):
    """A FIFO that a fixed pool of worker tasks takes from, whose hot path is plain code.

    asyncio.Queue costs about ten Python calls per item (put, get, their full/empty checks
    and wake-ups), more than a whole send's own bookkeeping at thousands of messages per
    second. Here a worker takes an item that is already there with ``items.popleft()``, and
    waits (``wait_for_item``) only when there is none.
    """

    def __init__(self) -> None:
        self.items: deque[T] = deque()
        self._idle: deque[asyncio.Future[None]] = deque()

    def put(self, item: T) -> None:
        self.items.append(item)
        if self._idle:
            _wake_first(self._idle)

    async def wait_for_item(self) -> None:
        """Until an item may be there: another worker may take it first, so look again."""
        waiter = asyncio.get_running_loop().create_future()
        self._idle.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            # Woken, then cancelled before it could run: the wake-up goes to another worker,
            # or an item would wait while a worker idles.
            if waiter.done() and not waiter.cancelled() and self.items:
                _wake_first(self._idle)
            raise


class Slots:
    """A counting semaphore, first come first served, whose uncontended take is one plain call.

    ``asyncio.Semaphore``'s ``async with`` costs seven Python calls even when a slot is free;
    here ``try_take()`` either takes a free slot or says to ``await take()``. A slot given
    back goes straight to the longest waiter, so a stream of ``try_take()`` callers cannot
    overtake the tasks already waiting.
    """

    def __init__(self, count: int) -> None:
        self._free = count
        self._waiters: deque[asyncio.Future[None]] = deque()

    def try_take(self) -> bool:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return True
        return False

    async def take(self) -> None:
        if self.try_take():
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.cancelled():
                # give_back() may have dropped it already.
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            else:
                # Handed a slot, then cancelled before it could run: it goes on.
                self.give_back()
            raise

    def give_back(self) -> None:
        if not (self._waiters and _wake_first(self._waiters)):
            self._free += 1
