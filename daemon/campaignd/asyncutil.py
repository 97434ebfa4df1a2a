"""Small asyncio helpers shared by the daemon's loops."""

from __future__ import annotations

import asyncio


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
