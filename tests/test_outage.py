"""PostgreSQL goes away mid-campaign: the daemon keeps running, sends nothing it cannot
record once its lease runs out, reconnects with backoff and finishes the work."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import asyncpg

from campaignd import db, leasing
from campaignd import operator as campaignd_operator
from campaignd.config import DatabaseConfig
from campaignd.daemon import STOP_MARGIN_SECONDS
from campaignd.dispatch import FINAL_WRITE_SECONDS
from campaignd.fakeprovider import FakeProvider
from campaignd.outcomes import RecipientState, RecipientUpdate, outcome_columns, released
from campaignd.schema import migrate
from campaignd.sql import QUERIES
from tests.conftest import (
    DaemonRole,
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
from tests.pgproxy import PgProxy


async def test_database_outage_mid_campaign_is_survived_without_unrecorded_sends(
    tmp_path: Path, own_server: tuple[str, Any], fake: FakeProvider, daemons: Any
) -> None:
    url, server = own_server
    lease_seconds = 2.0
    fake.behaviour.latency_seconds = 0.01
    connection = await db.connect(DatabaseConfig(url=url))  # type: ignore[arg-type]
    await migrate(connection)
    campaign_id = await create_campaign(connection, "sms", 3000)
    await connection.close()
    config = daemon_config(
        tmp_path, url, {"sms": {"url": fake.url, "rate_per_second": 300.0}}, lease_seconds=lease_seconds
    )
    daemon = daemons(config)

    async def progressed() -> bool:
        probe = await db.connect(DatabaseConfig(url=url))  # type: ignore[arg-type]
        try:
            return bool((await campaign(probe, campaign_id))["sent_count"] >= 300)
        finally:
            await probe.close()

    await wait_for(progressed, timeout=60, what="300 sent")
    await asyncio.to_thread(server.stop)
    stopped_at = time.monotonic()

    # Once the lease it last renewed has run out, the daemon must not start another send.
    await asyncio.sleep(lease_seconds + 1.5)
    quiet_from = fake.request_count()
    await asyncio.sleep(4.0)
    assert fake.request_count() == quiet_from, "sent while it could not record"
    assert daemon.process.poll() is None, "the daemon died with the database"
    assert time.monotonic() - stopped_at > lease_seconds

    await asyncio.to_thread(server.start)
    connection = await db.connect(DatabaseConfig(url=url))  # type: ignore[arg-type]
    try:
        await wait_status(connection, campaign_id, "completed", timeout=120)
        assert (await campaign(connection, campaign_id))["sent_count"] == 3000
        await assert_counters_match(connection, campaign_id)
    finally:
        await connection.close()
    accepted = {a.recipient_id for a in fake.accepted() if a.campaign_id == campaign_id}
    assert len(accepted) == 3000
    assert fake.addresses_delivered_under_several_keys() == {}
    assert "database_unavailable" in daemon.log()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


async def _lost_claim_run(
    tmp_path: Path, database_url: str, fake: FakeProvider, proxy: PgProxy, recipients: int, **sender: Any
) -> tuple[asyncpg.Connection, str, Path]:
    """A campaign whose second claim commits and loses its reply (proxy armed before start)."""
    connection = await db.connect(DatabaseConfig(url=database_url))  # type: ignore[arg-type]
    campaign_id = await create_campaign(connection, "sms", recipients, start=False)
    proxy.lose_reply(QUERIES["claim_recipients"], execution=2)
    config = daemon_config(tmp_path, proxy.url, {"sms": {"url": fake.url, **sender}})
    await connection.execute("UPDATE campaignd.campaigns SET status = 'sending' WHERE id = $1", campaign_id)
    return connection, campaign_id, config


async def test_a_claim_whose_reply_was_lost_is_given_back_and_the_campaign_completes(
    tmp_path: Path, database_url: str, fake: FakeProvider, daemons: Any, proxy: PgProxy
) -> None:
    """The claim committed; the lane never learnt which rows it took. They stayed in flight
    under the live lane, which nothing recovers: the campaign stayed SENDING for good."""
    connection, campaign_id, config = await _lost_claim_run(tmp_path, database_url, fake, proxy, 600)
    daemon = daemons(config)
    try:
        await wait_status(connection, campaign_id, "completed", timeout=60)
        assert proxy.lost == 1, "the claim's reply was never lost: this test tested nothing"
        row = await campaign(connection, campaign_id)
        assert row["sent_count"] == 600
        await assert_counters_match(connection, campaign_id)
        # The lost claim sent nothing, so it spent no attempt and left no error behind.
        attempts = await connection.fetch(
            "SELECT attempts, error_code, count(*) FROM campaignd.recipients"
            " WHERE campaign_id = $1 GROUP BY 1, 2",
            campaign_id,
        )
        assert [tuple(r) for r in attempts] == [(1, None, 600)]
    finally:
        await connection.close()
    assert fake.request_count() == 600, "a recipient was sent twice"
    assert len({a.recipient_id for a in fake.accepted() if a.campaign_id == campaign_id}) == 600
    assert "lost_claims_released" in daemon.log()
    daemon.signal(signal.SIGTERM)
    assert await asyncio.to_thread(daemon.wait) == 0


async def test_outcome_writes_that_never_answer_cannot_hold_up_a_stop(
    tmp_path: Path, database_url: str, fake: FakeProvider, daemons: Any, proxy: PgProxy
) -> None:
    """A write to a database that takes it and never answers waited for as long as the
    connection lived: the stop outlasted any TimeoutStopSec, and systemd killed it."""
    fake.behaviour.latency_seconds = 1.0
    connection = await db.connect(DatabaseConfig(url=database_url))  # type: ignore[arg-type]
    try:
        campaign_id = await create_campaign(connection, "sms", 200)
        config = daemon_config(tmp_path, proxy.url, {"sms": {"url": fake.url}}, drain_seconds=3.0)
        daemon = daemons(config)

        async def in_the_air() -> bool:
            return fake.request_count() > 0

        await wait_for(in_the_air, timeout=30, what="requests at the provider")
        # The next outcome write, and so every one after it, waits at the proxy for good.
        proxy.hold_statement(QUERIES["record_outcomes"], execution=1)
        daemon.signal(signal.SIGTERM)
        # Bounded by the drain (3 s) and FINAL_WRITE_SECONDS; 60 s is only the test's patience.
        assert await asyncio.to_thread(daemon.wait, 60) == 0
        assert proxy.statement_held.is_set(), "no write was held: this test tested nothing"
        assert "outcomes_unrecorded" in daemon.log()
        # Nothing is lost: what was not recorded stays in flight, for the next owner.
        counts = await state_counts(connection, campaign_id)
        assert counts.keys() <= {"sent", "pending", "in_flight"} and sum(counts.values()) == 200, counts
        assert counts.get("in_flight", 0) > 0, counts
    finally:
        proxy.release()
        await connection.close()


async def test_a_lane_leaving_gives_its_lost_claims_back_rather_than_leave_them_in_doubt(
    tmp_path: Path, database_url: str, fake: FakeProvider, daemons: Any, proxy: PgProxy
) -> None:
    """Left in flight, a lost claim looks to the next owner like a send cut off: a sender that
    cannot resend safely would fail those recipients 'in_doubt' though nothing was sent."""
    connection, campaign_id, config = await _lost_claim_run(
        tmp_path, database_url, fake, proxy, 400, rate_per_second=40.0, burst=5, resend_in_doubt=False
    )
    first = daemons(config)
    try:

        async def lost() -> bool:
            return proxy.lost == 1

        await wait_for(lost, timeout=30, what="the second claim's reply lost")
        first.signal(signal.SIGTERM)
        assert await asyncio.to_thread(first.wait) == 0
        left = await connection.fetchval(
            "SELECT count(*) FROM campaignd.recipients WHERE campaign_id = $1 AND state = 'in_flight'",
            campaign_id,
        )
        assert left == 0
        assert "lost_claims_released" in first.log()

        second = daemons(config)
        await wait_status(connection, campaign_id, "completed", timeout=60)
        row = await campaign(connection, campaign_id)
        assert (row["sent_count"], row["failed_count"]) == (400, 0)
        await assert_counters_match(connection, campaign_id)
    finally:
        await connection.close()
    assert fake.request_count() == 400, "a recipient was sent twice"
    second.signal(signal.SIGTERM)
    assert await asyncio.to_thread(second.wait) == 0


async def test_a_lost_claim_in_a_campaign_cancelled_while_the_lane_stays_busy_is_given_back(
    tmp_path: Path, database_url: str, fake: FakeProvider, daemons: Any, proxy: PgProxy
) -> None:
    """Lost claims went back only when their campaign ran out of work here or the lane left.
    Cancelled meanwhile, with another campaign keeping the lane busy, the campaign kept rows
    in flight, under a live lane the watchdog leaves alone, for as long as the lane lived."""
    connection, doomed, config = await _lost_claim_run(
        tmp_path, database_url, fake, proxy, 3000, rate_per_second=100.0
    )
    daemon = daemons(config)
    try:

        async def lost() -> bool:
            return proxy.lost == 1

        await wait_for(lost, timeout=30, what="the second claim's reply lost")
        busy = await create_campaign(connection, "sms", 6000)
        cancelled = await campaignd_operator.cancel_campaign(connection, doomed)
        assert cancelled.status == "cancelled"

        async def settled() -> bool:
            return (await state_counts(connection, doomed)).keys() <= {"sent", "skipped"}

        await wait_for(settled, timeout=30, what="the cancelled campaign's lost claims to be given back")
        assert (await state_counts(connection, busy)).get("pending", 0) > 0, "the lane was never idle"
        await assert_counters_match(connection, doomed)
    finally:
        await connection.close()
    assert "lost_claims_released" in daemon.log()
    assert fake.duplicate_keys() == {}, "a recipient was sent twice"
    daemon.signal(signal.SIGTERM)
    assert await asyncio.to_thread(daemon.wait) == 0


async def test_an_outcome_written_again_does_not_land_on_a_later_claim(conn: asyncpg.Connection) -> None:
    """A batch whose reply was lost is written again. Meanwhile its 'due at once' outcome may
    have committed and the lane claimed the row again: the old outcome must not undo the new
    claim, whose send would then be recorded nowhere and the recipient sent twice."""
    campaign_id = await create_campaign(conn, "sms", 1)
    # Prepared as a lane would have: one recipient, every one sendable.
    await conn.execute(
        "UPDATE campaignd.campaigns SET prepared_at = now(), total_count = 1 WHERE id = $1", campaign_id
    )
    await conn.execute(
        "UPDATE campaignd.senders SET lease_owner = 'host:1', lease_epoch = 1,"
        " lease_expires_at = now() + interval '1 hour' WHERE id = 'sms'"
    )
    lane = ("sms", "host:1", 1)

    async def claim(number: int) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await conn.fetch(
            QUERIES["claim_recipients"], *lane, campaign_id, 0, 10, 30.0, number
        )
        return rows

    async def record(update: RecipientUpdate) -> int:
        row = await conn.fetchrow(QUERIES["record_outcomes"], *lane, *outcome_columns([update]))
        assert row is not None and row["lane_held"] == 1
        return int(row["applied"])

    [first] = await claim(1)
    given_back = released(first["id"])
    given_back.claim = 1
    assert await record(given_back) == 1
    [again] = await claim(2)
    assert again["id"] == first["id"]

    assert await record(given_back) == 0, "the first claim's outcome landed on the second claim"
    state = await conn.fetchrow(
        "SELECT state, lease_claim FROM campaignd.recipients WHERE id = $1", first["id"]
    )
    assert tuple(state) == ("in_flight", 2)
    assert await record(RecipientUpdate(first["id"], RecipientState.SENT)) == 1
    assert (await campaign(conn, campaign_id))["sent_count"] == 1
    await assert_counters_match(conn, campaign_id)


async def test_a_renewal_does_not_queue_behind_a_batch_write_that_waits_for_the_host(
    conn: asyncpg.Connection, database_url: str
) -> None:
    """A host transaction holding a campaign row (an edit, a cascading DELETE) holds up the
    lane's outcome write, which locks the lane row first. The renewal must not wait for that
    write: held up past the lease, it lost the lane to another daemon, which then recovered
    the lane's claims as in doubt."""
    campaign_id = await create_campaign(conn, "sms", 5)
    await conn.execute(
        "UPDATE campaignd.campaigns SET prepared_at = now(), total_count = 5 WHERE id = $1", campaign_id
    )
    [lease] = await leasing.acquire_lanes(conn, ["sms"], "host:1", 30.0)
    claimed = await conn.fetch(QUERIES["claim_recipients"], *lease.token, campaign_id, 0, 10, 30.0, 1)
    assert len(claimed) == 5

    config = DatabaseConfig(url=database_url)  # type: ignore[arg-type]
    host, writer, renewer = [await db.connect(config) for _ in range(3)]
    # The write waits for as long as the host holds the row, not for the session's lock_timeout.
    await writer.execute("SET lock_timeout = 0")
    try:
        async with host.transaction():
            await host.execute("UPDATE campaignd.campaigns SET name = 'edited' WHERE id = $1", campaign_id)
            batch = [RecipientUpdate(row["id"], RecipientState.SENT) for row in claimed]
            write = asyncio.create_task(
                writer.fetchrow(QUERIES["record_outcomes"], *lease.token, *outcome_columns(batch))
            )

            async def write_waits_for_the_host() -> bool:
                return bool(
                    await conn.fetchval(
                        "SELECT count(*) FROM pg_stat_activity"
                        " WHERE wait_event_type = 'Lock' AND query LIKE '%unnest%'"
                    )
                )

            await wait_for(
                write_waits_for_the_host, timeout=30, what="the outcome write to wait for the host"
            )
            renewal = await asyncio.wait_for(leasing.renew(renewer, lease, [campaign_id]), timeout=30)
            assert renewal.held
            # The write still fences the lane: even once its lease has run out, neither another
            # daemon nor the watchdog can take it while the write is in progress.
            await conn.execute(
                "UPDATE campaignd.senders SET lease_expires_at = now() - interval '1 second' WHERE id = 'sms'"
            )
            assert await leasing.acquire_lanes(conn, ["sms"], "host:2", 30.0) == []
            assert await conn.fetch(QUERIES["wd_expire_lanes"]) == []
            assert not write.done()
        row = await write
        assert row is not None and (row["lane_held"], row["applied"]) == (1, 5)
    finally:
        for connection in (host, writer, renewer):
            await connection.close()
    await assert_counters_match(conn, campaign_id)


