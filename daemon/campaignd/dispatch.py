"""A sender lane at work: claim recipients, send them under the rate limit, record outcomes.

The order of durable steps is what makes a message neither lost nor doubled silently:

1. a claim (pending -> in_flight) is committed before its send starts, so a crash leaves
   the recipient visibly in flight, and the next lane owner resends it with the same
   idempotency key (or fails it as ``in_doubt``);
2. the outcome (sent / retry / failed / skipped) and the campaign counters are committed
   in one statement, fenced by the lane's epoch, before anything counts it as done;
3. a campaign completes in one statement that checks no recipient is pending or in flight.
"""

from __future__ import annotations

import asyncio
import enum
import math
import operator
import random
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncpg
import structlog

from campaignd import leasing, metrics
from campaignd.asyncutil import Slots, WorkQueue, wait_any
from campaignd.breaker import FailureBreaker
from campaignd.config import AnySenderConfig, DispatchConfig
from campaignd.db import Backoff, answer_timeout, is_transient_db_error, note_unavailable
from campaignd.leasing import LaneLease, report_in_doubt
from campaignd.limits import CampaignCap, SenderLimiter, throttled_too_long
from campaignd.outcomes import (
    OutcomeColumns,
    RecipientState,
    RecipientUpdate,
    ResultKind,
    SendResult,
    decide,
    in_doubt,
    internal_error,
    outcome_columns,
    released,
)
from campaignd.providers import Delivery, InvalidAddress, Provider
from campaignd.redact import redacted_traceback
from campaignd.render import RenderError, Template, TemplateError
from campaignd.sql import QUERIES
from campaignd.storable import StorableText, storable_columns, storable_result, substitutes

if TYPE_CHECKING:
    from campaignd.db import Connection

log = structlog.get_logger("campaignd.dispatch")

# A lane keeps at most this many seconds of sending claimed ahead: enough to keep the
# connection pool busy while the next claim is in the air, little enough that a pause
# takes effect quickly and few claims are in doubt after a crash.
CLAIM_HORIZON_SECONDS = 2.0
PROGRESS_LOG_SECONDS = 10.0
# A busy lane claims several times a second; it looks up its campaigns again about this
# often (at once when woken), while it waits for room, so that a claim does not wait behind
# a second query. A campaign paused from outside stops being sent within about this time
# (twice it at most): its unsent claims go back.
REFRESH_SECONDS = 0.25
# Pre-flight renders the message for this many of a campaign's first recipients.
PREFLIGHT_SAMPLE = 20
# A campaign of more than this many claim batches is prepared head first: its first batches
# are sent while the rest is prepared, instead of after all of it (~2 s at 1M recipients).
PREPARE_HEAD_BATCHES = 10
# The statements that prepare the rest of a campaign read all of it, and may outlast the
# session's statement_timeout (at 30 s, from ~10-15M recipients; fewer on a loaded server).
# Each attempt runs with that timeout times the next of these factors; one timed out at the
# last fails the campaign, with a reason, instead of being tried again forever.
PREPARE_TAIL_TIMEOUT_FACTORS = (1, 8, 64)
# Id bounds of a whole campaign, for the statements that prepare a range of it.
FIRST_ID = 0
BEYOND_LAST_ID = 2**63 - 1
# How long outcomes still held after the drain may take to be written on shutdown (through a
# database outage, retrying). The deploy files' stop timeouts count on it (systemd/, compose).
FINAL_WRITE_SECONDS = 5.0
# An outcome's metric labels, read without a Python frame per outcome.
_STATE_AND_CLASS = operator.attrgetter("state", "error_class")


class Shutdown:
    """SIGTERM asks lanes to stop claiming and drain; a second signal ends the drain now.

    Each lane stops through a part of the daemon's Shutdown (Shutdown.part()): a part can
    be asked to stop on its own (a lane handed over to another replica), and stops, within
    the daemon's deadline if that comes sooner, whenever the daemon does.
    """

    def __init__(self, drain_seconds: float) -> None:
        self.requested = asyncio.Event()
        # Set whenever the deadline comes sooner: a drain waiting on the old one (or on none,
        # a sender's pause) wakes to it instead of sleeping past a second signal.
        self.deadline_moved = asyncio.Event()
        self.drain_seconds = drain_seconds
        self.drain_deadline: float | None = None
        self._parts: weakref.WeakSet[Shutdown] = weakref.WeakSet()

    def request(self) -> None:
        now = asyncio.get_running_loop().time()
        self._stop_by(now if self.requested.is_set() else now + self.drain_seconds)

    def part(self) -> Shutdown:
        part = Shutdown(self.drain_seconds)
        self._parts.add(part)
        if self.drain_deadline is not None:
            part._stop_by(self.drain_deadline)
        return part

    def _stop_by(self, deadline: float) -> None:
        if self.drain_deadline is None or deadline < self.drain_deadline:
            self.drain_deadline = deadline
            self.deadline_moved.set()
        self.requested.set()
        for part in list(self._parts):
            part._stop_by(self.drain_deadline)

    def drain_remaining(self) -> float | None:
        if self.drain_deadline is None:
            return None
        return max(0.0, self.drain_deadline - asyncio.get_running_loop().time())


@dataclass
class CampaignRun:
    campaign_id: str
    template: Template
    cap: CampaignCap | None
    breaker: FailureBreaker
    # campaigns.status_changes when the lane last saw it sending: its pause applies to that.
    status_changes: int = 0
    cursor: int = 0
    outstanding: int = 0
    active: bool = True
    # Why this lane is pausing the campaign (provider verdict or circuit breaker), until the
    # pause is written.
    pause_reason: str | None = None
    pause_written: bool = False
    # A capped campaign's claims wait here for its cap's tokens, not in the lane's send queue
    # (see Lane._pace).
    waiting: deque[Flight] = field(default_factory=deque)
    pacer: asyncio.Task[None] | None = None

    def revive(self, fresh: CampaignRun) -> None:
        """Resumed while claims from before its pause are still settling: those flights
        count against this run, so it is revived rather than replaced (with the message as it
        is now: a host may have edited it while paused)."""
        self.template, self.cap, self.breaker = fresh.template, fresh.cap, fresh.breaker
        self.status_changes = fresh.status_changes
        self.cursor, self.active, self.pause_reason, self.pause_written = 0, True, None, False

    def claim_room(self) -> int | None:
        """A capped campaign claims no more than it can send soon, so that its claims, waiting
        on its own cap, never fill the lane and starve the sender's other campaigns."""
        if self.cap is None:
            return None
        horizon = math.ceil(self.cap.rate_per_second * CLAIM_HORIZON_SECONDS) + self.cap.burst
        return horizon - self.outstanding


@dataclass(slots=True)
class Flight:
    """One claimed recipient between its claim and its recorded outcome: the claim's columns
    (one object per message, not a claim inside a flight) and the campaign run it is for."""

    recipient_id: int
    address: str | None
    variables: Any
    attempts: int
    run: CampaignRun
    # The lane's number of the claim that took it.
    claim: int
    # The error code and message a retry carried when claimed (its last outcome's).
    last_error: str | None = None
    last_message: str | None = None
    # Filled in ahead of the send when a capped campaign's pacer looked at it (Lane._pace),
    # with the template it was rendered from: a run revived after a pause may have another.
    delivery: Delivery | None = None
    rendered_with: Template | None = None
    request_started: bool = False
    settled: bool = False

    def prepared(self) -> Delivery | None:
        """The request prepared ahead, while its run's message is the one it was rendered from."""
        return self.delivery if self.rendered_with is self.run.template else None


