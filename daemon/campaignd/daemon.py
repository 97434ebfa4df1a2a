"""The daemon: connect, take sender lanes as work appears, serve them, stop cleanly.

Lifecycle, in order (each step undone in reverse on the way out):
1. the health server (answers probes even while the database is unreachable);
2. the connection pool (retried with backoff: the database may start after us);
3. the schema check and the sender rows mirrored from config;
4. provider sessions;
5. side loops: the NOTIFY listener (wakes lane acquisition the moment a campaign starts),
   the watchdog, the event-loop lag probe, and systemd notifications;
6. the lane manager, which acquires free or expired lanes and runs one Lane task each;
7. the balancer, which announces this daemon to its replicas and hands one of its lanes
   to a replica that serves two fewer (the lane drains and is released, as on shutdown).
On shutdown the manager stops acquiring, and every lane drains and releases before the
provider sessions and the pool close. A side task that fails (a bug) is a shutdown too:
the lanes drain the same way, then the process exits 1 (DaemonFailed).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Coroutine, Iterator
from typing import Any

import asyncpg
import structlog

from campaignd import db, leasing, metrics
from campaignd.asyncutil import Slots, wait_any
from campaignd.config import Settings
from campaignd.dispatch import FINAL_WRITE_SECONDS, Lane, Shutdown
from campaignd.health import HealthServer, Heartbeats
from campaignd.providers import Provider, build_provider
from campaignd.schema import SchemaNotReady, require_current
from campaignd.sdnotify import Notifier
from campaignd.sql import QUERIES
from campaignd.storable import StorableText, server_encoding, storable_text
from campaignd.watchdog import Watchdog

log = structlog.get_logger("campaignd.daemon")

# After the drain and the final writes, how long a stop may take to give claims back, release
# the lanes and close its connections before the process ends itself (end_an_overrunning_stop).
# The unit's TimeoutStopSec (drain_seconds + 20 s) outlasts drain_seconds + 5 s + this.
STOP_MARGIN_SECONDS = 10.0

NOTIFY_CHANNEL = "campaignd_work"


DISPATCHER_HEARTBEAT = "dispatcher"


class StartupError(Exception):
    """The daemon cannot start (its message says why); exit code 1."""


class DaemonFailed(Exception):
    """A side task failed, was logged (daemon_failed) and the lanes drained: exit code 1.

    Raised after everything is closed; its callers end the process on that one structured
    line, without a second, unstructured traceback.
    """

    def __init__(self, failed: list[str]) -> None:
        super().__init__(f"failed: {', '.join(failed)}")
        self.failed = failed


LOOP_LAG_PROBE_SECONDS = 0.5
# How often the NOTIFY listener is asked a question, and how long its answer may take: a
# listener that went silent is replaced within twice this, instead of leaving every new
# campaign to the next poll for as long as its socket stays open.
LISTENER_PROBE_SECONDS = 10.0
# How long the pool's polite close may take at the end of a stop before its connections are
# dropped; within STOP_MARGIN_SECONDS.
POOL_CLOSE_SECONDS = 2.0


class Daemon:
    def __init__(self, settings: Settings, shutdown: Shutdown) -> None:
        self.settings = settings
        self.shutdown = shutdown
        self._owner = settings.dispatch.owner
        self._wake_manager = asyncio.Event()
        self._lane_wakes: dict[str, asyncio.Event] = {s: asyncio.Event() for s in settings.senders}
        self._lanes: dict[str, asyncio.Task[None]] = {}
        # Owns the lane tasks while the daemon serves (see _serve).
        self._lane_group: asyncio.TaskGroup | None = None
        # Per lane: its own stop (a part of the daemon's shutdown) and when it was taken.
        self._lane_stops: dict[str, Shutdown] = {}
        self._lanes_since: dict[str, float] = {}
        # Lanes handed over to a replica: not taken back until this (loop) time, which is set
        # once the lane is released; None while it drains.
        self._handed_over: dict[str, float | None] = {}
        self._announced = False
        self._send_slots = Slots(settings.dispatch.concurrency)
        self._pool: asyncpg.Pool | None = None
        # The database's server encoding, and how the lanes make texts storable in it (None:
        # UTF8 or SQL_ASCII, which store any text): read once the pool is up.
        self._server_encoding: str | None = None
        self._storable: StorableText | None = None
        self.heartbeats = Heartbeats()
        self.ready = asyncio.Event()

    async def run(self) -> None:
        # The health server comes first so that probes get answers (liveness yes, readiness
        # "connecting") while the database is still unreachable.
        health = await self._start_health_server()
        notifier = Notifier()
        try:
            await self._run_connected(notifier)
        finally:
            notifier.notify("STOPPING=1")
            notifier.close()
            if health is not None:
                await health.stop()
            log.info("daemon_stopped", owner=self._owner)

    async def _register_senders(self) -> bool:
        """Mirrors the configured senders, once the schema is known to be current (raises
        SchemaNotReady otherwise: no retry would fix that)."""
        assert self._pool is not None
        async with self._pool.acquire() as connection:
            await require_current(connection)
            await sync_senders(connection, self.settings)
            self._server_encoding = server_encoding(connection)
        self._storable = storable_text(self._server_encoding)
        return True

    async def _run_connected(self, notifier: Notifier) -> None:
        pool = await db.retry_until(
            lambda: db.create_pool(self.settings.database),
            stop=self.shutdown.requested,
            what="connect",
            # A login refused at start is a wrong password or role: exit, saying so (cli).
            fatal=(db.LOGIN_REFUSED,),
        )
        if pool is None:
            return
        self._pool = pool
        providers: dict[str, Provider] = {}
        try:
            # Retried like every other statement: a blip between connecting and serving must
            # not make the daemon exit, where a supervisor may not restart it.
            if not await db.retry_until(self._register_senders, stop=self.shutdown.requested, what="start"):
                return
            providers = {
                sender_id: build_provider(
                    sender_id, sender, connection_limit=self.settings.dispatch.concurrency
                )
                for sender_id, sender in self.settings.senders.items()
            }
            log.info(
                "daemon_started",
                owner=self._owner,
                senders=sorted(providers),
                concurrency=self.settings.dispatch.concurrency,
                server_encoding=self._server_encoding,
            )
            self.heartbeats.register(
                DISPATCHER_HEARTBEAT, allowance_seconds=max(30.0, 10 * self.settings.dispatch.poll_seconds)
            )
            failed = await self._serve(pool, providers, notifier)
        finally:
            self._pool = None
            if self._announced:
                await self._retire(pool)
            for provider in providers.values():
                await provider.close()
            await db.close_pool(pool, POOL_CLOSE_SECONDS)
        if failed:
            raise DaemonFailed(failed)

    async def _serve(
        self, pool: asyncpg.Pool, providers: dict[str, Provider], notifier: Notifier
    ) -> list[str]:
        """Serve until the shutdown request or a side task's failure; returns what failed.

        Lanes are not siblings of the side loops: a failing task makes a task group cancel
        its siblings, and a lane cancelled mid-send records nothing of the sends in the air.
        They are owned by a group around the side loops instead, which is only left once
        every lane has drained and released; its body does not raise (a side task's failure
        is turned into a shutdown request), so that group never cancels them. Only the
        cancellation of run() itself cancels the lanes, and even then they release their
        leases while the pool is still open.
        """
        watchdog = Watchdog(pool, self.settings.watchdog, self.heartbeats)
        side_loops: list[tuple[str, Coroutine[Any, Any, None]]] = [
            ("lane-manager", self._manage_lanes(pool, providers)),
            ("watchdog", watchdog.run(self.shutdown.requested)),
            ("loop-lag", self._measure_loop_lag()),
            ("sd-notify", self._notify_systemd(notifier)),
        ]
        if self.settings.dispatch.rebalance_seconds > 0:
            side_loops.append(("balance", self._balance(pool)))
        failed: list[str] = []
        async with asyncio.TaskGroup() as lanes:
            self._lane_group = lanes
            tasks: list[asyncio.Task[None]] = []
            try:
                async with asyncio.TaskGroup() as group:
                    tasks = [group.create_task(loop, name=name) for name, loop in side_loops]
                    # The listener only ever ends by this cancellation; the other loops end
                    # with the shutdown request.
                    listener = group.create_task(self._listen(), name="listener")
                    tasks.append(listener)
                    await self.shutdown.requested.wait()
                    listener.cancel()
            except Exception as exc:
                failures = [
                    task for task in tasks if task.done() and not task.cancelled() and task.exception()
                ]
                failed = [task.get_name() for task in failures] or ["daemon"]
                cause = failures[0].exception() if len(failures) == 1 else exc
                log.error(
                    "daemon_failed",
                    failed=failed,
                    error=type(cause).__name__,
                    note="draining the lanes, then exiting",
                    exc_info=cause,
                )
                # Not a second request: that would cut short a drain already under way.
                if not self.shutdown.requested.is_set():
                    self.shutdown.request()
            if self._lanes:
                log.info(
                    "draining", lanes=sorted(self._lanes), drain_seconds=self.settings.dispatch.drain_seconds
                )
        self._lane_group = None
        return failed

    async def _start_health_server(self) -> HealthServer | None:
        address = self.settings.health.address
        if address is None:
            return None
        server = HealthServer(address[0], address[1], self.heartbeats, self._readiness)
        try:
            await server.start()
        except OSError as exc:
            raise StartupError(
                f"cannot listen on [health] listen = {self.settings.health.listen}: {exc.strerror}"
            ) from exc
        return server

    async def _readiness(self) -> str | None:
        """None when ready; otherwise why not."""
        pool = self._pool
        if pool is None:
            return "not connected to the database yet"
        try:
            async with asyncio.timeout(3):
                async with pool.acquire() as connection:
                    await require_current(connection)
        except SchemaNotReady as exc:
            return str(exc)
        except Exception as exc:
            if isinstance(exc, db.LOGIN_REFUSED):
                # Waited out like an outage, but it is no outage: the operator has to act.
                return f"database login refused ({type(exc).__name__})"
            if isinstance(exc, TimeoutError) or db.is_transient_db_error(exc):
                return f"database unreachable ({type(exc).__name__})"
            # Not ready either way (a login refused, a server error): a probe gets 503 and the
            # reason's type, not a 500 and a traceback in the log every few seconds.
            return f"database error ({type(exc).__name__})"
        return None

    async def _measure_loop_lag(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.shutdown.requested.is_set():
            started = loop.time()
            await wait_any(self.shutdown.requested, seconds=LOOP_LAG_PROBE_SECONDS)
            if not self.shutdown.requested.is_set():
                metrics.EVENT_LOOP_LAG.set(max(0.0, loop.time() - started - LOOP_LAG_PROBE_SECONDS))

    def status_line(self) -> str:
        active = metrics.REGISTRY.get_sample_value("campaignd_active_campaigns") or 0
        return (
            f"STATUS={len(self._lanes)} lanes, {active:.0f} campaigns active, "
            f"{metrics.THROUGHPUT.rate():.0f} msg/s"
        )

    async def _notify_systemd(self, notifier: Notifier) -> None:
        if not notifier.enabled:
            return
        await wait_any(self.ready, self.shutdown.requested, seconds=None)
        if self.shutdown.requested.is_set():
            return
        notifier.notify("READY=1", self.status_line())
        interval = min(notifier.watchdog_interval or 5.0, 5.0)
        while not self.shutdown.requested.is_set():
            problems = self.heartbeats.problems()
            # Withholding WATCHDOG=1 is how a wedged daemon gets restarted by systemd.
            if not problems:
                notifier.notify("WATCHDOG=1", self.status_line())
            else:
                notifier.notify("STATUS=unhealthy: " + "; ".join(problems))
            await wait_any(self.shutdown.requested, seconds=interval)
        notifier.notify("STOPPING=1", "STATUS=draining")

    # ------------------------------------------------------------------ lanes

    async def _manage_lanes(self, pool: asyncpg.Pool, providers: dict[str, Provider]) -> None:
        config = self.settings.dispatch
        backoff = db.Backoff()
        while not self.shutdown.requested.is_set():
            self.heartbeats.beat(DISPATCHER_HEARTBEAT)
            metrics.LANES_HELD.set(len(self._lanes))
            free = [
                sender_id
                for sender_id in self.settings.senders
                if sender_id not in self._lanes and not self._handing_over(sender_id)
            ]
            if free:
                deferral = leasing.acquisition_deferral(len(self._lanes))
                if deferral:
                    await wait_any(self.shutdown.requested, seconds=deferral)
                    if self.shutdown.requested.is_set():
                        continue
                try:
                    async with pool.acquire() as connection:
                        leases = await leasing.acquire_lanes(
                            connection, free, self._owner, config.lease_seconds
                        )
                    backoff.reset()
                except Exception as exc:
                    await backoff.wait_after(
                        exc, log, "acquire_lanes", self._wake_manager, self.shutdown.requested
                    )
                    self._wake_manager.clear()
                    continue
                for lease in leases:
                    self._start_lane(lease, pool, providers[lease.sender_id])
                if leases:
                    # There may be more: try again at once (after this lane's deferral).
                    self._wake_manager.set()
            self.ready.set()
            await self._sleep(config.poll_seconds)

    def _start_lane(self, lease: leasing.LaneLease, pool: asyncpg.Pool, provider: Provider) -> None:
        assert self._lane_group is not None
        stop = self._lane_stops[lease.sender_id] = self.shutdown.part()
        lane = Lane(
            lease=lease,
            sender=self.settings.senders[lease.sender_id],
            provider=provider,
            pool=pool,
            dispatch=self.settings.dispatch,
            send_slots=self._send_slots,
            shutdown=stop,
            wake=self._lane_wakes[lease.sender_id],
            storable=self._storable,
        )
        task = self._lane_group.create_task(
            self._serve_lane(lease.sender_id, lane), name=f"lane:{lease.sender_id}"
        )
        self._lanes[lease.sender_id] = task
        self._lanes_since[lease.sender_id] = asyncio.get_running_loop().time()

    async def _serve_lane(self, sender_id: str, lane: Lane) -> None:
        crashed = False
        try:
            await lane.run()
        except Exception as exc:
            # A lane never takes the daemon down (nor, raising in the lanes' task group, the
            # other lanes): its lease expires or is re-acquired, and its in-flight claims
            # are recovered as in doubt. It is taken again on the next poll, not at once,
            # so a lane that keeps failing does not spin.
            crashed = True
            log.error("lane_crashed", sender_id=sender_id, error=repr(exc), exc_info=exc)
        finally:
            self._lanes.pop(sender_id, None)
            self._lanes_since.pop(sender_id, None)
            self._lane_stops.pop(sender_id, None)
            if sender_id in self._handed_over:
                self._handed_over[sender_id] = asyncio.get_running_loop().time() + leasing.handover_grace(
                    self.settings.dispatch.poll_seconds
                )
            if not crashed:
                # Look for more work (or re-acquire this lane) without waiting for the poll.
                self._wake_manager.set()

    def _handing_over(self, sender_id: str) -> bool:
        """Whether a lane handed over is still left to the replica it was meant for.

        If that replica has not taken it within the grace (it died, or lost the race to a
        third), this daemon may take it back like any free lane.
        """
        if sender_id not in self._handed_over:
            return False
        until = self._handed_over[sender_id]
        if until is None or asyncio.get_running_loop().time() < until:
            return True
        del self._handed_over[sender_id]
        return False

    # --------------------------------------------------------------- balancing

    async def _balance(self, pool: asyncpg.Pool) -> None:
        interval = self.settings.dispatch.rebalance_seconds
        senders = sorted(self.settings.senders)
        while not self.shutdown.requested.is_set():
            try:
                async with pool.acquire() as connection:
                    peers = await leasing.announce(
                        connection, self._owner, senders, interval, first=not self._announced
                    )
                self._announced = True
            except Exception as exc:
                # Only sharing waits: the lanes go on, and the next round tries again.
                log.warning("announce_failed", error=type(exc).__name__)
            else:
                self._hand_over_if_unbalanced(peers, settled_after=interval)
            await wait_any(self.shutdown.requested, seconds=interval)

    def _hand_over_if_unbalanced(self, peers: list[leasing.Peer], *, settled_after: float) -> None:
        # One handover at a time, and none while a lane stops for another reason: the counts
        # the next decision rests on must have settled.
        if any(self._handing_over(sender_id) for sender_id in list(self._handed_over)):
            return
        if any(stop.requested.is_set() for stop in self._lane_stops.values()):
            return
        handover = leasing.lane_to_hand_over(
            self._lanes_since, peers, now=asyncio.get_running_loop().time(), settled_after=settled_after
        )
        if handover is None:
            return
        log.info(
            "lane_handover",
            sender_id=handover.sender_id,
            owner=self._owner,
            to=handover.to.owner,
            lanes=len(self._lanes),
            their_lanes=handover.to.lanes,
        )
        metrics.LANE_HANDOVERS.labels(handover.sender_id).inc()
        self._handed_over[handover.sender_id] = None
        # _lanes_since, which the handover was chosen from, and _lane_stops share their keys.
        self._lane_stops[handover.sender_id].request()

    async def _retire(self, pool: asyncpg.Pool) -> None:
        """Leave the replicas' view at once rather than when the announcement expires."""
        try:
            async with asyncio.timeout(2):
                async with pool.acquire() as connection:
                    await leasing.retire(connection, self._owner)
        except Exception as exc:
            log.warning("retire_failed", error=type(exc).__name__)

    async def _sleep(self, seconds: float) -> None:
        await wait_any(self._wake_manager, self.shutdown.requested, seconds=seconds)
        self._wake_manager.clear()

    # --------------------------------------------------------------- listening

    def _on_notify(self, _connection: db.Connection, _pid: int, _channel: str, payload: object) -> None:
        wake = self._lane_wakes.get(str(payload))
        if wake is None:
            return
        wake.set()
        self._wake_manager.set()

    def _wake_everything(self) -> None:
        for wake in self._lane_wakes.values():
            wake.set()
        self._wake_manager.set()

    async def _listen(self) -> None:
        """Keeps a LISTEN connection; ends only when cancelled.

        NOTIFY only wakes lanes early (the manager polls anyway), so no error of its own is
        worth stopping the daemon for: a reconnect refused while the pool's sessions still
        work (a rotated password, a pg_hba change, NOLOGIN) is logged and retried like an
        outage.
        """
        backoff = db.Backoff()
        redact = db.url_redactor(self.settings.database)
        while True:
            connection: asyncpg.Connection | None = None
            try:
                closed = asyncio.Event()
                # Its set-up's statements (codecs, LISTEN) are bounded like the probe: a server
                # that goes silent as the listener reconnects (an outage, a failover) held it
                # there, before its probe ever started.
                async with asyncio.timeout(2 * LISTENER_PROBE_SECONDS):
                    connection = await db.connect(self.settings.database)
                    connection.add_termination_listener(lambda _c, closed=closed: closed.set())
                    await connection.add_listener(NOTIFY_CHANNEL, self._on_notify)
                backoff.reset()
                # Notifications sent while we were not listening are gone: look now.
                self._wake_everything()
                if await _answers_until_closed(connection, closed):
                    log.warning("listener_disconnected")
                else:
                    log.warning("listener_silent", waited=LISTENER_PROBE_SECONDS, note="replacing it")
            except Exception as exc:
                if db.is_transient_db_error(exc):
                    await backoff.wait_after(exc, log, "listen")
                else:
                    delay = backoff.next()
                    log.error(
                        "listener_failed",
                        error=type(exc).__name__,
                        message=redact(str(exc)),
                        retry_in=round(delay, 2),
                    )
                    await asyncio.sleep(delay)
            finally:
                if connection is not None:
                    try:
                        # Not asyncio.wait_for: on Python 3.11 it loses a cancellation that lands
                        # as the close completes (a stop just as the server goes away), and the
                        # listener, never ending, held the stop until it overran.
                        async with asyncio.timeout(2):
                            await connection.close()
                    except Exception:
                        # A silent connection does not close politely; it is dropped.
                        connection.terminate()