async def test_a_database_that_turns_read_only_is_waited_out_and_the_campaign_completes(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    # What a failover to a standby not yet promoted looks like: the connections drop, and the
    # new ones refuse every write. The daemon used to exit (code 1) at the first refusal.
    campaign_id = await create_campaign(conn, "sms", 2000)
    config = daemon_config(tmp_path, database_url, {"sms": {"url": fake.url, "rate_per_second": 300.0}})
    daemon = daemons(config)
    await wait_sent(conn, campaign_id, 200, what="200 sent before the failover")

    database = await conn.fetchval("SELECT current_database()")
    await conn.execute(f'ALTER DATABASE "{database}" SET default_transaction_read_only = on')
    await _drop_daemon_connections(conn)
    await wait_for(lambda: _logged(daemon, "ReadOnlySQLTransactionError"), timeout=30, what="a write refused")
    await asyncio.sleep(3.0)
    assert daemon.process.poll() is None, "the daemon exited on a read-only database"

    await conn.execute(f'ALTER DATABASE "{database}" RESET default_transaction_read_only')
    await _drop_daemon_connections(conn)
    row = await wait_status(conn, campaign_id, "completed", timeout=120)

    assert row["sent_count"] == 2000
    await assert_counters_match(conn, campaign_id)
    assert len({a.recipient_id for a in fake.accepted()}) == 2000
    assert fake.addresses_delivered_under_several_keys() == {}
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


async def test_logins_refused_while_running_are_waited_out_and_nothing_ends_in_doubt(
    tmp_path: Path,
    conn: asyncpg.Connection,
    daemon_role: DaemonRole,
    fake: FakeProvider,
    daemons: Any,
) -> None:
    # A password rotated in the database before the configuration, or NOLOGIN, once the
    # server has dropped the daemon's sessions: the lanes crashed, the daemon exited, the
    # requests in the air were cut off and the outcomes held were lost; a sender that cannot
    # resend then failed as in doubt 137 recipients the provider never had.
    role, url = daemon_role.name, daemon_role.url
    fake.behaviour.latency_seconds = 0.05
    campaign_id = await create_campaign(conn, "sms", 2000)
    config = daemon_config(
        tmp_path, url, {"sms": {"url": fake.url, "rate_per_second": 300.0, "resend_in_doubt": False}}
    )
    daemon = daemons(config)
    await wait_sent(conn, campaign_id, 200)

    await conn.execute(f"ALTER ROLE {role} NOLOGIN")
    await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role)
    await wait_for(
        lambda: _logged(daemon, "InvalidAuthorizationSpecificationError"), timeout=30, what="a refusal"
    )
    await asyncio.sleep(3.0)
    assert daemon.process.poll() is None, "the daemon exited on a refused login"

    await conn.execute(f"ALTER ROLE {role} LOGIN")
    row = await wait_status(conn, campaign_id, "completed", timeout=120)

    assert (row["sent_count"], row["failed_count"]) == (2000, 0)
    await assert_counters_match(conn, campaign_id)
    assert len({a.recipient_id for a in fake.accepted()}) == 2000
    assert fake.addresses_delivered_under_several_keys() == {}
    assert "lane_crashed" not in daemon.log() and "daemon_failed" not in daemon.log()
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0


