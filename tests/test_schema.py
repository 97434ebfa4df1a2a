"""The schema contract: migrations are idempotent, concurrent-safe, and the daemon refuses an
unmigrated database."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import asyncpg

from campaignd import db
from campaignd.config import DatabaseConfig
from campaignd.schema import SchemaNotReady, current_version, migrate, require_current
from campaignd.sql import SCHEMA_VERSION
from tests.conftest import daemon_config, with_database


async def fresh_database(pg_url: str, name: str) -> str:
    admin = await asyncpg.connect(pg_url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    return with_database(pg_url, name)


async def schema_snapshot(connection: asyncpg.Connection) -> list[tuple[str, str]]:
    rows = await connection.fetch(
        "SELECT c.relname, c.relkind::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'campaignd' ORDER BY 1"
    )
    return [(row[0], row[1]) for row in rows]


async def test_migrate_twice_is_a_no_op(pg_url: str) -> None:
    url = await fresh_database(pg_url, "migrate_twice")
    connection = await db.connect(DatabaseConfig(url=url))  # type: ignore[arg-type]
    try:
        assert await current_version(connection) is None
        with_error = None
        try:
            await require_current(connection)
        except SchemaNotReady as exc:
            with_error = str(exc)
        assert with_error is not None and "campaignd migrate" in with_error

        assert await migrate(connection) == list(range(1, SCHEMA_VERSION + 1))
        before = await schema_snapshot(connection)
        assert await migrate(connection) == []
        assert await schema_snapshot(connection) == before
        assert await current_version(connection) == SCHEMA_VERSION
        await require_current(connection)
        assert {"senders", "campaigns", "recipients", "schema_migrations"} <= {name for name, _ in before}
    finally:
        await connection.close()


async def test_concurrent_migrators_apply_each_version_once(pg_url: str) -> None:
    url = await fresh_database(pg_url, "migrate_concurrently")
    connections = [await db.connect(DatabaseConfig(url=url)) for _ in range(4)]  # type: ignore[arg-type]
    try:
        results = await asyncio.gather(*(migrate(c) for c in connections))
        applied = sorted(v for result in results for v in result)
        assert applied == list(range(1, SCHEMA_VERSION + 1))
        assert (
            await connections[0].fetchval("SELECT count(*) FROM campaignd.schema_migrations")
            == SCHEMA_VERSION
        )
    finally:
        for connection in connections:
            await connection.close()


async def test_cli_migrate_twice_then_run_refuses_unmigrated_database(pg_url: str, tmp_path: Path) -> None:
    url = await fresh_database(pg_url, "migrate_cli")
    config = daemon_config(tmp_path, url, {"sms": {"url": "http://127.0.0.1:9/send"}})
    run = [sys.executable, "-m", "campaignd"]

    refused = subprocess.run(
        [*run, "run", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 1
    assert "campaignd migrate" in refused.stderr

    for _ in range(2):
        migrated = subprocess.run(
            [*run, "migrate", "--config", str(config)], capture_output=True, text=True, timeout=60
        )
        assert migrated.returncode == 0, migrated.stderr
    connection = await db.connect(DatabaseConfig(url=url))  # type: ignore[arg-type]
    try:
        assert await connection.fetchval("SELECT count(*) FROM campaignd.schema_migrations") == SCHEMA_VERSION
        # migrate also registers the configured senders, so a host can insert campaigns at once.
        assert await connection.fetchval("SELECT provider FROM campaignd.senders WHERE id = 'sms'") == "http"
    finally:
        await connection.close()


async def test_completion_refuses_while_a_retry_is_scheduled(conn: asyncpg.Connection) -> None:
    """The completion statement itself, not only the daemon around it, refuses early completion."""
    from campaignd.sql import QUERIES
    from tests.conftest import create_campaign

    campaign_id = await create_campaign(conn, "sms", 2)
    token = await hold_lane(conn, "sms")
    await conn.execute(
        "UPDATE campaignd.recipients SET state = 'sent' WHERE id = (SELECT min(id) FROM campaignd.recipients)"
    )
    await conn.execute(
        "UPDATE campaignd.recipients SET next_attempt_at = now() + interval '1 hour', attempts = 1"
        " WHERE id = (SELECT max(id) FROM campaignd.recipients)"
    )
    assert await conn.fetchrow(QUERIES["complete_campaign"], *token, campaign_id) is None
    await conn.execute("UPDATE campaignd.recipients SET state = 'failed' WHERE state = 'pending'")
    # A stale token (another owner's epoch) cannot complete it either.
    assert await conn.fetchrow(QUERIES["complete_campaign"], "sms", "me", token[2] - 1, campaign_id) is None
    assert await conn.fetchrow(QUERIES["complete_campaign"], *token, campaign_id) is not None


async def test_a_pause_applies_only_to_the_status_its_lane_saw(conn: asyncpg.Connection) -> None:
    """Every change of status counts, whoever makes it (a host's own UPDATE here); a lane's
    pause carries the count it saw and applies only while it holds, so a pause written again
    after its reply was lost cannot undo a resume that came in between."""
    from campaignd.sql import QUERIES
    from tests.conftest import create_campaign

    campaign_id = await create_campaign(conn, "sms", 2)
    token = await hold_lane(conn, "sms")
    seen = await conn.fetchval("SELECT status_changes FROM campaignd.campaigns WHERE id = $1", campaign_id)
    # Writes that leave the status as it is do not count.
    await conn.execute(
        "UPDATE campaignd.campaigns SET status = 'sending', name = 'renamed' WHERE id = $1", campaign_id
    )
    assert seen == 1, "draft -> sending"
    row = await conn.fetchrow(QUERIES["pause_campaign"], *token, campaign_id, "breaker", seen)
    assert row is not None and row["paused"]
    # Resumed by the host, then the same pause again (its first reply lost): it stands down,
    # and says what it found.
    await conn.execute(
        "UPDATE campaignd.campaigns SET status = 'sending', status_reason = NULL WHERE id = $1", campaign_id
    )
    again = await conn.fetchrow(QUERIES["pause_campaign"], *token, campaign_id, "breaker", seen)
    assert again is not None and not again["paused"] and again["status"] == "sending"
    assert (
        await conn.fetchval("SELECT status_changes FROM campaignd.campaigns WHERE id = $1", campaign_id)
        == seen + 2
    )
    # The count the lane sees now pauses it; another lane's token does not.
    now_seen = seen + 2
    stale = ("sms", "me", token[2] - 1)
    assert not (await conn.fetchrow(QUERIES["pause_campaign"], *stale, campaign_id, "breaker", now_seen))[
        "paused"
    ]
    assert (await conn.fetchrow(QUERIES["pause_campaign"], *token, campaign_id, "breaker", now_seen))[
        "paused"
    ]
    # A retry of a pause that did apply finds it paused with its own reason.
    retried = await conn.fetchrow(QUERIES["pause_campaign"], *token, campaign_id, "breaker", now_seen)
    assert retried is not None and not retried["paused"]
    assert (retried["status"], retried["status_reason"]) == ("paused", "breaker")


async def hold_lane(conn: asyncpg.Connection, sender_id: str) -> tuple[str, str, int]:
    """Take the sender's lane as a daemon would; returns its token (sender, owner, epoch)."""
    epoch = await conn.fetchval(
        "UPDATE campaignd.senders SET lease_owner = 'me', lease_epoch = lease_epoch + 1,"
        " lease_expires_at = now() + interval '1 minute' WHERE id = $1 RETURNING lease_epoch",
        sender_id,
    )
    assert epoch is not None
    return (sender_id, "me", epoch)
