"""PostgreSQL goes away mid-campaign: the daemon keeps running, sends nothing it cannot
record once its lease runs out, reconnects with backoff and finishes the work."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

from campaignd import db
from campaignd.config import DatabaseConfig
from campaignd.fakeprovider import FakeProvider
from campaignd.schema import migrate
from tests.conftest import (
    assert_counters_match,
    campaign,
    create_campaign,
    daemon_config,
    wait_for,
    wait_status,
)


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
