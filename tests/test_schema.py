"""The schema contract: migrations are idempotent, concurrent-safe, and the daemon refuses an
unmigrated database."""

from __future__ import annotations

import argparse
import asyncio
import functools
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest
import structlog

from campaignd import db, schema
from campaignd.config import DatabaseConfig, load_settings
from campaignd.schema import SchemaNotReady, current_version, migrate, require_current
from campaignd.sql import MIGRATIONS, QUERIES, SCHEMA_VERSION
from tests.conftest import daemon_config, hold_lane, with_database


async def fresh_database(pg_url: str, name: str) -> str:
    admin = await asyncpg.connect(pg_url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    return with_database(pg_url, name)


async def database_at(pg_url: str, name: str, version: int, *, encoding: str = "UTF8") -> str:
    """A new database whose schema is at an older ``version``, as a host that has not upgraded
    yet has it: migrations 1..version applied and recorded as `campaignd migrate` does."""
    admin = await asyncpg.connect(pg_url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.execute(
            f"CREATE DATABASE {name} TEMPLATE template0 ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C'"
        )
    finally:
        await admin.close()
    url = with_database(pg_url, name)
    connection = await asyncpg.connect(url)
    try:
        async with connection.transaction():
            await connection.execute(QUERIES["migrations_bootstrap"])
            for migration in MIGRATIONS[:version]:
                await connection.execute(migration.sql)
                await connection.execute(QUERIES["migrations_record"], migration.version, migration.name)
    finally:
        await connection.close()
    return url


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


# The body migration 011 creates (prosrc), as 009 did with [[:space:]]: every database that
# can hold the non-breaking space gets it, whatever its encoding.
ADDRESS_KEY_WITH_NBSP = r"""
    SELECT CASE
        WHEN phone AND char_length(btrim(address, E' \t\n\r\f\013')) <= 64
             AND address ~ '^[ \t\n\r\f\v]*\+?[0-9 \u00a0.()/-]*[ \t\n\r\f\v]*$'
        -- E'' strings know no \v: the vertical tab is \013.
        THEN translate(address, E'+ \t\n\r\f\013\u00a0.()/-', '')
        ELSE btrim(address)
    END
"""


async def test_migrations_9_and_11_upgrade_every_server_encoding(pg_url: str) -> None:
    """An encoding without the non-breaking space (SQL_ASCII, EUC_JP) could not parse its
    escape, and such a database could never upgrade past 8."""
    for encoding, has_nbsp in (("UTF8", True), ("LATIN1", True), ("SQL_ASCII", False), ("EUC_JP", False)):
        url = await database_at(pg_url, f"migrate_9_{encoding.lower()}", 8, encoding=encoding)
        connection = await db.connect(DatabaseConfig(url=url))  # type: ignore[arg-type]
        try:
            assert await migrate(connection) == list(range(9, SCHEMA_VERSION + 1)), encoding
            key = "SELECT campaignd.address_key($1, $2)"
            assert await connection.fetchval(key, " +1 (555) 000-1111 ", True) == "15550001111"
            assert await connection.fetchval(key, " a b ", False) == "a b"
            body = await connection.fetchval("SELECT prosrc FROM pg_proc WHERE proname = 'address_key'")
            if has_nbsp:
                assert body == ADDRESS_KEY_WITH_NBSP, encoding
                assert await connection.fetchval(key, "+1\u00a0555", True) == "1555"
            else:
                assert "u00a0" not in body, encoding
            # Inlined (one expression, no SET): a plan shows the expression, not a function call.
            plan = await connection.fetchval(
                "EXPLAIN (VERBOSE, FORMAT JSON)"
                " SELECT campaignd.address_key(address, true) FROM campaignd.recipients"
            )
            assert "address_key" not in str(plan), encoding
        finally:
            await connection.close()


# Migrations that wait for a lock, scaled down: a test holds a table, the migration waits for
# it this long at a time and gives up after the bound.
LOCK_TIMEOUT = 0.2
# The migration these tests hold up: it alters campaignd.recipients (later ones may not).
LOCKING_MIGRATION = 10


def quick_backoff() -> db.Backoff:
    return db.Backoff(first=0.05, cap=0.2)


async def hold_recipients(url: str) -> tuple[asyncpg.Connection, asyncpg.transaction.Transaction]:
    """A host's transaction that has read campaignd.recipients and stays open: migration 10
    (ALTER TABLE recipients) cannot take its lock until it ends."""
    holder = await asyncpg.connect(url)
    transaction = holder.transaction()
    await transaction.start()
    await holder.execute("LOCK TABLE campaignd.recipients IN ACCESS SHARE MODE")
    return holder, transaction


async def test_a_migration_waiting_for_a_table_lets_its_readers_through_then_completes(
    pg_url: str,
) -> None:
    url = await database_at(pg_url, "migrate_waits", LOCKING_MIGRATION - 1)
    holder, held = await hold_recipients(url)
    reader = await asyncpg.connect(url)  # no lock_timeout: it waits as long as it is made to
    migrator = await db.connect(DatabaseConfig(url=url))  # type: ignore[arg-type]
    session_lock_timeout = await migrator.fetchval("SHOW lock_timeout")
    try:
        with structlog.testing.capture_logs() as logs:
            migration = asyncio.create_task(
                migrate(
                    migrator,
                    lock_timeout_seconds=LOCK_TIMEOUT,
                    give_up_after_seconds=60,
                    backoff=quick_backoff(),
                )
            )
            # The reads a daemon and a host make while the migration waits: each is held at most
            # about one lock_timeout (the migration's request queued ahead of it), never the
            # session's 5 s.
            slowest = 0.0
            started = time.monotonic()
            while time.monotonic() - started < 1.5:
                before = time.monotonic()
                await reader.fetchval("SELECT count(*) FROM campaignd.recipients")
                slowest = max(slowest, time.monotonic() - before)
                await asyncio.sleep(0.01)
            assert slowest < LOCK_TIMEOUT + 0.6, slowest
            assert not migration.done(), migration
            assert await reader.fetchval(QUERIES["schema_version"]) == LOCKING_MIGRATION - 1

            await held.commit()
            assert await asyncio.wait_for(migration, 10) == list(range(LOCKING_MIGRATION, SCHEMA_VERSION + 1))
        waits = [entry for entry in logs if entry["event"] == "migration_waiting_for_lock"]
        assert waits and all(entry["version"] == LOCKING_MIGRATION for entry in waits)
        assert [entry["attempt"] for entry in waits] == list(range(1, len(waits) + 1))
        assert await current_version(reader) == SCHEMA_VERSION
        # The session's own lock_timeout is back once the migration has committed.
        assert await migrator.fetchval("SHOW lock_timeout") == session_lock_timeout
    finally:
        for connection in (migrator, reader, holder):
            await connection.close()


async def test_a_migration_that_cannot_take_its_lock_gives_up_with_nothing_applied(pg_url: str) -> None:
    url = await database_at(pg_url, "migrate_gives_up", LOCKING_MIGRATION - 1)
    holder, _held = await hold_recipients(url)
    migrator = await db.connect(DatabaseConfig(url=url))  # type: ignore[arg-type]
    try:
        started = time.monotonic()
        with pytest.raises(schema.MigrationLockTimeout) as raised:
            await migrate(
                migrator,
                lock_timeout_seconds=LOCK_TIMEOUT,
                give_up_after_seconds=1.0,
                backoff=quick_backoff(),
            )
        assert time.monotonic() - started < 5
        message = str(raised.value)
        assert message.startswith(f"could not take a lock for migration {LOCKING_MIGRATION} (")
        assert f"nothing was applied, the schema is still at version {LOCKING_MIGRATION - 1}" in message
        assert await current_version(migrator) == LOCKING_MIGRATION - 1
        assert not await migrator.fetchval(
            "SELECT count(*) FROM pg_constraint WHERE conrelid = 'campaignd.recipients'::regclass"
            " AND conname = 'recipients_id_claimable'"
        )
    finally:
        await migrator.close()
        await holder.close()


async def test_cli_migrate_says_in_one_line_that_a_lock_could_not_be_taken(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not "the database is unreachable (LockNotAvailableError ...)": the database answered."""
    from campaignd.cli import EXIT_FAILURE, _cmd_migrate

    url = await database_at(pg_url, "migrate_cli_gives_up", LOCKING_MIGRATION - 1)
    holder, _held = await hold_recipients(url)
    config = daemon_config(tmp_path, url, {"sms": {"url": "http://127.0.0.1:9/send"}})
    # The command's own bound is a minute; the same command, with the test's bound.
    monkeypatch.setattr(
        schema,
        "migrate",
        functools.partial(
            schema.migrate,
            lock_timeout_seconds=LOCK_TIMEOUT,
            give_up_after_seconds=0.5,
            backoff=quick_backoff(),
        ),
    )
    try:
        with structlog.testing.capture_logs():
            exit_code = await _cmd_migrate(load_settings(config), argparse.Namespace())
    finally:
        await holder.close()
    assert exit_code == EXIT_FAILURE
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"campaignd: could not take a lock for migration {LOCKING_MIGRATION} (")
    assert "nothing was applied" in lines[0]


async def test_migration_10_refuses_recipient_ids_the_claims_cannot_reach(pg_url: str) -> None:
    """Claims walk ids from 0 up to below the bigint maximum: a recipient a host wrote at 0, below
    it or at the maximum was never claimed, and its campaign stayed 'sending' forever."""
    from tests.conftest import create_campaign

    url = await database_at(pg_url, "migrate_10", 9)
    connection = await db.connect(DatabaseConfig(url=url))  # type: ignore[arg-type]
    try:
        campaign_id = await create_campaign(connection, "sms", 3, start=False)
        prepared = await create_campaign(connection, "sms", 0, start=False, name="prepared")
        await connection.execute(
            "UPDATE campaignd.campaigns SET prepared_at = now(), total_count = 2, skipped_count = 0"
            " WHERE id = $1",
            prepared,
        )
        insert = "INSERT INTO campaignd.recipients (id, campaign_id, address) VALUES ($1, $2, '+15550001111')"
        # Written before the upgrade: renumbered above every id in use (the host's own 5,000
        # included), so that they are claimed and can be updated under the new rule.
        for unreachable in (0, -5, 9223372036854775807, 5000):
            await connection.execute(insert, unreachable, campaign_id)
        for unreachable in (-9, -7):
            await connection.execute(insert, unreachable, prepared)

        assert await migrate(connection) == list(range(10, SCHEMA_VERSION + 1))
        assert await current_version(connection) == SCHEMA_VERSION
        rows = await connection.fetch(
            "SELECT id, campaign_id, state, error_code, error_message FROM campaignd.recipients ORDER BY id"
        )
        assert [r["id"] for r in rows] == [1, 2, 3, 5000, 5001, 5002, 5003, 5004, 5005]
        # Not yet prepared: checked by the preparation with the rest, then sent.
        draft = [(r["state"], r["error_code"]) for r in rows if str(r["campaign_id"]) == campaign_id]
        assert draft == [("pending", None)] * 7
        # Prepared without them: never checked against the rest (a duplicate address, say), so
        # never sent; skipped and counted, saying why.
        skipped = [r for r in rows if str(r["campaign_id"]) == prepared]
        assert [(r["state"], r["error_code"]) for r in skipped] == [("skipped", "unreachable_id")] * 2
        assert skipped[0]["error_message"].startswith("written with id -9, which claims cannot reach")
        assert (
            await connection.fetchval("SELECT skipped_count FROM campaignd.campaigns WHERE id = $1", prepared)
            == 2
        )
        # The identity sequence goes on above them.
        fresh = await connection.fetchval(
            "INSERT INTO campaignd.recipients (campaign_id, address)"
            " VALUES ($1, '+15550003333') RETURNING id",
            campaign_id,
        )
        assert fresh == 5006
        # Every row now satisfies the rule: it can be validated, and any row updated.
        await connection.execute(
            "ALTER TABLE campaignd.recipients VALIDATE CONSTRAINT recipients_id_claimable"
        )
        await connection.execute("UPDATE campaignd.recipients SET state = 'skipped'")

        for unreachable in (0, -5, -9223372036854775808, 9223372036854775807):
            with pytest.raises(asyncpg.CheckViolationError, match="recipients_id_claimable"):
                await connection.execute(insert, unreachable, campaign_id)
            with pytest.raises(asyncpg.CheckViolationError, match="recipients_id_claimable"):
                await connection.copy_records_to_table(
                    "recipients",
                    schema_name="campaignd",
                    columns=["id", "campaign_id", "address"],
                    records=[(unreachable, campaign_id, "+15550001111")],
                )
        # The ids campaignd numbers itself, and any other a host writes between the bounds.
        await connection.execute(
            "INSERT INTO campaignd.recipients (campaign_id, address) VALUES ($1, '+15550002222')", campaign_id
        )
        for reachable in (1000, 9223372036854775806):
            await connection.execute(insert, reachable, campaign_id)
    finally:
        await connection.close()


async def test_migration_10_with_no_room_to_renumber_says_so_and_applies_nothing(pg_url: str) -> None:
    from tests.conftest import create_campaign

    url = await database_at(pg_url, "migrate_10_full", 9)
    connection = await db.connect(DatabaseConfig(url=url))  # type: ignore[arg-type]
    try:
        campaign_id = await create_campaign(connection, "sms", 0, start=False)
        insert = "INSERT INTO campaignd.recipients (id, campaign_id, address) VALUES ($1, $2, '+15550001111')"
        for id_ in (9223372036854775806, 0, -1):
            await connection.execute(insert, id_, campaign_id)

        with pytest.raises(asyncpg.RaiseError, match="no room above the highest id in use"):
            await migrate(connection)
        assert await current_version(connection) == 9
        ids = [r["id"] for r in await connection.fetch("SELECT id FROM campaignd.recipients ORDER BY id")]
        assert ids == [-1, 0, 9223372036854775806]
    finally:
        await connection.close()


async def test_cli_migrate_says_in_one_line_why_a_migration_refused_the_data(
    pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from campaignd.cli import EXIT_FAILURE, _cmd_migrate
    from tests.conftest import create_campaign

    url = await database_at(pg_url, "migrate_cli_refused", 9)
    connection = await db.connect(DatabaseConfig(url=url))  # type: ignore[arg-type]
    try:
        campaign_id = await create_campaign(connection, "sms", 0, start=False)
        for id_ in (9223372036854775806, 0):
            await connection.execute(
                "INSERT INTO campaignd.recipients (id, campaign_id, address) VALUES ($1, $2, 'x')",
                id_,
                campaign_id,
            )
    finally:
        await connection.close()
    config = daemon_config(tmp_path, url, {"sms": {"url": "http://127.0.0.1:9/send"}})

    with structlog.testing.capture_logs():
        exit_code = await _cmd_migrate(load_settings(config), argparse.Namespace())

    assert exit_code == EXIT_FAILURE
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("campaignd: migration 10: 1 recipients have ids the claims cannot reach")
    assert "nothing was applied. Give those recipients ids between 1 and" in lines[0]


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
