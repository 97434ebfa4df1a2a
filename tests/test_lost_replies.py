"""Every statement the daemon runs during a campaign, its reply lost once.

The server runs the statement (and commits it, outside a transaction block), then the
connection drops before the daemon reads the answer: it cannot tell whether it took effect.
Whatever the statement, the campaign must still complete, every recipient be sent exactly
once, the counters match, and the daemon keep running and stop cleanly.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import pytest

from campaignd import db
from campaignd import operator as campaignd_operator
from campaignd.config import DatabaseConfig
from campaignd.fakeprovider import FakeProvider, Rule
from campaignd.sql import QUERIES
from tests.conftest import (
    assert_counters_match,
    campaign,
    create_campaign,
    daemon_config,
    state_counts,
    wait_for,
    wait_status,
)
from tests.pgproxy import PgProxy

RECIPIENTS = 600

# (statement, which of its executions loses its reply). Statements inside a transaction
# (the preparation's, and the outcome writes') lose it before COMMIT, which rolls them back;
# "COMMIT;" (asyncpg's, the preparation's) and record_outcomes_commit lose the reply to a
# commit that happened. The claim's second execution has tests of its own (test_outage).
CASES = [
    ("claim_recipients", 1),
    ("record_outcomes", 1),
    ("record_outcomes_commit", 1),
    ("record_outcomes_commit", 3),
    ("acquire_lanes", 1),
    ("recover_orphaned_claims", 1),
    ("sending_campaigns", 1),
    ("lock_lane", 1),
    ("prepare_hold_campaign", 1),
    ("prepare_head_boundary", 1),
    ("preflight_sample", 1),
    ("prepare_skip_no_address", 1),
    ("prepare_skip_missing_variables", 1),
    ("prepare_skip_duplicates", 1),
    ("prepare_lock_campaign", 1),
    ("prepare_finish", 1),
    ("COMMIT;", 1),
    ("renew_lane", 1),
    ("complete_campaign", 1),
    ("upsert_sender", 1),
    ("announce_daemon", 1),
    ("wd_try_lock", 1),
    ("wd_expire_lanes", 1),
    ("wd_complete_finished", 1),
    ("wd_stuck_candidates", 1),
]


@pytest.mark.parametrize(("statement", "execution"), CASES, ids=[f"{s}#{n}" for s, n in CASES])
async def test_a_lost_reply_loses_and_doubles_nothing(
    tmp_path: Path,
    database_url: str,
    fake: FakeProvider,
    daemons: Any,
    proxy: PgProxy,
    statement: str,
    execution: int,
) -> None:
    connection = await db.connect(DatabaseConfig(url=database_url))  # type: ignore[arg-type]
    try:
        campaign_id = await create_campaign(connection, "sms", RECIPIENTS)
        proxy.lose_reply(QUERIES.get(statement, statement), execution=execution)
        # Slow enough that the lane renews its lease while it sends.
        config = daemon_config(
            tmp_path, proxy.url, {"sms": {"url": fake.url, "rate_per_second": 300.0}}, lease_seconds=2.0
        )
        daemon = daemons(config)
        await wait_status(connection, campaign_id, "completed", timeout=60)
        assert proxy.lost == 1, f"{statement} #{execution} never ran: this case tested nothing"
        assert (await campaign(connection, campaign_id))["sent_count"] == RECIPIENTS
        await assert_counters_match(connection, campaign_id)
    finally:
        await connection.close()
    assert fake.request_count() == RECIPIENTS, "a recipient was sent twice"
    assert len({a.recipient_id for a in fake.accepted()}) == RECIPIENTS
    assert daemon.process.poll() is None, f"the daemon died:\n{daemon.log()[-3000:]}"
    daemon.signal(signal.SIGTERM)
    assert await asyncio.to_thread(daemon.wait) == 0


async def test_outcome_writes_losing_replies_while_recipients_retry_send_each_once(
    tmp_path: Path, database_url: str, fake: FakeProvider, daemons: Any, proxy: PgProxy
) -> None:
    """Retries make batches whose outcomes leave rows pending and soon due again, and every
    other outcome write here loses its reply and is written again: still each recipient is
    accepted once and never sent after. (A replay landing on a later claim of the same row is
    too narrow a race to hit from here: the lane rewrites within milliseconds. test_outage
    replays one deterministically.)"""
    fake.behaviour.transient_rate = 0.3
    fake.behaviour.seed = 7
    connection = await db.connect(DatabaseConfig(url=database_url))  # type: ignore[arg-type]
    try:
        campaign_id = await create_campaign(connection, "sms", RECIPIENTS)
        # The commit's reply: the batch took effect, and the lane does not know it.
        proxy.lose_reply(QUERIES["record_outcomes_commit"], execution=2, then_every=2)
        config = daemon_config(
            tmp_path,
            proxy.url,
            {"sms": {"url": fake.url, "rate_per_second": 300.0}},
            max_attempts=50,
            backoff_base_seconds=0.05,
            backoff_max_seconds=0.2,
        )
        daemon = daemons(config)
        await wait_status(connection, campaign_id, "completed", timeout=90)
        assert proxy.lost >= 3, f"only {proxy.lost} outcome writes lost their reply"
        assert (await campaign(connection, campaign_id))["sent_count"] == RECIPIENTS
        await assert_counters_match(connection, campaign_id)
    finally:
        await connection.close()
    assert fake.duplicate_keys() == {}, "a recipient accepted once was sent again"
    assert len({a.recipient_id for a in fake.accepted()}) == RECIPIENTS
    daemon.signal(signal.SIGTERM)
    assert await asyncio.to_thread(daemon.wait) == 0


async def test_a_pause_written_again_after_its_reply_was_lost_leaves_a_resume_standing(
    tmp_path: Path, database_url: str, fake: FakeProvider, daemons: Any, proxy: PgProxy
) -> None:
    """The circuit breaker pauses the campaign; that write commits but its reply is lost, and
    while the lane backs off to write it again, an operator resumes the campaign (the numbers
    were fixed). The write that follows must not pause it again with the old verdict."""
    fake.behaviour.fail_prefix_rules["+1999"] = Rule(400, {"error": {"code": "invalid_number"}})
    connection = await db.connect(DatabaseConfig(url=database_url))  # type: ignore[arg-type]
    try:
        recipients = [(f"+1999{i:07d}", {"name": f"n{i}"}) for i in range(300)]
        campaign_id = await create_campaign(connection, "sms", recipients)
        daemon = await _paused_with_its_write_again_held(
            connection, campaign_id, "pause_campaign", "circuit breaker: ", tmp_path, fake, daemons, proxy
        )
        del fake.behaviour.fail_prefix_rules["+1999"]
        await connection.execute(
            "UPDATE campaignd.campaigns SET status = 'sending', status_reason = NULL WHERE id = $1",
            campaign_id,
        )
        proxy.release()
        row = await wait_status(connection, campaign_id, "completed", timeout=60)
        counts = await state_counts(connection, campaign_id)
        assert counts["failed"] >= 20 and counts["sent"] == 300 - counts["failed"], counts
        assert row["status_reason"] is None
        await assert_counters_match(connection, campaign_id)
    finally:
        await connection.close()
    await _stood_down(daemon, "campaign_pause_not_applied")


async def test_a_sender_pause_written_again_after_its_reply_was_lost_leaves_a_resume_standing(
    tmp_path: Path, database_url: str, fake: FakeProvider, daemons: Any, proxy: PgProxy
) -> None:
    """The provider rejects the sender (401); the lane's pause of the sender and its campaigns
    commits but its reply is lost, and while the lane backs off to write it again, an operator
    runs `resume-sender` (the token was fixed). The write that follows must not pause the
    sender again with the old verdict."""
    fake.behaviour.fail_prefix_rules["+1555"] = Rule(401, {"error": {"code": "bad_token"}})
    connection = await db.connect(DatabaseConfig(url=database_url))  # type: ignore[arg-type]
    try:
        campaign_id = await create_campaign(connection, "sms", 300)
        daemon = await _paused_with_its_write_again_held(
            connection,
            campaign_id,
            "pause_sender",
            "provider rejected the sender: bad_token",
            tmp_path,
            fake,
            daemons,
            proxy,
        )
        del fake.behaviour.fail_prefix_rules["+1555"]
        resumed = await campaignd_operator.resume_sender(connection, "sms")
        assert resumed.campaigns == (campaign_id,), resumed
        proxy.release()
        await wait_status(connection, campaign_id, "completed", timeout=60)
        assert (
            await connection.fetchval("SELECT paused_reason FROM campaignd.senders WHERE id = 'sms'") is None
        )
        assert (await campaign(connection, campaign_id))["sent_count"] == 300
        await assert_counters_match(connection, campaign_id)
    finally:
        await connection.close()
    await _stood_down(daemon, "sender_pause_not_applied")


async def _paused_with_its_write_again_held(
    connection: Any,
    campaign_id: str,
    statement: str,
    reason_starts: str,
    tmp_path: Path,
    fake: FakeProvider,
    daemons: Any,
    proxy: PgProxy,
) -> Any:
    """Starts a daemon whose first ``statement`` (a pause) commits with its reply lost, and
    returns it once the campaign reads paused and the lane's second write of the pause is held
    at the proxy, before the server has seen it (``proxy.release()`` lets it go)."""
    proxy.lose_reply(QUERIES[statement], execution=1)
    proxy.hold_statement(QUERIES[statement], execution=2)
    config = daemon_config(tmp_path, proxy.url, {"sms": {"url": fake.url, "rate_per_second": 300.0}})
    daemon = daemons(config)
    paused = await wait_status(connection, campaign_id, "paused", timeout=60)
    assert paused["status_reason"].startswith(reason_starts), paused["status_reason"]
    await wait_for(lambda: asyncio.sleep(0, proxy.statement_held.is_set()), what="the pause written again")
    assert proxy.lost == 1
    return daemon


async def _stood_down(daemon: Any, event: str) -> None:
    """The held write stood down (logged ``event``), and the daemon runs on and stops cleanly."""
    assert event in daemon.log()
    assert daemon.process.poll() is None, f"the daemon died:\n{daemon.log()[-3000:]}"
    daemon.signal(signal.SIGTERM)
    assert await asyncio.to_thread(daemon.wait) == 0