async def _answers_until_closed(connection: asyncpg.Connection, closed: asyncio.Event) -> bool:
    """Asks the listener a question every LISTENER_PROBE_SECONDS: True once its connection
    closed, False when an answer did not come in time (a partition, a failover that moved the
    server's address leave it open and silent)."""
    while not closed.is_set():
        await wait_any(closed, seconds=LISTENER_PROBE_SECONDS)
        if closed.is_set():
            break
        try:
            await connection.fetchval(QUERIES["listener_probe"], timeout=LISTENER_PROBE_SECONDS)
        except TimeoutError:
            return False
    return True


async def sync_senders(connection: db.Connection, settings: Settings) -> None:
    """Mirror configured senders into the database so hosts can reference them."""
    for sender_id, sender in settings.senders.items():
        await connection.execute(
            QUERIES["upsert_sender"],
            sender_id,
            sender.provider,
            sender.rate_per_second,
            sender.burst,
            sender.resend_in_doubt,
        )


@contextlib.contextmanager
def shutdown_on_signals(shutdown: Shutdown) -> Iterator[None]:
    """SIGTERM/SIGINT request a drain; a second one cuts the drain short."""
    loop = asyncio.get_running_loop()
    handled = (signal.SIGTERM, signal.SIGINT)
    for signum in handled:
        loop.add_signal_handler(signum, _signalled, shutdown, signum)
    try:
        yield
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)


