"""A big campaign is prepared head first: its first recipients are sent while the rest is
prepared. Real daemons, a real PostgreSQL, the fake provider.

With batch_size 5 a campaign's head is PREPARE_HEAD_BATCHES x 5 = 50 fresh recipients, so a
few hundred recipients take the two-step path, and a recipient locked by the test holds the
second step (the tail's skips) for as long as the test needs.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from campaignd import db, operator
from campaignd.config import DatabaseConfig
from campaignd.dispatch import PREPARE_HEAD_BATCHES
from campaignd.fakeprovider import FakeProvider
from campaignd.providers.addresses import normalize_e164
from campaignd.providers.base import InvalidAddress
from campaignd.schema import migrate
from campaignd.sql import QUERIES
from tests.conftest import (
    DaemonProcess,
    assert_counters_match,
    campaign,
    create_campaign,
    daemon_config,
    register_sender,
    state_counts,
    wait_for,
    wait_status,
    with_database,
)
from tests.test_dispatch import assert_exactly_once

BATCH_SIZE = 5
HEAD = PREPARE_HEAD_BATCHES * BATCH_SIZE
SIZE = 300

Recipient = tuple[str | None, Any]


def mixed_recipients() -> list[Recipient]:
    """Good recipients with bad ones and repeated addresses on both sides of the head."""
    recipients: list[Recipient] = [(f"+1555{i:07d}", {"name": f"n{i}"}) for i in range(SIZE)]

    def put(index: int, address: str | None, variables: Any = None) -> None:
        recipients[index] = (address, {"name": f"n{index}"} if variables is None else variables)

    put(1, "+15559999007", {"name": {"nested": 1}})  # skipped when sent: keeps its address
    put(3, None)  # no address, in the head
    put(4, "+15559999001")  # kept: its repeats in the head and in the tail are skipped
    put(7, "+15559999001")
    put(200, "+15559999001")
    put(210, " +15559999001  ")  # padded, still the same address
    put(9, "+15559999002", {})  # cannot be sent (no name): its repeat in the tail is sent
    put(150, "+15559999002")
    put(160, None)  # no address, in the tail
    put(170, "   ")
    put(180, "+15559999003")  # two in the tail: the second is skipped
    put(190, "+15559999003")
    put(220, "+15559999004", {"name": None})  # a null name, in the tail
    put(230, "+15559999004")
    put(240, "+15559999005", ["name"])  # variables that are not an object
    put(250, "+15559999007")  # repeats the head's recipient skipped when sent
    put(HEAD - 1, "+15559999006")  # the last of the head, repeated right after it
    put(HEAD, "+15559999006")
    return recipients


def expected_outcomes(recipients: list[Recipient]) -> list[tuple[str, str | None]]:
    """The preparation's rules, stated plainly: no address, then missing variables, then
    repeats of an address not skipped (the first kept); the rest is sent, but for a value
    that cannot fill the message, found when it is sent (it keeps its address all the same)."""
    outcomes: list[tuple[str, str | None] | None] = []
    for address, variables in recipients:
        if address is None or not address.strip():
            outcomes.append(("skipped", "no_address"))
        elif not isinstance(variables, dict) or variables.get("name") is None:
            outcomes.append(("skipped", "missing_variable"))
        else:
            outcomes.append(None)
    kept: set[str] = set()
    for index, (address, _) in enumerate(recipients):
        if outcomes[index] is None:
            assert address is not None
            variables = recipients[index][1]
            if address.strip() in kept:
                outcomes[index] = ("skipped", "duplicate_address")
            elif not isinstance(variables["name"], str):
                outcomes[index] = ("skipped", "bad_variable")
            else:
                outcomes[index] = ("sent", None)
            kept.add(address.strip())
    return [outcome for outcome in outcomes if outcome is not None]


async def outcomes(conn: asyncpg.Connection, campaign_id: str) -> list[tuple[str, str | None]]:
    rows = await conn.fetch(
        "SELECT state, error_code FROM campaignd.recipients WHERE campaign_id = $1 ORDER BY id", campaign_id
    )
    return [(row["state"], row["error_code"]) for row in rows]


async def lock_recipient(database_url: str, campaign_id: str, index: int) -> asyncpg.Connection:
    """Holds the row lock of the campaign's ``index``-th recipient in an open transaction: a
    preparation's skips wait at that row (one without an address) until the connection rolls
    back."""
    blocker = await asyncpg.connect(database_url)
    recipient_id = await blocker.fetchval(
        "SELECT id FROM campaignd.recipients WHERE campaign_id = $1 ORDER BY id OFFSET $2 LIMIT 1",
        campaign_id,
        index,
    )
    await blocker.execute("BEGIN")
    # By id: FOR UPDATE under an OFFSET would lock every row the OFFSET passes over too.
    await blocker.execute("SELECT id FROM campaignd.recipients WHERE id = $1 FOR UPDATE", recipient_id)
    return blocker


async def preparation_waits_for_lock(conn: asyncpg.Connection) -> bool:
    return bool(
        await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'campaignd'"
            " AND wait_event_type = 'Lock' AND query LIKE '%recipient has no address%'"
        )
    )


async def claimed_beyond_head(conn: asyncpg.Connection, campaign_id: str) -> int:
    """Recipients past the prepared head that anything but the tail's skips has touched."""
    count: int = await conn.fetchval(
        "SELECT count(*) FROM campaignd.recipients r JOIN campaignd.campaigns c ON c.id = r.campaign_id"
        " WHERE c.id = $1 AND r.id >= c.prepared_below"
        " AND (r.state IN ('in_flight', 'sent', 'failed') OR r.attempts > 0)",
        campaign_id,
    )
    return count


