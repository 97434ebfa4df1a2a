"""How a campaign ends: completed only when something was sent or failed; failed, with a
reason, when every recipient was skipped (by the preparation or when it was to be sent);
and a campaign failed before it could be sent ends its recipients with it."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import asyncpg

from campaignd import db, operator
from campaignd.config import DatabaseConfig, WatchdogConfig
from campaignd.fakeprovider import FakeProvider
from campaignd.health import Heartbeats
from campaignd.sql import QUERIES
from campaignd.watchdog import Watchdog
from tests.conftest import (
    add_numbered_recipients,
    assert_counters_match,
    bug_planted,
    campaign,
    create_campaign,
    daemon_config,
    hold_lane,
    mark_prepared,
    wait_for,
    wait_status,
)


async def outcomes(conn: asyncpg.Connection, campaign_id: str) -> dict[tuple[str, str | None], int]:
    rows = await conn.fetch(
        "SELECT state, error_code, count(*) AS n FROM campaignd.recipients"
        " WHERE campaign_id = $1 GROUP BY state, error_code",
        campaign_id,
    )
    return {(row["state"], row["error_code"]): row["n"] for row in rows}


async def _ended(
    conn: asyncpg.Connection, campaign_id: str, expected: dict[tuple[str, str | None], int]
) -> bool:
    """Whether the campaign's recipients ended as expected and its total is counted."""
    total = sum(expected.values())
    return (
        await outcomes(conn, campaign_id) == expected
        and (await campaign(conn, campaign_id))["total_count"] == total
    )


# ------------------------------------------------------------------ with a real daemon


