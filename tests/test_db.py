"""Every daemon session carries its guards and planner setting."""

from __future__ import annotations

import asyncpg


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
        "idle_in_transaction_session_timeout": "1min",
        # Generic plans for the unnest batch statements can go quadratic after an ANALYZE.
        "plan_cache_mode": "force_custom_plan",
        "application_name": "campaignd",
    }


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
