"""The daemon's side tasks (NOTIFY listener, lane manager, ...) and the lanes' drain.

A failing side task used to end the daemon without draining: the lanes ran on, outside the
task group, while the provider sessions and the pool were closed under them, leaving sends
unrecorded and the lease live. The listener failed that way on any error other than a
connection problem, such as a reconnect refused by authentication.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import asyncpg

from campaignd.fakeprovider import FakeProvider
from tests.conftest import (
    DaemonProcess,
    DaemonRole,
    assert_counters_match,
    campaign,
    create_campaign,
    daemon_config,
    state_counts,
    wait_for,
    wait_status,
)


def log_events(daemon: DaemonProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]


def not_json(daemon: DaemonProcess) -> list[str]:
    return [line for line in daemon.log().splitlines() if line.strip() and not line.startswith("{")]


async def role_backends(conn: asyncpg.Connection, role: str, *, listening: bool = False) -> int:
    count: int = await conn.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE usename = $1 AND ($2 = false OR query LIKE 'LISTEN%')",
        role,
        listening,
    )
    return count


async def test_a_listener_refused_a_login_retries_while_the_lanes_send_on(
    tmp_path: Path,
    conn: asyncpg.Connection,
    daemon_role: DaemonRole,
    fake: FakeProvider,
    daemons: Any,
) -> None:
    recipients = 600
    fake.behaviour.latency_seconds = 0.02
    # Two pooled sessions, both open (below) before logins are refused: a refused login then
    # reaches the listener alone, as when a password is rotated under a running daemon.
    config = daemon_config(tmp_path, daemon_role.url, {"sms": {"url": fake.url, "rate_per_second": 60.0}})
    config.write_text(config.read_text().replace("pool_size = 6", "pool_size = 2"))
    campaign_id = await create_campaign(conn, "sms", recipients)
    daemon = daemons(config)

    async def pool_full_and_listening() -> bool:
        return (
            await role_backends(conn, daemon_role.name) >= 3
            and await role_backends(conn, daemon_role.name, listening=True) == 1
        )

    await wait_for(pool_full_and_listening, timeout=60, what="both pooled sessions and the listener")
    assert (await campaign(conn, campaign_id))["status"] == "sending", "too fast: nothing left to test"

    await conn.execute(f"ALTER ROLE {daemon_role.name} NOLOGIN")
    await conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1 AND query LIKE 'LISTEN%'",
        daemon_role.name,
    )

    async def listener_refused_or_exited() -> bool:
        # A refused login is waited out like an outage, logged as the database unavailable.
        refused = (
            '"during": "listen"' in daemon.log() and "InvalidAuthorizationSpecificationError" in daemon.log()
        )
        return refused or daemon.process.poll() is not None

    await wait_for(listener_refused_or_exited, timeout=60, what="the listener's reconnect refused")
    sent_when_refused = (await campaign(conn, campaign_id))["sent_count"]
    await conn.execute(f"ALTER ROLE {daemon_role.name} LOGIN")
    assert daemon.process.poll() is None, "the daemon exited when the listener's login was refused"

    async def listening_again() -> bool:
        return await role_backends(conn, daemon_role.name, listening=True) == 1

    await wait_for(listening_again, timeout=60, what="the listener back")
    row = await wait_status(conn, campaign_id, "completed", timeout=120)
    assert sent_when_refused < recipients, "the campaign ended before the listener was refused"
    assert row["sent_count"] == recipients
    await assert_counters_match(conn, campaign_id)
    assert fake.request_count() == recipients, "a recipient was sent twice"
    assert fake.accepted_count() == recipients

    refused = [
        e for e in log_events(daemon) if e["event"] == "database_unavailable" and e["during"] == "listen"
    ]
    assert refused and all(e["error"] == "InvalidAuthorizationSpecificationError" for e in refused)
    assert all(e["message"] == f'role "{daemon_role.name}" is not permitted to log in' for e in refused)
    assert daemon_role.password not in daemon.log()

    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    assert not_json(daemon) == []


async def test_a_failing_lane_manager_drains_the_lanes_before_the_daemon_exits(
    tmp_path: Path, database_url: str, conn: asyncpg.Connection, fake: FakeProvider, daemons: Any
) -> None:
    # Slow answers: many requests are in the air when the manager fails.
    fake.behaviour.latency_seconds = 1.0
    config = daemon_config(
        tmp_path,
        database_url,
        {
            "sms": {"url": fake.url, "rate_per_second": 50.0},
            "other": {"url": fake.url},
        },
    )
    campaign_id = await create_campaign(conn, "sms", 500)
    daemon = daemons(config)

    async def in_the_air() -> bool:
        return fake.request_count() - sum(fake.answers().values()) >= 10

    await wait_for(in_the_air, timeout=60, what="sends in flight")
    # A bug in the manager's own statement, while the lane already serving is unaffected:
    # taking the other sender's lane raises an error that is no outage.
    await conn.execute(
        """
        CREATE FUNCTION campaignd.test_refuse_lane() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'planted: lane acquisition refused'; END $$;
        CREATE TRIGGER test_refuse_lane BEFORE UPDATE ON campaignd.senders FOR EACH ROW
        WHEN (NEW.id = 'other' AND NEW.lease_owner IS NOT NULL) EXECUTE FUNCTION campaignd.test_refuse_lane();
        """
    )
    await create_campaign(conn, "other", 5, name="other")

    assert daemon.wait(timeout=120) == 1

    # Every send in the air was answered and its outcome written; nothing is left in flight
    # under a live lease: the lane was released.
    counts = await state_counts(conn, campaign_id)
    assert "in_flight" not in counts, counts
    lease = await conn.fetchrow(
        "SELECT lease_owner, lease_expires_at FROM campaignd.senders WHERE id = 'sms'"
    )
    assert lease is not None and lease["lease_owner"] is None, dict(lease or {})
    sent = await conn.fetch(
        "SELECT id FROM campaignd.recipients WHERE campaign_id = $1 AND state = 'sent'", campaign_id
    )
    accepted = {a.recipient_id for a in fake.accepted() if a.campaign_id == campaign_id}
    assert {r["id"] for r in sent} == accepted
    assert fake.request_count() == len(accepted), "a request without its outcome"
    assert 0 < len(accepted) < 500
    await assert_counters_match(conn, campaign_id)

    failures = [e for e in log_events(daemon) if e["event"] == "daemon_failed"]
    assert len(failures) == 1 and failures[0]["failed"] == ["lane-manager"]
    assert failures[0]["error"] == "RaiseError"
    assert not_json(daemon) == [], "a traceback outside the structured log"
    assert "lane_released" in daemon.log()
    assert "lane_release_failed" not in daemon.log()