async def record_outcomes(
    connection: Connection, token: tuple[str, str, int], columns: OutcomeColumns
) -> asyncpg.Record:
    """One batch of outcomes, written by ``record_outcomes`` in a transaction of its own,
    planned without nested loops (see record_outcomes_begin): two round trips more per batch,
    not per message. Returns whether the lane was still held and how many were applied."""
    try:
        await connection.execute(QUERIES["record_outcomes_begin"])
        row = await connection.fetchrow(QUERIES["record_outcomes"], *token, *columns)
        await connection.execute(QUERIES["record_outcomes_commit"])
    except asyncio.CancelledError:
        # Cut off by a stop's deadline with the statement sent and unanswered: handed back,
        # the connection would be waited on until the server answered, which a database that
        # took the statement and went silent never does. Whether the batch committed is
        # unknown either way: its rows are in doubt to the next owner.
        connection.terminate()
        raise
    except Exception:
        # Rolled back here: the pool would too, but reports a connection handed back in a
        # transaction to the loop's exception handler. One that cannot be rolled back (or
        # whose rollback a stop cuts off) is terminated: the server rolls it back.
        if not connection.is_closed() and connection.is_in_transaction():
            try:
                await connection.execute(QUERIES["record_outcomes_rollback"])
            except asyncio.CancelledError:
                connection.terminate()
                raise
            except Exception:
                connection.terminate()
        raise
    assert row is not None
    return row


class LaneLost(Exception):
    """Another daemon holds this sender lane now."""


class _NotSending(Exception):
    """The campaign being prepared left SENDING meanwhile: the preparation rolls back."""


