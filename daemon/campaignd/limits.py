"""Rate limits: the sender's token bucket, its slow-down when the provider throttles,
and the optional per-campaign cap."""

from __future__ import annotations

import asyncio
import math
from collections import deque

# After a throttle the sender's rate is cut multiplicatively, then climbs back
# additively (AIMD), so a provider that keeps throttling converges on what it accepts.
THROTTLE_CUT = 0.5
MIN_RATE_FACTOR = 0.05
RECOVERY_STEP = 0.1
RECOVERY_INTERVAL_SECONDS = 2.0
# Requests reach the provider with some jitter (the event loop, the connection pool, the
# network, the provider's accept queue), which squeezes evenly spaced requests into clumps.
# The window guard counts rate + burst over one second plus this margin, as far as the
# burst allows without lowering the sustained rate: (1 + margin) * rate <= rate + burst.
JITTER_MARGIN_SECONDS = 0.1
# A streak of throttled answers is judged only once it holds this many: one picked up again
# after a quiet spell (a campaign paused, then resumed) is not judged by its first answer.
THROTTLE_PAUSE_MIN_ANSWERS = 10


def throttled_too_long(*, since: float, now: float, answers: int, pause_after_seconds: float) -> bool:
    """Whether a sender whose every answer since ``since`` was one of ``answers`` throttles
    should be paused (``pause_after_seconds`` 0: never)."""
    return (
        pause_after_seconds > 0
        and answers >= THROTTLE_PAUSE_MIN_ANSWERS
        and now - since >= pause_after_seconds
    )


class TokenBucket:
    """A leaky bucket of ``burst`` tokens refilled at ``rate_per_second``: it admits ``burst``
    takes at once, then one per 1/rate, so no one-second window sees more than
    ``rate_per_second + burst`` takes.

    The bucket aiolimiter offers, with a take that is one plain call when a token is there
    (``try_take``): a lane takes a token for every message, and awaiting
    ``AsyncLimiter.acquire()`` cost ten Python calls each time. Tasks that must wait are
    served first come, first served: only the longest waiter sleeps until the next token,
    and hands its place on when it has one.
    """

    __slots__ = ("_checked_at", "_level", "_waiters", "capacity", "rate")

    def __init__(self, rate_per_second: float, burst: int) -> None:
        self.rate = rate_per_second
        self.capacity = max(1.0, float(burst))
        self._level = 0.0
        self._checked_at = 0.0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def try_take(self, now: float) -> bool:
        """Take a token if one is there and no task waits for one before."""
        return not self._waiters and self._take(now)

    def _take(self, now: float) -> bool:
        level = self._level - (now - self._checked_at) * self.rate
        self._checked_at = now
        if level < 0.0:
            level = 0.0
        if level + 1.0 <= self.capacity:
            self._level = level + 1.0
            return True
        self._level = level
        return False

    async def take(self) -> None:
        loop = asyncio.get_running_loop()
        if self.try_take(loop.time()):
            return
        me = loop.create_future()
        waiters = self._waiters
        waiters.append(me)
        try:
            if waiters[0] is not me:
                await me
            # Time, not another task, brings the next token: the head sleeps until it is due.
            while True:
                if self._take(loop.time()):
                    break
                await asyncio.sleep((self._level + 1.0 - self.capacity) / self.rate)
        finally:
            # The longest waiter when it took its token (or was cancelled after being handed
            # the head); anywhere in the queue when cancelled while waiting its turn.
            was_head = waiters[0] is me
            waiters.remove(me)
            if was_head and waiters and not waiters[0].done():
                waiters[0].set_result(None)


