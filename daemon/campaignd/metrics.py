"""Prometheus metrics (served at /metrics by the health server).

One registry per process, module-level, because one process runs one daemon; names follow
Prometheus conventions: ``campaignd_`` prefix, ``_total`` counters, base units.
"""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.process_collector import ProcessCollector

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)

MESSAGES = Counter(
    "campaignd_messages",
    "Recipient outcomes committed to the database, by sender, outcome and error class.",
    ["sender_id", "outcome", "error_class"],
    registry=REGISTRY,
)
SEND_DURATION = Histogram(
    "campaignd_send_duration_seconds",
    "Time from a request's start to the provider's answer (or the client's timeout).",
    ["sender_id"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    registry=REGISTRY,
)
SENDS_IN_FLIGHT = Gauge(
    "campaignd_sends_in_flight", "Requests to providers currently in the air.", registry=REGISTRY
)


class InFlight:
    """Requests in the air, counted by the one event loop and read at scrape time: a gauge's
    inc()/dec() take a lock twice per message for a value nobody reads between scrapes."""

    count = 0


SENDS_IN_FLIGHT.set_function(lambda: InFlight.count)
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

    def add(self, count: int) -> None:
        if count:
            self._events.append((time.monotonic(), count))

    def rate(self) -> float:
        now = time.monotonic()
        while self._events and now - self._events[0][0] > self._window:
            self._events.popleft()
        if not self._events:
            return 0.0
        span = max(1.0, now - self._events[0][0])
        return sum(count for _, count in self._events) / span


THROUGHPUT = Throughput()