class Lane:
    def __init__(
        self,
        *,
        lease: LaneLease,
        sender: AnySenderConfig,
        provider: Provider,
        pool: asyncpg.Pool,
        dispatch: DispatchConfig,
        send_slots: Slots,
        shutdown: Shutdown,
        wake: asyncio.Event,
        storable: StorableText | None = None,
    ) -> None:
        self.lease = lease
        self._sender = sender
        self._provider = provider
        self._pool = pool
        self._config = dispatch
        self._slots = send_slots
        self._shutdown = shutdown
        self._wake = wake
        # In a database whose server encoding is not UTF8: how texts from outside it (the
        # provider's answers, the reasons made of them) are made storable there (storable.py).
        self._storable = storable
        self._loop = asyncio.get_running_loop()
        self._limiter = SenderLimiter(sender.rate_per_second, sender.burst, smooth_start=True)
        self._rng = random.Random()
        # Throttled answers since the last sender_throttled line (which reports them).
        self._throttled_answers = 0
        # Answers in a row that were throttles (any other result of a send ends the streak, a
        # skip aside), and when the streak began: a sender throttled for too long is paused.
        # Per lane: a handover or a restart starts it afresh.
        self._throttled_in_a_row = 0
        self._throttled_since = 0.0
        self._runs: dict[str, CampaignRun] = {}
        # Claimed recipients wait here for one of the lane's send workers: a fixed pool, not
        # a task per recipient, keeps the live objects (and the garbage collector's work) to
        # the pool's size however many claims are queued.
        self._queue: WorkQueue[Flight] = WorkQueue()
        self._workers: dict[asyncio.Task[None], Flight | None] = {}
        self._pacers: set[asyncio.Task[None]] = set()
        # Campaigns whose head is being sent while the rest of them is prepared, by the task
        # preparing that rest (in the lane's task group: a bug there stops the lane).
        self._tails: dict[str, asyncio.Task[None]] = {}
        self._group: asyncio.TaskGroup | None = None
        self._outstanding = 0
        # Set when outcome writes free claim room; the feed loop waits on it.
        self._room = asyncio.Event()
        # Set when the last claimed recipient lands (its outcome decided or the claim given
        # back); a draining lane waits on it.
        self._landing = asyncio.Event()
        self._buffer: list[RecipientUpdate] = []
        # A claim that failed may have committed with its reply lost, leaving rows in flight
        # that the lane knows nothing of (see _release_lost_claims), in one of the campaigns
        # it has claimed in.
        self._claim_failed = False
        self._claimed_in: set[str] = set()
        # Campaigns dropped (paused, cancelled) whose lost claims are still to be given back:
        # kept until that succeeds, so that a failed attempt is tried again.
        self._release_due: set[str] = set()
        self._claims_made = 0
        self._flush_wanted = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self._refresh_due_at = 0.0
        self._refresh_interval = min(REFRESH_SECONDS, dispatch.poll_seconds)
        self._pause_reason: str | None = None
        self._paused_from_outside = False
        # The sender's pause_changes when the provider's verdict came: later renewals may see a
        # resume that its write, retried after a lost reply, must not undo.
        self._pause_changes_seen = 0
        self._progress: Counter[str] = Counter()
        # Looked up once: labels() per message costs a dict lookup under a lock.
        self._send_duration = metrics.SEND_DURATION.labels(lease.sender_id)
        self._progress_since = time.monotonic()
        self._log = log.bind(sender_id=lease.sender_id, lane_epoch=lease.epoch, owner=lease.owner)
        self._max_outstanding = claim_budget(
            concurrency=dispatch.concurrency,
            batch_size=dispatch.batch_size,
            rate_per_second=sender.rate_per_second,
            burst=sender.burst,
        )
        # Claim when this much room is free: claims come in batches, not one by one, and the
        # next one is asked for while a good part of the last is still queued, so that the
        # send workers do not run dry while it is in the air.
        self._claim_threshold = max(1, min(dispatch.batch_size, self._max_outstanding) // 4)
        self._worker_count = max(1, min(dispatch.concurrency, self._max_outstanding))

    # ---------------------------------------------------------------- lifecycle

    async def run(self) -> None:
        if self.lease.previous_owner is not None:
            metrics.LEASE_TAKEOVERS.labels(self.lease.sender_id).inc()
        self._log.info("lane_acquired", previous_owner=self.lease.previous_owner)
        try:
            await self._recover_in_doubt()
            for _ in range(self._worker_count):
                self._workers[asyncio.create_task(self._worker())] = None
            async with asyncio.TaskGroup() as group:
                self._group = group
                renewer = group.create_task(self._renew_loop(), name=f"renew:{self.lease.sender_id}")
                flusher = group.create_task(self._flush_loop(), name=f"flush:{self.lease.sender_id}")
                try:
                    await self._feed()
                    # A tail half prepared is rolled back; the next lane owner prepares it.
                    for tail in self._tails.values():
                        tail.cancel()
                    await self._drain()
                    await self._final_flush()
                    await self._release_lost_claims_on_leaving()
                    self._log_progress(final=True)
                finally:
                    renewer.cancel()
                    flusher.cancel()
                    for tail in self._tails.values():
                        tail.cancel()
                    await self._stop_workers()
        except Exception:
            await self._salvage()
            raise
        finally:
            await self._release()

    async def _salvage(self) -> None:
        """After a bug took the lane down: write what it holds, while the lease is still its.

        The workers are stopped, so the buffer holds every outcome the lane decided, its
        unsent claims given back and its requests cut off in the air. Left unwritten, every
        one of them would be in doubt to the next owner: recipients sent, and recipients that
        never left, failed 'in_doubt' by a sender that does not resend. Written once, then one
        by one if the batch as a whole is refused, so that an outcome the database will not
        take (the bug's own, perhaps) costs its recipient alone.
        """
        if self.lease.lost or not self._buffer:
            return
        try:
            await self._flush(raise_errors=True)
            return
        except Exception as exc:
            if is_transient_db_error(exc):
                note_unavailable(self._log, "record_outcomes", exc, waiting=len(self._buffer))
                return
        held, self._buffer = self._buffer, []
        for index, update in enumerate(held):
            try:
                lane_held = await self._write_one(update)
            except Exception as exc:
                if is_transient_db_error(exc):
                    note_unavailable(self._log, "record_outcomes", exc, waiting=len(held) - index)
                    return
                self._log.error(
                    "outcome_unrecordable",
                    recipient_id=update.recipient_id,
                    state=update.state.value,
                    error=type(exc).__name__,
                )
                continue
            if not lane_held:
                self.lease.lost = True
                return
            self._count([update])

    async def _write_one(self, update: RecipientUpdate) -> bool:
        """One outcome. One the database refuses as data (class 22: a text its encoding cannot
        hold, say) is written again in a form it takes (storable.substitutes): left in flight,
        its recipient was resent, as in doubt, by every next owner of the lane, and the answer
        refused again, crashing each of them."""
        try:
            return await self._write([update])
        except asyncpg.exceptions.DataError as exc:
            refused = exc
        for substitute in substitutes(update, refused):
            try:
                lane_held = await self._write([substitute])
            except asyncpg.exceptions.DataError:
                continue
            if lane_held:
                self._log.error(
                    "outcome_substituted",
                    recipient_id=update.recipient_id,
                    state=update.state.value,
                    error=type(refused).__name__,
                    error_code=substitute.error_code,
                )
            return lane_held
        raise refused

    async def _recover_in_doubt(self) -> None:
        async def recover() -> list[asyncpg.Record]:
            async with self._pool.acquire() as connection:
                return await leasing.recover_in_doubt(connection, self.lease.sender_id)

        for row in await self._with_db(recover, "recover_in_doubt") or []:
            report_in_doubt(self._log, row, by="lane")

    async def _release(self) -> None:
        if self.lease.lost:
            self._log.info("lane_lost")
            return
        try:
            async with self._pool.acquire() as connection:
                await leasing.release(connection, self.lease)
            self._log.info("lane_released")
        except Exception as exc:
            # The lease simply expires and the next owner takes over.
            self._log.warning("lane_release_failed", error=type(exc).__name__)

    def _storable_text(self, text: str) -> str:
        """A text from outside the database (a provider's, an exception's) as it can store it."""
        return text if self._storable is None else self._storable(text)

    # ---------------------------------------------------------------- feeding

    def _stopping(self) -> bool:
        return self._shutdown.requested.is_set() or self.lease.lost or self._pause_reason is not None

    async def _feed(self) -> None:
        await self._feed_until_stopped()
        if self._pause_reason is not None and not self.lease.lost:
            await self._pause_sender()

    async def _feed_until_stopped(self) -> None:
        backoff = Backoff()
        while not self._stopping():
            if not self.lease.may_send():
                # The renewer is late (database unreachable): send nothing we may not record.
                await self._wait(self._config.poll_seconds)
                continue
            try:
                await self._write_campaign_pauses()
                runs = await self._campaigns()
                # Not while a tail is prepared: stopping would roll it back, and a campaign
                # paused meanwhile would wait for a resume to have its counters right.
                if not runs and self._outstanding == 0 and not self._buffer and not self._tails:
                    self._log.info("lane_idle")
                    return
                claimed = await self._claim_round(runs)
                backoff.reset()
                if self._pause_reason is not None:
                    return
                step = after_claim_round(
                    claimed=claimed,
                    free_room=self._free_room(),
                    claim_threshold=self._claim_threshold,
                    unwritten=self._outstanding + len(self._buffer),
                )
                if step is FeedStep.WAIT_FOR_ROOM:
                    await self._wait_for_room()
                elif step is FeedStep.WAIT_UNTIL_WRITTEN:
                    await self._wait_until_written()
                elif step is FeedStep.WAIT_FOR_WORK:
                    await self._wait(self._config.poll_seconds)
            except LaneLost:
                return
            except Exception as exc:
                await backoff.wait_after(exc, self._log, "claim", self._wake, self._shutdown.requested)
                self._consume_wake()

    def _free_room(self) -> int:
        """How many more recipients may be claimed now.

        A recipient counts until its outcome is committed, not until its request ends: when
        outcome writes fall behind, claiming stops instead of piling up in_flight rows that a
        lapsed lease would turn into in-doubt resends.
        """
        return self._max_outstanding - self._outstanding - len(self._buffer)

    async def _wait(self, seconds: float) -> None:
        """Until woken by NOTIFY, a shutdown, or the timeout."""
        await wait_any(self._wake, self._shutdown.requested, seconds=seconds)
        self._consume_wake()

    def _consume_wake(self) -> None:
        """A wake (NOTIFY: a campaign started on this sender; a pause decided here) asks for a
        fresh look at the lane's campaigns."""
        if self._wake.is_set():
            self._wake.clear()
            self._refresh_due_at = 0.0

    async def _wait_for_room(self) -> None:
        """Until a batch's worth of room is free: claims come in batches, not a few rows per
        round trip. Committing the outcomes already decided makes the room, so they are
        written at once when that would be enough."""
        await self._wait_on_outcomes(
            lambda: self._free_room() >= self._claim_threshold,
            write_now=lambda: self._free_room() + len(self._buffer) >= self._claim_threshold,
        )

    async def _wait_until_written(self) -> None:
        """Nothing left to claim, but claims still out: until their outcomes are written (the
        campaign may be complete then), rather than a whole poll later."""
        await self._wait_on_outcomes(
            lambda: not (self._outstanding or self._buffer), write_now=lambda: not self._outstanding
        )

    async def _wait_on_outcomes(self, done: Callable[[], bool], *, write_now: Callable[[], bool]) -> None:
        """Until ``done()`` (checked whenever outcome writes free room), the poll is due, or a
        NOTIFY (a campaign started on this sender) or a shutdown wakes the lane: a busy lane
        picks up new work at once. Outcomes are written at once, not at the next flush tick,
        when ``write_now()``: otherwise the send workers could run dry while the lane waits.

        The campaigns are looked up again during this wait, while the send workers have
        claims to work on, rather than in front of the next claim, where they would wait.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._config.poll_seconds
        while not done():
            remaining = deadline - loop.time()
            if remaining <= 0 or self._wake.is_set() or self._shutdown.requested.is_set():
                break
            if self._refresh_due():
                await self._refresh_campaigns()
                continue
            if write_now():
                self._flush_wanted.set()
            self._room.clear()
            await wait_any(
                self._room,
                self._wake,
                self._shutdown.requested,
                seconds=min(remaining, self._refresh_due_at - loop.time()),
            )
        self._consume_wake()

    async def _campaigns(self) -> list[CampaignRun]:
        """The campaigns to claim for: the ones known, looked up again when woken or when the
        waits for room have not done it (a lane that never waits)."""
        known = [run for run in self._runs.values() if run.active]
        if known and not self._refresh_due(overdue=True):
            return known
        return await self._refresh_campaigns()

    def _refresh_due(self, *, overdue: bool = False) -> bool:
        due_at = self._refresh_due_at + (self._refresh_interval if overdue and self._refresh_due_at else 0.0)
        return asyncio.get_running_loop().time() >= due_at

    async def _refresh_campaigns(self) -> list[CampaignRun]:
        self._refresh_due_at = asyncio.get_running_loop().time() + self._refresh_interval
        async with self._pool.acquire() as connection:
            rows = await connection.fetch(QUERIES["sending_campaigns"], self.lease.sender_id)
        sending = {str(row["id"]): row for row in rows}
        left: list[str] = []
        for campaign_id, run in list(self._runs.items()):
            if campaign_id not in sending:
                if run.active:
                    self._log.info("campaign_no_longer_sending", campaign_id=campaign_id)
                run.active = False
                if run.outstanding == 0:
                    del self._runs[campaign_id]
                    left.append(campaign_id)
        if self._claim_failed:
            # Paused or cancelled with this lane's lost claims in it: given back now (a
            # cancelled campaign's then end skipped by the watchdog), not when the lane leaves,
            # which a busy sender may not do for days. Only while nothing of it is outstanding
            # here (it may have been resumed since): then every claim of the lane still in
            # flight there is a lost one.
            self._release_due.update(c for c in left if c in self._claimed_in)
            due = sorted(c for c in self._release_due if c not in self._runs or not self._runs[c].outstanding)
            if due:
                await self._release_lost_claims(due)
                self._release_due.difference_update(due)
        for campaign_id, row in sending.items():
            known = self._runs.get(campaign_id)
            if known is not None and known.active:
                # Paused and resumed since the last look: a pause decided from now on is
                # decided about the campaign as it is now.
                known.status_changes = row["status_changes"]
                continue
            if known is not None and known.pause_reason and not known.pause_written:
                continue
            started = await self._start_campaign(campaign_id, row)
            if started is None:
                continue
            if known is None:
                self._runs[campaign_id] = started
            else:
                known.revive(started)
        return [run for run in self._runs.values() if run.active]

    async def _start_campaign(self, campaign_id: str, row: asyncpg.Record) -> CampaignRun | None:
        bound = self._log.bind(campaign_id=campaign_id)
        try:
            template = Template(row["message"])
        except TemplateError as exc:
            reason = self._storable_text(f"invalid message: {exc}")
            async with self._pool.acquire() as connection:
                failed = await connection.fetchval(
                    QUERIES["fail_campaign"], *self.lease.token, campaign_id, reason
                )
            if failed:
                bound.warning("campaign_failed", reason=reason)
            return None
        # A campaign whose tail this lane is still preparing has its head prepared.
        if (
            not row["prepared"]
            and campaign_id not in self._tails
            and await self._prepare_campaign(campaign_id, template, bound) is None
        ):
            return None
        cap = CampaignCap(row["rate_per_second"]) if row["rate_per_second"] else None
        breaker = FailureBreaker(
            self._provider.name,
            consecutive=self._sender.breaker_consecutive_failures,
            window=self._sender.breaker_window,
            ratio=self._sender.breaker_failure_ratio,
        )
        return CampaignRun(campaign_id, template, cap, breaker, row["status_changes"])

    async def _prepare_campaign(
        self, campaign_id: str, template: Template, bound: structlog.typing.FilteringBoundLogger
    ) -> int | None:
        """Skip the recipients that cannot be sent and run the pre-flight, in one transaction
        fenced by the lane. A campaign of more than PREPARE_HEAD_BATCHES batches has only its
        head prepared here (see _prepare_tail). Returns the bound below which fresh recipients
        may be claimed (BEYOND_LAST_ID: all), or None when the campaign is not to be sent."""
        head = PREPARE_HEAD_BATCHES * self._config.batch_size
        try:
            async with self._pool.acquire() as connection, connection.transaction():
                await self._lock_lane(connection)
                await connection.execute(QUERIES["prepare_hold_campaign"], campaign_id)
                head_below = await connection.fetchval(QUERIES["prepare_head_boundary"], campaign_id, head)
                below = BEYOND_LAST_ID if head_below is None else int(head_below)
                skipped = await self._skip_unsendable(connection, campaign_id, template, FIRST_ID, below)
                sample = await connection.fetch(
                    QUERIES["preflight_sample"], campaign_id, FIRST_ID, below, PREFLIGHT_SAMPLE
                )
                if await self._failed_preflight(connection, campaign_id, template, sample, bound):
                    return None
                if below != BEYOND_LAST_ID:
                    status = await connection.fetchval(
                        QUERIES["prepare_head_finish"], campaign_id, below, skipped
                    )
                else:
                    prepared = await self._finish_preparing(connection, campaign_id)
        except _NotSending:
            bound.info("campaign_no_longer_sending", during="preparation")
            return None
        if below != BEYOND_LAST_ID:
            if status != "sending":
                return None
            bound.info("campaign_started", head_skipped=skipped, prepared_below=below)
            # Only once the head is committed: the rest is judged against it.
            assert self._group is not None
            self._tails[campaign_id] = self._group.create_task(
                self._prepare_tail(campaign_id, template, below, sample, bound),
                name=f"prepare:{campaign_id}",
            )
            return below
        if prepared is None or prepared["status"] != "sending":
            self._log_unsendable(prepared, bound)
            return None
        bound.info(
            "campaign_started", total=prepared["total"], skipped=prepared["skipped"], to_send=prepared["open"]
        )
        return BEYOND_LAST_ID

    async def _prepare_tail(
        self,
        campaign_id: str,
        template: Template,
        head_below: int,
        head_sample: list[asyncpg.Record],
        bound: structlog.typing.FilteringBoundLogger,
    ) -> None:
        """The rest of a campaign whose head is being sent: its skips, then its counters
        recounted and prepared_at set, in one transaction fenced by the lane. Until it
        commits, claims stay in the head; a crash or a lost lane before then rolls it back,
        and the campaign is prepared again from its first pending recipient, head first.

        Its statements read the whole campaign: each attempt runs with the session's
        statement_timeout times the next of PREPARE_TAIL_TIMEOUT_FACTORS, and a campaign whose
        rest times out at the last fails (_fail_unprepared_tail) rather than being prepared
        again forever while only its head is sent.

        The pre-flight judged the head's first recipients; a head with fewer than
        PREFLIGHT_SAMPLE to send (all skipped, say) is judged again here, with the first of
        the rest, as preparing the whole campaign at once would have judged it."""
        backoff = Backoff()
        prepared: asyncpg.Record | None = None
        timeouts = 0
        try:
            while True:
                if self._stopping():
                    return
                timeout_ms = 0
                try:
                    async with self._pool.acquire() as connection, connection.transaction():
                        timeout_ms = await connection.fetchval(
                            QUERIES["prepare_tail_statement_timeout"], PREPARE_TAIL_TIMEOUT_FACTORS[timeouts]
                        )
                        # The statements that read the whole rest wait for their answer as long
                        # as the server lets them run, not the pool's default: cut off sooner,
                        # the attempt would be retried as an outage, at the same timeout, for
                        # ever. (The others, row locks and settings, keep the default: a
                        # connection gone silent there is given up sooner.)
                        whole_rest = answer_timeout(timeout_ms / 1000)
                        await connection.execute(QUERIES["prepare_hold_campaign"], campaign_id)
                        await self._skip_unsendable(
                            connection,
                            campaign_id,
                            template,
                            head_below,
                            BEYOND_LAST_ID,
                            answer_within=whole_rest,
                        )
                        # Fenced before it commits, not from its start: the lane's lock
                        # holds off its lease renewals, and a tail's skips can take seconds.
                        await self._lock_lane(connection)
                        if len(head_sample) < PREFLIGHT_SAMPLE:
                            rest = await connection.fetch(
                                QUERIES["preflight_sample"],
                                campaign_id,
                                head_below,
                                BEYOND_LAST_ID,
                                PREFLIGHT_SAMPLE - len(head_sample),
                                timeout=whole_rest,
                            )
                            sample = [*head_sample, *rest]
                            if await self._failed_preflight(
                                connection, campaign_id, template, sample, bound, answer_within=whole_rest
                            ):
                                return
                        prepared = await self._finish_preparing(
                            connection, campaign_id, answer_within=whole_rest
                        )
                    break
                except LaneLost:
                    return
                except _NotSending:
                    bound.info("campaign_no_longer_sending", during="preparation of the rest")
                    return
                except asyncpg.exceptions.QueryCanceledError:
                    # Not an outage: tried again as it was, it would time out again, forever,
                    # with the campaign sending only its head.
                    metrics.DATABASE_ERRORS.labels("prepare_tail").inc()
                    timeouts += 1
                    if timeouts < len(PREPARE_TAIL_TIMEOUT_FACTORS):
                        bound.warning(
                            "prepare_tail_timed_out",
                            statement_timeout_ms=timeout_ms,
                            next_factor=PREPARE_TAIL_TIMEOUT_FACTORS[timeouts],
                        )
                        continue
                    await self._fail_unprepared_tail(campaign_id, timeout_ms, bound)
                    return
                except Exception as exc:
                    await backoff.wait_after(exc, bound, "prepare_tail", self._shutdown.requested)
        finally:
            self._tails.pop(campaign_id, None)
            if prepared is None and not self._stopping():
                # Rolled back (the campaign left SENDING for a moment) or failed: a run left
                # active would claim only in the head, and never complete, if its campaign was
                # resumed before the lane looked. Stopped here, it is started again, head
                # first, at the next look, as after a restart.
                run = self._runs.get(campaign_id)
                if run is not None:
                    run.active = False
            # Claims may now go past the head (or the lane, lost, stops).
            self._wake.set()
        if prepared is not None and prepared["status"] == "failed":
            self._log_unsendable(prepared, bound)
        elif prepared is not None:
            bound.info("campaign_prepared", total=prepared["total"], skipped=prepared["skipped"])

    async def _fail_unprepared_tail(
        self, campaign_id: str, timeout_ms: int, bound: structlog.typing.FilteringBoundLogger
    ) -> None:
        """The rest of a campaign could not be prepared within the longest statement_timeout
        (PREPARE_TAIL_TIMEOUT_FACTORS): the campaign fails, and the watchdog's sweep ends its
        pending recipients skipped 'campaign_failed' (none of the rest was claimed)."""
        head = PREPARE_HEAD_BATCHES * self._config.batch_size
        reason = (
            f"preparation timed out: the recipients after the first {head} were not checked within"
            f" {timeout_ms / 1000:g} s ({PREPARE_TAIL_TIMEOUT_FACTORS[-1]} times [database]"
            " statement_timeout_seconds); raise it, or split the campaign"
        )
        backoff = Backoff()
        while not self._stopping():
            try:
                async with self._pool.acquire() as connection:
                    failed = await connection.fetchval(
                        QUERIES["fail_campaign"], *self.lease.token, campaign_id, reason
                    )
            except Exception as exc:
                await backoff.wait_after(exc, bound, "fail_campaign", self._shutdown.requested)
                continue
            if failed is None:
                # Paused or cancelled meanwhile (or the lane lost): a resume prepares it again.
                bound.warning("prepare_tail_timed_out", statement_timeout_ms=timeout_ms, failed=False)
            else:
                bound.warning("campaign_failed", reason=reason)
            return

    async def _failed_preflight(
        self,
        connection: Connection,
        campaign_id: str,
        template: Template,
        sample: list[asyncpg.Record],
        bound: structlog.typing.FilteringBoundLogger,
        *,
        answer_within: float | None = None,
    ) -> bool:
        """Fails the campaign, in the preparing transaction, when the pre-flight finds its
        message invalid for the provider; the skips made stand, and are counted. Raises
        _NotSending (the transaction rolls back) if it is no longer SENDING: it is prepared
        again, and judged again, when it is. ``answer_within``: see _skip_unsendable."""
        try:
            problem = preflight(self._provider, template, sample)
        except Exception as exc:
            # A bug in a provider's checks. Raised, it crashed the lane at every refresh and
            # held up the sender's other campaigns; this campaign's messages are unjudged.
            bound.error("preflight_failed", exception=redacted_traceback(exc, self._provider.redact))
            problem = self._provider.redact(
                f"the provider's check of the message failed: {type(exc).__name__}: {exc}"
            )
        if problem is None:
            return False
        reason = self._storable_text(f"pre-flight: {problem}")
        if (
            await connection.fetchval(QUERIES["fail_campaign"], *self.lease.token, campaign_id, reason)
            is None
        ):
            raise _NotSending
        await self._finish_preparing(connection, campaign_id, answer_within=answer_within)
        bound.warning("campaign_failed", reason=reason)
        return True

    async def _lock_lane(self, connection: Connection) -> None:
        if await connection.fetchval(QUERIES["lock_lane"], *self.lease.token) is None:
            self.lease.lost = True
            raise LaneLost

    async def _skip_unsendable(
        self,
        connection: Connection,
        campaign_id: str,
        template: Template,
        first_id: int,
        below: int,
        *,
        answer_within: float | None = None,
    ) -> int:
        """Skips the fresh recipients in [first_id, below) that cannot be sent; returns how many.
        ``answer_within``: how long each statement's answer is waited for (None: the pool's
        default, see db.create_pool)."""
        skipped = _affected(
            await connection.execute(
                QUERIES["prepare_skip_no_address"], campaign_id, first_id, below, timeout=answer_within
            )
        )
        if template.variables:
            skipped += _affected(
                await connection.execute(
                    QUERIES["prepare_skip_missing_variables"],
                    campaign_id,
                    first_id,
                    below,
                    sorted(template.variables),
                    timeout=answer_within,
                )
            )
        # Last, so that a recipient skipped for its variables does not keep its address
        # from a later duplicate that can be sent.
        duplicates = (
            QUERIES["prepare_skip_duplicates"]
            if below == BEYOND_LAST_ID
            else QUERIES["prepare_skip_duplicates_in_head"]
        )
        await connection.execute(QUERIES["prepare_duplicates_without_nested_loops"])
        skipped += _affected(
            await connection.execute(
                duplicates,
                campaign_id,
                first_id,
                below,
                self._provider.phone_addresses,
                timeout=answer_within,
            )
        )
        await connection.execute(QUERIES["prepare_duplicates_done"])
        return skipped

    @staticmethod
    async def _finish_preparing(
        connection: Connection, campaign_id: str, *, answer_within: float | None = None
    ) -> asyncpg.Record | None:
        await connection.execute(QUERIES["prepare_lock_campaign"], campaign_id)
        prepared: asyncpg.Record | None = await connection.fetchrow(
            QUERIES["prepare_finish"], campaign_id, timeout=answer_within
        )
        return prepared

    @staticmethod
    def _log_unsendable(
        prepared: asyncpg.Record | None, bound: structlog.typing.FilteringBoundLogger
    ) -> None:
        if prepared is not None and prepared["status"] == "failed":
            bound.warning("campaign_failed", reason=prepared["status_reason"], total=prepared["total"])

    async def _claim_round(self, runs: list[CampaignRun]) -> int:
        claimed_total = 0
        # Rotate the starting campaign so campaigns of one sender share it fairly.
        if runs:
            start = self._rng.randrange(len(runs))
            runs = runs[start:] + runs[:start]
        for run in runs:
            room = self._free_room()
            if room <= 0:
                break
            run_room = run.claim_room()
            if run_room is not None and run_room <= 0:
                continue
            limit = claim_limit(
                batch_size=self._config.batch_size,
                free_room=room,
                run_room=run_room,
                outstanding=self._outstanding,
                workers=self._worker_count,
            )
            claim, claims = await self._claim(run, limit)
            claimed_total += len(claims)
            for row in claims:
                self._launch(run, row, claim)
            if not claims and run.outstanding == 0 and run.campaign_id not in self._tails:
                await self._try_complete(run)
        return claimed_total

    async def _claim(self, run: CampaignRun, limit: int) -> tuple[int, list[asyncpg.Record]]:
        """The claim's number and the rows it took."""
        self._claimed_in.add(run.campaign_id)
        self._claims_made += 1
        claim = self._claims_made
        try:
            async with self._pool.acquire() as connection:
                rows = await connection.fetch(
                    QUERIES["claim_recipients"],
                    *self.lease.token,
                    run.campaign_id,
                    run.cursor,
                    limit,
                    self.lease.lease_seconds,
                    claim,
                )
        except BaseException:
            # For the rest of the lane's life: the server may commit it later still.
            self._claim_failed = True
            raise
        fresh_ids = [row["id"] for row in rows if row["fresh"]]
        if fresh_ids:
            run.cursor = max(run.cursor, max(fresh_ids))
        elif len(rows) < limit:
            # Nothing fresh after the cursor: rows skipped while locked by someone else would
            # otherwise hide below it, so the next round looks from the start again.
            run.cursor = 0
        return claim, rows

    async def _try_complete(self, run: CampaignRun) -> None:
        await self._flush()
        async with self._pool.acquire() as connection:
            row = await connection.fetchrow(QUERIES["complete_campaign"], *self.lease.token, run.campaign_id)
        if row is not None:
            run.active = False
            self._runs.pop(run.campaign_id, None)
            if row["status"] == "failed":
                # Every recipient was skipped as it came to be sent: nothing was sent.
                self._log.warning(
                    "campaign_failed",
                    campaign_id=run.campaign_id,
                    reason=row["status_reason"],
                    total=row["total_count"],
                    skipped=row["skipped_count"],
                )
                return
            self._log.info(
                "campaign_completed",
                campaign_id=run.campaign_id,
                total=row["total_count"],
                sent=row["sent_count"],
                failed=row["failed_count"],
                skipped=row["skipped_count"],
            )
            return
        # Not complete, with nothing of it left to send here: rows this lane lost the claim
        # replies for would keep it SENDING for as long as the lane lives.
        if self._claim_failed and await self._release_lost_claims([run.campaign_id]):
            self._wake.set()

    async def _release_lost_claims(self, campaign_ids: list[str]) -> int:
        """Gives back this lane's in-flight claims in these campaigns but those whose outcome
        is still in the buffer; how many.

        The caller makes sure the lane has nothing outstanding in them: then every other claim
        of its epoch in flight there is one whose reply was lost.
        """
        unwritten = [update.recipient_id for update in self._buffer]
        async with self._pool.acquire() as connection:
            rows = await connection.fetch(
                QUERIES["release_lost_claims"], *self.lease.token, campaign_ids, unwritten
            )
        for row in rows:
            self._log.warning(
                "lost_claims_released", campaign_id=str(row["campaign_id"]), recipients=row["released"]
            )
        return sum(int(row["released"]) for row in rows)

    async def _release_lost_claims_on_leaving(self) -> None:
        """Lost claims given back now are due at once for the next owner; left behind, they
        would be taken for sends cut off and resent as in doubt, or failed 'in_doubt' by a
        sender that does not resend."""
        # _drain lands every flight (a send cut off goes into the buffer as in doubt); were
        # one still out, its row would be given back with its request in the air.
        if self.lease.lost or self._outstanding or not self._claim_failed:
            return
        try:
            await self._release_lost_claims(sorted(self._claimed_in))
        except Exception as exc:
            if not is_transient_db_error(exc):
                raise
            note_unavailable(self._log, "release_lost_claims", exc)

    def _pause_campaign(self, run: CampaignRun, reason: str) -> None:
        """Stop claiming and sending for this campaign now; the feed loop writes the pause."""
        if run.pause_reason is not None or not run.active:
            return
        # As stored: _write_campaign_pauses compares it with the reason read back.
        run.pause_reason = self._storable_text(reason)
        run.active = False
        self._wake.set()

    async def _write_campaign_pauses(self) -> None:
        pausing = [run for run in self._runs.values() if run.pause_reason and not run.pause_written]
        for run in pausing:
            async with self._pool.acquire() as connection:
                row = await connection.fetchrow(
                    QUERIES["pause_campaign"],
                    *self.lease.token,
                    run.campaign_id,
                    run.pause_reason,
                    run.status_changes,
                )
            run.pause_written = True
            if row is not None and (
                row["paused"] or (row["status"] == "paused" and row["status_reason"] == run.pause_reason)
            ):
                self._log.error("campaign_paused", campaign_id=run.campaign_id, reason=run.pause_reason)
            else:
                # Paused, resumed, cancelled or completed by someone else since the lane looked,
                # or the lane taken over: what they did stands. A resumed campaign is sent again
                # and meets the provider's verdict afresh.
                self._log.warning(
                    "campaign_pause_not_applied",
                    campaign_id=run.campaign_id,
                    reason=run.pause_reason,
                    status=None if row is None else row["status"],
                )

    async def _pause_sender(self) -> None:
        reason = self._pause_reason
        assert reason is not None

        async def pause() -> asyncpg.Record | None:
            async with self._pool.acquire() as connection:
                return await connection.fetchrow(
                    QUERIES["pause_sender"],
                    *self.lease.token,
                    reason,
                    self._paused_from_outside,
                    self._pause_changes_seen,
                )

        row = await self._with_db(pause, "pause_sender")
        for run in self._runs.values():
            run.active = False
        if row is None:
            return  # The lane was lost or the daemon stops before the database came back.
        if row["paused_reason"] is None:
            # The lane was taken over (its next owner meets the provider's verdict itself), or
            # the sender was resumed since the lane looked (a pause seen in the database
            # lifted, or an operator's resume while a verdict was written): the lane leaves
            # either way, and a resumed sender meets the verdict afresh.
            self._log.warning("sender_pause_not_applied", reason=reason, why="resumed or lane taken over")
            return
        # A provider's verdict that a pause already in place hid (see pause_sender).
        hidden = not self._paused_from_outside and row["paused_reason"] != reason
        self._log.error(
            "sender_paused",
            reason=row["paused_reason"],
            campaigns=[str(campaign_id) for campaign_id in row["campaign_ids"]],
            **({"provider_verdict": reason} if hidden else {}),
        )

    # ---------------------------------------------------------------- sending

    def _launch(self, run: CampaignRun, row: asyncpg.Record, claim: int) -> None:
        run.outstanding += 1
        self._outstanding += 1
        flight = Flight(
            row["id"],
            row["address"],
            row["variables"],
            row["attempts"],
            run,
            claim,
            row["error_code"],
            row["error_message"],
        )
        if run.cap is None:
            self._queue.put(flight)
            return
        run.waiting.append(flight)
        if run.pacer is None or run.pacer.done():
            run.pacer = asyncio.create_task(self._pace(run), name=f"pace:{run.campaign_id}")
            self._pacers.add(run.pacer)
            run.pacer.add_done_callback(self._pacers.discard)

    async def _pace(self, run: CampaignRun) -> None:
        """A capped campaign's claims enter the send queue one cap token at a time: the queue
        then holds only recipients ready to send, and the sender's other campaigns (a new one
        above all) never wait behind claims that wait for their own campaign's cap. A recipient
        that cannot be sent (an address the provider refuses, a variable that does not render)
        is skipped here, before it takes a token: it would otherwise slow the campaign by one
        cap interval each."""
        while run.waiting:
            cap = run.cap
            if cap is not None and run.active and not self._stopping():
                if self._skipped_before_its_token(run.waiting[0]):
                    continue
                await cap.acquire()
            if run.waiting:
                # A paused or stopping run's claims go straight on, to be given back.
                self._queue.put(run.waiting.popleft())

    def _skipped_before_its_token(self, flight: Flight) -> bool:
        """Prepares the request of the next claim to pace; settles (and returns True for) one
        that cannot be sent."""
        if flight.prepared() is not None:
            return False
        try:
            prepared = self._prepare(flight)
        except Exception:
            # A bug: the worker meets it again, logs it and spends the attempt.
            return False
        if isinstance(prepared, Delivery):
            flight.delivery, flight.rendered_with = prepared, flight.run.template
            return False
        flight.run.waiting.popleft()
        try:
            self._settle(flight, prepared)
        finally:
            self._landed(flight)
        return True

    async def _worker(self) -> None:
        me = asyncio.current_task()
        assert me is not None
        queued = self._queue.items
        while True:
            if not queued:
                await self._queue.wait_for_item()
                continue
            flight = queued.popleft()
            self._workers[me] = flight
            try:
                await self._send(flight)
            finally:
                self._workers[me] = None
                self._landed(flight)

    def _landed(self, flight: Flight) -> None:
        flight.run.outstanding -= 1
        self._outstanding -= 1
        if not self._outstanding:
            self._landing.set()
        if not flight.settled:
            # Cancelled (shutdown, lost lease) before its outcome was decided: a request
            # that may have reached the provider is in doubt; one that did not goes back.
            recipient_id = flight.recipient_id
            if flight.request_started:
                self._record(in_doubt(recipient_id, resend=self._provider.resend_in_doubt), flight)
            else:
                self._record(released(recipient_id), flight)

    def _release_queued(self) -> None:
        """Claims no worker has picked up go back unsent."""
        for run in self._runs.values():
            while run.waiting:
                self._landed(run.waiting.popleft())
        queued = self._queue.items
        while queued:
            self._landed(queued.popleft())

    async def _stop_workers(self) -> None:
        self._release_queued()
        tasks = [*self._workers, *self._pacers]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._workers.clear()

    async def _send(self, flight: Flight) -> None:
        """Never raises but CancelledError: a bug is logged and spends the recipient's attempt."""
        run = flight.run
        slots = self._slots
        try:
            if not slots.try_take():
                await slots.take()
            try:
                # The lease's clock is read once, right before the request (below).
                if not run.active or self._stopping():
                    self._settle(flight, None)
                    return
                prepared = flight.prepared() or self._prepare(flight)
                if isinstance(prepared, SendResult):
                    result = prepared
                else:
                    if not self._limiter.try_acquire(self._loop.time()):
                        await self._limiter.acquire()
                        # Waiting for a token can take long; the world may have changed.
                        if not run.active or self._stopping():
                            self._settle(flight, None)
                            return
                    if not self.lease.may_send():
                        self._settle(flight, None)
                        return
                    # Built first: a bug in building the request sent nothing.
                    sending = self._provider.send(prepared)
                    flight.request_started = True
                    # Timed here, not in a helper coroutine: every await in a request passes
                    # through each coroutine around it, several times per message.
                    started = time.perf_counter()
                    in_flight = metrics.IN_FLIGHT
                    in_flight.count += 1
                    try:
                        result = await sending
                    finally:
                        in_flight.count -= 1
                        self._send_duration.observe(time.perf_counter() - started)
            finally:
                slots.give_back()
            self._settle(flight, result)
        except Exception as exc:
            self._log.error(
                "send_failed_unexpectedly",
                campaign_id=run.campaign_id,
                recipient_id=flight.recipient_id,
                exception=redacted_traceback(exc, self._provider.redact),
            )
            self._settle(flight, internal_error(exc, request_started=flight.request_started))

    def _prepare(self, flight: Flight) -> Delivery | SendResult:
        """The request for a claimed recipient, or the skip of one that cannot be sent."""
        run = flight.run
        try:
            address = self._provider.normalize_address(flight.address or "")
            message = run.template.render(flight.variables)
        except InvalidAddress as exc:
            return SendResult(ResultKind.SKIPPED, error_code="invalid_address", error_message=str(exc))
        except RenderError as exc:
            return SendResult(ResultKind.SKIPPED, error_code=exc.code, error_message=str(exc))
        return Delivery(run.campaign_id, flight.recipient_id, address, message)

    def _settle(self, flight: Flight, result: SendResult | None) -> None:
        """Decide the recipient's outcome; None gives the claim back unsent."""
        flight.settled = True
        if result is None:
            self._record(released(flight.recipient_id), flight)
            return
        if self._storable is not None:
            # Not UTF8: the texts as stored, before decide() compares them with the last ones
            # (read back from the database) and reasons to pause are made of them.
            result = storable_result(self._storable, result)
        update = decide(
            flight.recipient_id,
            result,
            attempts=flight.attempts,
            max_attempts=self._config.max_attempts,
            backoff_base=self._config.backoff_base_seconds,
            backoff_max=self._config.backoff_max_seconds,
            rng=self._rng,
            resend_in_doubt=self._provider.resend_in_doubt,
            last_error=flight.last_error,
            last_message=flight.last_message,
        )
        if result.kind is ResultKind.THROTTLED:
            self._throttled_answers += 1
            # One line per cut of the rate, not per answer: a storm answers every request in
            # the air at once, and a provider throttling for hours would fill the log.
            if self._limiter.throttled(result.retry_after_seconds):
                self._log.info(
                    "sender_throttled",
                    campaign_id=flight.run.campaign_id,
                    retry_after=result.retry_after_seconds,
                    rate_factor=self._limiter.factor,
                    throttled_answers=self._throttled_answers,
                )
                self._throttled_answers = 0
            self._extend_throttle_streak(result)
        # A verdict against the sender or campaign that decide() gave up on as this recipient's
        # own pauses nothing: were it the sender's after all, the requests still in the air
        # bring the same verdict for recipients without this history.
        elif update.state is RecipientState.FAILED:
            pass
        elif result.kind is ResultKind.SENDER_FATAL and self._pause_reason is None:
            self._decide_sender_pause(
                f"provider rejected the sender: {result.error_code}: {result.error_message}"
            )
        elif result.kind is ResultKind.CAMPAIGN_FATAL:
            self._pause_campaign(
                flight.run, f"provider rejected the campaign: {result.error_code}: {result.error_message}"
            )
        if result.kind is not ResultKind.THROTTLED and result.kind is not ResultKind.SKIPPED:
            self._throttled_in_a_row = 0
        tripped = flight.run.breaker.record(result)
        if tripped is not None:
            self._pause_campaign(flight.run, f"circuit breaker: {tripped}")
        self._record(update, flight)

    def _extend_throttle_streak(self, result: SendResult) -> None:
        """Counts a throttled answer; pauses the sender once every answer has been one for
        throttle_pause_after_seconds. Unpaused, a provider that never lets up was asked for
        ever, at the limiter's floor, and the campaign stayed in SENDING."""
        now = self._loop.time()
        if not self._throttled_in_a_row:
            self._throttled_since = now
        self._throttled_in_a_row += 1
        if self._pause_reason is not None or not throttled_too_long(
            since=self._throttled_since,
            now=now,
            answers=self._throttled_in_a_row,
            pause_after_seconds=self._sender.throttle_pause_after_seconds,
        ):
            return
        last = ": ".join(part for part in (result.error_code, result.error_message) if part)
        self._decide_sender_pause(
            f"provider throttled every request for {now - self._throttled_since:.0f} s"
            f" ({self._throttled_in_a_row} answers in a row, the last {last or 'one without a code'});"
            " resume the sender once its limit has reset"
        )

    def _decide_sender_pause(self, reason: str) -> None:
        # As stored: _pause_sender compares it with the reason read back.
        self._pause_reason = self._storable_text(reason)
        self._pause_changes_seen = self.lease.pause_changes
        self._wake.set()

    def _record(self, update: RecipientUpdate, flight: Flight) -> None:
        if update.state is RecipientState.PENDING:
            update.claim = flight.claim
        self._buffer.append(update)
        if len(self._buffer) >= self._config.batch_size:
            self._flush_wanted.set()

    async def _drain(self) -> None:
        """Let requests already at the provider finish (within drain_seconds on shutdown)."""
        # Claims not yet sent go straight back; only requests in the air are waited for.
        self._release_queued()
        for task, flight in self._workers.items():
            if flight is not None and not flight.request_started:
                task.cancel()
        while self._outstanding:
            # Read again at every wake: a second signal moves the deadline to now.
            remaining = 0.0 if self.lease.lost else self._shutdown.drain_remaining()
            if remaining is not None and remaining <= 0:
                self._log.warning("drain_timeout", in_doubt=self._outstanding)
                break
            self._landing.clear()
            self._shutdown.deadline_moved.clear()
            await wait_any(self._landing, self._shutdown.deadline_moved, seconds=remaining)
        await self._stop_workers()

    # ---------------------------------------------------------------- recording

    async def _flush_loop(self) -> None:
        while True:
            await wait_any(self._flush_wanted, seconds=self._config.flush_seconds)
            self._flush_wanted.clear()
            await self._flush()

    async def _final_flush(self) -> None:
        """Write every outcome still held, retrying through an outage for a bounded time.

        With a drain deadline (the daemon's shutdown, a handover), until FINAL_WRITE_SECONDS
        past it, each attempt and each wait included: the drain and this together must fit
        the service manager's stop timeout (TimeoutStopSec), or the process is killed
        mid-write. A lane stopping without one (its sender paused) retries for a lease or a
        drain's length, whichever is longer.
        """
        loop = asyncio.get_running_loop()
        drain_left = self._shutdown.drain_remaining()
        deadline = loop.time() + (
            max(self._config.drain_seconds, self.lease.lease_seconds)
            if drain_left is None
            else drain_left + FINAL_WRITE_SECONDS
        )
        backoff = Backoff()
        while self._buffer and not self.lease.lost:
            try:
                # An attempt against a database that does not answer would otherwise wait for
                # its connect or statement timeout, far past the deadline.
                async with asyncio.timeout_at(deadline):
                    await self._flush(raise_errors=True)
            except Exception as exc:
                if not (isinstance(exc, TimeoutError) or is_transient_db_error(exc)):
                    raise
                if loop.time() >= deadline:
                    self._log.error(
                        "outcomes_unrecorded",
                        recipients=len(self._buffer),
                        note="left in_flight; the next lane owner resends them as in doubt",
                    )
                    return
                await asyncio.sleep(min(backoff.next(), deadline - loop.time()))

    async def _flush(self, *, raise_errors: bool = False) -> None:
        async with self._flush_lock:
            while self._buffer and not self.lease.lost:
                batch = self._buffer[: self._config.batch_size]
                try:
                    lane_held = await self._write(batch)
                except Exception as exc:
                    if raise_errors or not is_transient_db_error(exc):
                        raise
                    note_unavailable(
                        self._log,
                        "record_outcomes",
                        exc,
                        waiting=len(self._buffer),
                    )
                    return
                del self._buffer[: len(batch)]
                self._room.set()
                if not lane_held:
                    self.lease.lost = True
                    self._log.warning("lane_taken_over", outcomes_rejected=len(batch) + len(self._buffer))
                    self._buffer.clear()
                    return
                self._count(batch)

    async def _write(self, batch: list[RecipientUpdate]) -> bool:
        columns = outcome_columns(batch)
        if self._storable is not None:
            # Also the texts decide() made of the provider's (gave up after ...: ..., clipped).
            columns = storable_columns(self._storable, columns)
        async with self._pool.acquire() as connection:
            row = await record_outcomes(connection, self.lease.token, columns)
        return bool(row["lane_held"])

    def _count(self, batch: Iterable[RecipientUpdate]) -> None:
        """Counted only after the batch is committed."""
        tally: Counter[tuple[str, str]] = Counter()
        for (state, error_class), count in Counter(map(_STATE_AND_CLASS, batch)).items():
            outcome = state.value
            if state is RecipientState.PENDING:
                outcome = "released" if error_class == "released" else "retry"
            tally[(outcome, error_class)] += count
        for (outcome, error_class), count in tally.items():
            metrics.MESSAGES.labels(self.lease.sender_id, outcome, error_class).inc(count)
        sent = sum(count for (outcome, _), count in tally.items() if outcome == "sent")
        metrics.THROUGHPUT.add(sent)
        for (outcome, _), count in tally.items():
            self._progress[outcome] += count
        self._log.debug("outcomes_recorded", **{f"{o}_{c}": n for (o, c), n in tally.items()})
        self._log_progress(final=False)

    def _log_progress(self, *, final: bool) -> None:
        """One info line per lane every PROGRESS_LOG_SECONDS (and at the end), not one per batch."""
        now = time.monotonic()
        elapsed = now - self._progress_since
        if not self._progress or (not final and elapsed < PROGRESS_LOG_SECONDS):
            return
        self._log.info(
            "lane_progress",
            seconds=round(elapsed, 1),
            msgs_per_second=round(self._progress["sent"] / elapsed, 1) if elapsed else None,
            **dict(self._progress),
        )
        self._progress.clear()
        self._progress_since = now

    # ---------------------------------------------------------------- renewing

    async def _renew_loop(self) -> None:
        interval = self.lease.renew_interval
        while True:
            await asyncio.sleep(interval)
            campaign_ids = [run.campaign_id for run in self._runs.values() if run.outstanding]
            was_blocked = not self.lease.may_send()
            try:
                async with self._pool.acquire() as connection:
                    renewal = await leasing.renew(connection, self.lease, campaign_ids)
                    if renewal.held and was_blocked:
                        # Sending again after an outage: requests held back all at once
                        # would leave together, so the first second is paced like a start.
                        self._limiter.restart_smoothly()
                    if not renewal.held:
                        # Said before the connection goes back to the pool: the feed loop
                        # sees the lost lease at that await and may cancel this task there.
                        self._log.warning("lane_taken_over")
                        self._wake.set()
            except Exception as exc:
                if not is_transient_db_error(exc):
                    raise
                self._log.warning(
                    "lease_renewal_failed", error=type(exc).__name__, may_send=self.lease.may_send()
                )
                interval = min(1.0, self.lease.renew_interval)
                continue
            interval = self.lease.renew_interval
            if not renewal.held:
                return
            if renewal.paused_reason is not None and self._pause_reason is None:
                # Paused from outside (operator or host): stop like a provider rejection.
                self._pause_reason = renewal.paused_reason
                self._paused_from_outside = True
                self._wake.set()

    # ---------------------------------------------------------------- helpers

    async def _with_db(self, operation: Any, what: str) -> Any:
        backoff = Backoff()
        while not self.lease.lost:
            try:
                return await operation()
            except Exception as exc:
                if (
                    is_transient_db_error(exc)
                    and self._shutdown.requested.is_set()
                    and not self.lease.may_send()
                ):
                    return None
                await backoff.wait_after(exc, self._log, what)
        return None


