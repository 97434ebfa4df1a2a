"""Prometheus metrics (served at /metrics by the health server).

One registry per process, module-level, because one process runs one daemon; names follow
Prometheus conventions: ``campaignd_`` prefix, ``_total`` counters, base units.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import deque
from collections.abc import Iterator
from itertools import accumulate

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.metrics_core import HistogramMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.utils import floatToGoString

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)

MESSAGES = Counter(
    "campaignd_messages",
    "Recipient outcomes committed to the database, by sender, outcome and error class.",
    ["sender_id", "outcome", "error_class"],
    registry=REGISTRY,
)


class DurationSeries:
    """One label set's histogram: counts per bucket and their sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        # counts[i] counts observations <= bounds[i] and > bounds[i - 1]; the last, the rest.
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds


class DurationHistogram:
    """A histogram observed by the one event loop and read at scrape time (by the health
    server, on the same loop): prometheus_client's Histogram takes a lock twice per
    observation, for threads this process does not have, which cost about 5 µs of every
    message's CPU. The exposition is the same (cumulative buckets, _count, _sum)."""

    def __init__(
        self,
        name: str,
        documentation: str,
        label: str,
        bounds: tuple[float, ...],
        registry: CollectorRegistry,
    ) -> None:
        self._name, self._documentation, self._label = name, documentation, label
        self._bounds = bounds
        self._series: dict[str, DurationSeries] = {}
        registry.register(self)

    def labels(self, value: str) -> DurationSeries:
        return self._series.setdefault(value, DurationSeries(self._bounds))

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=[self._label])
        bucket_labels = [*map(floatToGoString, self._bounds), "+Inf"]
        for value, series in self._series.items():
            cumulative = accumulate(series.counts)
            buckets = [(le, float(count)) for le, count in zip(bucket_labels, cumulative, strict=True)]
            family.add_metric([value], buckets, series.sum)
        yield family


SEND_DURATION = DurationHistogram(
    "campaignd_send_duration_seconds",
    "Time from a request's start to the provider's answer (or the client's timeout).",
    "sender_id",
    (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    REGISTRY,
)
SENDS_IN_FLIGHT = Gauge(
    "campaignd_sends_in_flight", "Requests to providers currently in the air.", registry=REGISTRY
)


class InFlightCount:
    """Requests in the air, counted by the one event loop and read at scrape time: a gauge's
    inc()/dec() take a lock twice per message for a value nobody reads between scrapes. An
    instance, not a class attribute: setting a class's attribute invalidates its type cache."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


IN_FLIGHT = InFlightCount()
SENDS_IN_FLIGHT.set_function(lambda: IN_FLIGHT.count)
PENDING_RECIPIENTS = Gauge(
    "campaignd_pending_recipients",
    "Recipients of SENDING campaigns not yet final (pending or in flight), by sender.",
    ["sender_id"],
    registry=REGISTRY,
)
ACTIVE_CAMPAIGNS = Gauge("campaignd_active_campaigns", "Campaigns in status 'sending'.", registry=REGISTRY)
CAMPAIGNS_STUCK = Gauge(
    "campaignd_campaigns_stuck",
    "SENDING campaigns with pending work and no progress for [watchdog] stuck_after_seconds.",
    registry=REGISTRY,
)
LANES_HELD = Gauge("campaignd_lanes_held", "Sender lanes this process serves.", registry=REGISTRY)
WATCHDOG_RUNS = Counter(
    "campaignd_watchdog_runs",
    "Watchdog passes: ran, skipped (another daemon's watchdog held the lock) or error.",
    ["result"],
    registry=REGISTRY,
)
LANE_HANDOVERS = Counter(
    "campaignd_lane_handovers",
    "Sender lanes this process gave up so that a less busy replica would serve them.",
    ["sender_id"],
    registry=REGISTRY,
)
LEASE_TAKEOVERS = Counter(
    "campaignd_lease_takeovers",
    "Sender lanes taken from a previous owner whose lease had expired (by a daemon or the watchdog).",
    ["sender_id"],
    registry=REGISTRY,
)
IN_DOUBT = Counter(
    "campaignd_in_doubt_recipients",
    "Claims found in flight after their owner died or stalled: resent with the same key, or failed.",
    ["sender_id", "action"],
    registry=REGISTRY,
)
COUNTER_DRIFT_REPAIRED = Counter(
    "campaignd_counter_drift_repaired",
    "Campaigns whose counters differed from their recipient states and were recomputed.",
    registry=REGISTRY,
)
EVENT_LOOP_LAG = Gauge(
    "campaignd_event_loop_lag_seconds",
    "How late the event loop ran a timer, last measured.",
    registry=REGISTRY,
)
DATABASE_ERRORS = Counter(
    "campaignd_database_errors",
    "Database operations that failed with a connection, timeout or lock error (and were retried).",
    ["operation"],
    registry=REGISTRY,
)


class Throughput:
    """Messages sent per second over the last minute, for systemd's STATUS= line."""

    def __init__(self, window_seconds: float = 60.0) -> None:
        self._window = window_seconds
        self._events: deque[tuple[float, int]] = deque()

    def add(self, count: int, *, now: float | None = None) -> None:
        if count:
            at = time.monotonic() if now is None else now
            self._events.append((at, count))
            # Expired here too, not only when read: outside systemd nothing reads the rate,
            # and a long-running daemon kept one entry per outcome batch forever.
            self._expire(at)

    def rate(self, *, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        self._expire(now)
        if not self._events:
            return 0.0
        span = max(1.0, now - self._events[0][0])
        return sum(count for _, count in self._events) / span

    def _expire(self, now: float) -> None:
        while self._events and now - self._events[0][0] > self._window:
            self._events.popleft()

    def __len__(self) -> int:
        return len(self._events)


THROUGHPUT = Throughput()
