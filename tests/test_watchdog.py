"""The watchdog: each repair it makes, on a real database, and the reasons it gives."""

from __future__ import annotations

import asyncio
import math
import signal
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from structlog.testing import capture_logs

from campaignd import db, leasing, metrics
from campaignd import watchdog as watchdog_module
from campaignd.config import DatabaseConfig, WatchdogConfig
from campaignd.fakeprovider import FakeProvider
from campaignd.health import Heartbeats
from campaignd.outcomes import RecipientState, RecipientUpdate, outcome_columns
from campaignd.sql import QUERIES
from campaignd.watchdog import (
    DRIFT_BATCH,
    DriftWalk,
    StuckFacts,
    Watchdog,
    advance_drift_walk,
    begin_drift_pass,
    drift_history_seconds,
    stuck_reason,
)
from tests.conftest import (
    DaemonRole,
    assert_counters_match,
    campaign,
    create_campaign,
    daemon_config,
    doubted_then,
    lane_epoch,
    mark_prepared,
    register_sender,
    state_counts,
    wait_for,
    wait_status,
)
from tests.pgproxy import PgProxy


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    created = await db.create_pool(DatabaseConfig(url=database_url, pool_size=4))  # type: ignore[arg-type]
    yield created
    await created.close()


def watchdog(pool: asyncpg.Pool, stuck_after: float = 900.0) -> Watchdog:
    return Watchdog(pool, WatchdogConfig(interval_seconds=1.0, stuck_after_seconds=stuck_after), Heartbeats())


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


async def finished_orphan(conn: asyncpg.Connection) -> str:
    """A campaign whose lane died after writing every outcome: only a watchdog pass completes it."""
    campaign_id = await create_campaign(conn, "sms", 5, name="finished")
    await mark_prepared(conn, campaign_id)
    await conn.execute("UPDATE campaignd.recipients SET state = 'sent' WHERE campaign_id = $1", campaign_id)
    await conn.execute("UPDATE campaignd.campaigns SET sent_count = 5 WHERE id = $1", campaign_id)
    return campaign_id


