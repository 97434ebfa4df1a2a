"""Rate limits measured against the real clock over short runs.

Shared machines are noisy: waits are checked with lower bounds, and upper bounds only loosely.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import campaignd.limits as limits
from campaignd.fakeprovider import max_in_window
from campaignd.limits import (
    MIN_RATE_FACTOR,
    THROTTLE_CUT,
    THROTTLE_PAUSE_MIN_ANSWERS,
    CampaignCap,
    SenderLimiter,
    TokenBucket,
    throttled_too_long,
)


async def _acquire_times(acquire: Callable[[], Awaitable[Any]], count: int) -> list[float]:
    loop = asyncio.get_running_loop()
    times: list[float] = []
    for _ in range(count):
        await acquire()
        times.append(loop.time())
    return times


async def test_token_bucket_admits_burst_at_once_then_limits_rate() -> None:
    rate, burst = 50.0, 10
    bucket = TokenBucket(rate, burst)
    loop = asyncio.get_running_loop()
    started = loop.time()

    times = await _acquire_times(bucket.take, 3 * burst)

    assert times[burst - 1] - started < 0.05
    # The 2*burst acquisitions after the burst are paced at `rate`.
    assert times[-1] - started >= (2 * burst - 1) / rate * 0.9
    assert times[-1] - started < 5.0
    # In any quarter second: at most a quarter second of rate plus the burst (+1 for clock slack).
    assert max_in_window(times, 0.25) <= rate * 0.25 + burst + 1


async def test_token_bucket_never_exceeds_rate_plus_burst_per_second() -> None:
    rate, burst = 50.0, 10
    bucket = TokenBucket(rate, burst)

    # More than rate + burst acquisitions, so an unlimited bucket would break the bound.
    times = await _acquire_times(bucket.take, int(rate) + burst + 15)

    assert max_in_window(times, 1.0) <= rate + burst


def test_token_bucket_try_take_admits_the_burst_then_one_per_interval() -> None:
    bucket = TokenBucket(8.0, 3)  # times below are exact binary fractions of 1/8 s
    assert [bucket.try_take(100.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.try_take(100.0625)  # half a token refilled
    assert bucket.try_take(100.125)
    assert not bucket.try_take(100.125)
    # An idle bucket refills to its burst, no further.
    assert [bucket.try_take(200.0) for _ in range(4)] == [True, True, True, False]


async def test_token_bucket_serves_waiters_first_come_first_served() -> None:
    bucket = TokenBucket(100.0, 1)
    loop = asyncio.get_running_loop()
    assert bucket.try_take(loop.time())
    order: list[int] = []

    async def take(n: int) -> None:
        await bucket.take()
        order.append(n)

    waiters = [asyncio.create_task(take(n)) for n in range(4)]
    await asyncio.sleep(0)
    # A token refilled meanwhile belongs to the tasks already waiting, not to a newcomer.
    assert not bucket.try_take(loop.time() + 1.0)
    await asyncio.wait_for(asyncio.gather(*waiters), 5.0)
    assert order == [0, 1, 2, 3]


async def test_token_bucket_waiter_cancelled_at_the_head_hands_its_place_on() -> None:
    bucket = TokenBucket(20.0, 1)
    await bucket.take()
    head = asyncio.create_task(bucket.take())
    queued = asyncio.create_task(bucket.take())
    last = asyncio.create_task(bucket.take())
    await asyncio.sleep(0.01)
    queued.cancel()
    head.cancel()
    await asyncio.wait_for(last, 5.0)
    assert head.cancelled() and queued.cancelled()


async def test_sender_limiter_try_acquire_takes_nothing_when_it_says_wait() -> None:
    loop = asyncio.get_running_loop()
    limiter = SenderLimiter(1000.0, 2)
    now = loop.time()
    assert limiter.try_acquire(now)
    assert limiter.try_acquire(now)
    assert not limiter.try_acquire(now)  # the bucket is empty
    # One token and a half back: half a token, had the refusal taken one. Not exactly one,
    # which subtracting two large clock readings may leave a hair short of, and refuse.
    assert limiter.try_acquire(now + 0.0015)

    held = SenderLimiter(1000.0, 10)
    held.throttled(0.5)
    assert not held.try_acquire(loop.time())
    # Refused while throttled (held, then slowed): the bucket kept its tokens for later.
    assert held._bucket.try_take(loop.time())


async def test_sender_limiter_fast_path_never_overtakes_a_task_waiting_for_the_window() -> None:
    """A task that has its token but waits for room in the window (here the first window of
    a smooth start, assumed full) is first in line: a send that finds room at the moment it
    asks, through try_acquire, must not take it. Otherwise every worker that finishes a send
    could overtake it, send after send (a test of the circuit breaker saw a recipient sent
    more than twenty places late)."""
    loop = asyncio.get_running_loop()
    limiter = SenderLimiter(20.0, 5, smooth_start=True)
    waiting = asyncio.create_task(limiter.acquire())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiting.done(), "the first window is assumed full"
    # Later, room in the window and tokens in the bucket: still the waiter's turn first.
    assert not limiter.try_acquire(loop.time() + 10.0)
    await asyncio.wait_for(waiting, timeout=30)
    order: list[str] = []

    async def take(name: str) -> None:
        await limiter.acquire()
        order.append(name)

    first = asyncio.create_task(take("first"))
    await asyncio.sleep(0)
    second = asyncio.create_task(take("second"))
    await asyncio.wait_for(asyncio.gather(first, second), timeout=30)
    assert order == ["first", "second"]


async def test_sender_limiter_fast_path_keeps_the_window_limit() -> None:
    rate, burst = 50.0, 10
    limiter = SenderLimiter(rate, burst)
    loop = asyncio.get_running_loop()

    async def acquire() -> None:
        if not limiter.try_acquire(loop.time()):
            await limiter.acquire()

    times = await _acquire_times(acquire, int(rate) + burst + 15)

    assert max_in_window(times, 1.0) <= rate + burst


async def test_sender_limiter_first_burst_is_immediate_then_waits() -> None:
    rate, burst = 50.0, 10
    limiter = SenderLimiter(rate, burst)
    loop = asyncio.get_running_loop()
    started = loop.time()

    times = await _acquire_times(limiter.acquire, 3 * burst)

    assert times[burst - 1] - started < 0.05
    assert times[-1] - started >= (2 * burst - 1) / rate * 0.9
    assert max_in_window(times, 0.25) <= rate * 0.25 + burst + 1
    assert limiter.factor == 1.0


async def test_smooth_start_paces_the_first_window_at_the_rate_without_a_burst() -> None:
    rate, burst = 100.0, 20
    limiter = SenderLimiter(rate, burst, smooth_start=True)
    loop = asyncio.get_running_loop()
    started = loop.time()

    times = await _acquire_times(limiter.acquire, 60)

    # No burst at the start: the 20th token comes about 0.2 s in, not at once.
    assert times[burst - 1] - started >= 0.15
    # Paced near the rate (at most rate + burst over the guard's window): 60 tokens take
    # about half a second, with no clump.
    assert 0.45 <= times[-1] - started < 3.0
    assert max_in_window(times, 0.25) <= (rate + burst) * 0.25 + 2


async def test_restart_smoothly_paces_again_after_an_idle_spell() -> None:
    rate, burst = 100.0, 20
    limiter = SenderLimiter(rate, burst)
    await _acquire_times(limiter.acquire, 5)
    await asyncio.sleep(1.2)
    limiter.restart_smoothly()
    loop = asyncio.get_running_loop()
    started = loop.time()

    times = await _acquire_times(limiter.acquire, burst)

    # Without the restart the bucket, full again after the idle spell, would hand out the
    # whole burst at once.
    assert times[-1] - started >= 0.15


async def test_throttled_holds_next_acquire_for_retry_after_and_halves_factor() -> None:
    limiter = SenderLimiter(1000.0, 10)
    await limiter.acquire()
    loop = asyncio.get_running_loop()

    limiter.throttled(0.3)
    started = loop.time()
    await limiter.acquire()
    waited = loop.time() - started

    assert waited >= 0.29
    assert waited < 3.0
    assert limiter.factor == THROTTLE_CUT


async def test_throttled_without_retry_after_does_not_hold() -> None:
    limiter = SenderLimiter(1000.0, 10)
    loop = asyncio.get_running_loop()

    limiter.throttled(None)
    started = loop.time()
    await limiter.acquire()

    assert loop.time() - started < 0.25
    assert limiter.factor == THROTTLE_CUT


async def test_acquire_waiting_when_throttle_arrives_honours_the_hold() -> None:
    limiter = SenderLimiter(5.0, 1)
    await limiter.acquire()  # the bucket is now empty: the next token is 0.2 s away
    loop = asyncio.get_running_loop()
    started = loop.time()
    waiter = asyncio.create_task(limiter.acquire())
    await asyncio.sleep(0.05)

    limiter.throttled(0.5)
    await asyncio.wait_for(waiter, 5.0)

    assert loop.time() - started >= 0.5


async def test_throttles_within_one_interval_cut_the_rate_once() -> None:
    limiter = SenderLimiter(100.0, 10)

    cuts = [limiter.throttled(None) for _ in range(50)]

    assert limiter.factor == THROTTLE_CUT
    # Only the cut is news (the lane logs it); the other 49 answers are the same signal.
    assert cuts == [True] + [False] * 49


async def test_repeated_throttles_after_each_interval_cut_down_to_the_minimum(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(limits, "RECOVERY_INTERVAL_SECONDS", 0.0)
    limiter = SenderLimiter(100.0, 10)

    for _ in range(20):
        limiter.throttled(None)

    assert limiter.factor == MIN_RATE_FACTOR


async def test_slowed_limiter_paces_at_the_reduced_rate() -> None:
    rate, burst = 100.0, 20
    limiter = SenderLimiter(rate, burst)
    limiter.throttled(None)  # factor 0.5: 50/s through a bucket of one token
    loop = asyncio.get_running_loop()
    started = loop.time()

    await _acquire_times(limiter.acquire, 11)

    # Unthrottled, these 11 would all fit in the burst; at 50/s they need ~0.2 s.
    assert loop.time() - started >= 0.18
    assert limiter.factor == THROTTLE_CUT


async def test_factor_recovers_additively_after_recovery_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    limiter = SenderLimiter(1000.0, 10)
    limiter.throttled(None)
    assert limiter.factor == THROTTLE_CUT

    await limiter.acquire()
    assert limiter.factor == THROTTLE_CUT  # the default interval has not passed

    monkeypatch.setattr(limits, "RECOVERY_INTERVAL_SECONDS", 0.05)
    await asyncio.sleep(0.1)
    await limiter.acquire()
    assert limiter.factor == pytest.approx(THROTTLE_CUT + limits.RECOVERY_STEP)

    for _ in range(10):
        await asyncio.sleep(0.07)
        await limiter.acquire()
    assert limiter.factor == 1.0


async def test_campaign_cap_limits_to_its_rate() -> None:
    rate = 20.0
    cap = CampaignCap(rate)  # burst max(1, 20 // 10) = 2
    loop = asyncio.get_running_loop()
    started = loop.time()

    times = await _acquire_times(cap.acquire, 12)

    assert times[1] - started < 0.05
    assert times[-1] - started >= (12 - 2) / rate * 0.9
    assert max_in_window(times, 0.25) <= rate * 0.25 + 2 + 1


async def test_campaign_cap_with_slow_rate_has_burst_of_one() -> None:
    cap = CampaignCap(4.0)
    loop = asyncio.get_running_loop()
    started = loop.time()

    await cap.acquire()
    first = loop.time() - started
    await cap.acquire()
    second = loop.time() - started

    assert first < 0.05
    assert second >= 0.2


def test_a_sender_is_paused_only_after_enough_throttles_in_a_row_over_the_whole_limit() -> None:
    def judged(since: float, now: float, answers: int, limit: float = 60.0) -> bool:
        return throttled_too_long(since=since, now=now, answers=answers, pause_after_seconds=limit)

    assert judged(0.0, 60.0, THROTTLE_PAUSE_MIN_ANSWERS)
    assert not judged(0.0, 59.9, 1_000), "not before the limit, however many answers"
    # A streak picked up again after a quiet spell is not judged by its first answers.
    assert not judged(0.0, 3_600.0, THROTTLE_PAUSE_MIN_ANSWERS - 1)
    assert not judged(0.0, 1e9, 1_000_000, limit=0.0), "0 disables the pause"