async def test_a_campaign_whose_every_recipient_is_refused_when_sent_fails_as_if_skipped_when_prepared(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    """README: a campaign with none left to send ends failed with status_reason. Addresses the
    preparation cannot judge (a space inside a number) are skipped as each is to be sent; the
    campaign then sent nothing, and ended completed."""
    config = daemon_config(tmp_path, database_url, {"sms": {"url": fake.url}})
    refused = await create_campaign(
        conn, "sms", [(f"+1555 000{i:04d}", {"name": "x"}) for i in range(4)], name="refused when sent"
    )
    nobody = await create_campaign(conn, "sms", [(None, {"name": "x"})] * 4, name="skipped when prepared")
    one_sent = await create_campaign(
        conn,
        "sms",
        [("+15550009999", {"name": "x"}), *[(f"+1555 000{i:04d}", {"name": "x"}) for i in range(3)]],
        name="one sent",
    )
    empty = await create_campaign(conn, "sms", [], name="empty")
    daemon = daemons(config)

    row = await wait_status(conn, refused, "failed", timeout=30)
    prepared = await wait_status(conn, nobody, "failed", timeout=30)
    # The same verdict, in the same words, wherever the recipients were skipped.
    assert row["status_reason"] == prepared["status_reason"] == "no valid recipient: all 4 were skipped"
    assert (row["sent_count"], row["failed_count"], row["skipped_count"], row["total_count"]) == (0, 0, 4, 4)
    assert row["completed_at"] is not None
    assert await outcomes(conn, refused) == {("skipped", "invalid_address"): 4}
    # One sent is a completion; a campaign without recipients fails as before.
    assert (await wait_status(conn, one_sent, "completed", timeout=30))["sent_count"] == 1
    assert (await wait_status(conn, empty, "failed", timeout=30))[
        "status_reason"
    ] == "campaign has no recipients"
    assert fake.request_count() == 1
    for campaign_id in (refused, nobody, one_sent):
        await assert_counters_match(conn, campaign_id)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    # Whichever ended it, the lane or the watchdog, the log says what happened.
    ended = [line for line in daemon.log().splitlines() if refused in line and '"campaign_' in line]
    assert any('"campaign_failed"' in line for line in ended), ended
    assert not any('"campaign_completed"' in line for line in ended), ended


async def test_a_campaign_whose_message_does_not_compile_ends_its_recipients_with_it(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    """Failed before any preparation, it kept total_count 0 and every recipient pending for
    good: the watchdog's counter check skips campaigns never prepared, and the doctor said
    'failed but 3 still pending'."""
    config = daemon_config(tmp_path, database_url, {"sms": {"url": fake.url}})
    broken = await create_campaign(conn, "sms", 3, message={"text": "hello {{name"}, name="broken")
    daemon = daemons(config)

    row = await wait_status(conn, broken, "failed", timeout=30)
    # Its recipients are ended by the watchdog's sweep, which counts its total too.
    await wait_for(
        lambda: _ended(conn, broken, {("skipped", "campaign_failed"): 3}), timeout=30, what="the sweep"
    )
    row = await campaign(conn, broken)

    assert row["status_reason"].startswith("invalid message: ")
    assert (row["total_count"], row["skipped_count"], row["sent_count"], row["failed_count"]) == (3, 3, 0, 0)
    messages = await conn.fetch(
        "SELECT error_message FROM campaignd.recipients WHERE campaign_id = $1", broken
    )
    assert {m["error_message"] for m in messages} == {row["status_reason"]}
    await assert_counters_match(conn, broken)
    facts = await operator.fetch_campaign_facts(conn, broken)
    assert facts is not None
    assert [f.message for f in operator.diagnose(facts) if f.severity == "problem"] == [
        f"campaign failed: {row['status_reason']}"
    ]
    assert fake.request_count() == 0
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


async def test_a_campaign_failed_by_its_pre_flight_ends_its_pending_recipients_too(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    """The pre-flight's failure is the same decision as a message that does not compile:
    its recipients end skipped 'campaign_failed', counted, not pending for good."""
    config = daemon_config(tmp_path, database_url, {"sms": {"url": fake.url}})
    broken = await create_campaign(
        conn, "sms", 5, message={"text": "Hi {{name}}", "break the pre-flight": True}, name="broken"
    )
    daemon = daemons(config, env=bug_planted("broken_preflight"))

    row = await wait_status(conn, broken, "failed", timeout=60)
    await wait_for(
        lambda: _ended(conn, broken, {("skipped", "campaign_failed"): 5}), timeout=30, what="the sweep"
    )
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0

    assert row["status_reason"].startswith("pre-flight: ")
    assert (await campaign(conn, broken))["total_count"] == 5
    await assert_counters_match(conn, broken)
    assert fake.request_count() == 0


# ------------------------------------------------------------------ the statements themselves


async def test_the_lanes_completion_fails_a_campaign_that_sent_and_failed_nothing(
    conn: asyncpg.Connection,
) -> None:
    skipped = await create_campaign(conn, "sms", 3, name="all skipped when sent")
    one_failed = await create_campaign(conn, "sms", 3, name="one failed")
    emptied = await create_campaign(conn, "sms", 2, name="recipients deleted by the host")
    for campaign_id in (skipped, one_failed, emptied):
        await mark_prepared(conn, campaign_id)
    token = await hold_lane(conn, "sms")
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

    ended = {
        c: await conn.fetchrow(QUERIES["complete_campaign"], *token, c)
        for c in (skipped, one_failed, emptied)
    }

    assert (ended[skipped]["status"], ended[skipped]["status_reason"]) == (
        "failed",
        "no valid recipient: all 3 were skipped",
    )
    assert (ended[one_failed]["status"], ended[one_failed]["status_reason"]) == ("completed", None)
    # As prepare_finish says of a campaign without recipients.
    assert (ended[emptied]["status"], ended[emptied]["status_reason"]) == (
        "failed",
        "campaign has no recipients",
    )
    row = await campaign(conn, skipped)
    assert row["status"] == "failed" and row["completed_at"] is not None and row["lease_owner"] is None


async def test_failing_a_campaign_and_a_watchdog_pass_end_its_pending_recipients_not_those_in_flight(
    conn: asyncpg.Connection, database_url: str
) -> None:
    campaign_id = await create_campaign(conn, "sms", 4)
    token = await hold_lane(conn, "sms")
    ids = [
        r["id"]
        for r in await conn.fetch(
            "SELECT id FROM campaignd.recipients WHERE campaign_id = $1 ORDER BY id", campaign_id
        )
    ]
    # A resend of a send in doubt (resend_in_doubt = true), and a claim still in the air.
    await conn.execute(
        "UPDATE campaignd.recipients SET error_code = 'in_doubt', error_message = 'interrupted',"
        " next_attempt_at = now() WHERE id = $1",
        ids[0],
    )
    await conn.execute(
        "UPDATE campaignd.recipients SET state = 'in_flight', attempts = 1, lease_owner = 'me',"
        " lease_epoch = $2, lease_claim = 1, lease_expires_at = now() + interval '1 minute' WHERE id = $1",
        ids[1],
        token[2],
    )

    assert (
        await conn.fetchval(QUERIES["fail_campaign"], *token, campaign_id, "invalid message: x") is not None
    )
    # One statement over the campaign row alone: a campaign of millions failed past
    # statement_timeout, retried as an outage at every refresh of its lane.
    assert await outcomes(conn, campaign_id) == {
        ("pending", None): 2,
        ("pending", "in_doubt"): 1,
        ("in_flight", None): 1,
    }
    pool = await db.create_pool(DatabaseConfig(url=database_url, pool_size=2))  # type: ignore[arg-type]
    try:
        assert await Watchdog(pool, WatchdogConfig(), Heartbeats()).run_pass()
    finally:
        await pool.close()

    row = await campaign(conn, campaign_id)
    assert (row["status"], row["status_reason"]) == ("failed", "invalid message: x")
    assert (row["total_count"], row["skipped_count"], row["failed_count"]) == (4, 2, 1)
    assert await outcomes(conn, campaign_id) == {
        ("skipped", "campaign_failed"): 2,
        ("failed", "in_doubt"): 1,
        ("in_flight", None): 1,
    }
    doubt = await conn.fetchrow("SELECT error_message FROM campaignd.recipients WHERE id = $1", ids[0])
    assert doubt["error_message"] == "interrupted"
    await assert_counters_match(conn, campaign_id)
    # Only a SENDING campaign, and only by the lane's owner.
    assert await conn.fetchval(QUERIES["fail_campaign"], *token, campaign_id, "again") is None


async def test_failing_a_campaign_of_many_recipients_stays_one_cheap_statement(
    conn: asyncpg.Connection,
) -> None:
    # Ending every pending recipient in it, 200,000 took longer than this statement_timeout:
    # retried as an outage at every refresh of the lane, the sender's other campaigns were
    # never claimed again. A timeout far below the time it took stands for the default 30 s
    # against millions.
    campaign_id = await create_campaign(conn, "sms", 0)
    await add_numbered_recipients(conn, campaign_id, 200_000)
    token = await hold_lane(conn, "sms")
    await conn.execute("SET statement_timeout = '300ms'")
    try:
        failed = await conn.fetchval(QUERIES["fail_campaign"], *token, campaign_id, "invalid message: x")
    finally:
        await conn.execute("RESET statement_timeout")

    assert failed is not None
    assert (await campaign(conn, campaign_id))["status"] == "failed"