async def end_an_overrunning_stop(shutdown: Shutdown) -> None:
    """Ends the process once a stop has outlasted its budget: the drain, the final writes
    (FINAL_WRITE_SECONDS), then STOP_MARGIN_SECONDS to give claims back, release the lanes and
    close the connections, each of which is bounded on its own.

    A database that stops answering without closing its connections (a server frozen, a
    network partition, a proxy stuck) holds statements that nothing else bounds: the daemon
    logged "draining" and never exited, whatever the signals. Nothing it still holds can be
    written then; its lanes' leases run out, and the next owner recovers their claims as
    after a crash. systemd's TimeoutStopSec would end it too, but later, and only under
    systemd.
    """
    await shutdown.requested.wait()
    loop = asyncio.get_running_loop()
    while True:
        # Re-read each time: a second signal moves the drain's deadline sooner.
        assert shutdown.drain_deadline is not None
        left = shutdown.drain_deadline + FINAL_WRITE_SECONDS + STOP_MARGIN_SECONDS - loop.time()
        if left <= 0:
            break
        await asyncio.sleep(min(left, 1.0))
    current = asyncio.current_task()
    log.error(
        "stop_overran",
        budget_seconds=shutdown.drain_seconds + FINAL_WRITE_SECONDS + STOP_MARGIN_SECONDS,
        waiting_on=sorted(task.get_name() for task in asyncio.all_tasks() if task is not current)[:20],
        note="exiting now; the database did not answer what the stop had to write",
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def _signalled(shutdown: Shutdown, signum: int) -> None:
    log.info("shutdown_requested", signal=signal.Signals(signum).name, again=shutdown.requested.is_set())
    shutdown.request()
