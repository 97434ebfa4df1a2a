"""Rate limits: the sender's token bucket, its slow-down when the provider throttles,
and the optional per-campaign cap."""

from __future__ import annotations

import asyncio
import math
from collections import deque

from aiolimiter import AsyncLimiter

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


def token_bucket(rate_per_second: float, burst: int) -> AsyncLimiter:
    """A bucket of ``burst`` tokens refilled at ``rate_per_second``.

    aiolimiter's leaky bucket admits ``max_rate`` at once and then drains at
    ``max_rate / time_period`` per second; so no one-second window ever sees more than
    ``rate_per_second + burst`` acquisitions.
    """
    capacity = max(1.0, float(burst))
    return AsyncLimiter(capacity, capacity / rate_per_second)


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
        self._bucket = token_bucket(rate_per_second, burst)
        # The promise is "no one-second window above rate + burst"; the bucket keeps it at
        # the moment tokens are taken, the window guard keeps it with a margin for jitter.
        self._window_limit = max(1, int(rate_per_second + burst))
        self._window_seconds = 1.0 + min(JITTER_MARGIN_SECONDS, burst / rate_per_second)
        self._recent: deque[float] = deque()
        self._slowdown: AsyncLimiter | None = None
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
                await slowdown.acquire()
            await self._bucket.acquire()
            # Almost every send finds room in the window at once, without another coroutine.
            if not self._take_window_slot(loop.time()):
                await self._window_guard(loop)
            # A throttle that arrived while this task waited for a token wins.
            if loop.time() >= self._hold_until:
                return

    def _take_window_slot(self, now: float) -> bool:
        if self._unprimed:
            self._unprimed = False
            self._assumed_full_until = now + self._window_seconds
        recent = self._recent
        expired = now - self._window_seconds
        while recent and recent[0] <= expired:
            recent.popleft()
        assumed = self._assumed(now)[0] if now < self._assumed_full_until else 0
        if len(recent) + assumed < self._window_limit:
            recent.append(now)
            return True
        return False

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

    def throttled(self, retry_after_seconds: float | None) -> None:
        now = asyncio.get_running_loop().time()
        if retry_after_seconds:
            self._hold_until = max(self._hold_until, now + retry_after_seconds)
        # One cut per recovery interval: fifty throttled answers to requests that were
        # already in flight together are one signal, not fifty.
        if now - self._last_adjust >= RECOVERY_INTERVAL_SECONDS or self._factor == 1.0:
            self._set_factor(max(MIN_RATE_FACTOR, self._factor * THROTTLE_CUT), now)

    def _maybe_recover(self, now: float) -> None:
        if self._factor < 1.0 and now - self._last_adjust >= RECOVERY_INTERVAL_SECONDS:
            self._set_factor(min(1.0, self._factor + RECOVERY_STEP), now)

    def _set_factor(self, factor: float, now: float) -> None:
        self._factor = factor
        self._last_adjust = now
        self._slowdown = None if factor >= 1.0 else token_bucket(self.rate_per_second * factor, 1)


class CampaignCap:
    """The campaign's own ``rate_per_second``, applied beneath the sender's bucket."""

    def __init__(self, rate_per_second: float) -> None:
        self.rate_per_second = rate_per_second
        self.burst = max(1, int(rate_per_second // 10))
        self._bucket = token_bucket(rate_per_second, self.burst)

    async def acquire(self) -> None:
        await self._bucket.acquire()
