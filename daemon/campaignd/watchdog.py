"""The in-process watchdog: what operators did by hand in the seeds' "Stuck Campaigns" runbook.

Every daemon runs it; an advisory lock lets one pass run at a time across all daemons. A
pass takes back expired lanes and their orphaned claims, sweeps cancelled campaigns,
completes campaigns whose recipients are all final, repairs counters that drifted from
recipient states, and flags (with a reason) SENDING campaigns that make no progress. It
never sends anything and never completes a campaign with pending or in-flight work.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import asyncpg
import structlog

from campaignd import leasing, metrics
from campaignd.asyncutil import wait_any
from campaignd.config import WatchdogConfig
from campaignd.db import is_transient_db_error, note_unavailable
from campaignd.health import Heartbeats
from campaignd.sql import QUERIES

if TYPE_CHECKING:
    from campaignd.db import Connection

log = structlog.get_logger("campaignd.watchdog")

HEARTBEAT = "watchdog"


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


class Watchdog:
    def __init__(self, pool: asyncpg.Pool, config: WatchdogConfig, heartbeats: Heartbeats) -> None:
        self._pool = pool
        self._config = config
        self._heartbeats = heartbeats
        heartbeats.register(HEARTBEAT, allowance_seconds=3 * config.interval_seconds + 30)

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
            if not await connection.fetchval(QUERIES["wd_try_lock"]):
                metrics.WATCHDOG_RUNS.labels("skipped").inc()
                await self._update_gauges(connection)
                return False
            try:
                await self._expire_lanes(connection)
                await self._recover_orphans(connection)
                await self._sweep_cancelled(connection)
                await self._complete_finished(connection)
                await self._repair_drift(connection)
                await self._flag_stuck(connection)
                await self._update_gauges(connection)
            finally:
                await connection.fetchval(QUERIES["wd_unlock"])
        metrics.WATCHDOG_RUNS.labels("ran").inc()
        return True

    async def _expire_lanes(self, connection: Connection) -> None:
        for row in await connection.fetch(QUERIES["wd_expire_lanes"]):
            metrics.LEASE_TAKEOVERS.labels(row["id"]).inc()
            log.warning(
                "lane_lease_expired", sender_id=row["id"], note="owner stopped renewing; lane released"
            )

    async def _recover_orphans(self, connection: Connection) -> None:
        for row in await leasing.recover_in_doubt(connection, None):
            leasing.report_in_doubt(log, row, by="watchdog")

    async def _sweep_cancelled(self, connection: Connection) -> None:
        for row in await connection.fetch(QUERIES["wd_sweep_cancelled"]):
            log.info("cancelled_recipients_swept", campaign_id=str(row["campaign_id"]), recipients=row["n"])

    async def _complete_finished(self, connection: Connection) -> None:
        for row in await connection.fetch(QUERIES["wd_complete_finished"]):
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
        recent = 3 * self._config.interval_seconds
        for candidate in await connection.fetch(QUERIES["wd_drift_candidates"], recent):
            campaign_id = candidate["id"]
            try:
                async with connection.transaction(isolation="repeatable_read"):
                    counters = await connection.fetchrow(QUERIES["wd_lock_campaign_counters"], campaign_id)
                    if counters is None:
                        continue
                    counts = await connection.fetchrow(QUERIES["wd_count_states"], campaign_id)
                    assert counts is not None
                    stored = (
                        counters["sent_count"],
                        counters["failed_count"],
                        counters["skipped_count"],
                        counters["total_count"],
                    )
                    actual = (counts["sent"], counts["failed"], counts["skipped"], counts["total"])
                    if stored == actual:
                        continue
                    await connection.execute(QUERIES["wd_set_counters"], campaign_id, *actual)
            except (asyncpg.exceptions.LockNotAvailableError, asyncpg.exceptions.SerializationError):
                # Being written right now: its counters are checked again on a later pass.
                continue
            metrics.COUNTER_DRIFT_REPAIRED.inc()
            log.warning(
                "counter_drift_repaired",
                campaign_id=str(campaign_id),
                stored=dict(zip(("sent", "failed", "skipped", "total"), stored, strict=True)),
                actual=dict(zip(("sent", "failed", "skipped", "total"), actual, strict=True)),
            )

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
