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
