"""The in-process watchdog: what operators did by hand in the seeds' "Stuck Campaigns" runbook.

Every daemon runs it; an advisory lock lets one pass run at a time across all daemons (a
session that sits on the lock idle, a daemon lost or frozen mid-pass, is ended after 90 s).
A pass takes back expired lanes and their orphaned claims, sweeps cancelled and failed
campaigns (a chunk of recipients a statement, for a few seconds a pass at most), completes
campaigns whose recipients are all final (recounting their counters as it does; one that
sent and failed nothing fails instead), repairs counters that drifted from recipient states
(a batch of campaigns per pass, walking over all of them), and flags (with a reason) SENDING
campaigns that make no progress. A statement that outlasts statement_timeout in the sweep or
the counter checks is logged and the pass goes on. It never sends anything and never
completes a campaign with pending or in-flight work.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING
from uuid import UUID

import asyncpg
import structlog

from campaignd import leasing, metrics
from campaignd.asyncutil import wait_any
from campaignd.config import WatchdogConfig
from campaignd.db import MAX_INACTIVE_CONNECTION_SECONDS, is_transient_db_error, note_unavailable
from campaignd.health import Heartbeats
from campaignd.sql import QUERIES

if TYPE_CHECKING:
    from campaignd.db import Connection

log = structlog.get_logger("campaignd.watchdog")

HEARTBEAT = "watchdog"

# Campaigns whose counters one pass checks: each check counts the campaign's recipients, and
# a pass must stay cheap on a big database. More candidates take more passes (DriftWalk).
DRIFT_BATCH = 200

# Recipients of cancelled and failed campaigns one statement of the sweep ends (a fraction of
# a second on a slow machine, far below any sensible statement_timeout), and how long a pass
# goes on sweeping before it leaves the rest to the next pass.
SWEEP_CHUNK = 5_000
SWEEP_BUDGET_SECONDS = 5.0

# How long a session may hold the watchdog's lock while waiting on its client before another
# daemon's watchdog ends it (wd_end_idle_lock_holder). A live pass keeps its session waiting
# for moments between statements. Longer than a pool connection ever sits unused: the
# statement reads pg_locks and pg_stat_activity at two moments, and a connection idle for
# longer, seen before it took the lock for its pass, would be ended mid-pass.
LOCK_HOLDER_IDLE_LIMIT_SECONDS = MAX_INACTIVE_CONNECTION_SECONDS + 30.0

# sent, failed, skipped, total: a campaign's counters, stored or counted from its recipients.
Counters = tuple[int, int, int, int]
COUNTER_NAMES = ("sent", "failed", "skipped", "total")


@dataclass(frozen=True)
class StuckFacts:
    sender_id: str
    paused_reason: str | None
    lane_live: bool
    lease_owner: str | None
    pending: int
    due: int
    next_due: datetime | None
    sender_rate: float
    campaign_rate: float | None
    prepared: bool
    stuck_after_seconds: float


def stuck_reason(facts: StuckFacts) -> str | None:
    """Why a SENDING campaign has made no progress, in plain words; None if it is not stuck."""
    if facts.paused_reason is not None:
        return f"sender {facts.sender_id} is paused: {facts.paused_reason}"
    if not facts.prepared:
        if facts.lane_live:
            return (
                f"sender {facts.sender_id}'s lane is held by {facts.lease_owner} "
                "but the campaign never started"
            )
        return f"no live daemon holds sender {facts.sender_id}'s lane: is a daemon with this sender running?"
    if facts.pending == 0:
        return None
    if not facts.lane_live:
        return (
            f"no live daemon holds sender {facts.sender_id}'s lane "
            f"({facts.pending} recipients pending): is a daemon with this sender running?"
        )
    if facts.due == 0 and facts.next_due is not None:
        return (
            f"every pending recipient ({facts.pending}) is waiting on backoff; "
            f"the next retry is due at {facts.next_due.isoformat()}"
        )
    rate = min(facts.sender_rate, facts.campaign_rate or facts.sender_rate)
    if rate * facts.stuck_after_seconds < 1:
        return (
            f"rate limit too low: {rate:g} msg/s is less than one message "
            f"per {facts.stuck_after_seconds:.0f}s"
        )
    return (
        f"sender {facts.sender_id}'s lane is held by {facts.lease_owner}, {facts.due} recipients are due, "
        "but nothing was recorded: the daemon may be wedged or unable to reach the provider"
    )


@dataclass(frozen=True)
class DriftWalk:
    """Where the counter check stands in its walk over the candidates, in campaign id order.

    ``after``: the last campaign checked (None: the next pass starts from the first);
    ``started``: when (monotonic seconds) the walk under way began; ``previous_started``: when
    the one before it did.
    """

    after: UUID | None = None
    started: float | None = None
    previous_started: float | None = None


def begin_drift_pass(walk: DriftWalk, now: float) -> DriftWalk:
    """A pass that starts from the first candidate begins a new walk."""
    if walk.after is not None:
        return walk
    return DriftWalk(after=None, started=now, previous_started=walk.started)


def drift_history_seconds(walk: DriftWalk, now: float, interval_seconds: float) -> float:
    """How long after it finished a campaign stays a candidate for the counter check.

    A campaign that finishes behind the cursor of the walk under way is reached only by the
    next walk: so during a walk, every campaign finished since the previous walk began must
    still be a candidate, or long walks (many candidates) would let it drop out unchecked.
    The first walk looks back three intervals before it began.
    """
    recent = 3 * interval_seconds
    since = walk.previous_started if walk.previous_started is not None else walk.started
    if since is None:
        return recent
    return recent + max(now - since, 0.0)


def advance_drift_walk(walk: DriftWalk, checked: Sequence[UUID], reached_end: bool) -> DriftWalk:
    """After a pass: on from the last campaign checked, or from the first once the walk has
    checked the last candidate. A pass cut short resumes where it stopped."""
    if reached_end:
        return replace(walk, after=None)
    if checked:
        return replace(walk, after=checked[-1])
    return walk


def counters_dict(counters: Counters) -> dict[str, int]:
    return dict(zip(COUNTER_NAMES, counters, strict=True))


def report_drift(campaign_id: UUID, stored: Counters, actual: Counters, *, step: str) -> None:
    metrics.COUNTER_DRIFT_REPAIRED.inc()
    log.warning(
        "counter_drift_repaired",
        campaign_id=str(campaign_id),
        stored=counters_dict(stored),
        actual=counters_dict(actual),
        step=step,
    )


class Watchdog:
    def __init__(self, pool: asyncpg.Pool, config: WatchdogConfig, heartbeats: Heartbeats) -> None:
        self._pool = pool
        self._config = config
        self._heartbeats = heartbeats
        heartbeats.register(HEARTBEAT, allowance_seconds=3 * config.interval_seconds + 30)
        # In memory: each daemon's watchdog walks the candidates on the passes it runs, so
        # each covers them all in a bounded number of its own passes.
        self._drift_walk = DriftWalk()
        self._told_holder_unendable = False

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._heartbeats.beat(HEARTBEAT)
            try:
                await self.run_pass()
            except Exception as exc:
                if not is_transient_db_error(exc):
                    log.exception("watchdog_pass_failed")
                else:
                    note_unavailable(log, "watchdog", exc)
                metrics.WATCHDOG_RUNS.labels("error").inc()
            await wait_any(stop, seconds=self._config.interval_seconds)

    async def run_pass(self) -> bool:
        """One pass; False when another daemon's watchdog is running one."""
        async with self._pool.acquire() as connection:
            if not await self._take_lock(connection):
                metrics.WATCHDOG_RUNS.labels("skipped").inc()
                await self._update_gauges(connection)
                return False
            try:
                await self._expire_lanes(connection)
                await self._recover_orphans(connection)
                await self._sweep_ended(connection)
                await self._complete_finished(connection)
                await self._repair_drift(connection)
                await self._flag_stuck(connection)
                await self._count_ended_totals(connection)
                await self._update_gauges(connection)
            finally:
                await connection.fetchval(QUERIES["wd_unlock"])
        metrics.WATCHDOG_RUNS.labels("ran").inc()
        return True

    async def _take_lock(self, connection: Connection) -> bool:
        """The lock of a pass; taken from a session that sits on it waiting on its client
        past the limit."""
        if await connection.fetchval(QUERIES["wd_try_lock"]):
            self._told_holder_unendable = False
            return True
        try:
            ended = await connection.fetch(QUERIES["wd_end_idle_lock_holder"], LOCK_HOLDER_IDLE_LIMIT_SECONDS)
        except asyncpg.PostgresError as exc:
            if is_transient_db_error(exc):
                raise
            # A holder of another role (a superuser's session, say) that this role may see but
            # not end, or a server that refuses the statement: a busy lock was a quiet skip
            # before, and must not become a traceback at every pass. Said once; the operator
            # ends the session.
            if not self._told_holder_unendable:
                self._told_holder_unendable = True
                log.warning(
                    "watchdog_lock_holder_stuck",
                    idle_limit_seconds=LOCK_HOLDER_IDLE_LIMIT_SECONDS,
                    error=type(exc).__name__,
                    message=str(exc),
                    note="a session may hold the watchdog's lock for good; this role could not end it",
                )
            return False
        for row in ended:
            log.warning(
                "watchdog_lock_holder_ended",
                pid=row["pid"],
                application_name=row["application_name"],
                client_addr=row["client_addr"],
                idle_seconds=round(row["idle_seconds"], 1),
                ended=row["ended"],
            )
        return bool(ended) and bool(await connection.fetchval(QUERIES["wd_try_lock"]))

    async def _expire_lanes(self, connection: Connection) -> None:
        for row in await connection.fetch(QUERIES["wd_expire_lanes"]):
            metrics.LEASE_TAKEOVERS.labels(row["id"]).inc()
            log.warning(
                "lane_lease_expired", sender_id=row["id"], note="owner stopped renewing; lane released"
            )

    async def _recover_orphans(self, connection: Connection) -> None:
        for row in await leasing.recover_in_doubt(connection, None):
            leasing.report_in_doubt(log, row, by="watchdog")

    async def _sweep_ended(self, connection: Connection) -> None:
        """Ends the pending recipients of cancelled and failed campaigns, a chunk (one
        statement) at a time, until a chunk ends fewer than SWEEP_CHUNK (nothing more to sweep
        now) or the step has spent SWEEP_BUDGET_SECONDS; the next passes sweep the rest. A
        campaign a host cancelled with an UPDATE leaves every recipient pending, millions
        maybe: swept in one statement, they outlasted statement_timeout pass after pass, and
        the steps after this one (completions, counter repairs, stuck flags) never ran."""
        deadline = time.monotonic() + SWEEP_BUDGET_SECONDS
        swept: dict[tuple[UUID, str], tuple[int, int]] = {}
        try:
            while True:
                rows = await connection.fetch(QUERIES["wd_sweep_ended"], SWEEP_CHUNK)
                for row in rows:
                    key = (row["campaign_id"], row["status"])
                    skipped, failed = swept.get(key, (0, 0))
                    swept[key] = (skipped + row["skipped"], failed + row["failed"])
                if sum(row["skipped"] + row["failed"] for row in rows) < SWEEP_CHUNK:
                    break
                if time.monotonic() >= deadline:
                    log.info("sweep_continues_next_pass", budget_seconds=SWEEP_BUDGET_SECONDS)
                    break
        except asyncpg.exceptions.QueryCanceledError:
            # A chunk outlasted statement_timeout (a server far busier than usual): the chunks
            # before it are committed, and the next pass goes on. Raised, it would cost this
            # pass every step after this one, as the single statement over all of them did.
            log.warning("sweep_timed_out", chunk=SWEEP_CHUNK)
        finally:
            # One line per campaign and pass, however many chunks it took.
            for (campaign_id, status), (skipped, failed) in swept.items():
                log.info(
                    "cancelled_recipients_swept" if status == "cancelled" else "failed_recipients_swept",
                    campaign_id=str(campaign_id),
                    recipients=skipped + failed,
                    skipped=skipped,
                    failed_in_doubt=failed,
                )

    async def _count_ended_totals(self, connection: Connection) -> None:
        """The total_count of a cancelled or failed campaign never prepared, once swept. It
        reads every recipient of the campaign, so it runs after the completions, repairs and
        stuck flags, which a slow count must not delay."""
        try:
            await connection.execute(QUERIES["wd_count_ended_totals"])
        except asyncpg.exceptions.QueryCanceledError:
            # A campaign of a hundred million recipients may take longer than
            # statement_timeout to count: the next pass tries again, and this one goes on.
            log.warning("ended_total_count_timed_out")

    async def _complete_finished(self, connection: Connection) -> None:
        for row in await connection.fetch(QUERIES["wd_complete_finished"]):
            stored: Counters = (
                row["stored_sent"],
                row["stored_failed"],
                row["stored_skipped"],
                row["stored_total"],
            )
            actual: Counters = (
                row["sent_count"],
                row["failed_count"],
                row["skipped_count"],
                row["total_count"],
            )
            # Recounted by the completion itself: the drift check may not have reached it yet.
            if stored != actual:
                report_drift(row["id"], stored, actual, step="complete_finished")
            if row["status"] == "failed":
                # Every recipient skipped: nothing was sent, which is no completion.
                log.warning(
                    "campaign_failed",
                    campaign_id=str(row["id"]),
                    sender_id=row["sender_id"],
                    reason=row["status_reason"],
                    total=row["total_count"],
                    by="watchdog",
                )
                continue
            log.info(
                "campaign_completed",
                campaign_id=str(row["id"]),
                sender_id=row["sender_id"],
                total=row["total_count"],
                sent=row["sent_count"],
                failed=row["failed_count"],
                skipped=row["skipped_count"],
                by="watchdog",
            )

    async def _repair_drift(self, connection: Connection) -> None:
        now = time.monotonic()
        walk = begin_drift_pass(self._drift_walk, now)
        recent = drift_history_seconds(walk, now, self._config.interval_seconds)
        candidates = [
            row["id"]
            for row in await connection.fetch(QUERIES["wd_drift_candidates"], recent, walk.after, DRIFT_BATCH)
        ]
        checked: list[UUID] = []
        try:
            for campaign_id in candidates:
                try:
                    await self._check_counters(connection, campaign_id)
                except asyncpg.exceptions.QueryCanceledError:
                    # Its count outlasted statement_timeout (a huge campaign on a busy server):
                    # the walk goes on past it. Stopping here, every pass would start again
                    # at it and fail, and no campaign after it would ever be checked, nor the
                    # rest of the pass (stuck flags, gauges) run.
                    log.warning("counter_check_timed_out", campaign_id=str(campaign_id))
                checked.append(campaign_id)
        finally:
            # A short batch held the last candidates: once all are checked, the walk starts over.
            reached_end = len(candidates) < DRIFT_BATCH and len(checked) == len(candidates)
            self._drift_walk = advance_drift_walk(walk, checked, reached_end)

    async def _check_counters(self, connection: Connection, campaign_id: UUID) -> None:
        try:
            async with connection.transaction(isolation="repeatable_read"):
                counters = await connection.fetchrow(QUERIES["wd_lock_campaign_counters"], campaign_id)
                if counters is None:
                    return
                counts = await connection.fetchrow(QUERIES["wd_count_states"], campaign_id)
                assert counts is not None
                stored: Counters = (
                    counters["sent_count"],
                    counters["failed_count"],
                    counters["skipped_count"],
                    counters["total_count"],
                )
                actual: Counters = (counts["sent"], counts["failed"], counts["skipped"], counts["total"])
                if stored == actual:
                    return
                await connection.execute(QUERIES["wd_set_counters"], campaign_id, *actual)
        except (asyncpg.exceptions.LockNotAvailableError, asyncpg.exceptions.SerializationError):
            # Being written right now: its counters are checked again by the next walk.
            return
        report_drift(campaign_id, stored, actual, step="repair_drift")

    async def _flag_stuck(self, connection: Connection) -> None:
        stuck_after = self._config.stuck_after_seconds
        for row in await connection.fetch(QUERIES["wd_stuck_candidates"], stuck_after):
            reason = stuck_reason(
                StuckFacts(
                    sender_id=row["sender_id"],
                    paused_reason=row["paused_reason"],
                    lane_live=row["lane_live"],
                    lease_owner=row["lease_owner"],
                    pending=row["pending"],
                    due=row["due"],
                    next_due=row["next_due"],
                    sender_rate=row["sender_rate"],
                    campaign_rate=row["campaign_rate"],
                    prepared=row["prepared"],
                    stuck_after_seconds=stuck_after,
                )
            )
            if reason is None:
                continue
            flagged = await connection.fetchval(QUERIES["wd_flag_stuck"], row["id"], reason)
            log.warning(
                "campaign_stuck",
                campaign_id=str(row["id"]),
                sender_id=row["sender_id"],
                reason=reason,
                stuck_since=flagged.isoformat() if flagged else None,
                pending=row["pending"],
            )
        for row in await connection.fetch(QUERIES["wd_unflag_recovered"], stuck_after):
            log.info("campaign_unstuck", campaign_id=str(row["id"]))

    async def _update_gauges(self, connection: Connection) -> None:
        rows = await connection.fetch(QUERIES["wd_gauges"])
        metrics.ACTIVE_CAMPAIGNS.set(sum(row["active"] for row in rows))
        metrics.CAMPAIGNS_STUCK.set(sum(row["stuck"] for row in rows))
        metrics.PENDING_RECIPIENTS.clear()
        for row in rows:
            metrics.PENDING_RECIPIENTS.labels(row["sender_id"]).set(row["open"])
