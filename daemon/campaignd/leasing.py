"""Sender lanes: one daemon at a time serves all SENDING campaigns of a sender.

A lane is a lease on the sender's row: (lease_owner, lease_epoch, lease_expires_at). The
epoch is bumped at every acquisition and is the fencing token that every write made for
the lane carries (see sql/queries.sql). Locally, a lane may start a send only until its
*local* deadline: the time the last renewal was *sent* plus the lease length, less a
margin. The clock is CLOCK_BOOTTIME, which keeps counting while the process is stopped or
the machine sleeps, so a daemon thawed after a long freeze knows at once that its lease is
gone and sends nothing more before asking the database.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import asyncpg
import structlog

from campaignd import metrics
from campaignd.sql import QUERIES

if TYPE_CHECKING:
    from campaignd.db import Connection

# Renew three times per lease: two renewals may be lost before the lease runs out.
RENEWALS_PER_LEASE = 3
# Stop sending this fraction of the lease before it ends, for clock-rate differences
# between this host and the database.
SAFETY_FRACTION = 0.1


# Replicas configured with the same senders share the lanes that have work, the least busy
# first: a daemon takes one lane per attempt, and one that already serves lanes waits this
# long per lane (up to the cap) before each attempt. Without it, the first replica to wake
# takes every lane whose campaigns start together and the others stay idle.
DEFERRAL_PER_HELD_LANE_SECONDS = 0.01
MAX_ACQUISITION_DEFERRAL_SECONDS = 0.2


def acquisition_deferral(held_lanes: int) -> float:
    return min(held_lanes * DEFERRAL_PER_HELD_LANE_SECONDS, MAX_ACQUISITION_DEFERRAL_SECONDS)


def handover_grace(poll_seconds: float) -> float:
    """How long a lane handed over is left for its new owner before the old may take it back:
    the release wakes the replicas at once, and three polls cover a lost notification."""
    return 3 * poll_seconds + MAX_ACQUISITION_DEFERRAL_SECONDS


# A replica hands a lane over only to a peer holding at least this many lanes fewer: moving
# one then narrows the gap without reversing it, so two replicas never pass a lane back and
# forth.
HANDOVER_MIN_GAP = 2
# A daemon's row in campaignd.daemons counts for this many of its announcement intervals:
# one lost announcement is forgiven, and a frozen or dead daemon stops being offered lanes
# soon after (one offered a lane meanwhile leaves it free, and the lane comes back).
PRESENCE_INTERVALS = 2


@dataclass(frozen=True)
class Peer:
    """Another live daemon, as announced in campaignd.daemons."""

    owner: str
    senders: frozenset[str]
    lanes: int


@dataclass(frozen=True)
class Handover:
    sender_id: str
    to: Peer


def lane_to_hand_over(
    held_since: Mapping[str, float], peers: Iterable[Peer], *, now: float, settled_after: float
) -> Handover | None:
    """The lane this daemon should give up so that a less busy peer takes it, if any.

    held_since maps each lane this daemon serves to when it took it. A lane is given only to
    a peer configured for its sender, and only once held for settled_after seconds: a lane
    just taken stays put while counts settle. The least busy peer is served first; of the
    lanes it could take, the one taken last moves (the one longest held keeps its warm
    connections), ties broken by sender id so that the choice is reproducible.
    """
    held = len(held_since)
    for peer in sorted(peers, key=lambda p: (p.lanes, p.owner)):
        if peer.lanes + HANDOVER_MIN_GAP > held:
            break
        movable = [
            sender_id
            for sender_id, since in held_since.items()
            if sender_id in peer.senders and now - since >= settled_after
        ]
        if movable:
            return Handover(max(movable, key=lambda s: (held_since[s], s)), peer)
    return None


async def announce(
    connection: Connection, owner: str, sender_ids: list[str], interval_seconds: float, *, first: bool
) -> list[Peer]:
    """Refresh this daemon's presence; returns the other live daemons."""
    rows = await connection.fetch(
        QUERIES["announce_daemon"], owner, sender_ids, interval_seconds * PRESENCE_INTERVALS, first
    )
    return [Peer(row["owner"], frozenset(row["senders"]), int(row["lanes"])) for row in rows]


