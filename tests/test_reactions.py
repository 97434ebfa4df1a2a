"""How a running daemon reacts to a provider's verdicts: at the scope the error names.

Real ``campaignd run`` processes, a real PostgreSQL, the fake generic provider.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import asyncpg

from campaignd.fakeprovider import FakeProvider, Rule
from tests.conftest import (
    assert_counters_match,
    bug_planted,
    campaign,
    create_campaign,
    daemon_config,
    state_counts,
    wait_for,
    wait_status,
)

BAD = "+1999"
NO_SUCH_NUMBER = Rule(400, {"error": {"code": "invalid_number", "message": "no such number"}})


def _recipients(prefix: str, count: int) -> list[tuple[str | None, dict[str, Any]]]:
    return [(f"{prefix}{i:07d}", {"name": f"n{i}"}) for i in range(count)]


def _requests_for(fake: FakeProvider, prefix: str) -> int:
    return sum(fake.requests_by_address(f"{prefix}{i:07d}") for i in range(1000))


async def test_breaker_pauses_a_campaign_failing_with_one_code_and_spares_the_others(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    fake.behaviour.fail_prefix_rules[BAD] = NO_SUCH_NUMBER
    config = daemon_config(tmp_path, database_url, {"sms": {"url": fake.url, "rate_per_second": 200.0}})
    doomed = await create_campaign(conn, "sms", _recipients(BAD, 1000), name="doomed")
    healthy = await create_campaign(conn, "sms", _recipients("+1555", 300), name="healthy")
    daemon = daemons(config)

    paused = await wait_status(conn, doomed, "paused", timeout=60)
    await wait_status(conn, healthy, "completed", timeout=60)

    assert paused["status_reason"] == (
        "circuit breaker: 20 consecutive failures with http error invalid_number (HTTP 400: no such number)"
    )
    # It paused within the first few dozen failures, not after a thousand.
    assert _requests_for(fake, BAD) < 100
    counts = await state_counts(conn, doomed)
    assert counts.get("in_flight", 0) == 0
    assert counts["pending"] > 900, "unsent recipients wait for a resume, their attempts intact"
    unspent = await conn.fetchval(
        "SELECT count(*) FROM campaignd.recipients WHERE campaign_id = $1 AND state = 'pending'"
        " AND attempts = 0",
        doomed,
    )
    assert unspent == counts["pending"]
    await assert_counters_match(conn, doomed)
    assert (await campaign(conn, healthy))["sent_count"] == 300

    # Resumed unchanged, it trips again on the next streak: the breaker starts afresh.
    before = _requests_for(fake, BAD)
    await conn.execute(
        "UPDATE campaignd.campaigns SET status = 'sending', status_reason = NULL WHERE id = $1", doomed
    )
    again = await wait_status(conn, doomed, "paused", timeout=60)
    assert again["status_reason"].startswith("circuit breaker: 20 consecutive failures")
    assert 20 <= _requests_for(fake, BAD) - before < 100
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


async def test_breaker_can_be_disabled_then_every_recipient_fails_on_its_own(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    fake.behaviour.fail_prefix_rules[BAD] = NO_SUCH_NUMBER
    sender = {"url": fake.url, "breaker_consecutive_failures": 0, "breaker_window": 0}
    config = daemon_config(tmp_path, database_url, {"sms": sender})
    doomed = await create_campaign(conn, "sms", _recipients(BAD, 200))
    daemon = daemons(config)

    row = await wait_status(conn, doomed, "completed", timeout=60)

    assert row["failed_count"] == 200
    await assert_counters_match(conn, doomed)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


async def test_breaker_ratio_rule_pauses_when_most_sends_fail_with_one_code(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    # One success in every ten breaks every streak; the ratio rule still sees 90% failing.
    recipients = [
        (f"+1555{i:07d}" if i % 10 == 9 else f"{BAD}{i:07d}", {"name": f"n{i}"}) for i in range(1000)
    ]
    fake.behaviour.fail_prefix_rules[BAD] = NO_SUCH_NUMBER
    config = daemon_config(
        tmp_path, database_url, {"sms": {"url": fake.url, "rate_per_second": 200.0}}, concurrency=4
    )
    doomed = await create_campaign(conn, "sms", recipients)
    daemon = daemons(config)

    paused = await wait_status(conn, doomed, "paused", timeout=60)

    assert paused["status_reason"].startswith("circuit breaker: ")
    assert "of the last 100 sends failed with http error invalid_number" in paused["status_reason"]
    assert fake.request_count() < 300
    await assert_counters_match(conn, doomed)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


async def test_a_sender_throttled_on_every_answer_for_too_long_is_paused_with_nothing_spent(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    # A provider that never lets up: a quota spent for the day, a proxy answering 429 to
    # everything. The sender used to be asked for ever, at its limiter's floor, with the
    # campaign in SENDING; now it is paused, each recipient pending with its attempts intact.
    fake.behaviour.fail_prefix_rules["+1555"] = Rule(
        429, {"error": {"code": "rate_limited", "message": "daily quota spent"}}
    )
    sender = {"url": fake.url, "rate_per_second": 200.0, "throttle_pause_after_seconds": 2}
    config = daemon_config(tmp_path, database_url, {"sms": sender})
    throttled = await create_campaign(conn, "sms", _recipients("+1555", 300))
    daemon = daemons(config)

    paused = await wait_status(conn, throttled, "paused", timeout=60)

    reason = await conn.fetchval("SELECT paused_reason FROM campaignd.senders WHERE id = 'sms'")
    assert paused["status_reason"] == reason
    assert reason.startswith("provider throttled every request for "), reason
    assert "the last rate_limited: HTTP 429: daily quota spent" in reason, reason
    assert reason.endswith("resume the sender once its limit has reset")
    await wait_for(
        lambda: conn.fetchval(
            "SELECT count(*) = 0 FROM campaignd.recipients WHERE campaign_id = $1 AND state = 'in_flight'",
            throttled,
        ),
        timeout=30,
        what="the requests in the air recorded",
    )
    assert await state_counts(conn, throttled) == {"pending": 300}
    assert (
        await conn.fetchval(
            "SELECT max(attempts) FROM campaignd.recipients WHERE campaign_id = $1", throttled
        )
        == 0
    ), "a throttled try spends no attempt"
    await assert_counters_match(conn, throttled)
    # Paused, it asks the provider nothing more.
    await wait_for(lambda: asyncio.to_thread(lambda: "sender_paused" in daemon.log()), what="sender_paused")
    asked = fake.request_count()
    await asyncio.sleep(1.5)
    assert fake.request_count() == asked
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


async def test_throttling_broken_by_accepted_sends_never_pauses_the_sender(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    # Half of the requests throttled, for far longer than the limit: the sender slows down,
    # and every acceptance starts the streak again, so the campaign completes. The fake's
    # draws are seeded: none of its first 3,000 requests is the 9th throttle in a row, short
    # of the 10 a pause needs, so a streak that nothing ended would pause it within seconds.
    fake.behaviour.throttle_rate = 0.5
    fake.behaviour.throttle_retry_after = "0"
    fake.behaviour.seed = 3
    sender = {"url": fake.url, "rate_per_second": 100.0, "throttle_pause_after_seconds": 1}
    config = daemon_config(tmp_path, database_url, {"sms": sender})
    campaign_id = await create_campaign(conn, "sms", _recipients("+1555", 120))
    daemon = daemons(config)

    row = await wait_status(conn, campaign_id, "completed", timeout=120)

    assert row["sent_count"] == 120
    assert (row["completed_at"] - row["started_at"]).total_seconds() > 3, "throttled for less than the limit"
    assert await conn.fetchval("SELECT paused_reason FROM campaignd.senders WHERE id = 'sms'") is None
    assert "sender_throttled" in daemon.log()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


async def test_a_bug_building_a_request_sends_nothing_and_is_retried_not_held_in_doubt(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    """Nothing left, so nothing is in doubt: a sender that cannot resend safely still retries
    the recipient, until its attempts run out, instead of failing it as maybe delivered."""
    config = daemon_config(
        tmp_path, database_url, {"sms": {"url": fake.url, "resend_in_doubt": False}}, max_attempts=2
    )
    campaign_id = await create_campaign(conn, "sms", 3)
    daemon = daemons(config, env=bug_planted("broken_request"))

    await wait_status(conn, campaign_id, "completed", timeout=60)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0

    assert fake.request_count() == 0
    rows = await conn.fetch(
        "SELECT state, error_code, attempts FROM campaignd.recipients WHERE campaign_id = $1", campaign_id
    )
    assert [(r["state"], r["error_code"], r["attempts"]) for r in rows] == [
        ("failed", "internal_error", 2)
    ] * 3
    assert "send_failed_unexpectedly" in daemon.log() and "a bug while building the request" in daemon.log()


async def test_a_bug_in_the_preflight_fails_its_campaign_and_spares_the_senders_others(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    """Raised, such a bug crashed the lane at every refresh: no campaign of the sender was
    ever started again."""
    config = daemon_config(tmp_path, database_url, {"sms": {"url": fake.url}})
    broken = await create_campaign(
        conn, "sms", 5, message={"text": "Hi {{name}}", "break the pre-flight": True}, name="broken"
    )
    healthy = await create_campaign(conn, "sms", 5, name="healthy")
    daemon = daemons(config, env=bug_planted("broken_preflight"))

    failed = await wait_status(conn, broken, "failed", timeout=60)
    await wait_status(conn, healthy, "completed", timeout=60)

    async def swept() -> bool:
        # Its recipients, never claimed, are ended by the watchdog's sweep.
        return await state_counts(conn, broken) == {"skipped": 5}

    await wait_for(swept, timeout=30, what="the failed campaign's recipients swept")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0

    assert failed["status_reason"] == (
        "pre-flight: the provider's check of the message failed: TypeError: a bug in the pre-flight"
    )
    assert fake.request_count() == 5
    await assert_counters_match(conn, broken)
    assert "preflight_failed" in daemon.log() and "lane_crashed" not in daemon.log()


async def test_a_send_that_timed_out_is_remembered_as_maybe_delivered_until_the_recipient_ends(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    # The provider holds the first request for one recipient past the sender's timeout: it may
    # have delivered it. The resend waits a backoff; a cancel meanwhile must not call it unsent.
    held = "+15550000000"
    fake.behaviour.rules[held] = Rule(200, {"id": "late"}, times=1, delay_seconds=5.0)
    config = daemon_config(
        tmp_path,
        database_url,
        {"sms": {"url": fake.url, "timeout_seconds": 0.5}},
        backoff_base_seconds=120.0,
        backoff_max_seconds=120.0,
    )
    campaign_id = await create_campaign(conn, "sms", _recipients("+1555", 3))
    daemons(config)

    async def waiting_for_its_resend() -> bool:
        row = await conn.fetchrow(
            "SELECT state, error_code, maybe_delivered FROM campaignd.recipients WHERE address = $1", held
        )
        return row is not None and tuple(row) == ("pending", "timeout", True)

    await wait_for(waiting_for_its_resend, timeout=30)
    await conn.execute("UPDATE campaignd.campaigns SET status = 'cancelled' WHERE id = $1", campaign_id)

    async def swept() -> bool:
        return (await state_counts(conn, campaign_id)).get("pending", 0) == 0

    await wait_for(swept, timeout=30)
    rows = await conn.fetch(
        "SELECT address, state, error_code, maybe_delivered FROM campaignd.recipients"
        " WHERE campaign_id = $1 ORDER BY id",
        campaign_id,
    )
    assert [tuple(r) for r in rows] == [
        (held, "failed", "in_doubt", True),
        ("+15550000001", "sent", None, False),
        ("+15550000002", "sent", None, False),
    ]
    await assert_counters_match(conn, campaign_id)