async def test_a_big_campaign_is_prepared_head_first_with_the_same_outcomes(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    recipients = mixed_recipients()
    config = daemon_config(tmp_path, database_url, {"sms": {"url": fake.url}}, batch_size=BATCH_SIZE)
    campaign_id = await create_campaign(conn, "sms", recipients)
    daemon = daemons(config)

    row = await wait_status(conn, campaign_id, "completed", timeout=120)

    expected = expected_outcomes(recipients)
    assert await outcomes(conn, campaign_id) == expected
    sent = sum(1 for state, _ in expected if state == "sent")
    assert (row["total_count"], row["sent_count"], row["skipped_count"]) == (SIZE, sent, SIZE - sent)
    await assert_counters_match(conn, campaign_id)
    # It took the two-step path: the head bound was written, and the tail prepared later.
    first_id = await conn.fetchval(
        "SELECT min(id) FROM campaignd.recipients WHERE campaign_id = $1", campaign_id
    )
    assert row["prepared_below"] == first_id + HEAD
    assert "campaign_prepared" in daemon.log()
    assert_exactly_once(fake, campaign_id, sent)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


async def test_sigkill_between_the_head_and_the_tail_resumes_without_loss(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    fake.behaviour.latency_seconds = 0.05
    recipients = mixed_recipients()
    config = daemon_config(
        tmp_path, database_url, {"sms": {"url": fake.url}}, batch_size=BATCH_SIZE, lease_seconds=2.0
    )
    campaign_id = await create_campaign(conn, "sms", recipients)
    blocker = await lock_recipient(database_url, campaign_id, 160)  # one without an address
    try:
        first = daemons(config)
        await wait_for(lambda: preparation_waits_for_lock(conn), timeout=60, what="the tail's skips waiting")

        async def head_sending() -> bool:
            # The head's recipient skipped when sent is among the outcomes the rest is judged by.
            row = await campaign(conn, campaign_id)
            return row["sent_count"] >= 10 and row["skipped_count"] > 3

        await wait_for(head_sending, timeout=60, what="10 of the head sent, 1 skipped when sent")
        first.kill()
    finally:
        await blocker.close()

    row = await campaign(conn, campaign_id)
    assert row["status"] == "sending" and row["prepared_at"] is None
    assert row["prepared_below"] is not None
    # Only the head was claimed, and the tail's skips, rolled back by the kill, left no trace.
    assert await claimed_beyond_head(conn, campaign_id) == 0
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM campaignd.recipients"
            " WHERE campaign_id = $1 AND id >= $2 AND state <> 'pending'",
            campaign_id,
            row["prepared_below"],
        )
        == 0
    )
    in_flight_at_kill = (await state_counts(conn, campaign_id)).get("in_flight", 0)

    second = daemons(config)
    row = await wait_status(conn, campaign_id, "completed", timeout=120)

    expected = expected_outcomes(recipients)
    assert await outcomes(conn, campaign_id) == expected
    await assert_counters_match(conn, campaign_id)
    assert_exactly_once(fake, campaign_id, sum(1 for state, _ in expected if state == "sent"))
    # A recipient reached the provider twice only as an in-doubt resend, under one key.
    assert sum(fake.duplicate_keys().values()) + fake.cancelled_count() <= in_flight_at_kill
    second.signal(signal.SIGTERM)
    assert second.wait() == 0