def _affected(status: str) -> int:
    """The row count of a command status such as ``UPDATE 12``."""
    return int(status.rpartition(" ")[2])


def preflight(provider: Provider, template: Template, sample: Iterable[asyncpg.Record]) -> str | None:
    """Why the campaign cannot be valid for its provider, judged on its first recipients'
    messages (recipients that will be skipped anyway do not count), or None."""
    messages = []
    for row in sample:
        try:
            provider.normalize_address(row["address"] or "")
            messages.append(template.render(row["variables"]))
        except (InvalidAddress, RenderError):
            continue
    return provider.check_messages(messages) if messages else None


def claim_limit(
    *, batch_size: int, free_room: int, run_room: int | None, outstanding: int, workers: int
) -> int:
    """How many recipients one claim asks for.

    A lane with no claim out (a campaign starting on an idle lane, a lane taken over, a
    campaign resumed) first claims only what its idle workers can send at once: every worker
    waits for that claim, and a claim's time grows with its size (a median 2.3 ms for 64
    rows against 13.9 ms for 1,000: bench/claim_sizes.py, BENCHMARKS.md). The next
    round, with those requests in the air, claims a whole batch."""
    limit = min(batch_size, free_room)
    if outstanding == 0:
        limit = min(limit, workers)
    if run_room is not None:
        limit = min(limit, run_room)
    return limit