class SenderLimiter:
    """Every request that reaches the provider, whatever its outcome, takes one token."""

    def __init__(self, rate_per_second: float, burst: int, *, smooth_start: bool = False) -> None:
        self.rate_per_second = rate_per_second
        self.burst = burst
        # A lane that starts (a takeover, a restart, a graceful handover) may follow another
        # owner's full second of sends, and its first requests leave late while connections
        # open in a busy process, arriving in a clump. Starting as if the last window had been
        # full paces the first second at the rate, with the burst kept as slack for both.
        self._unprimed = smooth_start
        self._assumed_full_until = 0.0
        self._bucket = TokenBucket(rate_per_second, burst)
        # The promise is "no one-second window above rate + burst"; the bucket keeps it at
        # the moment tokens are taken, the window guard keeps it with a margin for jitter.
        self._window_limit = max(1, int(rate_per_second + burst))
        self._window_seconds = 1.0 + min(JITTER_MARGIN_SECONDS, burst / rate_per_second)
        # Tasks inside acquire() are first in line: try_acquire takes nothing while one waits,
        # and those waiting for room in the window get it in the order they got their tokens.
        self._acquiring = 0
        self._window_turn = asyncio.Lock()
        self._recent: deque[float] = deque()
        self._slowdown: TokenBucket | None = None
        self._factor = 1.0
        self._hold_until = 0.0
        self._last_adjust = 0.0

    def restart_smoothly(self) -> None:
        """Pace the next window as after a start (see ``smooth_start``)."""
        self._recent.clear()
        self._unprimed = True

    @property
    def factor(self) -> float:
        return self._factor

    async def acquire(self) -> None:
        self._acquiring += 1
        try:
            await self._acquire()
        finally:
            self._acquiring -= 1

    async def _acquire(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            if now < self._hold_until:
                await asyncio.sleep(self._hold_until - now)
                continue
            if self._factor < 1.0:
                self._maybe_recover(now)
            slowdown = self._slowdown
            if slowdown is not None:
                await slowdown.take()
            await self._bucket.take()
            # Almost every send finds room in the window at once, without another coroutine.
            if self._window_turn.locked() or not self._take_window_slot(loop.time()):
                async with self._window_turn:
                    await self._window_guard(loop)
            # A throttle that arrived while this task waited for a token wins.
            if loop.time() >= self._hold_until:
                return

    def try_acquire(self, now: float) -> bool:
        """The common case in one plain call: nobody waiting in ``acquire()``, no throttle in
        force, room in the window and a token in the bucket. Otherwise nothing is taken, and
        the caller awaits ``acquire()``."""
        if (
            self._acquiring
            or now < self._hold_until
            or self._slowdown is not None
            or not self._window_has_room(now)
        ):
            return False
        if not self._bucket.try_take(now):
            return False
        self._recent.append(now)
        return True

    def _take_window_slot(self, now: float) -> bool:
        if self._window_has_room(now):
            self._recent.append(now)
            return True
        return False

    def _window_has_room(self, now: float) -> bool:
        if self._unprimed:
            self._unprimed = False
            self._assumed_full_until = now + self._window_seconds
        recent = self._recent
        expired = now - self._window_seconds
        while recent and recent[0] <= expired:
            recent.popleft()
        assumed = self._assumed(now)[0] if now < self._assumed_full_until else 0
        return len(recent) + assumed < self._window_limit

    async def _window_guard(self, loop: asyncio.AbstractEventLoop) -> None:
        """Until the window has room: when the oldest send in it (or assumed in it) expires."""
        while not self._take_window_slot(now := loop.time()):
            _, next_expiry = self._assumed(now)
            if self._recent:
                next_expiry = min(next_expiry, self._recent[0] + self._window_seconds)
            await asyncio.sleep(max(next_expiry - now, 0.0))

    def _assumed(self, now: float) -> tuple[int, float]:
        """Sends assumed in the window before a (re)start: a full window of them, evenly
        spaced, expiring one by one. Counted, not stored: at a high rate that is millions.
        Returns how many still count, and when the next one expires."""
        left = self._assumed_full_until - now
        if left <= 0:
            return 0, float("inf")
        spacing = self._window_seconds / self._window_limit
        count = math.ceil(left / spacing)
        return count, now + (left - (count - 1) * spacing)

    def throttled(self, retry_after_seconds: float | None) -> bool:
        """Slow down for a throttled answer; returns whether this answer cut the rate."""
        now = asyncio.get_running_loop().time()
        if retry_after_seconds:
            self._hold_until = max(self._hold_until, now + retry_after_seconds)
        # One cut per recovery interval: fifty throttled answers to requests that were
        # already in flight together are one signal, not fifty.
        if now - self._last_adjust >= RECOVERY_INTERVAL_SECONDS or self._factor == 1.0:
            self._set_factor(max(MIN_RATE_FACTOR, self._factor * THROTTLE_CUT), now)
            return True
        return False

    def _maybe_recover(self, now: float) -> None:
        if self._factor < 1.0 and now - self._last_adjust >= RECOVERY_INTERVAL_SECONDS:
            self._set_factor(min(1.0, self._factor + RECOVERY_STEP), now)

    def _set_factor(self, factor: float, now: float) -> None:
        self._factor = factor
        self._last_adjust = now
        self._slowdown = None if factor >= 1.0 else TokenBucket(self.rate_per_second * factor, 1)


class CampaignCap:
    """The campaign's own ``rate_per_second``, applied beneath the sender's bucket."""

    def __init__(self, rate_per_second: float) -> None:
        self.rate_per_second = rate_per_second
        self.burst = max(1, int(rate_per_second // 10))
        self._bucket = TokenBucket(rate_per_second, self.burst)

    async def acquire(self) -> None:
        await self._bucket.take()