async def test_completes_an_orphaned_campaign_whose_recipients_are_all_final(
    conn: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    # The "test 6" report: everything was sent, the completion write never happened.
    done = await create_campaign(conn, "sms", 3, name="done")
    waiting = await create_campaign(conn, "sms", 3, name="waiting")
    for campaign_id in (done, waiting):
        await mark_prepared(conn, campaign_id)
    await conn.execute("UPDATE campaignd.recipients SET state = 'sent' WHERE campaign_id = $1", done)
    await conn.execute("UPDATE campaignd.campaigns SET sent_count = 3 WHERE id = $1", done)
    # One recipient of the other waits on a retry due in an hour: never completed early.
    await conn.execute(
        "UPDATE campaignd.recipients SET state = 'sent' WHERE campaign_id = $1"
        " AND id <> (SELECT max(id) FROM campaignd.recipients WHERE campaign_id = $1)",
        waiting,
    )
    await conn.execute(
        "UPDATE campaignd.recipients SET next_attempt_at = now() + interval '1 hour', attempts = 1"
        " WHERE campaign_id = $1 AND state = 'pending'",
        waiting,
    )
    await conn.execute("UPDATE campaignd.campaigns SET sent_count = 2 WHERE id = $1", waiting)

    assert await watchdog(pool).run_pass()

    assert (await campaign(conn, done))["status"] == "completed"
    assert (await campaign(conn, done))["completed_at"] is not None
    assert (await campaign(conn, waiting))["status"] == "sending"


async def test_takes_over_the_expired_lane_of_a_killed_daemon_and_recovers_its_claims(
    tmp_path: Path,
    database_url: str,
    conn: asyncpg.Connection,
    pool: asyncpg.Pool,
    fake: FakeProvider,
    daemons: Any,
) -> None:
    fake.behaviour.latency_seconds = 0.5
    config = daemon_config(
        tmp_path,
        database_url,
        {"sms": {"url": fake.url, "rate_per_second": 200.0}},
        lease_seconds=2.0,
    )
    campaign_id = await create_campaign(conn, "sms", 400)
    victim = daemons(config)

    async def in_flight() -> bool:
        counts = await state_counts(conn, campaign_id)
        return counts.get("sent", 0) >= 20 and counts.get("in_flight", 0) >= 5

    await wait_for(in_flight, timeout=30, what="claims in flight")
    victim.kill()
    orphaned = (await state_counts(conn, campaign_id))["in_flight"]
    epoch = await lane_epoch(conn, "sms")
    resent_before = sample("campaignd_in_doubt_recipients_total", sender_id="sms", action="resent")

    async def expired() -> bool:
        return bool(
            await conn.fetchval("SELECT lease_expires_at < now() FROM campaignd.senders WHERE id = 'sms'")
        )

    await wait_for(expired, timeout=10, what="the lease to expire")
    assert await watchdog(pool).run_pass()

    lane = await conn.fetchrow("SELECT lease_owner, lease_epoch FROM campaignd.senders WHERE id = 'sms'")
    assert lane is not None and lane["lease_owner"] is None and lane["lease_epoch"] == epoch + 1
    counts = await state_counts(conn, campaign_id)
    assert "in_flight" not in counts
    recovered = await conn.fetch(
        "SELECT attempts, next_attempt_at FROM campaignd.recipients"
        " WHERE campaign_id = $1 AND state = 'pending' AND error_code = 'in_doubt'",
        campaign_id,
    )
    assert len(recovered) == orphaned
    assert all(r["attempts"] == 0 and r["next_attempt_at"] is not None for r in recovered)
    assert sample("campaignd_in_doubt_recipients_total", sender_id="sms", action="resent") == (
        resent_before + orphaned
    )
    await assert_counters_match(conn, campaign_id)

    # A new daemon finishes the campaign; in-doubt resends carry their original keys.
    successor = daemons(config)
    await wait_status(conn, campaign_id, "completed", timeout=60)
    assert fake.addresses_delivered_under_several_keys() == {}
    assert len({a.recipient_id for a in fake.accepted()}) == 400
    successor.signal(signal.SIGTERM)
    assert successor.wait() == 0


async def test_repairs_counters_that_drifted_from_recipient_states(
    conn: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    campaign_id = await create_campaign(conn, "sms", 5)
    await mark_prepared(conn, campaign_id)
    await conn.execute(
        "UPDATE campaignd.recipients SET state = 'sent' WHERE id IN"
        " (SELECT id FROM campaignd.recipients WHERE campaign_id = $1 ORDER BY id LIMIT 2)",
        campaign_id,
    )
    await conn.execute(
        "UPDATE campaignd.campaigns SET status = 'paused', sent_count = 999, failed_count = 7 WHERE id = $1",
        campaign_id,
    )
    repaired_before = sample("campaignd_counter_drift_repaired_total")

    assert await watchdog(pool).run_pass()

    row = await campaign(conn, campaign_id)
    assert (row["sent_count"], row["failed_count"], row["total_count"]) == (2, 0, 5)
    await assert_counters_match(conn, campaign_id)
    assert sample("campaignd_counter_drift_repaired_total") == repaired_before + 1


async def add_older_candidates(conn: asyncpg.Connection, count: int) -> list[str]:
    """Paused, prepared campaigns of one recipient each, counters right, last updated a day
    ago: candidates of the counter check, each older than any a test creates after them."""
    await register_sender(conn, "sms")
    rows = await conn.fetch(
        "WITH c AS (INSERT INTO campaignd.campaigns"
        "  (name, sender_id, message, status, prepared_at, total_count, updated_at)"
        "  SELECT 'older ' || g, 'sms', '{\"text\": \"x\"}', 'paused', now(), 1, now() - interval '1 day'"
        "  FROM generate_series(1, $1) g RETURNING id),"
        " r AS (INSERT INTO campaignd.recipients (campaign_id, address) SELECT id, '+15550000000' FROM c)"
        " SELECT id FROM c",
        count,
    )
    return [str(row["id"]) for row in rows]


async def test_the_counter_check_reaches_every_campaign_however_many_there_are(
    conn: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    # More candidates than a pass checks, all older than the drifted one: a pass that picked
    # the oldest (the counter repair leaves updated_at alone) picked these, pass after pass.
    older = await add_older_candidates(conn, DRIFT_BATCH)
    drifted = await create_campaign(conn, "sms", 10)
    await mark_prepared(conn, drifted)
    # Still sending (one recipient pending), so nothing but the counter check repairs it.
    await conn.execute(
        "UPDATE campaignd.recipients SET state = 'sent' WHERE id IN"
        " (SELECT id FROM campaignd.recipients WHERE campaign_id = $1 ORDER BY id LIMIT 9)",
        drifted,
    )
    walk_passes = math.ceil((DRIFT_BATCH + 1) / DRIFT_BATCH)
    dog = watchdog(pool)

    for _ in range(walk_passes):
        assert await dog.run_pass()

    row = await campaign(conn, drifted)
    assert (row["status"], row["sent_count"]) == ("sending", 9), "the counter check never reached it"
    await assert_counters_match(conn, drifted)

    # The walk starts over: the first campaign it checked, drifted since, is checked again.
    first = min(older, key=uuid.UUID)
    await conn.execute("UPDATE campaignd.campaigns SET skipped_count = 5 WHERE id = $1", first)
    for _ in range(walk_passes):
        assert await dog.run_pass()
    await assert_counters_match(conn, first)


async def test_a_counter_check_that_times_out_does_not_stop_the_walk(
    conn: asyncpg.Connection, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A count that outlasts statement_timeout (cancelled here on purpose, for one campaign):
    # the walk used to stop at it, pass after pass, and nothing after it was ever checked.
    slow, drifted = sorted([await create_campaign(conn, "sms", 3) for _ in range(2)], key=uuid.UUID)
    for campaign_id in (slow, drifted):
        await mark_prepared(conn, campaign_id)
    await conn.execute("UPDATE campaignd.campaigns SET skipped_count = 7 WHERE id = $1", drifted)
    cancelled_for_slow = QUERIES["wd_count_states"].replace(
        "WHERE campaign_id = $1",
        f"WHERE campaign_id = $1 AND (campaign_id <> '{slow}' OR pg_cancel_backend(pg_backend_pid()))",
    )
    monkeypatch.setattr(watchdog_module, "QUERIES", {**QUERIES, "wd_count_states": cancelled_for_slow})

    with capture_logs() as events:
        assert await watchdog(pool).run_pass()

    await assert_counters_match(conn, drifted)
    assert [e["campaign_id"] for e in events if e["event"] == "counter_check_timed_out"] == [slow]


async def test_a_finished_campaign_whose_counters_drifted_completes_with_the_true_counts(
    conn: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    # Beyond the first batch of the counter check: only the completion itself can repair it.
    await add_older_candidates(conn, DRIFT_BATCH)
    campaign_id = await create_campaign(conn, "sms", 5)
    await mark_prepared(conn, campaign_id)
    await conn.execute(
        "UPDATE campaignd.recipients SET state = CASE WHEN id = (SELECT min(id) FROM campaignd.recipients"
        " WHERE campaign_id = $1) THEN 'failed' ELSE 'sent' END WHERE campaign_id = $1",
        campaign_id,
    )
    await conn.execute(
        "UPDATE campaignd.campaigns SET sent_count = 0, failed_count = 3 WHERE id = $1", campaign_id
    )
    repaired_before = sample("campaignd_counter_drift_repaired_total")

    with capture_logs() as events:
        assert await watchdog(pool).run_pass()

    row = await campaign(conn, campaign_id)
    assert row["status"] == "completed"
    assert (row["sent_count"], row["failed_count"], row["skipped_count"], row["total_count"]) == (4, 1, 0, 5)
    await assert_counters_match(conn, campaign_id)
    [completed] = [e for e in events if e["event"] == "campaign_completed"]
    assert completed["campaign_id"] == campaign_id
    assert (completed["sent"], completed["failed"], completed["skipped"], completed["total"]) == (4, 1, 0, 5)
    [repaired] = [e for e in events if e["event"] == "counter_drift_repaired"]
    assert repaired["campaign_id"] == campaign_id
    assert repaired["stored"] == {"sent": 0, "failed": 3, "skipped": 0, "total": 5}
    assert repaired["actual"] == {"sent": 4, "failed": 1, "skipped": 0, "total": 5}
    assert sample("campaignd_counter_drift_repaired_total") == repaired_before + 1


async def test_a_finished_campaign_that_sent_and_failed_nothing_fails_with_the_preparations_reason(
    conn: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    # Every recipient skipped when it was to be sent (an address the provider cannot take):
    # README promises such a campaign ends failed with a reason, not completed with 0 sent.
    skipped = await create_campaign(conn, "sms", 3, name="all skipped")
    one_failed = await create_campaign(conn, "sms", 3, name="one failed")
    emptied = await create_campaign(conn, "sms", 2, name="recipients deleted by the host")
    for campaign_id in (skipped, one_failed, emptied):
        await mark_prepared(conn, campaign_id)
    await conn.execute(
        "UPDATE campaignd.recipients SET state = 'skipped', error_code = 'invalid_address'"
        " WHERE campaign_id = ANY($1::uuid[])",
        [skipped, one_failed],
    )
    await conn.execute(
        "UPDATE campaignd.recipients SET state = 'failed', error_code = 'http_400'"
        " WHERE id = (SELECT min(id) FROM campaignd.recipients WHERE campaign_id = $1)",
        one_failed,
    )
    await conn.execute("DELETE FROM campaignd.recipients WHERE campaign_id = $1", emptied)

    with capture_logs() as events:
        assert await watchdog(pool).run_pass()

    row = await campaign(conn, skipped)
    assert (row["status"], row["status_reason"]) == ("failed", "no valid recipient: all 3 were skipped")
    assert row["completed_at"] is not None
    assert (row["sent_count"], row["failed_count"], row["skipped_count"], row["total_count"]) == (0, 0, 3, 3)
    await assert_counters_match(conn, skipped)
    assert (await campaign(conn, one_failed))["status"] == "completed"
    # The words prepare_finish uses for a campaign without recipients.
    row = await campaign(conn, emptied)
    assert (row["status"], row["status_reason"]) == ("failed", "campaign has no recipients")
    failed = {e["campaign_id"]: e for e in events if e["event"] == "campaign_failed"}
    assert set(failed) == {skipped, emptied}
    assert failed[skipped]["reason"] == "no valid recipient: all 3 were skipped"
    assert [e["campaign_id"] for e in events if e["event"] == "campaign_completed"] == [one_failed]


@pytest.mark.parametrize("resend", [True, False])
async def test_an_in_doubt_claim_of_a_cancelled_campaign_ends_failed_in_doubt(
    conn: asyncpg.Connection, pool: asyncpg.Pool, resend: bool
) -> None:
    # Its lane died with the request in the air. With resend_in_doubt the recovery makes it
    # pending (in_doubt), and the sweep then recorded a message that may have been delivered
    # as skipped (cancelled); it ends as it does without a resend: failed, in_doubt.
    campaign_id = await create_campaign(conn, "sms", 3)
    await mark_prepared(conn, campaign_id)
    await conn.execute("UPDATE campaignd.senders SET resend_in_doubt = $1 WHERE id = 'sms'", resend)
    first = await conn.fetchval(
        "SELECT min(id) FROM campaignd.recipients WHERE campaign_id = $1", campaign_id
    )
    await conn.execute(
        "UPDATE campaignd.senders SET lease_owner = 'A', lease_epoch = 1,"
        " lease_expires_at = now() - interval '1 second' WHERE id = 'sms'"
    )
    await conn.execute(
        "UPDATE campaignd.recipients SET state = 'in_flight', attempts = 1, lease_owner = 'A',"
        " lease_epoch = 1, lease_claim = 1, lease_expires_at = now() WHERE id = $1",
        first,
    )
    await conn.execute(
        "UPDATE campaignd.campaigns SET status = 'cancelled', completed_at = now() WHERE id = $1", campaign_id
    )

    assert await watchdog(pool).run_pass()

    row = await conn.fetchrow(
        "SELECT state, error_code, error_message FROM campaignd.recipients WHERE id = $1", first
    )
    assert (row["state"], row["error_code"]) == ("failed", "in_doubt")
    assert row["error_message"] == "the daemon holding this claim stopped before recording its outcome"
    row = await campaign(conn, campaign_id)
    assert (row["status"], row["failed_count"], row["skipped_count"]) == ("cancelled", 1, 2)
    await assert_counters_match(conn, campaign_id)


def test_a_campaign_finished_during_a_walk_stays_a_candidate_until_the_next_walk_ends() -> None:
    ids = sorted(uuid.uuid4() for _ in range(3))
    first = begin_drift_pass(DriftWalk(), now=100.0)
    assert first == DriftWalk(after=None, started=100.0, previous_started=None)
    assert drift_history_seconds(first, 100.0, interval_seconds=10.0) == 30.0

    going = advance_drift_walk(first, ids[:2], reached_end=False)
    assert going.after == ids[1]
    assert begin_drift_pass(going, 110.0) == going, "a walk under way goes on"
    assert advance_drift_walk(going, [], reached_end=False) == going, "a pass cut short resumes"

    second = begin_drift_pass(advance_drift_walk(going, ids[2:], reached_end=True), 500.0)
    assert second == DriftWalk(after=None, started=500.0, previous_started=100.0)
    # Finished at 105, behind the first walk's cursor: the second walk, however long, reaches it.
    assert drift_history_seconds(second, 2000.0, interval_seconds=10.0) > 2000.0 - 105.0


async def test_flags_a_campaign_stuck_behind_a_paused_sender_with_that_reason(
    conn: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    campaign_id = await create_campaign(conn, "sms", 4)
    await mark_prepared(conn, campaign_id)
    await conn.execute("UPDATE campaignd.senders SET paused_reason = 'provider rejected the sender: 190'")
    await conn.execute(
        "UPDATE campaignd.campaigns SET updated_at = now() - interval '1 hour' WHERE id = $1", campaign_id
    )

    assert await watchdog(pool, stuck_after=60).run_pass()

    row = await campaign(conn, campaign_id)
    assert row["stuck_since"] is not None
    assert row["stuck_reason"] == "sender sms is paused: provider rejected the sender: 190"
    assert row["status"] == "sending", "the watchdog flags; it does not change the status"
    assert sample("campaignd_campaigns_stuck") == 1

    # Progress clears the flag.
    await conn.execute("UPDATE campaignd.campaigns SET updated_at = now() WHERE id = $1", campaign_id)
    await conn.execute("UPDATE campaignd.senders SET paused_reason = NULL")
    assert await watchdog(pool, stuck_after=60).run_pass()
    row = await campaign(conn, campaign_id)
    assert row["stuck_since"] is None and row["stuck_reason"] is None
    assert sample("campaignd_campaigns_stuck") == 0


async def test_a_campaign_whose_head_is_prepared_is_not_flagged_as_never_started(
    conn: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    # Its head was sent, and the rest of it is still being prepared when progress stops.
    campaign_id = await create_campaign(conn, "sms", 4)
    await conn.execute(
        "UPDATE campaignd.campaigns SET started_at = now(), updated_at = now() - interval '1 hour',"
        " prepared_below = (SELECT max(id) FROM campaignd.recipients WHERE campaign_id = $1) WHERE id = $1",
        campaign_id,
    )
    await conn.execute(
        "UPDATE campaignd.senders SET lease_owner = 'host:1', lease_epoch = 1,"
        " lease_expires_at = now() + interval '1 hour' WHERE id = 'sms'"
    )

    assert await watchdog(pool, stuck_after=60).run_pass()

    reason = (await campaign(conn, campaign_id))["stuck_reason"]
    assert reason is not None and "never started" not in reason
    assert "held by host:1" in reason and "4 recipients are due" in reason


async def test_sweeps_pending_recipients_of_a_cancelled_campaign(
    conn: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    campaign_id = await create_campaign(conn, "sms", 3)
    await mark_prepared(conn, campaign_id)
    await conn.execute("UPDATE campaignd.campaigns SET status = 'cancelled' WHERE id = $1", campaign_id)

    assert await watchdog(pool).run_pass()

    assert await state_counts(conn, campaign_id) == {"skipped": 3}
    assert (await campaign(conn, campaign_id))["skipped_count"] == 3
    await assert_counters_match(conn, campaign_id)


async def test_sweeps_pending_recipients_of_a_failed_campaign(
    conn: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    # A campaign failed before any preparation by a version that left its recipients pending
    # (total_count 0), or with claims given back after it failed: they end as fail_campaign
    # ends pending recipients, and an in-doubt resend ends failed, in_doubt.
    campaign_id = await create_campaign(conn, "sms", 3)
    await conn.execute(
        "UPDATE campaignd.campaigns SET status = 'failed', status_reason = 'invalid message: x',"
        " completed_at = now() WHERE id = $1",
        campaign_id,
    )
    await conn.execute(
        "UPDATE campaignd.recipients SET error_code = 'in_doubt', error_message = 'interrupted',"
        " next_attempt_at = now()"
        " WHERE id = (SELECT min(id) FROM campaignd.recipients WHERE campaign_id = $1)",
        campaign_id,
    )

    with capture_logs() as events:
        assert await watchdog(pool).run_pass()

    rows = await conn.fetch(
        "SELECT state, error_code, error_message FROM campaignd.recipients"
        " WHERE campaign_id = $1 ORDER BY id",
        campaign_id,
    )
    assert [tuple(r) for r in rows] == [
        ("failed", "in_doubt", "interrupted"),
        ("skipped", "campaign_failed", "invalid message: x"),
        ("skipped", "campaign_failed", "invalid message: x"),
    ]
    row = await campaign(conn, campaign_id)
    assert (row["status"], row["total_count"], row["failed_count"], row["skipped_count"]) == (
        "failed",
        3,
        1,
        2,
    )
    await assert_counters_match(conn, campaign_id)
    [swept] = [e for e in events if e["event"] == "failed_recipients_swept"]
    assert (swept["campaign_id"], swept["skipped"], swept["failed_in_doubt"]) == (campaign_id, 2, 1)


async def test_the_sweep_ends_failed_in_doubt_a_recipient_an_earlier_attempt_may_have_reached(
    conn: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    # Its first send timed out (maybe delivered), its retry met a 503 that overwrote the
    # error code; then the campaign failed. The sweep ended it skipped (campaign_failed).
    campaign_id = await create_campaign(conn, "sms", 2)
    doubted = await doubted_then(conn, campaign_id, "503")
    await conn.execute(
        "UPDATE campaignd.campaigns SET status = 'failed', status_reason = 'invalid message: x',"
        " completed_at = now() WHERE id = $1",
        campaign_id,
    )

    assert await watchdog(pool).run_pass()

    rows = await conn.fetch(
        "SELECT id, state, error_code, error_message FROM campaignd.recipients"
        " WHERE campaign_id = $1 ORDER BY id",
        campaign_id,
    )
    assert [(r["id"] == doubted, r["state"], r["error_code"]) for r in rows] == [
        (True, "failed", "in_doubt"),
        (False, "skipped", "campaign_failed"),
    ]
    assert rows[0]["error_message"] == (
        "the campaign ended while this send was in doubt: an earlier attempt may have been delivered"
        " (last error: http_503)"
    )
    await assert_counters_match(conn, campaign_id)


async def test_a_cancelled_campaign_larger_than_a_chunk_is_swept_over_passes_with_exact_counters(
    conn: asyncpg.Connection, pool: asyncpg.Pool, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A host cancels with an UPDATE (the schema's contract), leaving every recipient pending:
    # the sweep ends them a chunk (one statement) at a time, at most a budget a pass, so that
    # no statement of the watchdog grows with the data. One chunk a pass here (budget 0).
    monkeypatch.setattr(watchdog_module, "SWEEP_CHUNK", 100)
    monkeypatch.setattr(watchdog_module, "SWEEP_BUDGET_SECONDS", 0.0)
    campaign_id = await create_campaign(conn, "sms", 350)
    await mark_prepared(conn, campaign_id)
    # A live lane holds 20 claims, and 3 sends in doubt wait to be resent.
    await conn.execute(
        "UPDATE campaignd.senders SET lease_owner = 'A', lease_epoch = 1,"
        " lease_expires_at = now() + interval '1 hour' WHERE id = 'sms'"
    )
    lane = ("sms", "A", 1)
    claimed = await conn.fetch(QUERIES["claim_recipients"], *lane, campaign_id, 0, 20, 30.0, 1)
    assert len(claimed) == 20
    await conn.execute(
        "UPDATE campaignd.recipients SET error_code = 'in_doubt', error_message = 'interrupted',"
        " next_attempt_at = now() WHERE id IN (SELECT id FROM campaignd.recipients"
        " WHERE campaign_id = $1 AND state = 'pending' ORDER BY id DESC LIMIT 3)",
        campaign_id,
    )
    await conn.execute("UPDATE campaignd.campaigns SET status = 'cancelled' WHERE id = $1", campaign_id)
    dog = watchdog(pool)

    async def pending() -> int:
        return (await state_counts(conn, campaign_id)).get("pending", 0)

    assert await dog.run_pass()
    assert await pending() == 230, "one chunk a pass"
    await assert_counters_match(conn, campaign_id)

    # The lane gives its claims back (they land pending) while sweeps run: a pass does not
    # wait for the rows being given back, and two sweeps at once (two daemons', were it not
    # for the advisory lock) never end or count a row twice: the second skips the campaign
    # the first holds.
    giver = await db.connect(DatabaseConfig(url=database_url))  # type: ignore[arg-type]
    other = await db.connect(DatabaseConfig(url=database_url))  # type: ignore[arg-type]
    try:
        async with giver.transaction():
            given = await giver.fetch(QUERIES["release_lost_claims"], *lane, [campaign_id], [])
            assert [row["released"] for row in given] == [20]
            assert await asyncio.wait_for(dog.run_pass(), timeout=30)
            async with other.transaction():
                assert await other.fetch(QUERIES["wd_sweep_ended"], 100) != []
                assert await asyncio.wait_for(conn.fetch(QUERIES["wd_sweep_ended"], 100), timeout=30) == []
        assert await pending() == 50
        await assert_counters_match(conn, campaign_id)
        assert await dog.run_pass()
        assert await pending() == 0
    finally:
        await giver.close()
        await other.close()

    assert await state_counts(conn, campaign_id) == {"skipped": 347, "failed": 3}
    row = await campaign(conn, campaign_id)
    assert (row["skipped_count"], row["failed_count"], row["total_count"]) == (347, 3, 350)
    await assert_counters_match(conn, campaign_id)

    # With time to spare, one pass sweeps chunk after chunk, and logs each campaign once.
    monkeypatch.setattr(watchdog_module, "SWEEP_BUDGET_SECONDS", 60.0)
    second = await create_campaign(conn, "sms", 250)
    await conn.execute("UPDATE campaignd.campaigns SET status = 'cancelled' WHERE id = $1", second)
    with capture_logs() as events:
        assert await dog.run_pass()
    assert await state_counts(conn, second) == {"skipped": 250}
    await assert_counters_match(conn, second)
    swept = [e for e in events if e["event"] == "cancelled_recipients_swept"]
    assert [(e["campaign_id"], e["skipped"]) for e in swept] == [(second, 250)]


async def test_a_sweep_that_outlasts_statement_timeout_stops_no_other_step_of_the_pass(
    conn: asyncpg.Connection, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    done = await finished_orphan(conn)
    # Beside it, a big campaign a host cancelled with an UPDATE before it was ever prepared:
    # ending all of it in one statement outlasts the statement_timeout below (0.1 s standing
    # for 30 s, 100,000 recipients for a hundred million). That statement failed every pass,
    # and no step after it ever ran: nothing was completed, repaired or flagged again.
    big = await create_campaign(conn, "sms", 0, name="big")
    await conn.execute(
        "INSERT INTO campaignd.recipients (campaign_id, address)"
        " SELECT $1, '+1555' || lpad(g::text, 7, '0') FROM generate_series(1, 100000) g",
        big,
    )
    await conn.execute("UPDATE campaignd.campaigns SET status = 'cancelled' WHERE id = $1", big)
    slow = await db.create_pool(
        DatabaseConfig(url=database_url, pool_size=2, statement_timeout_seconds=0.1)  # type: ignore[arg-type]
    )
    try:
        dog = watchdog(slow)
        # A chunk as big as the campaign times out as the single statement did: the pass goes on.
        monkeypatch.setattr(watchdog_module, "SWEEP_CHUNK", 200_000)
        with capture_logs() as events:
            assert await dog.run_pass()
        assert (await campaign(conn, done))["status"] == "completed"
        assert [e["event"] for e in events if e["event"] == "sweep_timed_out"] == ["sweep_timed_out"]
        assert await state_counts(conn, big) == {"pending": 100_000}

        # Chunks well within the timeout end all of it, over a pass or a few.
        monkeypatch.setattr(watchdog_module, "SWEEP_CHUNK", 2_000)
        for _ in range(20):
            assert await dog.run_pass()
            if (await campaign(conn, big))["total_count"] == 100_000:
                break
        assert await state_counts(conn, big) == {"skipped": 100_000}
        await assert_counters_match(conn, big)
    finally:
        await slow.close()


async def test_one_watchdog_pass_at_a_time_across_daemons(
    conn: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    assert await conn.fetchval("SELECT pg_try_advisory_lock(hashtext('campaignd.watchdog'))")
    try:
        assert not await watchdog(pool).run_pass()
    finally:
        await conn.fetchval("SELECT pg_advisory_unlock(hashtext('campaignd.watchdog'))")
    assert await watchdog(pool).run_pass()


async def session_exists(conn: asyncpg.Connection, pid: int) -> bool:
    return bool(await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid))


async def test_a_session_sitting_idle_on_the_watchdogs_lock_is_ended_and_the_pass_runs(
    conn: asyncpg.Connection, daemon_role: DaemonRole, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a daemon lost mid-pass leaves behind: a session that holds the lock and sits idle,
    # which the server keeps until TCP keepalive gives it up (hours), or for good where the
    # daemon is frozen. Every daemon's watchdog skipped every pass meanwhile. The daemons'
    # own role, not a superuser, must be enough to end it.
    finished = await finished_orphan(conn)
    holder = await asyncpg.connect(daemon_role.url)
    pool = await db.create_pool(DatabaseConfig(url=daemon_role.url, pool_size=2))  # type: ignore[arg-type]
    try:
        assert await holder.fetchval(QUERIES["wd_try_lock"])
        dog = watchdog(pool)
        # Idle for less than the limit (90 s): it may be a live pass between statements.
        assert not await dog.run_pass()
        assert await session_exists(conn, holder.get_server_pid())
        assert (await campaign(conn, finished))["status"] == "sending"

        monkeypatch.setattr(watchdog_module, "LOCK_HOLDER_IDLE_LIMIT_SECONDS", 1.0)
        await asyncio.sleep(1.2)
        with capture_logs() as events:
            assert await dog.run_pass()
        ended = [e for e in events if e["event"] == "watchdog_lock_holder_ended"]
        assert [(e["pid"], e["ended"]) for e in ended] == [(holder.get_server_pid(), True)]
        assert not await session_exists(conn, holder.get_server_pid())
        assert (await campaign(conn, finished))["status"] == "completed"
        # The pass let its lock go: the next one (of any daemon) runs.
        assert await dog.run_pass()
    finally:
        holder.terminate()
        await pool.close()


async def test_a_watchdog_lost_mid_pass_does_not_stop_every_other_watchdog(
    conn: asyncpg.Connection, database_url: str, proxy: PgProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A daemon's connection goes silent in the middle of its pass (held at the proxy, which
    # keeps the server's side of it open, as a partition does): the server's session keeps
    # the lock. Another daemon's watchdog ends that session once it has sat idle past the
    # limit, and its pass completes the campaign that only a pass can complete.
    monkeypatch.setattr(watchdog_module, "LOCK_HOLDER_IDLE_LIMIT_SECONDS", 2.0)
    finished = await finished_orphan(conn)
    lost_pool = await db.create_pool(DatabaseConfig(url=proxy.url, pool_size=2))  # type: ignore[arg-type]
    other_pool = await db.create_pool(DatabaseConfig(url=database_url, pool_size=2))  # type: ignore[arg-type]
    try:
        proxy.hold_statement(QUERIES["wd_expire_lanes"], execution=1)
        lost_pass = asyncio.create_task(watchdog(lost_pool).run_pass())
        held = await asyncio.to_thread(proxy.statement_held.wait, 30)
        assert held, "the pass was not held mid-way: this test tested nothing"
        other = watchdog(other_pool)
        with capture_logs() as events:
            await wait_for(other.run_pass, timeout=60, interval=0.5, what="the other daemon's watchdog pass")
        assert [e["event"] for e in events if e["event"].startswith("watchdog_lock_holder")] == [
            "watchdog_lock_holder_ended"
        ]
        assert (await campaign(conn, finished))["status"] == "completed"
        # The lost daemon learns that its connection is gone, as an outage, and goes on.
        with pytest.raises(Exception) as lost:
            await asyncio.wait_for(lost_pass, timeout=30)
        assert db.is_transient_db_error(lost.value), lost.value
    finally:
        await other_pool.close()
        await db.close_pool(lost_pool, 2.0)


async def test_a_lock_holder_this_role_may_not_end_is_reported_once_and_the_passes_skip(
    conn: asyncpg.Connection, daemon_role: DaemonRole, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The daemons' role sees every session (pg_read_all_stats) but may not end a superuser's.
    await conn.execute(f"GRANT pg_read_all_stats TO {daemon_role.name}")
    monkeypatch.setattr(watchdog_module, "LOCK_HOLDER_IDLE_LIMIT_SECONDS", 0.5)
    pool = await db.create_pool(DatabaseConfig(url=daemon_role.url, pool_size=2))  # type: ignore[arg-type]
    try:
        assert await conn.fetchval(QUERIES["wd_try_lock"])
        await asyncio.sleep(0.7)
        dog = watchdog(pool)
        with capture_logs() as events:
            for _ in range(3):
                assert not await dog.run_pass()
        stuck = [e for e in events if e["event"] == "watchdog_lock_holder_stuck"]
        assert len(stuck) == 1, events
        assert await session_exists(conn, conn.get_server_pid())
        await conn.fetchval(QUERIES["wd_unlock"])
        assert await dog.run_pass()
    finally:
        await pool.close()


def facts(**overrides: Any) -> StuckFacts:
    base: dict[str, Any] = {
        "sender_id": "sms",
        "paused_reason": None,
        "lane_live": True,
        "lease_owner": "host:1",
        "pending": 10,
        "due": 10,
        "next_due": None,
        "sender_rate": 50.0,
        "campaign_rate": None,
        "prepared": True,
        "stuck_after_seconds": 900.0,
    }
    base.update(overrides)
    return StuckFacts(**base)


def test_stuck_reasons_in_plain_words() -> None:
    assert stuck_reason(facts(paused_reason="bad token")) == "sender sms is paused: bad token"
    assert "no live daemon holds sender sms's lane" in (stuck_reason(facts(lane_live=False)) or "")
    assert "never started" in (stuck_reason(facts(prepared=False)) or "")
    due_at = datetime(2030, 1, 1, tzinfo=UTC)
    waiting = stuck_reason(facts(due=0, next_due=due_at))
    assert waiting is not None and "waiting on backoff" in waiting and "2030-01-01" in waiting
    assert "rate limit too low" in (stuck_reason(facts(campaign_rate=0.0001)) or "")
    assert "wedged" in (stuck_reason(facts()) or "")
    assert stuck_reason(facts(pending=0)) is None


async def test_claims_of_a_lapsed_lane_are_left_to_its_owner_until_the_lane_is_fenced(
    conn: asyncpg.Connection, pool: asyncpg.Pool
) -> None:
    """A lease that ran out in the database but still names its owner and epoch may yet be
    renewed (a renewal stuck behind a lock, a pool full for a moment). Recovering its claims
    then would resend, or fail 'in_doubt', messages its owner is about to record as sent."""
    campaign_id = await create_campaign(conn, "sms", 5)
    await mark_prepared(conn, campaign_id)
    await conn.execute(
        "UPDATE campaignd.senders SET lease_owner = 'host:1', lease_epoch = 1,"
        " lease_expires_at = now() + interval '1 hour' WHERE id = 'sms'"
    )
    lane = ("sms", "host:1", 1)
    claimed = await conn.fetch(QUERIES["claim_recipients"], *lane, campaign_id, 0, 10, 30.0, 1)
    assert len(claimed) == 5
    await conn.execute(
        "UPDATE campaignd.senders SET lease_expires_at = now() - interval '1 second' WHERE id = 'sms'"
    )

    assert await leasing.recover_in_doubt(conn, None) == []
    assert (await state_counts(conn, campaign_id)) == {"in_flight": 5}
    # Its owner renews after all, and its outcomes land.
    assert await conn.fetchrow(QUERIES["renew_lane"], *lane, 30.0, [campaign_id]) is not None
    first = RecipientUpdate(claimed[0]["id"], RecipientState.SENT)
    recorded = await conn.fetchrow(QUERIES["record_outcomes"], *lane, *outcome_columns([first]))
    assert recorded is not None and recorded["applied"] == 1

    # Once the watchdog has fenced the lane (its lease run out again), the rest is recovered.
    await conn.execute(
        "UPDATE campaignd.senders SET lease_expires_at = now() - interval '1 second' WHERE id = 'sms'"
    )
    assert await watchdog(pool).run_pass()
    assert (await state_counts(conn, campaign_id)) == {"sent": 1, "pending": 4}
    await assert_counters_match(conn, campaign_id)