async def sending_with_the_tail_held(
    tmp_path: Path,
    database_url: str,
    conn: asyncpg.Connection,
    fake: FakeProvider,
    daemons: Any,
    recipients: list[Recipient] | None = None,
) -> tuple[str, DaemonProcess, asyncpg.Connection]:
    """A campaign whose head is being sent while its tail's skips wait for the test's lock
    (held until the returned connection rolls back or closes) on its 161st recipient, which
    must have no address."""
    fake.behaviour.latency_seconds = 0.05
    config = daemon_config(tmp_path, database_url, {"sms": {"url": fake.url}}, batch_size=BATCH_SIZE)
    campaign_id = await create_campaign(conn, "sms", recipients or mixed_recipients())
    blocker = await lock_recipient(database_url, campaign_id, 160)
    daemon = daemons(config)
    try:
        await wait_for(lambda: preparation_waits_for_lock(conn), timeout=60, what="the tail's skips waiting")
    except BaseException:
        await blocker.close()
        raise
    return campaign_id, daemon, blocker


async def test_a_cancel_while_the_tail_is_prepared_keeps_the_counters_true(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    campaign_id, daemon, blocker = await sending_with_the_tail_held(
        tmp_path, database_url, conn, fake, daemons
    )
    try:
        canceller = await asyncpg.connect(database_url)
        try:
            # The cancel waits for the tail's preparation, which holds the campaign row:
            # without that, the two deadlocked on the recipients both skip. Every recipient
            # is counted once, by the one that skipped it.
            cancel = asyncio.create_task(operator.cancel_campaign(canceller, campaign_id))
            await asyncio.sleep(0.5)
            await blocker.execute("ROLLBACK")
            cancellation = await asyncio.wait_for(cancel, timeout=60)
        finally:
            await canceller.close()
    finally:
        await blocker.close()
    assert cancellation.status == "cancelled"

    async def settled() -> bool:
        counts = await state_counts(conn, campaign_id)
        return not counts.get("in_flight") and not counts.get("pending")

    await wait_for(settled, timeout=60, what="every recipient final")
    await wait_for(lambda: _prepared(conn, campaign_id), timeout=60, what="the tail prepared")
    await assert_counters_match(conn, campaign_id)
    assert (await campaign(conn, campaign_id))["status"] == "cancelled"
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


async def _prepared(conn: asyncpg.Connection, campaign_id: str) -> bool:
    return (await campaign(conn, campaign_id))["prepared_at"] is not None


async def test_a_pause_while_the_tail_is_prepared_still_counts_its_skips(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    campaign_id, daemon, blocker = await sending_with_the_tail_held(
        tmp_path, database_url, conn, fake, daemons
    )
    try:
        await operator.pause_campaign(conn, campaign_id)
    finally:
        await blocker.close()

    # The tail's skips were made while the campaign was paused: they are counted, and the
    # campaign is prepared (a resume sends the rest without preparing it again).
    await wait_for(lambda: _prepared(conn, campaign_id), timeout=60, what="the tail prepared")
    await wait_for(lambda: _none_in_flight(conn, campaign_id), timeout=60, what="claims landed")
    await assert_counters_match(conn, campaign_id)
    row = await campaign(conn, campaign_id)
    assert row["status"] == "paused" and row["total_count"] == SIZE
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


async def _none_in_flight(conn: asyncpg.Connection, campaign_id: str) -> bool:
    return not (await state_counts(conn, campaign_id)).get("in_flight")


async def test_a_campaign_paused_while_the_rest_is_checked_fails_when_none_is_valid(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    nobody: list[Recipient] = [(None, {"name": f"n{i}"}) for i in range(SIZE)]
    campaign_id, daemon, blocker = await sending_with_the_tail_held(
        tmp_path, database_url, conn, fake, daemons, nobody
    )
    try:
        await operator.pause_campaign(conn, campaign_id)
    finally:
        await blocker.close()

    # Not left paused and prepared, to be completed by a resume having sent nothing.
    row = await wait_status(conn, campaign_id, "failed", timeout=60)
    assert row["status_reason"] == f"no valid recipient: all {SIZE} were skipped"
    await assert_counters_match(conn, campaign_id)
    assert fake.request_count() == 0
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


def with_timeouts(config: Path, statement: float, lock: float | None = None) -> Path:
    """``config`` with the [database] section's statement_timeout (and lock_timeout) set."""
    settings = f"statement_timeout_seconds = {statement!r}"
    if lock is not None:
        settings += f"\nlock_timeout_seconds = {lock!r}"
    text = config.read_text()
    assert "pool_size = 6\n" in text
    config.write_text(text.replace("pool_size = 6\n", f"pool_size = 6\n{settings}\n", 1))
    return config


def log_events(daemon: DaemonProcess, event: str) -> list[dict[str, Any]]:
    lines = (line for line in daemon.log().splitlines() if line.startswith("{"))
    return [entry for entry in map(json.loads, lines) if entry.get("event") == event]


BIG_SIZE = 80_000


def many_repeated_recipients() -> list[Recipient]:
    """BIG_SIZE recipients over 997 addresses, so that few are sent but the tail's duplicate
    skips (most of it) outlast a statement_timeout of 0.1 s; with no address, missing names,
    padded addresses and repeats across the head's bound among them."""
    recipients: list[Recipient] = [(f"+1555{i % 997:07d}", {"name": f"n{i}"}) for i in range(BIG_SIZE)]
    for index in range(60, BIG_SIZE, 101):
        recipients[index] = (None if index % 2 else "  ", {"name": "x"})
    for index in range(70, BIG_SIZE, 103):
        recipients[index] = (recipients[index][0], {} if index % 2 else {"name": None})
    for index in range(80, BIG_SIZE, 107):
        recipients[index] = (f"  {recipients[index][0]} ", {"name": f"n{index}"})
    fixed = mixed_recipients()
    for index in (1, 3, 4, 7, 9, 150, 160, 170, 180, 190, 200, 210, 220, 230, 240, 250, HEAD - 1, HEAD):
        recipients[index] = fixed[index]
    # Only in the tail, first without its name: its next occurrence is the one kept.
    recipients[5000] = ("+15559999010", {})
    recipients[40000] = ("+15559999010", {"name": "late"})
    recipients[50000] = ("+15559999010", {"name": "later"})
    return recipients


async def test_a_tail_that_outlasts_the_statement_timeout_is_prepared_with_a_longer_one(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    # Scaled down: 0.1 s stands for the default 30 s, 80,000 recipients with many repeats
    # for the 10-15M whose tail outlasts it. Tried again as it was, the tail timed out for
    # ever: the campaign stayed sending after its head, logged as the database unavailable.
    recipients = many_repeated_recipients()
    config = daemon_config(tmp_path, database_url, {"sms": {"url": fake.url}}, batch_size=BATCH_SIZE)
    campaign_id = await create_campaign(conn, "sms", recipients)
    daemon = daemons(with_timeouts(config, 0.1))

    row = await wait_status(conn, campaign_id, "completed", timeout=45)

    expected = expected_outcomes(recipients)
    assert await outcomes(conn, campaign_id) == expected
    sent = sum(1 for state, _ in expected if state == "sent")
    assert (row["total_count"], row["sent_count"], row["skipped_count"]) == (
        BIG_SIZE,
        sent,
        BIG_SIZE - sent,
    )
    await assert_counters_match(conn, campaign_id)
    assert_exactly_once(fake, campaign_id, sent)
    # Head first, and its rest prepared after timing out at the session's timeout at least once.
    first_id = await conn.fetchval(
        "SELECT min(id) FROM campaignd.recipients WHERE campaign_id = $1", campaign_id
    )
    assert row["prepared_below"] == first_id + HEAD
    timed_out = log_events(daemon, "prepare_tail_timed_out")
    assert timed_out and timed_out[0]["statement_timeout_ms"] == 100, timed_out
    assert not [e for e in log_events(daemon, "database_unavailable") if e.get("during") == "prepare_tail"]
    assert len(log_events(daemon, "campaign_prepared")) == 1
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


async def test_a_tail_that_times_out_at_the_longest_timeout_fails_the_campaign(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    # The tail's skips wait for a row lock the test holds, past 0.1 s, then 8 and 64 times it
    # (lock_timeout is longer): the campaign fails with a reason instead of being tried again
    # forever, while the lane's other campaigns are sent.
    fake.behaviour.latency_seconds = 0.02
    config = daemon_config(tmp_path, database_url, {"sms": {"url": fake.url}}, batch_size=BATCH_SIZE)
    campaign_id = await create_campaign(conn, "sms", mixed_recipients())
    blocker = await lock_recipient(database_url, campaign_id, 160)
    try:
        daemon = daemons(with_timeouts(config, 0.1, lock=30.0))
        await wait_for(lambda: preparation_waits_for_lock(conn), timeout=60, what="the tail's skips waiting")
        others: list[Recipient] = [(f"+1666{i:07d}", {"name": f"o{i}"}) for i in range(40)]
        other_id = await create_campaign(conn, "sms", others, name="other")
        other = await wait_status(conn, other_id, "completed", timeout=30)
        assert other["sent_count"] == 40

        # The third attempt timed out: the campaign fails at once (the lock the test holds is
        # on a recipient, which the watchdog's sweep skips while it is locked).
        row = await wait_status(conn, campaign_id, "failed", timeout=30)
    finally:
        await blocker.close()

    assert row["status_reason"] == (
        f"preparation timed out: the recipients after the first {HEAD} were not checked within 6.4 s"
        " (64 times [database] statement_timeout_seconds); raise it, or split the campaign"
    )
    assert [e["statement_timeout_ms"] for e in log_events(daemon, "prepare_tail_timed_out")] == [100, 800]
    # Nothing past the head was claimed; the rest ends skipped by the watchdog's sweep, and
    # is counted.
    assert await claimed_beyond_head(conn, campaign_id) == 0

    async def rest_swept() -> bool:
        left = await conn.fetchval(
            "SELECT count(*) FROM campaignd.recipients WHERE campaign_id = $1 AND id >= $2"
            " AND (state, error_code) IS DISTINCT FROM ('skipped', 'campaign_failed')",
            campaign_id,
            row["prepared_below"],
        )
        return bool(left == 0 and (await campaign(conn, campaign_id))["total_count"] == SIZE)

    await wait_for(rest_swept, timeout=30, what="the rest swept and counted")
    await wait_for(lambda: _none_in_flight(conn, campaign_id), timeout=30, what="claims landed")
    await assert_counters_match(conn, campaign_id)
    row = await campaign(conn, campaign_id)
    assert row["total_count"] == SIZE and row["sent_count"] > 0
    assert_exactly_once(fake, campaign_id, row["sent_count"])
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


async def test_ranges_of_a_campaign_are_read_from_its_index_not_across_older_campaigns(
    conn: asyncpg.Connection,
) -> None:
    # One big older campaign below this one's ids: through the primary key, a claim at
    # cursor 0 or a head's statement would read every one of its rows first.
    await register_sender(conn, "sms")
    older, campaign_id = [
        await conn.fetchval(
            "INSERT INTO campaignd.campaigns (name, sender_id, message)"
            " VALUES ($1, 'sms', '{}') RETURNING id",
            name,
        )
        for name in ("older", "this")
    ]
    for owner in (older, campaign_id):
        await conn.execute(
            "INSERT INTO campaignd.recipients (campaign_id, address, variables)"
            " SELECT $1, '+1555' || n, jsonb_build_object('name', 'n' || n) FROM generate_series(1, 50000) n",
            owner,
        )
    await conn.execute("ANALYZE campaignd.recipients")
    head_below = await conn.fetchval(QUERIES["prepare_head_boundary"], campaign_id, 1000)
    await conn.execute(
        "UPDATE campaignd.campaigns SET status = 'sending', prepared_below = $2 WHERE id = $1",
        campaign_id,
        head_below,
    )
    await conn.execute(
        "UPDATE campaignd.senders SET lease_owner = 'host:1', lease_epoch = 1,"
        " lease_expires_at = now() + interval '1 hour' WHERE id = 'sms'"
    )
    statements = {
        "claim_recipients": ("sms", "host:1", 1, campaign_id, 0, 100, 30.0, 1),
        "prepare_head_boundary": (campaign_id, 1000),
        "preflight_sample": (campaign_id, 0, head_below, 20),
        "prepare_skip_no_address": (campaign_id, 0, head_below),
        "prepare_skip_missing_variables": (campaign_id, 0, head_below, ["name"]),
        # Phone numbers' keys (WhatsApp, Twilio), the costlier ones.
        "prepare_skip_duplicates_in_head": (campaign_id, 0, head_below, True),
    }
    for name, args in statements.items():
        async with conn.transaction():
            plan = "\n".join(
                row[0] for row in await conn.fetch(f"EXPLAIN (COSTS OFF) {QUERIES[name]}", *args)
            )
        if name == "claim_recipients":
            # Its range is read inside lock_fresh_recipients (migration 006).
            assert "lock_fresh_recipients" in plan, plan
            plan = await fresh_lookup_plan(conn, campaign_id, 0)
        assert "recipients_fresh" in plan, f"{name}:\n{plan}"
        assert not primary_key_ranges(plan), f"{name} walks the primary key:\n{plan}"


async def test_a_claim_reads_fresh_recipients_in_order_beside_many_older_sent_ones(
    database_url: str, conn: asyncpg.Connection
) -> None:
    """Older campaigns' sent rows make campaign_id's physical order look random to the
    planner, which then priced reading recipients_fresh in order above sorting every pending
    recipient of the campaign (recipients_campaign_state, an incremental sort spilling to
    disk) for each claim: a claim cost grew with what was left to send (bench/scale.py, 1M
    older rows: 57 ms against 0.7 ms per claim of 1,000, three times PostgreSQL's CPU)."""
    await register_sender(conn, "sms")
    campaign_ids = []
    for index in range(11):
        campaign_ids.append(
            await conn.fetchval(
                "INSERT INTO campaignd.campaigns (name, sender_id, message)"
                " VALUES ($1, 'sms', '{}') RETURNING id",
                f"c{index}",
            )
        )
    *older, campaign_id = campaign_ids
    for owner in older:
        await conn.execute(
            "INSERT INTO campaignd.recipients (campaign_id, address, variables, state, attempts, sent_at)"
            " SELECT $1, '+1777' || n, '{}', 'sent', 1, now() FROM generate_series(1, 10000) n",
            owner,
        )
    await conn.execute(
        "INSERT INTO campaignd.recipients (campaign_id, address, variables)"
        " SELECT $1, '+1555' || n, '{}' FROM generate_series(1, 20000) n",
        campaign_id,
    )
    await conn.execute("ANALYZE campaignd.recipients")
    await conn.execute(
        "UPDATE campaignd.campaigns SET status = 'sending', prepared_at = now() WHERE id = $1", campaign_id
    )
    await conn.execute(
        "UPDATE campaignd.senders SET lease_owner = 'host:1', lease_epoch = 1,"
        " lease_expires_at = now() + interval '1 hour' WHERE id = 'sms'"
    )
    cursor = await conn.fetchval(
        "SELECT min(id) + 5000 FROM campaignd.recipients WHERE campaign_id = $1", campaign_id
    )
    args = ("sms", "host:1", 1, campaign_id, cursor, 1000, 30.0, 1)
    # With the daemon's own session settings.
    daemon_conn = await db.connect(DatabaseConfig(url=database_url))  # type: ignore[arg-type]
    try:
        async with daemon_conn.transaction():
            plan = "\n".join(
                row[0] for row in await daemon_conn.fetch(f"EXPLAIN {QUERIES['claim_recipients']}", *args)
            )
        assert "lock_fresh_recipients" in plan and "recipients_campaign_state" not in plan, plan
        inner = await fresh_lookup_plan(daemon_conn, campaign_id, cursor)
    finally:
        await daemon_conn.close()
    assert "recipients_fresh" in inner and "Sort" not in inner, inner


async def fresh_lookup_plan(connection: asyncpg.Connection, campaign_id: str, cursor: int) -> str:
    """The plan of a claim's fresh lookup (lock_fresh_recipients' query), under the settings
    the function runs it with."""
    settings, body = await connection.fetchrow(
        "SELECT proconfig, prosrc FROM pg_proc WHERE proname = 'lock_fresh_recipients'"
    )
    for name, number in (("campaign", 1), ("after_id", 2), ("below_id", 3), ("max_rows", 4)):
        body = re.sub(rf"\b{name}\b", f"${number}", body)
    async with connection.transaction():
        for setting in settings:
            await connection.execute(f"SET LOCAL {setting}")
        rows = await connection.fetch(f"EXPLAIN {body}", campaign_id, cursor, 2**63 - 1, 1000)
    return "\n".join(row[0] for row in rows)


def primary_key_ranges(plan: str) -> list[str]:
    """The primary-key scans of recipients in a plan that are not lookups of single ids."""
    lines = plan.splitlines()
    ranges = []
    for index, line in enumerate(lines):
        if "using recipients_pkey" in line:
            condition = next((later for later in lines[index + 1 :] if "Index Cond" in later), "")
            if not re.search(r"Index Cond: \((\w+\.)?id = ", condition):
                ranges.append(line.strip())
    return ranges


def _phone_like(rng: random.Random, number: str) -> str:
    """``number`` as hosts write phone numbers, right and wrong: digits and separators,
    sometimes a letter, a misplaced +, inner or outer blanks of several kinds."""
    pieces = []
    for digit in number:
        if rng.random() < 0.15:
            pieces.append(rng.choice([" ", "-", ".", "(", ")", "/", "\u00a0", "\t", "x", "+", "\u3000"]))
        pieces.append(digit)
    if rng.random() < 0.05:
        # Spaces are separators, but the send path refuses an address over 64 characters.
        pieces.insert(rng.randrange(len(pieces) + 1), " " * rng.randint(40, 60))
    text = ("+" if rng.random() < 0.6 else "") + "".join(pieces)
    if rng.random() < 0.2:
        blanks = [" ", "\t", "\u3000", "\n", "\v", "\u2003", "\x1c", "\x85", "\u00a0"]
        text = rng.choice(blanks) + text + rng.choice(["", "\r\n", *blanks])
    if rng.random() < 0.05:
        # Padding, which the send path strips before it counts the 64 characters.
        text += " " * rng.randint(50, 70)
    return text


def _sendable_as(address: str) -> str | None:
    try:
        return normalize_e164(address)
    except InvalidAddress:
        return None


async def _database_with_locale(pg_url: str, provider: str) -> asyncpg.Connection:
    """A migrated database whose character classes are the ``provider``'s (``libc`` C, or
    ``builtin`` C.UTF-8, PostgreSQL 17+, where a non-breaking space is a [[:space:]])."""
    name = f"keys_{provider}"
    locale = "LOCALE_PROVIDER builtin BUILTIN_LOCALE 'C.UTF-8'" if provider == "builtin" else "LOCALE 'C'"
    admin = await asyncpg.connect(pg_url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        try:
            await admin.execute(f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'UTF8' {locale}")
        except asyncpg.PostgresError as exc:
            pytest.skip(f"this server cannot create a {provider} database: {exc}")
    finally:
        await admin.close()
    connection = await db.connect(DatabaseConfig(url=with_database(pg_url, name)))  # type: ignore[arg-type]
    await migrate(connection)
    return connection


@pytest.mark.parametrize("provider", ["libc", "builtin"])
async def test_phone_keys_join_the_numbers_the_send_path_joins_and_never_a_sendable_with_another(
    pg_url: str, provider: str
) -> None:
    # campaignd.address_key (migrations 009, 011) must agree with normalize_e164, which decides
    # what is sent: two addresses sharing a key make one of them a duplicate, skipped unsent.
    # On every locale: with [[:space:]] (009), a builtin locale's non-breaking space before
    # the + gave a number the send path refuses the key of the number written plainly.
    conn = await _database_with_locale(pg_url, provider)
    try:
        await _check_phone_keys(conn)
    finally:
        await conn.close()


async def _check_phone_keys(conn: asyncpg.Connection) -> None:
    rng = random.Random(20261124)
    # A small pool of numbers, so that many addresses are the same number written differently.
    numbers = ["".join(rng.choice("0123456789") for _ in range(rng.randint(5, 16))) for _ in range(400)]
    addresses = [_phone_like(rng, rng.choice(numbers)) for _ in range(8000)]
    rows = await conn.fetch(
        "SELECT a, campaignd.address_key(a, true) AS key FROM unnest($1::text[]) a", addresses
    )
    by_key: dict[str, set[str | None]] = {}
    for row in rows:
        by_key.setdefault(row["key"], set()).add(_sendable_as(row["a"]))

    # Safe: every key holds one number, or only addresses that cannot be sent.
    assert all(len(sent_as) == 1 for sent_as in by_key.values()), [
        (key, sent_as) for key, sent_as in by_key.items() if len(sent_as) > 1
    ][:5]
    # Complete: a number the send path sends, however it was written, has one key; else the
    # number is sent once for each key. Blanks only Python's str.strip() knew (U+3000, U+2003,
    # U+001C, U+0085) used to give it a second key, and so did blanks around it that took it
    # past 64 characters (schema 9 counted them, the send path does not).
    keys_by_number: dict[str, set[str]] = {}
    spellings_by_number: dict[str, set[str]] = {}
    for row in rows:
        number = _sendable_as(row["a"])
        if number is not None:
            keys_by_number.setdefault(number, set()).add(row["key"])
            spellings_by_number.setdefault(number, set()).add(row["a"])
    assert [keys for keys in keys_by_number.values() if len(keys) > 1] == []
    # Not vacuous: many numbers came in several spellings.
    assert sum(len(spellings) > 1 for spellings in spellings_by_number.values()) >= 50
