"""A lane's stop is a part of the daemon's shutdown: it can stop alone (handed over to a
replica) and always stops, within the daemon's deadline, with the daemon."""

from __future__ import annotations

import asyncio

from campaignd.dispatch import Shutdown


async def test_a_part_stops_alone_and_the_rest_goes_on() -> None:
    shutdown = Shutdown(drain_seconds=20.0)
    handed_over, other = shutdown.part(), shutdown.part()
    handed_over.request()
    assert handed_over.requested.is_set()
    remaining = handed_over.drain_remaining()
    assert remaining is not None and 19.0 < remaining <= 20.0
    assert not shutdown.requested.is_set()
    assert not other.requested.is_set()


async def test_every_part_stops_with_the_daemon() -> None:
    shutdown = Shutdown(drain_seconds=20.0)
    parts = [shutdown.part() for _ in range(3)]
    shutdown.request()
    assert all(part.requested.is_set() for part in parts)
    assert {part.drain_deadline for part in parts} == {shutdown.drain_deadline}
    # A part made after the shutdown began is stopped from the start.
    late = shutdown.part()
    assert late.requested.is_set() and late.drain_deadline == shutdown.drain_deadline


async def test_a_second_signal_ends_every_drain_even_a_handover_begun_earlier() -> None:
    shutdown = Shutdown(drain_seconds=20.0)
    handed_over = shutdown.part()
    handed_over.request()
    shutdown.request()
    # The first signal leaves the handover's own (sooner) deadline in place.
    first = handed_over.drain_remaining()
    assert first is not None and first > 0
    await asyncio.sleep(0.01)
    shutdown.request()
    assert handed_over.drain_remaining() == 0.0
    assert shutdown.drain_remaining() == 0.0


async def test_a_sooner_deadline_wakes_the_drains_waiting_on_the_old_one() -> None:
    shutdown = Shutdown(drain_seconds=20.0)
    paused_sender, handed_over = shutdown.part(), shutdown.part()
    handed_over.request()
    assert handed_over.deadline_moved.is_set() and not paused_sender.deadline_moved.is_set()
    handed_over.deadline_moved.clear()
    shutdown.request()
    # The signal's deadline is later than the handover's: that drain has nothing to wake for.
    assert not handed_over.deadline_moved.is_set()
    assert paused_sender.deadline_moved.is_set()
    await asyncio.sleep(0.01)
    shutdown.request()
    assert handed_over.deadline_moved.is_set() and handed_over.drain_remaining() == 0.0
