"""End to end: real ``campaignd run`` processes, a real PostgreSQL, the fake provider."""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg

from campaignd.fakeprovider import FakeProvider, Rule, max_in_window
from tests.conftest import (
    assert_counters_match,
    campaign,
    create_campaign,
    daemon_config,
    lane_epoch,
    state_counts,
    wait_for,
    wait_sent,
    wait_status,
    wait_taken_over,
    with_database_settings,
)


def assert_exactly_once(fake: FakeProvider, campaign_id: str, expected_sent: int) -> None:
    """Every sent recipient reached the provider under one key, none under two keys."""
    accepted = [a for a in fake.accepted() if a.campaign_id == campaign_id]
    assert len(accepted) == expected_sent
    assert len({a.recipient_id for a in accepted}) == expected_sent
    assert fake.addresses_delivered_under_several_keys() == {}


async def sent_ids(conn: asyncpg.Connection, campaign_id: str) -> set[int]:
    rows = await conn.fetch(
        "SELECT id FROM campaignd.recipients WHERE campaign_id = $1 AND state = 'sent'", campaign_id
    )
    return {row["id"] for row in rows}


async def test_campaign_of_2000_is_sent_exactly_once_and_completes(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    config = daemon_config(tmp_path, database_url, {"sms": {"url": fake.url}})
    campaign_id = await create_campaign(conn, "sms", 2000)
    daemon = daemons(config)

    row = await wait_status(conn, campaign_id, "completed", timeout=120)

    assert row["sent_count"] == 2000
    assert row["total_count"] == 2000
    assert row["completed_at"] is not None and row["started_at"] is not None
    assert fake.request_count() == 2000, "no recipient was sent twice"
    assert_exactly_once(fake, campaign_id, 2000)
    assert {a.recipient_id for a in fake.accepted()} == await sent_ids(conn, campaign_id)
    await assert_counters_match(conn, campaign_id)
    # Rendering filled each recipient's own variables.
    first = min(fake.accepted(), key=lambda a: a.recipient_id)
    assert first.body["message"] == {"text": "hello n0"}
    assert fake.last_headers["Idempotency-Key"].startswith(campaign_id + ":")
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


async def test_sigkill_mid_campaign_then_restart_resumes_without_loss_or_silent_duplicates(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    fake.behaviour.latency_seconds = 0.02
    fake.behaviour.jitter_seconds = 0.03
    config = daemon_config(
        tmp_path, database_url, {"sms": {"url": fake.url, "rate_per_second": 400.0}}, lease_seconds=2.0
    )
    campaign_id = await create_campaign(conn, "sms", 2000)
    first = daemons(config)

    await wait_sent(conn, campaign_id, 400)
    first.kill()
    in_flight_at_kill = (await state_counts(conn, campaign_id)).get("in_flight", 0)
    requests_at_kill = fake.request_count()
    assert (await campaign(conn, campaign_id))["status"] == "sending"

    second = daemons(config)
    await wait_status(conn, campaign_id, "completed", timeout=120)

    counts = await state_counts(conn, campaign_id)
    assert counts == {"sent": 2000}
    assert_exactly_once(fake, campaign_id, 2000)
    # A recipient reached the provider more than once only as an in-doubt resend under the
    # same idempotency key, and only for claims that were in flight at the kill.
    resends = sum(fake.duplicate_keys().values())
    abandoned = fake.cancelled_count()  # cut off by the kill before the provider accepted them
    assert resends + abandoned <= in_flight_at_kill
    assert fake.request_count() == 2000 + resends + abandoned
    assert requests_at_kill < 2000
    await assert_counters_match(conn, campaign_id)
    # Lost claims never spend an attempt.
    assert (
        await conn.fetchval(
            "SELECT max(attempts) FROM campaignd.recipients WHERE campaign_id = $1", campaign_id
        )
        == 1
    )
    if in_flight_at_kill:
        assert "in_doubt_recovered" in second.log()
    second.signal(signal.SIGTERM)
    assert second.wait() == 0


async def test_sigkill_mid_send_then_a_failed_resend_and_a_cancel_end_those_sends_in_doubt(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    # Claims in flight at the kill may have reached the provider. The next daemon resends them
    # (same key); its resends meet a 503, whose code replaced "in_doubt" on the rows, and the
    # campaign is then cancelled: those recipients were ended skipped, "not sent".
    fake.behaviour.latency_seconds = 0.3
    config = daemon_config(
        tmp_path,
        database_url,
        {"sms": {"url": fake.url, "rate_per_second": 400.0}},
        lease_seconds=2.0,
        backoff_base_seconds=120.0,
        backoff_max_seconds=120.0,
    )
    campaign_id = await create_campaign(conn, "sms", 2000)
    first = daemons(config)

    await wait_sent(conn, campaign_id, 100)
    first.kill()

    async def its_sessions_ended() -> bool:
        # A claim the server was running at the kill may still commit: counted once it has.
        return not await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = 'campaignd'"
            " AND pid <> pg_backend_pid()"
        )

    await wait_for(its_sessions_ended, timeout=30, what="the killed daemon's sessions to end")
    in_doubt_at_kill = {
        row["id"]
        for row in await conn.fetch(
            "SELECT id FROM campaignd.recipients WHERE campaign_id = $1 AND state = 'in_flight'", campaign_id
        )
    }
    assert in_doubt_at_kill, "the kill landed with nothing in flight"

    fake.behaviour.all_status = 503
    second = daemons(config)

    async def resent_and_refused() -> bool:
        return bool(
            await conn.fetchval(
                "SELECT count(*) FROM campaignd.recipients WHERE id = ANY($1::bigint[])"
                " AND state = 'pending' AND error_code <> 'in_doubt'",
                list(in_doubt_at_kill),
            )
        )

    await wait_for(resent_and_refused, timeout=60, what="a resend refused with a 503")
    await conn.execute("UPDATE campaignd.campaigns SET status = 'cancelled' WHERE id = $1", campaign_id)

    async def ended() -> bool:
        counts = await state_counts(conn, campaign_id)
        return not counts.get("pending") and not counts.get("in_flight")

    await wait_for(ended, timeout=60, what="every recipient ended")
    ended_in_doubt = {
        row["id"]
        for row in await conn.fetch(
            "SELECT id FROM campaignd.recipients WHERE campaign_id = $1 AND state = 'failed'"
            " AND error_code = 'in_doubt' AND maybe_delivered",
            campaign_id,
        )
    }
    assert ended_in_doubt == in_doubt_at_kill
    states = await state_counts(conn, campaign_id)
    assert states == {"sent": states["sent"], "failed": len(in_doubt_at_kill), "skipped": states["skipped"]}
    await assert_counters_match(conn, campaign_id)
    second.signal(signal.SIGTERM)
    assert second.wait() == 0


async def test_sigterm_drains_in_flight_sends_and_releases_the_lane(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    fake.behaviour.latency_seconds = 0.2
    config = daemon_config(tmp_path, database_url, {"sms": {"url": fake.url, "rate_per_second": 200.0}})
    campaign_id = await create_campaign(conn, "sms", 3000)
    daemon = daemons(config)

    await wait_sent(conn, campaign_id, 100)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait(timeout=30) == 0

    counts = await state_counts(conn, campaign_id)
    assert "in_flight" not in counts
    assert counts["pending"] > 0, "the test stopped the daemon before the end"
    assert (
        await conn.fetchval(
            "SELECT count(*) FROM campaignd.recipients WHERE campaign_id = $1 AND error_code = 'in_doubt'",
            campaign_id,
        )
        == 0
    )
    lane = await conn.fetchrow("SELECT lease_owner, lease_expires_at FROM campaignd.senders WHERE id = 'sms'")
    assert lane is not None and lane["lease_owner"] is None and lane["lease_expires_at"] is None
    # Everything the provider accepted is recorded as sent, and nothing else is.
    assert {a.recipient_id for a in fake.accepted()} == await sent_ids(conn, campaign_id)
    assert fake.request_count() == counts["sent"]
    await assert_counters_match(conn, campaign_id)
    assert await conn.fetchval("SELECT max(attempts) FROM campaignd.recipients WHERE state = 'pending'") == 0
    assert (await campaign(conn, campaign_id))["status"] == "sending"


async def test_two_daemons_share_the_work_each_recipient_once_rates_respected(
    tmp_path: Path,
    database_url: str,
    conn: asyncpg.Connection,
    provider_processes: Any,
    daemons: Any,
) -> None:
    rate, burst = 150.0, 10
    providers = {"alpha": provider_processes(), "beta": provider_processes()}
    config = daemon_config(
        tmp_path,
        database_url,
        {sender: {"url": p.url, "rate_per_second": rate, "burst": burst} for sender, p in providers.items()},
    )
    senders = ("alpha", "beta", "alpha")
    campaigns = [
        await create_campaign(
            conn, sender, [(f"+1666{index}{i:06d}", {"name": "x"}) for i in range(600)], name=sender
        )
        for index, sender in enumerate(senders)
    ]
    first, second = daemons(config), daemons(config)

    for campaign_id in campaigns:
        await wait_status(conn, campaign_id, "completed", timeout=120)

    for sender, provider in providers.items():
        records = provider.records()
        sender_campaigns = {c for c, s in zip(campaigns, senders, strict=True) if s == sender}
        accepted = records["accepted"]
        assert len(records["request_times"]) == 600 * len(sender_campaigns), "each recipient sent once"
        assert {a["campaign_id"] for a in accepted} == sender_campaigns
        assert len({(a["campaign_id"], a["recipient_id"]) for a in accepted}) == len(accepted)
        assert len({a["address"] for a in accepted}) == len(accepted), "no address under two keys"
        assert max_in_window(records["request_times"], 1.0) <= rate + burst
    for campaign_id in campaigns:
        await assert_counters_match(conn, campaign_id)
    for daemon in (first, second):
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0


async def test_replicas_configured_alike_share_senders_that_start_together(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    # Two replicas with one config, four senders whose campaigns start in one transaction:
    # both replicas wake at once, and the first to ask used to take all four lanes, leaving
    # the other idle. Now a replica takes one lane per attempt and, once it serves some,
    # waits a little before the next, so the other gets a share.
    senders = ("s1", "s2", "s3", "s4")
    config = daemon_config(
        tmp_path, database_url, {sender: {"url": fake.url, "rate_per_second": 50.0} for sender in senders}
    )
    campaigns = [
        await create_campaign(
            conn, sender, [(f"+1777{index}{i:06d}", {"name": "x"}) for i in range(150)], start=False
        )
        for index, sender in enumerate(senders)
    ]
    replicas = [daemons(config), daemons(config)]

    async def both_listening() -> bool:
        listeners = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'campaignd'"
            " AND datname = current_database() AND query ILIKE 'LISTEN%'"
        )
        return bool(listeners >= len(replicas))

    await wait_for(both_listening, timeout=30, what="both replicas listening")
    await conn.execute(
        "UPDATE campaignd.campaigns SET status = 'sending' WHERE id = ANY($1::uuid[])", campaigns
    )

    async def all_lanes_taken() -> list[str] | None:
        owners = await conn.fetch(
            "SELECT lease_owner FROM campaignd.senders WHERE id = ANY($1::text[])", list(senders)
        )
        values = [row["lease_owner"] for row in owners]
        return values if len(values) == len(senders) and all(values) else None

    owners = await wait_for(all_lanes_taken, timeout=30, what="every sender's lane taken")
    assert len(set(owners)) == len(replicas), f"lanes by owner: {Counter(owners)}"
    for campaign_id in campaigns:
        await wait_status(conn, campaign_id, "completed", timeout=60)
        await assert_counters_match(conn, campaign_id)
    assert fake.request_count() == 150 * len(senders)


async def lane_owners(conn: asyncpg.Connection, senders: tuple[str, ...]) -> Counter[str | None]:
    rows = await conn.fetch(
        "SELECT lease_owner FROM campaignd.senders WHERE id = ANY($1::text[])", list(senders)
    )
    return Counter(row["lease_owner"] for row in rows)


async def wait_one_replica_serves_all(conn: asyncpg.Connection, senders: tuple[str, ...]) -> None:
    async def one_owner() -> bool:
        owners = await lane_owners(conn, senders)
        return len(owners) == 1 and None not in owners

    await wait_for(one_owner, timeout=30, what=f"one replica serving the lanes of {senders}")


async def test_a_replica_started_later_gets_a_share_of_busy_lanes(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, provider_processes: Any, daemons: Any
) -> None:
    # One replica serves four long campaigns when a second starts (a rolling restart, or
    # scaling out). Before, the newcomer stayed idle until the campaigns ended; now the busy
    # replica hands it lanes until they are two and two, each lane draining before it is
    # released, so no message is sent twice and no sender ever has two lanes at once.
    senders = ("s1", "s2", "s3", "s4")
    rate, burst, count = 40.0, 5, 600
    # In a process of its own: the rate is judged by arrival times, which a provider in this
    # process stamps late and in a clump whenever the test's own work holds it up (seen: a
    # 185 ms gap, then 7 arrivals within 3 ms, late in a full test run).
    provider = provider_processes()
    config = daemon_config(
        tmp_path,
        database_url,
        {sender: {"url": provider.url, "rate_per_second": rate, "burst": burst} for sender in senders},
        rebalance_seconds=0.5,
    )
    campaigns = {
        sender: await create_campaign(
            conn, sender, [(f"+1778{index}{i:06d}", {"name": "x"}) for i in range(count)]
        )
        for index, sender in enumerate(senders)
    }
    first = daemons(config)
    await wait_one_replica_serves_all(conn, senders)
    second = daemons(config)

    async def shared() -> Counter[str | None] | None:
        owners = await lane_owners(conn, senders)
        return owners if sorted(owners.values()) == [2, 2] and None not in owners else None

    owners = await wait_for(shared, timeout=30, what="two lanes each")
    sent_when_shared = sum([(await campaign(conn, c))["sent_count"] for c in campaigns.values()])
    assert sent_when_shared < count * len(senders) / 2, "the campaigns were nearly over: too late to tell"
    for campaign_id in campaigns.values():
        await wait_status(conn, campaign_id, "completed", timeout=90)
        await assert_counters_match(conn, campaign_id)
    records = provider.records()
    assert len(records["request_times"]) == count * len(senders), "a message went out twice"
    assert len({a["address"] for a in records["accepted"]}) == len(records["accepted"]), "an address twice"
    assert first.log().count('"lane_handover"') == 2, owners
    assert "in_doubt_recovered" not in first.log() + second.log()
    for sender, campaign_id in campaigns.items():
        accepted = [a for a in records["accepted"] if a["campaign_id"] == campaign_id]
        assert len({a["recipient_id"] for a in accepted}) == len(accepted) == count, sender
        # The lane moved only after it drained: its sender's rate held across the move.
        assert max_in_window([a["arrived"] for a in accepted], 1.0) <= rate + burst, sender
    for daemon in (first, second):
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0
    assert await conn.fetchval("SELECT count(*) FROM campaignd.daemons") == 0, "a daemon left its row"


async def test_sigkill_while_handing_a_lane_over_loses_nothing(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    # The bad moment of a handover: the lane has stopped claiming and is draining requests
    # still at the provider when its daemon dies. The lane is neither released nor written
    # off: the replica takes it when its lease expires and settles the claims as in doubt.
    fake.behaviour.latency_seconds = 0.4
    senders = ("h1", "h2")
    count = 1500
    config = daemon_config(
        tmp_path,
        database_url,
        {sender: {"url": fake.url, "rate_per_second": 150.0} for sender in senders},
        rebalance_seconds=0.5,
        lease_seconds=2.0,
    )
    campaigns = [
        await create_campaign(conn, sender, [(f"+1779{index}{i:06d}", {"name": "x"}) for i in range(count)])
        for index, sender in enumerate(senders)
    ]
    first = daemons(config)
    await wait_one_replica_serves_all(conn, senders)
    second = daemons(config)

    async def handing_over() -> bool:
        return '"lane_handover"' in first.log()

    await wait_for(handing_over, timeout=30, interval=0.01, what="a handover")
    first.kill()
    in_flight_at_kill = await conn.fetchval(
        "SELECT count(*) FROM campaignd.recipients"
        " WHERE campaign_id = ANY($1::uuid[]) AND state = 'in_flight'",
        campaigns,
    )
    assert in_flight_at_kill > 0, "nothing was in flight at the kill: not the moment under test"

    for campaign_id in campaigns:
        await wait_status(conn, campaign_id, "completed", timeout=120)
        assert await state_counts(conn, campaign_id) == {"sent": count}
        assert_exactly_once(fake, campaign_id, count)
        await assert_counters_match(conn, campaign_id)
    # Sent twice only as in-doubt resends under the same key, of claims in flight at the kill.
    resends = sum(fake.duplicate_keys().values())
    abandoned = fake.cancelled_count()
    assert resends + abandoned <= in_flight_at_kill
    assert fake.request_count() == count * len(senders) + resends + abandoned
    assert "in_doubt_recovered" in second.log()
    assert (
        await conn.fetchval(
            "SELECT max(attempts) FROM campaignd.recipients WHERE campaign_id = ANY($1::uuid[])", campaigns
        )
        == 1
    )
    second.signal(signal.SIGTERM)
    assert second.wait() == 0


async def test_frozen_daemon_is_fenced_after_takeover(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    # Slow answers keep requests in the air when the first daemon is frozen, so it holds
    # outcomes it will try to write after it is thawed.
    fake.behaviour.latency_seconds = 0.5
    config = daemon_config(
        tmp_path, database_url, {"sms": {"url": fake.url, "rate_per_second": 100.0}}, lease_seconds=2.0
    )
    # A freeze that lands inside an outcome write's transaction keeps the sender's row locked,
    # and the takeover waits for the server to end that transaction: 60 s by default, past
    # this test's patience (it timed out so once in CI, on PostgreSQL 15). That case has its
    # own test in test_outage.py.
    with_database_settings(config, idle_in_transaction_timeout_seconds=3.0)
    campaign_id = await create_campaign(conn, "sms", 800)
    frozen = daemons(config)

    await wait_sent(conn, campaign_id, 50)
    frozen.signal(signal.SIGSTOP)
    epoch_before = await lane_epoch(conn, "sms")

    successor = daemons(config)

    await wait_taken_over(conn, "sms", epoch_before, timeout=30)
    await wait_status(conn, campaign_id, "completed", timeout=120)
    final = dict(await campaign(conn, campaign_id))

    frozen.signal(signal.SIGCONT)

    async def frozen_noticed() -> bool:
        return "lane_taken_over" in frozen.log()

    await wait_for(frozen_noticed, timeout=30, what="the thawed daemon to notice the takeover")
    after = dict(await campaign(conn, campaign_id))
    assert after == final, "a fenced daemon changed the campaign after the takeover"
    await assert_counters_match(conn, campaign_id)
    assert await state_counts(conn, campaign_id) == {"sent": 800}
    assert_exactly_once(fake, campaign_id, 800)
    for daemon in (frozen, successor):
        daemon.signal(signal.SIGTERM)
        assert daemon.wait() == 0


async def test_retry_scheduled_in_the_future_keeps_the_campaign_sending(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    # The seed-004 bug: rows waiting on next_attempt_at were invisible and the campaign was
    # completed with thousands unsent.
    flaky = "+15550000007"
    fake.behaviour.rules[flaky] = Rule(500, {"error": {"code": "upstream"}}, times=1)
    config = daemon_config(
        tmp_path, database_url, {"sms": {"url": fake.url}}, backoff_base_seconds=6.0, backoff_max_seconds=6.0
    )
    campaign_id = await create_campaign(conn, "sms", 50)
    daemons(config)

    async def waiting_on_retry() -> bool:
        counts = await state_counts(conn, campaign_id)
        return counts.get("sent") == 49 and counts.get("pending") == 1

    await wait_for(waiting_on_retry, timeout=60, what="49 sent, 1 waiting")
    retry = await conn.fetchrow(
        "SELECT attempts, error_code, next_attempt_at > now() AS in_future FROM campaignd.recipients"
        " WHERE campaign_id = $1 AND state = 'pending'",
        campaign_id,
    )
    assert (
        retry is not None
        and retry["in_future"]
        and retry["attempts"] == 1
        and retry["error_code"] == "upstream"
    )
    assert (await campaign(conn, campaign_id))["status"] == "sending"

    row = await wait_status(conn, campaign_id, "completed", timeout=60)
    assert row["sent_count"] == 50
    assert fake.requests_by_address(flaky) == 2


async def test_provider_errors_each_get_their_reaction(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    permanent, throttled, slow, exhausted = "+15550000001", "+15550000002", "+15550000003", "+15550000004"
    fake.behaviour.rules.update(
        {
            permanent: Rule(400, {"error": {"code": "invalid_number", "message": "no such number"}}),
            throttled: Rule(429, {"error": {"code": "slow_down"}}, headers={"Retry-After": "1"}, times=2),
            # Answers after the client's timeout the first time: a transient timeout, then sent.
            slow: Rule(200, {"id": "late"}, times=1, delay_seconds=3.0),
            exhausted: Rule(503, None, headers={"Retry-After": "0"}, times=None),
        }
    )
    fake.behaviour.rules[exhausted] = Rule(500, "<html>bad gateway</html>")
    config = daemon_config(
        tmp_path,
        database_url,
        {"sms": {"url": fake.url, "timeout_seconds": 1.0}},
        max_attempts=3,
    )
    campaign_id = await create_campaign(conn, "sms", 20)
    daemons(config)
    await wait_status(conn, campaign_id, "completed", timeout=90)

    rows = {
        r["address"]: r
        for r in await conn.fetch(
            "SELECT address, state, attempts, error_code, error_message FROM campaignd.recipients"
            " WHERE campaign_id = $1",
            campaign_id,
        )
    }
    assert rows[permanent]["state"] == "failed"
    assert rows[permanent]["error_code"] == "invalid_number"
    assert rows[permanent]["attempts"] == 1, "a permanent error is not retried"
    assert "no such number" in rows[permanent]["error_message"]
    # Throttled twice: retried without spending attempts.
    assert rows[throttled]["state"] == "sent" and rows[throttled]["attempts"] == 1
    assert fake.requests_by_address(throttled) == 3
    # Timed out once: a transient failure that spent one attempt, then sent.
    assert rows[slow]["state"] == "sent" and rows[slow]["attempts"] == 2
    # A transient error on every try: failed after max_attempts, with the last code.
    assert rows[exhausted]["state"] == "failed" and rows[exhausted]["attempts"] == 3
    assert rows[exhausted]["error_code"] == "http_500"
    assert fake.requests_by_address(exhausted) == 3
    await assert_counters_match(conn, campaign_id)
    assert Counter(r["state"] for r in rows.values()) == {"sent": 18, "failed": 2}


async def test_unauthorized_pauses_the_sender_and_its_campaigns(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    fake.behaviour.all_status = 401
    config = daemon_config(tmp_path, database_url, {"sms": {"url": fake.url, "rate_per_second": 50.0}})
    first = await create_campaign(conn, "sms", 300, name="a")
    second = await create_campaign(conn, "sms", 300, name="b")
    daemon = daemons(config)

    for campaign_id in (first, second):
        row = await wait_status(conn, campaign_id, "paused", timeout=30)
        assert "forced" in row["status_reason"]
    reason = await conn.fetchval("SELECT paused_reason FROM campaignd.senders WHERE id = 'sms'")
    assert reason is not None and "forced" in reason

    async def settled() -> bool:
        owner = await conn.fetchval("SELECT lease_owner FROM campaignd.senders WHERE id = 'sms'")
        return "sender_paused" in daemon.log() and owner is None

    await wait_for(settled, timeout=30, what="the lane to stop")
    requests = fake.request_count()
    assert requests <= 50 + 50, "stopped at the first rejections, not after hundreds"
    for campaign_id in (first, second):
        counts = await state_counts(conn, campaign_id)
        assert "in_flight" not in counts and counts.get("failed", 0) == 0, (
            "the sender's fault fails no recipient"
        )
        assert (
            await conn.fetchval(
                "SELECT max(attempts) FROM campaignd.recipients WHERE campaign_id = $1", campaign_id
            )
            == 0
        )
    # Nothing more is sent while the sender is paused, even when a campaign is set sending again.
    await conn.execute("UPDATE campaignd.campaigns SET status = 'sending' WHERE id = $1", first)
    import asyncio

    await asyncio.sleep(1.0)
    assert fake.request_count() == requests

    # Clearing the reason (what `resume-sender` will do) resumes sending.
    fake.behaviour.all_status = None
    await conn.execute("UPDATE campaignd.senders SET paused_reason = NULL WHERE id = 'sms'")
    await wait_status(conn, first, "completed", timeout=60)
    await assert_counters_match(conn, first)
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


async def test_bad_recipients_are_skipped_with_reasons(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    recipients: list[tuple[str | None, Any]] = [
        ("+15550000001", {"name": "kept"}),
        (None, {"name": "no address"}),
        ("   ", {"name": "blank"}),
        ("+15550000001", {"name": "duplicate"}),
        ("+15550000002", {}),
        ("+15550000003", {"name": None}),
        ("+1555 0000004", {"name": "space"}),
        ("+15550000005", {"name": {"nested": 1}}),
        ("+15550000006", {"name": "ok"}),
        # The first of two with one address cannot be sent: the second is, not skipped as its
        # duplicate.
        ("+15550000007", {}),
        ("+15550000007", {"name": "second"}),
        # Variables that are not an object fill no placeholder, even with the right names.
        ("+15550000008", ["name"]),
        # An address padded with spaces is the same address.
        ("  +15550000006 ", {"name": "padded"}),
    ]
    config = daemon_config(tmp_path, database_url, {"sms": {"url": fake.url}})
    campaign_id = await create_campaign(conn, "sms", recipients)
    daemons(config)
    row = await wait_status(conn, campaign_id, "completed", timeout=60)

    outcomes = [
        (r["state"], r["error_code"])
        for r in await conn.fetch(
            "SELECT state, error_code FROM campaignd.recipients WHERE campaign_id = $1 ORDER BY id",
            campaign_id,
        )
    ]
    assert outcomes == [
        ("sent", None),
        ("skipped", "no_address"),
        ("skipped", "no_address"),
        ("skipped", "duplicate_address"),
        ("skipped", "missing_variable"),
        ("skipped", "missing_variable"),
        ("skipped", "invalid_address"),
        ("skipped", "bad_variable"),
        ("sent", None),
        ("skipped", "missing_variable"),
        ("sent", None),
        ("skipped", "missing_variable"),
        ("skipped", "duplicate_address"),
    ]
    assert (row["total_count"], row["sent_count"], row["skipped_count"]) == (13, 3, 10)
    assert fake.request_count() == 3
    await assert_counters_match(conn, campaign_id)


async def test_campaign_without_a_valid_recipient_fails_with_a_reason(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    config = daemon_config(tmp_path, database_url, {"sms": {"url": fake.url}})
    nobody = await create_campaign(conn, "sms", [(None, {"name": "a"}), ("", {"name": "b"})], name="nobody")
    empty = await create_campaign(conn, "sms", [], name="empty")
    broken = await create_campaign(conn, "sms", 3, message={"text": "hello {{name"}, name="broken")
    daemons(config)

    row = await wait_status(conn, nobody, "failed", timeout=30)
    assert "no valid recipient" in row["status_reason"]
    assert row["skipped_count"] == 2
    row = await wait_status(conn, empty, "failed", timeout=30)
    assert row["status_reason"] == "campaign has no recipients"
    row = await wait_status(conn, broken, "failed", timeout=30)
    assert "invalid message" in row["status_reason"]
    assert fake.request_count() == 0


async def test_a_wake_with_every_claim_slot_taken_keeps_the_lane_claiming(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    # A wake (a campaign started on the sender, a tail prepared) that found the claim room full
    # made the claim round claim nothing, which the lane took for "nothing left": it waited
    # for every claim to be written, here forever (one request is held at the provider), until
    # the next poll. Seen in bench/latency.py as the send queue running dry for ~0.3 s.
    held = "+15550000000"  # the first recipient of a campaign made by create_campaign
    fake.behaviour.latency_seconds = 0.1
    fake.behaviour.rules[held] = Rule(503, delay_seconds=300.0)
    config = daemon_config(
        tmp_path,
        database_url,
        {"sms": {"url": fake.url, "timeout_seconds": 300.0}},
        # Two claims in the air and four queued: the room is full nearly all the time, and
        # frees one recipient at a time (the claim threshold is 1).
        concurrency=2,
        batch_size=4,
        # A lane that stops claiming would not look again within the test.
        poll_seconds=600.0,
    )
    # Of more than 10 batches: its tail is prepared while its head is sent, and wakes the lane.
    busy = await create_campaign(conn, "sms", 400, name="busy")
    daemons(config)

    async def sent_in_busy() -> int:
        return int((await campaign(conn, busy))["sent_count"])

    # The tail's wake comes within the first few sends.
    await wait_for(lambda: _at_least(sent_in_busy, 20), timeout=60, what="20 sent")
    # A NOTIFY wakes the lane, again at a moment when the room is almost surely full.
    newcomer = await create_campaign(conn, "sms", [(f"+1666{i:07d}", {"name": "n"}) for i in range(10)])
    row = await wait_status(conn, newcomer, "completed", timeout=60)
    assert row["sent_count"] == 10
    already = await sent_in_busy()
    await wait_for(lambda: _at_least(sent_in_busy, already + 20), timeout=60, what="20 more sent")
    assert fake.requests_by_address(held) == 1


async def _at_least(count: Any, expected: int) -> bool:
    return bool(await count() >= expected)
