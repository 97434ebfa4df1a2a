"""Every daemon session carries its guards and planner setting."""

from __future__ import annotations

import asyncpg
import pytest

from campaignd import db
from campaignd.config import DatabaseConfig


async def test_sessions_have_timeouts_and_plan_per_execution(conn: asyncpg.Connection) -> None:
    settings = {
        name: await conn.fetchval(f"SELECT current_setting('{name}')")
        for name in (
            "statement_timeout",
            "lock_timeout",
            "idle_in_transaction_session_timeout",
            "plan_cache_mode",
            "application_name",
        )
    }
    assert settings == {
        "statement_timeout": "30s",
        "lock_timeout": "5s",
        "idle_in_transaction_session_timeout": "15s",
        # Generic plans for the unnest batch statements can go quadratic after an ANALYZE.
        "plan_cache_mode": "force_custom_plan",
        "application_name": "campaignd",
    }


async def test_sql_with_backslashes_works_in_a_database_set_to_the_old_string_syntax(
    database_url: str, conn: asyncpg.Connection
) -> None:
    # A database (or role) left at standard_conforming_strings = off reads backslashes in
    # string literals as escapes; address_key's regexes, parsed where they are called, then
    # failed on every call ("quantifier operand invalid") and the sender's lane crash-looped.
    name = await conn.fetchval("SELECT current_database()")
    await conn.execute(f"ALTER DATABASE {name} SET standard_conforming_strings = off")
    legacy = await asyncpg.connect(database_url)
    try:
        assert await legacy.fetchval("SHOW standard_conforming_strings") == "off"
    finally:
        await legacy.close()

    session = await db.connect(DatabaseConfig(url=database_url))  # type: ignore[arg-type]
    try:
        keys = await session.fetch(
            "SELECT campaignd.address_key(a, true) AS key FROM unnest($1::text[]) AS a",
            ["+1 (555) 000-1111", "15550001111", "+1\u00a0555"],
        )
    finally:
        await session.close()

    # The third is written with a non-breaking space, one of the separators people write.
    assert [row["key"] for row in keys] == ["15550001111", "15550001111", "1555"]


async def test_a_connection_left_mid_operation_by_a_vanishing_server_is_retried_not_fatal() -> None:
    import structlog

    from campaignd.db import Backoff, is_transient_db_error

    # What asyncpg raised in the chaos suite when a daemon thawed from SIGSTOP as the server
    # shut down; raised, it ended the lane manager and the daemon with exit code 1.
    error = asyncpg.exceptions.InternalClientError(
        "cannot switch to state 12; another operation (2) is in progress"
    )

    assert is_transient_db_error(error)
    await Backoff(first=0.01).wait_after(error, structlog.get_logger("test"), "acquire_lanes")


async def test_a_connection_setting_the_client_refuses_is_raised_not_retried() -> None:
    import structlog

    from campaignd.db import Backoff, is_transient_db_error

    # An InterfaceError like the transient ones, but retrying a bad sslmode never ends: the
    # daemon logged database_unavailable every few seconds and never exited with code 2.
    error = asyncpg.exceptions.ClientConfigurationError("`sslmode` parameter must be one of: ...")

    assert not is_transient_db_error(error)
    with pytest.raises(asyncpg.exceptions.ClientConfigurationError):
        await Backoff(first=0.01).wait_after(error, structlog.get_logger("test"), "connect")