class FeedStep(enum.Enum):
    """What a lane's feed loop does after a claim round."""

    CLAIM_AGAIN = "claim_again"
    WAIT_FOR_ROOM = "wait_for_room"
    WAIT_UNTIL_WRITTEN = "wait_until_written"
    WAIT_FOR_WORK = "wait_for_work"


def after_claim_round(*, claimed: int, free_room: int, claim_threshold: int, unwritten: int) -> FeedStep:
    """The room decides first: a round that found it full claimed nothing because it could
    not, which says nothing about what is left to claim. Taken for "nothing left", it had the
    lane wait for every claim to be written (up to a poll) while the send queue ran dry, after
    any wake (a NOTIFY, a tail prepared) that came while the room was full.

    ``unwritten``: recipients claimed whose outcome is not committed yet."""
    if free_room < claim_threshold:
        # Room is only ever short while claims are out, whose writes will free it.
        return FeedStep.WAIT_FOR_ROOM
    if claimed:
        return FeedStep.CLAIM_AGAIN
    if unwritten:
        # Nothing left to claim now; the outcomes still to come may complete a campaign.
        return FeedStep.WAIT_UNTIL_WRITTEN
    return FeedStep.WAIT_FOR_WORK


def claim_budget(*, concurrency: int, batch_size: int, rate_per_second: float, burst: int) -> int:
    """How many recipients a lane may hold claimed (claimed, outcome not yet committed).

    Enough for the sends in the air plus the next batch, never more than CLAIM_HORIZON_SECONDS
    of the sender's rate: more claims ahead only mean more in doubt after a crash.
    """
    wanted = concurrency + batch_size
    # A sender whose rate, not the concurrency, sets the pace holds at least a second of its
    # sending whatever batch_size is: claims that run out while a claim or an outcome write is
    # slow leave its token bucket idle, and the bucket saves only `burst` tokens, so that time
    # is lost for good (a small batch_size cost 15% of a 200/s rate). A fast sender is bound
    # by the concurrency instead.
    one_second = math.ceil(rate_per_second) + burst
    if one_second <= 2 * wanted:
        wanted = max(wanted, one_second)
    horizon = math.ceil(rate_per_second * CLAIM_HORIZON_SECONDS) + burst
    return max(1, min(wanted, horizon))