async def retire(connection: Connection, owner: str) -> None:
    await connection.execute(QUERIES["retire_daemon"], owner)


# A partial, not a def: a lane reads this clock before every request, and a partial of a
# builtin is called without a Python frame.
local_clock: Callable[[], float] = functools.partial(time.clock_gettime, time.CLOCK_BOOTTIME)


@dataclass
class LaneLease:
    sender_id: str
    owner: str
    epoch: int
    lease_seconds: float
    deadline: float
    lost: bool = field(default=False)
    # Who held the lane before, when it was taken over after expiring (None: it was free).
    previous_owner: str | None = None
    # senders.pause_changes as of the last acquisition or renewal: a provider's verdict pauses
    # the sender only if it has not been paused and resumed since (see pause_sender).
    pause_changes: int = 0

    @property
    def token(self) -> tuple[str, str, int]:
        return (self.sender_id, self.owner, self.epoch)

    @property
    def renew_interval(self) -> float:
        return self.lease_seconds / RENEWALS_PER_LEASE

    def may_send(self) -> bool:
        return not self.lost and local_clock() < self.deadline

    def extend_from(self, asked_at: float) -> None:
        self.deadline = asked_at + self.lease_seconds * (1 - SAFETY_FRACTION)


async def acquire_lanes(
    connection: Connection, sender_ids: list[str], owner: str, lease_seconds: float, *, limit: int = 1
) -> list[LaneLease]:
    asked_at = local_clock()
    rows = await connection.fetch(QUERIES["acquire_lanes"], sender_ids, owner, lease_seconds, limit)
    leases = []
    for row in rows:
        lease = LaneLease(
            row["id"],
            owner,
            row["lease_epoch"],
            lease_seconds,
            deadline=0.0,
            previous_owner=row["previous_owner"],
            pause_changes=row["pause_changes"],
        )
        lease.extend_from(asked_at)
        leases.append(lease)
    return leases


async def recover_in_doubt(connection: Connection, sender_id: str | None) -> list[asyncpg.Record]:
    """Claims left in flight under a lane that has been fenced (released, expired by the
    watchdog, or taken over), for one sender or all.

    One row per campaign touched: campaign_id, sender_id, resent, failed.
    """
    rows: list[asyncpg.Record] = await connection.fetch(QUERIES["recover_orphaned_claims"], sender_id)
    return rows


def report_in_doubt(logger: structlog.typing.FilteringBoundLogger, row: asyncpg.Record, *, by: str) -> None:
    metrics.IN_DOUBT.labels(row["sender_id"], "resent").inc(row["resent"])
    metrics.IN_DOUBT.labels(row["sender_id"], "failed").inc(row["failed"])
    logger.warning(
        "in_doubt_recovered",
        campaign_id=str(row["campaign_id"]),
        sender_id=row["sender_id"],
        resent=row["resent"],
        failed_in_doubt=row["failed"],
        by=by,
    )


@dataclass(frozen=True)
class Renewal:
    held: bool
    paused_reason: str | None = None


async def renew(connection: Connection, lease: LaneLease, campaign_ids: list[str]) -> Renewal:
    asked_at = local_clock()
    row = await connection.fetchrow(QUERIES["renew_lane"], *lease.token, lease.lease_seconds, campaign_ids)
    if row is None:
        lease.lost = True
        return Renewal(held=False)
    lease.extend_from(asked_at)
    lease.pause_changes = row["pause_changes"]
    return Renewal(held=True, paused_reason=row["paused_reason"])


async def release(connection: Connection, lease: LaneLease) -> None:
    await connection.execute(QUERIES["release_lane"], *lease.token)
    lease.lost = True