async def test_a_stop_while_the_database_no_longer_answers_ends_within_its_budget(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    # A server that stops answering without closing its connections (frozen, partitioned)
    # held the daemon's statements for good: after SIGTERM it logged "draining" and never
    # exited (60 s and counting for a 2 s drain), and only a SIGKILL ended it.
    proxy = PgProxy(database_url)
    proxy.start()
    try:
        fake.behaviour.latency_seconds = 0.3
        campaign_id = await create_campaign(conn, "sms", 3000)
        config = daemon_config(
            tmp_path, proxy.url, {"sms": {"url": fake.url, "rate_per_second": 100.0}}, drain_seconds=2.0
        )
        daemon = daemons(config)
        await wait_sent(conn, campaign_id, 100)
        proxy.freeze()
        await asyncio.sleep(0.5)
        stopped_at = time.monotonic()
        daemon.signal(signal.SIGTERM)

        code = await asyncio.to_thread(daemon.wait, 60)
        took = time.monotonic() - stopped_at
    finally:
        proxy.stop()

    assert code == 1
    # drain_seconds + FINAL_WRITE_SECONDS + STOP_MARGIN_SECONDS, and some slack for the machine.
    assert took < 2.0 + FINAL_WRITE_SECONDS + STOP_MARGIN_SECONDS + 10, took
    assert "stop_overran" in daemon.log()


async def test_connections_that_go_silent_mid_campaign_are_replaced_and_the_campaign_completes(
    tmp_path: Path, proxy: PgProxy, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    # A partition, or a failover that moves the address to a new primary, leaves the daemon's
    # sockets to the old server open and silent: no answer, no error. Its statements waited
    # for good: the lane held its claims and outcomes, its lease ran out, and the campaign
    # stayed in SENDING with nothing to tell why (the health checks passed).
    fake.behaviour.latency_seconds = 0.01
    campaign_id = await create_campaign(conn, "sms", 3000)
    config = daemon_config(
        tmp_path, proxy.url, {"sms": {"url": fake.url, "rate_per_second": 500.0}}, lease_seconds=2.0
    )
    # The server kills a stranded session's transaction (and its locks) soon, too.
    with_database_settings(
        config,
        statement_timeout_seconds=1.0,
        lock_timeout_seconds=0.5,
        idle_in_transaction_timeout_seconds=2.0,
    )
    daemon = daemons(config)
    await wait_sent(conn, campaign_id, 300)
    proxy.strand()
    stranded_at = time.monotonic()
    row = await wait_status(conn, campaign_id, "completed", timeout=120)
    took = time.monotonic() - stranded_at
    # Stopped with connections still stranded: it must not wait on them past its budget.
    daemon.signal(signal.SIGTERM)
    code = await asyncio.to_thread(daemon.wait, 60)

    assert code == 0, daemon.log()[-3000:]
    assert (row["sent_count"], row["failed_count"], row["skipped_count"]) == (3000, 0, 0)
    await assert_counters_match(conn, campaign_id)
    assert len({a.recipient_id for a in fake.accepted()}) == 3000
    assert fake.addresses_delivered_under_several_keys() == {}
    log = daemon.log()
    assert "database_unavailable" in log and "TimeoutError" in log, log[-3000:]
    assert "lane_crashed" not in log and "daemon_failed" not in log
    # Without the stranding, ~3000 / 500 = 6 s; each silent statement now costs its bound.
    assert took < 90, took


async def test_a_daemon_frozen_inside_an_outcome_write_is_replaced_once_the_server_ends_it(
    tmp_path: Path,
    database_url: str,
    proxy: PgProxy,
    conn: asyncpg.Connection,
    fake: FakeProvider,
    daemons: Any,
) -> None:
    # SIGSTOP between an outcome write and its COMMIT (the COMMIT held at the proxy stands for
    # the freeze landing there) leaves the sender's row locked FOR KEY SHARE. A takeover locks
    # it FOR UPDATE to fence the owner, so it waits, past the lease, until the server ends the
    # frozen transaction (idle_in_transaction_timeout_seconds); then the lane goes on, and the
    # thawed daemon, fenced, changes nothing.
    fake.behaviour.latency_seconds = 0.05
    campaign_id = await create_campaign(conn, "sms", 400)
    senders = {"sms": {"url": fake.url, "rate_per_second": 100.0}}
    frozen_config = daemon_config(tmp_path, proxy.url, senders, lease_seconds=2.0)
    successor_config = daemon_config(
        tmp_path, database_url, senders, name="successor.toml", lease_seconds=2.0
    )
    for config in (frozen_config, successor_config):
        with_database_settings(config, idle_in_transaction_timeout_seconds=4.0)
    frozen = daemons(frozen_config)
    await wait_sent(conn, campaign_id, 50)
    proxy.hold_statement(QUERIES["record_outcomes_commit"], execution=1)
    assert await asyncio.to_thread(proxy.statement_held.wait, 30), "no outcome write was held"
    frozen.signal(signal.SIGSTOP)
    frozen_at = time.monotonic()
    epoch_before = await lane_epoch(conn, "sms")
    successor = daemons(successor_config)
    await wait_taken_over(conn, "sms", epoch_before, timeout=60)
    took = time.monotonic() - frozen_at
    # Not at the lease's end (2 s): the server ended the transaction 4 s after it went idle,
    # which was before the freeze.
    assert took > 3.0, took
    final = await wait_status(conn, campaign_id, "completed", timeout=120)
    frozen.signal(signal.SIGCONT)
    await wait_for(lambda: _logged(frozen, "lane_taken_over"), timeout=30, what="the thawed daemon fenced")
    assert dict(await campaign(conn, campaign_id)) == dict(final)
    assert await state_counts(conn, campaign_id) == {"sent": 400}
    await assert_counters_match(conn, campaign_id)
    assert fake.addresses_delivered_under_several_keys() == {}
    for daemon in (frozen, successor):
        daemon.signal(signal.SIGTERM)
        assert await asyncio.to_thread(daemon.wait, 60) == 0


async def test_a_listener_gone_silent_is_replaced_so_new_campaigns_start_at_once(
    tmp_path: Path, proxy: PgProxy, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    # The NOTIFY listener idles between notifications: a partition left it open and deaf, and
    # every campaign after it waited for the next poll (poll_seconds; a minute here) for as
    # long as the socket stayed open, however quick the pool's new connections were.
    config = daemon_config(
        tmp_path, proxy.url, {"sms": {"url": fake.url}}, poll_seconds=60.0, lease_seconds=2.0
    )
    with_database_settings(config, statement_timeout_seconds=1.0, idle_in_transaction_timeout_seconds=2.0)
    daemon = daemons(config)
    first = await create_campaign(conn, "sms", 10)
    await wait_status(conn, first, "completed", timeout=30)
    proxy.strand()
    await wait_for(lambda: _logged(daemon, '"listener_silent"'), timeout=60, what="the silent listener")
    second = await create_campaign(conn, "sms", 10, name="after")
    row = await wait_status(conn, second, "completed", timeout=15)
    daemon.signal(signal.SIGTERM)
    code = await asyncio.to_thread(daemon.wait, 60)

    assert code == 0, daemon.log()[-3000:]
    assert row["sent_count"] == 10
    assert len({a.recipient_id for a in fake.accepted()}) == 20


async def test_a_stop_just_as_the_database_goes_away_still_exits_zero(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    # The listener closed its connection the moment the server went away, and the stop's
    # cancellation landed as that close completed: asyncio.wait_for (Python 3.11) lost it,
    # the listener went on reconnecting, and the stop overran its budget and exited 1, its
    # work all done. A race: tried a few times.
    for attempt in range(4):
        proxy = PgProxy(database_url)
        proxy.start()
        config = daemon_config(tmp_path, proxy.url, {"sms": {"url": fake.url}}, name=f"c{attempt}.toml")
        daemon = daemons(config)
        try:
            campaign_id = await create_campaign(conn, "sms", 5, name=f"before stop {attempt}")
            await wait_status(conn, campaign_id, "completed", timeout=30)
        finally:
            proxy.stop()
        daemon.signal(signal.SIGTERM)
        code = await asyncio.to_thread(daemon.wait, 60)
        assert code == 0, f"attempt {attempt}: {daemon.log()[-3000:]}"


async def test_closing_a_pool_whose_connections_went_silent_ends_within_its_bound(proxy: PgProxy) -> None:
    # A polite close waits for the server's goodbye, which connections stranded by a partition
    # never get: asyncpg's Pool.close() gave up only after the pool's command_timeout, and a
    # daemon's stop with them overran its budget and exited 1.
    # The default statement_timeout: a polite close waits for an answer as long as any
    # statement does (35 s), past a stop's margin.
    pool = await db.create_pool(DatabaseConfig(url=proxy.url))  # type: ignore[arg-type]
    held = [await pool.acquire() for _ in range(3)]
    for connection in held:
        assert await connection.fetchval("SELECT 1") == 1
        await pool.release(connection)
    proxy.strand()
    started = time.monotonic()
    await db.close_pool(pool, 1.0)
    took = time.monotonic() - started
    # Waited its bound (the connections were still open and silent), and no longer.
    assert 0.9 <= took < 10, took


async def _logged(daemon: Any, text: str) -> bool:
    return text in daemon.log()


async def _drop_daemon_connections(connection: asyncpg.Connection) -> None:
    await connection.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
